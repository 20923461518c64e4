#!/usr/bin/env bash
# The accuracy table of the README: the whole validate loop on the tiny CPU example, async mode, with 1 and 2
# rollout workers and staleness bounds 1 and 4 (each: 3 pilot runs with seeds of their own, profile, predict, then
# 3 measured runs in each mode, alternating, compare). Runs of 160 steps (the example's 80 doubled), 3 of each kind:
# this shared 2-core machine's speed wanders by ~9 % over half a minute (slow spells of 10-60 s, ~25 % slower), and a
# run's response lengths depend on its seed by ~5 %, so one run of each kind is one noisy draw.
#   bash results/validate-tiny-cpu/run.sh   (from the repo root; ~50 minutes on 2 cores, nothing else running)
# It starts with ~4 minutes of training that is not measured: in the last three runs of this script the first
# cell's profile, taken ~4-7 min after the start, timed the machine slower than that cell's own runs after it
# (in-run learner x0.81-0.86 of the profile; the other cells near x1), as if the VM ran slow in its first minutes
# of load.
source "$(dirname "$0")/cells.sh"
warm_up examples/tiny_cpu.yaml 1200
for w in 1 2; do
  for s in 1 4; do
    cell "w$w-s$s" examples/tiny_cpu.yaml --set cluster.rollout_workers=$w --set pipeline.max_staleness=$s \
      --set run.steps=160 --repeats 3
  done
done
python3 results/validate-tiny-cpu/table.py > results/validate-tiny-cpu/table.md
cat results/validate-tiny-cpu/table.md
