#!/usr/bin/env bash
# Rows of the accuracy table for other systems' staleness control (sim/engine/policies.py), on the tiny CPU example
# with one rollout worker: the whole validate loop (3 pilots, profile, predict, 3 measured runs in each mode,
# alternating, compare), runs of 160 steps, as run.sh does for the rows of stalecast's own rule.
#   areal:            max_head_offpolicyness 2, workers take weights in flight (AReaL's default)
#   verl_fully_async: its defaults (staleness_threshold 0.1, a weight sync every 4 learner steps) with partial rollout
#   prime_rl:         max_async_level 2, in-flight weight updates
#   bash results/validate-tiny-cpu/policies.sh   (from the repo root; ~40 minutes on 2 cores, nothing else running)
source "$(dirname "$0")/cells.sh"
warm_up examples/tiny_cpu.yaml 1200
run() {  # name, then --set overrides; interruptible null: the policy's system decides (all three: in flight)
  local name=$1
  shift
  cell "policy-$name" examples/tiny_cpu.yaml --set run.steps=160 --repeats 3 --set pipeline.interruptible=null "$@"
}
run areal --set pipeline.staleness_control=areal --set 'pipeline.areal={max_head_offpolicyness: 2}'
run verl_fully_async --set pipeline.staleness_control=verl_fully_async
run prime_rl --set pipeline.staleness_control=prime_rl --set 'pipeline.prime_rl={max_async_level: 2}'
python3 results/validate-tiny-cpu/table.py > results/validate-tiny-cpu/table.md
cat results/validate-tiny-cpu/table.md
