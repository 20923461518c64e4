"""Rollout idle of the policy cells, recomputed after the fix of runs laid end to end (sim.metrics.rollout_idle: a
group counts within its own run). The cells' reports were made before the fix, where a group still generating at
the end of one predicted run counted as busy through every later run. This rebuilds each cell's prediction as
`stalecast validate` made it (the cell's profile, its pilots' groups replayed in order, seeds 0, 2, 4) and reads the
measured runs from the cell's folders; samples/s is printed beside as a check that the rebuild is the report's.

    python3 results/validate-tiny-cpu/recompute_idle.py   (from the repo root; a few seconds, after policies.sh:
    it reads the run folders policies.sh leaves in each cell, which git ignores)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from sim.config import load_config  # noqa: E402
from sim.metrics import compute_metrics  # noqa: E402
from sim.trace import read_trace  # noqa: E402
from validate.loop import (end_to_end, lengths_from, measured_seeds, predict_runs,  # noqa: E402
                           prediction_config, run_dir)

CELLS = {"areal": {"pipeline.staleness_control": "areal", "pipeline.areal": {"max_head_offpolicyness": 2}},
         "verl_fully_async": {"pipeline.staleness_control": "verl_fully_async"},
         "prime_rl": {"pipeline.staleness_control": "prime_rl", "pipeline.prime_rl": {"max_async_level": 2}}}

print("| policy | idle/rollout predicted / measured, in the report | after the fix | samples/s predicted, rebuilt / "
      "report |")
print("|---|---|---|---|")
for name, overrides in CELLS.items():
    cell = HERE / f"policy-{name}"
    report = {r["metric"]: r for r in json.loads((cell / "report.json").read_text())["rows"]}
    cfg = load_config(HERE.parents[1] / "examples" / "tiny_cpu.yaml",
                      {"run.steps": 160, "pipeline.interruptible": None, **overrides})
    pilots = [lengths_from(read_trace(cell / run_dir("pilot", r) / "trace")) for r in range(3)]
    predicted = predict_runs(prediction_config(cfg, cell / "profile.yaml"), measured_seeds(cfg, 3), pilots)
    measured = end_to_end([read_trace(cell / run_dir("measured", r) / "trace") for r in range(3)])
    mp, mm = compute_metrics(predicted), compute_metrics(measured)
    idle = report["idle/rollout"]
    print(f"| {name} | {idle['predicted']:.3f} / {idle['measured']:.3f} | {mp['idle/rollout']:.3f} / "
          f"{mm['idle/rollout']:.3f} | {mp['throughput/samples_per_s']:.1f} / "
          f"{report['throughput/samples_per_s']['predicted']:.1f} |")
