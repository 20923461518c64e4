#!/usr/bin/env bash
# The accuracy table of the README: the whole validate loop on the tiny CPU example, async mode, with 1 and 2
# rollout workers and staleness bounds 1 and 4 (each: pilot run with another seed, profile, predict, train async +
# sync, compare). Runs of 160 steps (the example's 80 doubled): this shared 2-core machine's speed wanders by ~9 % over
# 5 seconds and ~4 % over a minute, so a run must last long enough to average it out (~30 s async, ~40 s sync).
#   bash results/validate-tiny-cpu/run.sh   (from the repo root; ~15 minutes on 2 cores, nothing else running)
set -u
cd "$(dirname "$0")/../.."
for w in 1 2; do
  for s in 1 4; do
    stalecast validate examples/tiny_cpu.yaml --set cluster.rollout_workers=$w --set pipeline.max_staleness=$s \
      --set run.steps=160 --out "results/validate-tiny-cpu/w$w-s$s" > "results/validate-tiny-cpu/w$w-s$s.log" 2>&1
    echo "workers $w bound $s: exit $?"
  done
done
python3 results/validate-tiny-cpu/table.py > results/validate-tiny-cpu/table.md
cat results/validate-tiny-cpu/table.md
