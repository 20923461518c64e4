#!/usr/bin/env bash
# The small-KV-budget row of the accuracy table: the whole validate loop on examples/tiny_cpu_longtail.yaml with each
# rollout worker held to 400 KV tokens (one group at its longest needs 4 x (43 + 48) = 364), so that workers evict
# sequences (preempt_recompute) and re-prefill them; evictions predicted against measured (kv/preempted_share,
# within 0.10), beside throughput and staleness. Cells as continuous.sh: 3 pilot runs, a fresh profile, 3 measured
# runs per mode, W1 <= 0.2 versions.
#   bash results/validate-tiny-cpu/kv.sh   (from the repo root; ~20 minutes on 2 cores, nothing else running)
source "$(dirname "$0")/cells.sh"
warm_up examples/tiny_cpu_longtail.yaml 300
cell kv-w3-s4-400 examples/tiny_cpu_longtail.yaml --set run.steps=100 --repeats 3 --tol-w1 0.2 \
  --set hardware.memory.kv_budget_tokens=400
python3 results/validate-tiny-cpu/table.py 'kv-*' > results/validate-tiny-cpu/kv.md
cat results/validate-tiny-cpu/kv.md
