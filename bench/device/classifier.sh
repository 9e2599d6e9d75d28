#!/usr/bin/env bash
# Device call 1 (see BENCHMARKS.md): the classifier presets on one GPU with bf16 autocast,
# channels_last and the data on the device: `fast` (10 epochs) in-process, `best` through Ray
# Train with use_gpu (time to 94%), the note's `seed` recipe, and a residual variant; then the
# bf16 matmul peak. Every run is capped by `timeout` so the call ends inside its limit.
# Results: $OUT/<run>.tgz (final checkpoint, history, REPORT.md, plots).
cd "$(dirname "$0")/../.."
. bench/device/env.sh
if [ "$DEVICE" = cuda ] && [ -d .gpu/ray ] && [ ! -f /tmp/site/ray/.ok ]; then  # Ray 2.60 minus Java/RLlib/Serve/UI
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/ray/*.whl
  python3 - <<'PY' && touch /tmp/site/ray/.ok
import os, zipfile
z = zipfile.ZipFile(".gpu/ray/ray-min.zip")
for i in z.infolist():
    p = z.extract(i, "/tmp/site")
    mode = (i.external_attr >> 16) & 0o777
    if mode:
        os.chmod(p, mode)
PY
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, pydantic, mve.train; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
HAVE_RAY=
[ "$DEVICE" = cuda ] && python3 -c "import ray, ray.train.torch; print('ray', ray.__version__)" && HAVE_RAY=1
BUDGET=${BUDGET:-300}
show() {
  python3 - "$1" <<'PY'
import json, sys
name = sys.argv[1]
try:
    rows = [json.loads(l) for l in open(f"/tmp/runs/{name}/history.jsonl")]
except OSError:
    try:
        rows = json.load(open(f"/tmp/runs/{name}/history.json"))
    except OSError:
        rows = []
for r in rows:
    print(name, r["epoch"], round(r.get("val_accuracy", 0), 4), round(r.get("train_time_s", 0), 1),
          int(r.get("train_images_per_s", 0)))
PY
}
run() {  # run NAME SECONDS ARGS... (ARGS after the mve train subcommand)
  local name=$1 lim=$2; shift 2
  local left=$(( BUDGET - $(elapsed) ))
  [ "$left" -lt 40 ] && { echo "skip $name (budget)"; return; }
  [ "$lim" -gt "$left" ] && lim=$left
  timeout "$lim" python3 -m mve_cli train classifier --data "$DATA" --out "/tmp/runs/$name" \
    --set precision=bf16 "$@" $EXTRA > "/tmp/runs/$name.log" 2>&1
  echo "== $name rc=$? at $(elapsed)s"; tail -2 "/tmp/runs/$name.log"
  show "$name"; pack "$name"
}
run fast 100 --local --device "$DEVICE" --preset fast --set channels_last=true
if [ -n "$HAVE_RAY" ] && [ "$DEVICE" = cuda ]; then
  run best-ray 200 --preset best --gpu --workers 1 --cpus-per-worker 8 \
    --set channels_last=true --storage /tmp/ray-results
fi
if [ ! -f /tmp/runs/best-ray/model.safetensors ]; then  # no Ray here, or it failed
  run best 200 --local --device "$DEVICE" --preset best --set channels_last=true
fi
run seed 70 --local --device "$DEVICE" --preset seed
run best-res3 200 --local --device "$DEVICE" --preset best --set channels_last=true \
  --set model.convs_per_group=3 --set "model.widths=[48,128,144]"
[ "$DEVICE" = cuda ] && python3 - <<'PY'
import time
import torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn_like(a)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(10):
    a @ b
torch.cuda.synchronize()
dt = (time.perf_counter() - t) / 10
print(f"bf16 matmul 8192^3: {2 * 8192**3 / dt / 1e12:.0f} TFLOP/s")
PY
tar czf "$OUT/logs.tgz" -C /tmp/runs $(cd /tmp/runs && ls ./*.log) 2>/dev/null
echo "done at $(elapsed)s"
