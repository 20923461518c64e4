#!/usr/bin/env bash
# The three-worker long-tail cell of continuous.sh with every run starting from one policy (real.init_seed=0: the
# same random weights and warm start for the pilots, seeds 1, 3, 5, and the measured runs, seeds 0, 2, 4, as runs
# from one checkpoint start), the same loop (3 pilots, a fresh profile, 3 measured runs in each mode, W1 <= 0.2).
#   bash results/validate-tiny-cpu/shared_init.sh   (from the repo root; ~42 minutes on 2 cores, nothing else running)
source "$(dirname "$0")/cells.sh"
warm_up examples/tiny_cpu_longtail.yaml 100
cell shared-init-w3-s4 examples/tiny_cpu_longtail.yaml --set run.steps=100 --repeats 3 --tol-w1 0.2 \
  --set real.init_seed=0
python3 results/validate-tiny-cpu/table.py 'shared-init-*' > results/validate-tiny-cpu/shared_init.md
cat results/validate-tiny-cpu/shared_init.md
