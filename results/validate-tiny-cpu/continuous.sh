#!/usr/bin/env bash
# The continuous-batching rows of the accuracy table: the whole validate loop on examples/tiny_cpu_longtail.yaml
# (3 rollout workers batching continuously on the fast engine, answers of median 4 and p99 ~33 tokens, bound 4),
# async mode, each cell: 3 pilot runs (seeds 1, 3, 5) for the lengths, a fresh profile, then 3 measured runs in each
# mode (seeds 0, 2, 4, modes alternating), compare; the staleness distribution is judged by W1 <= 0.2 versions.
#   bash results/validate-tiny-cpu/continuous.sh   (from the repo root; ~50 minutes on 2 cores, nothing else running)
source "$(dirname "$0")/cells.sh"
warm_up examples/tiny_cpu_longtail.yaml 300
run() {  # name, then --set overrides
  local name=$1
  shift
  cell "continuous-$name" examples/tiny_cpu_longtail.yaml --set run.steps=100 --repeats 3 --tol-w1 0.2 "$@"
}
run w3-s4
run w2-s4 --set cluster.rollout_workers=2
python3 results/validate-tiny-cpu/table.py 'continuous-*' > results/validate-tiny-cpu/continuous.md
cat results/validate-tiny-cpu/continuous.md
