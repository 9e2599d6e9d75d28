#!/usr/bin/env bash
# Device call 2 (see BENCHMARKS.md): the final classifier recipes and the VAE on one GPU.
#   1. classifier `fast` (10 epochs) and `best` in-process, bf16 autocast + channels_last;
#   2. the VAE (bench/device/vae.sh), its latent prior, and its metrics incl. Inception FID;
#   3. further classifier variants while time is left.
# Each step is capped by `timeout` inside BUDGET seconds. Results: $OUT/<run>.tgz.
cd "$(dirname "$0")/../.."
. bench/device/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, pydantic, mve.train; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
BUDGET=${BUDGET:-440}
show() {
  python3 - "$1" <<'PY'
import json, sys
name = sys.argv[1]
try:
    rows = [json.loads(l) for l in open(f"/tmp/runs/{name}/history.jsonl")]
except OSError:
    rows = []
keys = ("val_accuracy", "val_psnr", "val_ssim", "val_elbo_bpd")
for r in rows:
    print(name, r["epoch"], *(f"{k[4:]}={r[k]:.4f}" for k in keys if k in r),
          f"t={r.get('train_time_s', 0):.1f}", int(r.get("train_images_per_s", 0)))
PY
}
run() {  # run MODEL NAME SECONDS ARGS...  (ARGS after `mve train MODEL`)
  local model=$1 name=$2 lim=$3; shift 3
  local left=$(( BUDGET - $(elapsed) ))
  [ "$left" -lt 30 ] && { echo "skip $name (budget)"; return 1; }
  [ "$lim" -gt "$left" ] && lim=$left
  timeout "$lim" python3 -m mve_cli train "$model" --local --device "$DEVICE" --data "$DATA" \
    --out "/tmp/runs/$name" --set precision=bf16 "$@" $EXTRA > "/tmp/runs/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc at $(elapsed)s"; tail -2 "/tmp/runs/$name.log"
  show "$name"; pack "$name"
  return $rc
}
run classifier fast 70 --preset fast --set channels_last=true
run classifier best 90 --preset best --set channels_last=true
[ -f bench/device/vae.sh ] && . bench/device/vae.sh
run classifier best-res3 70 --preset best --set channels_last=true \
  --set model.convs_per_group=3 --set "model.widths=[48,128,144]"
run classifier best-nocut 70 --preset best --set channels_last=true \
  --set data.augment.cutout=0 --set data.augment.crop_padding=2
cp /tmp/runs/vae.log /tmp/runs/vae-full.log 2>/dev/null; tar czf "$OUT/logs.tgz" -C /tmp/runs $(cd /tmp/runs && ls ./*.log) 2>/dev/null
echo "done at $(elapsed)s"
