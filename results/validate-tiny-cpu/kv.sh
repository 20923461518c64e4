#!/usr/bin/env bash
# The small-KV-budget row of the accuracy table: the whole validate loop on examples/tiny_cpu.yaml with continuous
# batching, one rollout worker, bound 4 and a KV budget of 160 tokens (one group at its longest needs 4 x (14 + 16) =
# 120; 32 sequences of mean length need ~4x the budget), so the worker admits against the budget and evicts and
# re-prefills sequences (preempt_recompute). Evictions predicted against measured (kv/preempted_share, within
# 0.10) beside the other judged rows. Cell as run.sh: 3 pilot runs, a fresh profile, 3 measured runs per mode.
#   bash results/validate-tiny-cpu/kv.sh   (from the repo root; ~30 minutes on 2 cores, nothing else running)
source "$(dirname "$0")/cells.sh"
warm_up examples/tiny_cpu.yaml 600
cell kv-w1-s4-160 examples/tiny_cpu.yaml --set cluster.batching=continuous --set pipeline.max_staleness=4 \
  --set hardware.memory.kv_budget_tokens=160 --set run.steps=160 --repeats 3
# The same cell without a budget: what the prediction misses that has nothing to do with the KV cache.
cell kvbase-w1-s4 examples/tiny_cpu.yaml --set cluster.batching=continuous --set pipeline.max_staleness=4 \
  --set run.steps=160 --repeats 3
python3 results/validate-tiny-cpu/table.py 'kv*' > results/validate-tiny-cpu/kv.md
cat results/validate-tiny-cpu/kv.md
