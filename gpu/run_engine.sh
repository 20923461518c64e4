#!/usr/bin/env bash
# Device check for the rollout engine: (1) the engine benchmark, decode step time of the fast engine against the
# reference engine and transformers' generate() at 64/256/512 sequences of the 0.5B shape in bf16, in one run
# (benchmarks/test_bench_engine.py); (2) `stalecast validate` on the single-GPU example with continuous batching,
# async against sync, 20 learner steps of up to 256 new tokens (quick profile, a short pilot for the lengths).
# At most ~8 minutes of device time. Run on the lent GPU machine from the repo root, with the wheels its image
# lacks (simpy, pydantic, pytest-benchmark, py-cpuinfo) carried in .whl/:
#   bash gpu/run_engine.sh   (outputs under $OUT, or ./gpu-out when OUT is unset)
# On a CPU it runs the same steps at CPU sizes (the benchmark picks them; SMALL=1 shrinks the validate), to check
# the script itself.
set -u
source "$(dirname "$0")/env.sh"
STEPS=${STEPS:-20}
TOKENS=${TOKENS:-256}
PILOT=${PILOT:-4}
BENCH_LIMIT=${BENCH_LIMIT:-150}
VALIDATE_LIMIT=${VALIDATE_LIMIT:-300}
CONFIG=examples/single_gpu.yaml
SMALL_SET=()
if [ "${SMALL:-0}" = 1 ]; then
  CONFIG=examples/tiny_cpu.yaml
  SMALL_SET=(--set real.warm_start_steps=0 --set cluster.batching=continuous)
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU";
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } \
  2>&1 | tee "$OUT/machine.txt"
timeout "$BENCH_LIMIT" python3 -m pytest -q -p no:cacheprovider benchmarks/test_bench_engine.py --benchmark-only -s \
  --benchmark-json "$OUT/engine.json" 2>&1 | tee "$OUT/engine.log"
echo "engine benchmark: exit ${PIPESTATUS[0]}" | tee -a "$OUT/engine.log"
timeout "$VALIDATE_LIMIT" python3 -m sim.cli validate "$CONFIG" --quick-profile --pilot-steps "$PILOT" \
  --set cluster.batching=continuous --set run.steps="$STEPS" --set workload.max_new_tokens="$TOKENS" \
  "${SMALL_SET[@]}" --out /tmp/val --force 2>&1 | tee "$OUT/validate.log"
echo "validate: exit ${PIPESTATUS[0]}" | tee -a "$OUT/validate.log"
for f in report.md report.json profile.yaml staleness.png throughput.png timeline.png; do
  cp "/tmp/val/$f" "$OUT/" 2>/dev/null
done
