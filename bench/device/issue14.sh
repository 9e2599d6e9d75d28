#!/usr/bin/env bash
# Issue 14 on a lent GPU, one call (rehearse first on the CPU, see recipes14.py's docstring):
#   1. recipes14.py: the distillation teacher, then fast / best / best-distill / muon /
#      best-res3 for seeds 0-4 (interleaved, so a short call still gives a balanced table), then
#      the best recipe on all 50,000 images -> $OUT/issue14/final (a servable checkpoint);
#   2. the final recipe once through Ray Train with --gpu (time to 94%), if Ray is installed.
# BUDGET (seconds, default 780) caps step 1; results: $OUT/issue14/{runs.jsonl,summary.md}.
cd "$(dirname "$0")/../.."
. bench/device/env.sh
BUDGET=${BUDGET:-780}
python3 bench/device/recipes14.py --data "$DATA" --out "$OUT/issue14" --device "$DEVICE" \
  --budget-s "$BUDGET" $EXTRA 2>&1 | tee /tmp/runs/recipes14.log
if python3 -c "import ray.train.torch" 2>/dev/null; then
  timeout 120 python3 -m mve_cli train classifier --preset best --gpu --workers 1 --data "$DATA" \
    --set precision=bf16 --set channels_last=true --out /tmp/runs/ray-gpu > /tmp/runs/ray-gpu.log 2>&1
  echo "== ray-gpu rc=$? at $(elapsed)s"; pack ray-gpu
fi
cp /tmp/runs/recipes14.log "$OUT/issue14/" 2>/dev/null
echo "done at $(elapsed)s"
