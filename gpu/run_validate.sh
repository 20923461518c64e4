#!/usr/bin/env bash
# Device check for issue 4: the whole validate loop on the single-GPU example (quick profile, a 2-step pilot,
# a few steps in async and sync mode). Run on the lent GPU machine from the repo root, wheels in .whl/:
#   bash gpu/run_validate.sh   (outputs under $OUT, or ./gpu-out when OUT is unset)
set -u
source "$(dirname "$0")/env.sh"
STEPS=${STEPS:-4}
TOKENS=${TOKENS:-32}
LIMIT=${LIMIT:-280}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/machine.txt" 2>&1
timeout "$LIMIT" python3 -m sim.cli validate examples/single_gpu.yaml --quick-profile --pilot-steps 2 \
  --set run.steps="$STEPS" --set workload.max_new_tokens="$TOKENS" --out /tmp/val 2>&1 | tee "$OUT/validate.log"
for f in report.md report.json profile.yaml staleness.png throughput.png timeline.png; do
  cp "/tmp/val/$f" "$OUT/" 2>/dev/null
done
