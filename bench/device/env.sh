# Sourced by the device scripts: the lent GPU machine has PyTorch but not mve's small pure-Python
# dependencies, and no network, so they travel as wheels in .gpu/whl (see BENCHMARKS.md).
# Data: the shared archive travels once in .gpu/data and is kept in /tmp/stash while warm.
set -u
export PYTHONUNBUFFERED=1 MVE_CACHE_DIR=/tmp/mvecache
if [ -n "${SKIP_WHEELS:-}" ]; then :
elif [ ! -f /tmp/site/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl && touch /tmp/site/.ok || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}  # appended to every training command (local smoke tests: --limit 2000 ...)
mkdir -p /tmp/stash /tmp/runs
[ -d .gpu/data ] && cp -n .gpu/data/*.tar.gz /tmp/stash/
export DATA=${DATA:-/tmp/stash/cifar10-train-jpeg.tar.gz}
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
mve() { python3 -m mve_cli "$@"; }
# pack NAME: one tarball per run (final checkpoint, history, report, plots; no epoch checkpoints)
pack() { tar czf "$OUT/$1.tgz" -C /tmp/runs --exclude=checkpoints --exclude=training_state.safetensors "$1" "$1.log" 2>/dev/null; }
