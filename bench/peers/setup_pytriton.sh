#!/usr/bin/env bash
# Makes the PyTriton venv that bench/peers/triton_server.py re-executes itself in.
#   bench/peers/setup_pytriton.sh [VENV]        (default /tmp/pytriton-venv)
# nvidia-pytriton 0.7.0 pins numpy<2, so it cannot go into .venv (numpy 2.x); torch, mve,
# serve_app, Pillow etc. come from .venv through a .pth file appended after the venv's own
# site-packages (so the venv's numpy 1.26 and tritonclient win). Same base interpreter as .venv.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${1:-/tmp/pytriton-venv}
base=$("$root/.venv/bin/python" -c 'import sys; print(sys.base_prefix)')/bin/python3
[ -x "$venv/bin/python" ] || "$base" -m venv "$venv"
"$venv/bin/pip" install -q nvidia-pytriton==0.7.0
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
main_site=$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n%s\n' "$main_site" "$root" > "$site/zz_mve_main.pth"
"$venv/bin/python" -c 'import pytriton, torch, mve, serve_app.oip, numpy; print("ok", numpy.__version__, torch.__version__)'
