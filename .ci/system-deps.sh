#!/usr/bin/env bash
# Debian packages the test suite needs beyond Python: headless Chromium and its WebDriver for the
# serving web-page test (tests/integration/test_serve_cli.py), and Redis for the head-node
# failure tests (tests/reliability/test_head_failure.py, GCS fault tolerance). Idempotent and quick when they are
# already installed; run as root (or with sudo available). Called from .ci/run.
set -euo pipefail

PACKAGES=(chromium chromium-driver redis-server)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "system-deps: ${PACKAGES[*]} already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "system-deps: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    SUDO="sudo"
fi
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${missing[@]}"
chromium --version && chromedriver --version
