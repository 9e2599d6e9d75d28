#!/usr/bin/env bash
# Installs Debian's `prometheus` package (brings `prometheus` and `promtool`) for tests/k8s:
# `promtool check rules` / `promtool test rules` and the scrape test against a local Ray.
# Idempotent: does nothing when both binaries are already on PATH. Needs root (or sudo).
# The Debian service is not started (no systemd in CI containers; the test starts its own
# server on a free loopback port with a generated config).
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    echo "prometheus: already installed ($(prometheus --version 2>&1 | head -n1))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "deps-prometheus: need root or sudo to apt-get install prometheus" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101: keep dpkg from starting the prometheus service inside a container.
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod +x "$POLICY"
    CREATED_POLICY=1
fi
cleanup() { if [ "$CREATED_POLICY" = 1 ]; then $SUDO rm -f "$POLICY"; fi; }
trap cleanup EXIT

$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
prometheus --version 2>&1 | head -n1
promtool --version 2>&1 | head -n1
