#!/usr/bin/env bash
# A continuous-batching row admitted by sample: the three-worker long-tail cell of continuous.sh with
# cluster.admission per_sample and 30 slots (groups of 4: admitted by group, two slots would wait for a third),
# the same loop (3 pilots, a fresh profile, 3 measured runs in each mode, W1 <= 0.2).
#   bash results/validate-tiny-cpu/per_sample.sh   (from the repo root; ~32 minutes on 2 cores, nothing else running)
source "$(dirname "$0")/cells.sh"
warm_up examples/tiny_cpu_longtail.yaml 100
cell per-sample-w3-s4 examples/tiny_cpu_longtail.yaml --set run.steps=100 --repeats 3 --tol-w1 0.2 \
  --set cluster.admission=per_sample --set cluster.max_concurrency=30
python3 results/validate-tiny-cpu/table.py 'per-sample-*' > results/validate-tiny-cpu/per_sample.md
cat results/validate-tiny-cpu/per_sample.md
