#!/usr/bin/env bash
# Device check for the single-GPU example (issue 3): simulate it, then train it for real in async and
# sync mode, and keep the summaries. Run on the lent GPU machine from the repo root, with the wheels of
# the packages its image lacks (pydantic, simpy) carried in .whl/:
#   bash gpu/run_single_gpu.sh   (outputs under $OUT, or ./gpu-out when OUT is unset)
set -u
source "$(dirname "$0")/env.sh"
STEPS=${STEPS:-20}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-200}
EXTRA=${EXTRA:-}      # extra train options, e.g. "--set workload.max_new_tokens=256"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; df -h /dev/shm;
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } \
  2>&1 | tee "$OUT/machine.txt"
python3 -m sim.cli simulate examples/single_gpu.yaml --steps "$STEPS" $EXTRA --out /tmp/runs/sim 2>&1 | tee "$OUT/simulate.log"
for mode in async sync; do
  timeout "$TRAIN_TIMEOUT" python3 -m sim.cli train examples/single_gpu.yaml --mode "$mode" --steps "$STEPS" $EXTRA \
    --out "/tmp/runs/$mode" --timeout $((TRAIN_TIMEOUT - 10)) 2>&1 | tee "$OUT/train_$mode.log"
  cp "/tmp/runs/$mode/summary.json" "$OUT/summary_$mode.json" 2>/dev/null
  cp "/tmp/runs/$mode/metrics.jsonl" "$OUT/metrics_$mode.jsonl" 2>/dev/null
done
