"""Where a cell's async step time goes, measured against simulated with the same lengths, from the run folders the
cell kept (git ignores them): for the learner-bound continuous cells, whose s/step the prediction misses.

    python3 results/validate-tiny-cpu/learner_gap.py continuous-w3-s4 [--set KEY=VALUE ...]

Per measured run (async, then sync): the step period and learner step (t_start..t_end) measured, and simulated
with the run's own lengths replayed (the recalibrated prediction); the learner step over the profile's cost at the
step's padded tokens (mean; validate/costs.py `learner_ratios`); padded tokens a step, measured and simulated
(which groups make a batch follows the schedule); and, async, the correlation between a step's ratio and the share
of it during which some worker ran an engine step (co-location would make it positive and large).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from costs_now import read_cell  # noqa: E402  (this folder: the script's own)
from real.runfolder import RunFolder  # noqa: E402
from sim.engine.pipeline import simulate  # noqa: E402
from sim.hardware.cost import cost_model_for  # noqa: E402
from sim.metrics import busy_periods  # noqa: E402
from sim.trace import read_trace  # noqa: E402
from validate.costs import learner_ratios, padded_tokens  # noqa: E402
from validate.loop import SYNC, lengths_from, measured_seeds, run_dir  # noqa: E402


def overlap(trace, engine_steps) -> np.ndarray:
    """Per consumed step: the share of its learner step during which some worker ran an engine step."""
    ends = engine_steps["t_start"] + engine_steps["seconds"]
    # the union of every worker's engine steps: one "worker" whose busy periods they are
    _, lo, hi = busy_periods(np.zeros(len(ends), np.int64), engine_steps["t_start"].to_numpy(), ends.to_numpy(),
                             float(ends.max()))
    steps = trace.steps.set_index("step").loc[padded_tokens(trace).index]
    return np.array([np.clip(np.minimum(hi, b) - np.maximum(lo, a), 0, None).sum() / (b - a)
                     for a, b in zip(steps["t_start"], steps["t_end"])])


def main(argv: list[str]) -> None:
    cell, cfg, pred = read_cell(argv)
    notes = json.loads((cell / "report.json").read_text())["notes"]
    timed = [float(m.group(1)) for n in notes if (m := re.match(r"learner bookkeeping: ([0-9.]+) s", n))]
    if timed:  # the pilots' bookkeeping, as the cell's prediction charged it
        pred = pred.with_overrides({"hardware.efficiency.learner_bookkeeping_s": timed[0]})
    solo = cost_model_for(pred, 0.0)  # the learner's cost alone: no co-location on a learner step
    print("| run | period, measured / simulated (s) | learner step, measured / simulated (s) | learner step / profile "
          "(mean) | padded tokens a step, measured / simulated | ratio vs workers' engine-step share (corr.) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, mode_cfg in (("measured", pred), ("measured_sync", pred.with_overrides(SYNC))):
        for r, seed in enumerate(measured_seeds(cfg, 3)):
            folder = RunFolder(cell / run_dir(kind, r))
            if not folder.path.is_dir():
                sys.exit(f"{folder.path}: missing (the script that drew the cell leaves it; git does not keep it)")
            real = read_trace(folder.trace_dir)
            sim = simulate(mode_cfg.with_overrides({"seed": seed, **lengths_from(real)}))
            period = [float(np.diff(t.steps.sort_values("step")["t_start"]).mean()) for t in (real, sim)]
            train = [float((t.steps["t_end"] - t.steps["t_start"]).mean()) for t in (real, sim)]
            ratios = learner_ratios(real, solo)
            corr = "" if kind != "measured" else (
                f"{np.corrcoef(overlap(real, folder.read_engine_steps()), ratios)[0, 1]:+.2f}")
            print(f"| {folder.path.name} | {period[0]:.3f} / {period[1]:.3f} | {train[0]:.3f} / {train[1]:.3f} | "
                  f"x{ratios.mean():.2f} | {padded_tokens(real).mean():.0f} / {padded_tokens(sim).mean():.0f} | "
                  f"{corr} |")


if __name__ == "__main__":
    main(sys.argv[1:])
