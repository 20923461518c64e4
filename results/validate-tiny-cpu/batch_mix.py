"""Which groups make an async batch, measured against simulated with the same lengths: for the long-tail cells
whose measured batches carried more padded tokens than their simulations (continuous.md, "Which groups make an
async batch"). From the run folders a cell kept (git ignores them):

    python3 results/validate-tiny-cpu/batch_mix.py continuous-w2-s4 continuous-w3-s4 per-sample-w3-s4 ...

First table, per measured async run: padded tokens a step; the share of steps whose batch holds a group with an
answer at the cap (max_new_tokens); the mean step at which those capped groups were consumed, measured minus
simulated (negative: the real run consumed them earlier); the seconds from a group's admission to its last answer,
capped groups and the others. Second table, per cell (its async runs pooled): each decode step's measured / charged
(validate's in-run cost check) by how many other workers were in an engine step at its midpoint, at a quarter of
the worker's slots or fewer and at all of them, while the learner trained (most steps).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from costs_now import read_cell  # noqa: E402  (this folder: the script's own)
from real.runfolder import RunFolder  # noqa: E402
from sim.engine.pipeline import simulate  # noqa: E402
from sim.hardware.cost import cost_model_for  # noqa: E402
from sim.metrics import rollout_idle  # noqa: E402
from sim.trace import read_trace  # noqa: E402
from validate.costs import decode_step_ratios, padded_tokens  # noqa: E402
from validate.loop import end_to_end, lengths_from, measured_seeds, run_dir  # noqa: E402


def groups(trace):
    """Per consumed group: the step that consumed it, its longest answer, its admission and last answer."""
    s = trace.samples[trace.samples.learner_step >= 0]
    return s.groupby("group_id").agg(step=("learner_step", "first"), longest=("response_len", "max"),
                                     t_admit=("t_admit", "first"), t_end=("t_end", "max"))


def mix_row(name: str, cfg, pred, r: int, seed: int) -> str:
    folder = RunFolder(HERE / name / run_dir("measured", r))
    real = read_trace(folder.trace_dir)
    sim = simulate(pred.with_overrides({"seed": seed, **lengths_from(real)}))
    g_real, g_sim = groups(real), groups(sim)
    cap = cfg.workload.max_new_tokens
    both = g_real.index.intersection(g_sim.index)
    capped = g_real.loc[both, "longest"] >= cap
    lag = (g_real.loc[both, "step"] - g_sim.loc[both, "step"])[capped].mean()
    share = [g[g.longest >= cap].step.nunique() / g.step.nunique() for g in (g_real, g_sim)]
    latency = [(g.t_end - g.t_admit).groupby(g.longest >= cap).mean() for g in (g_real, g_sim)]
    return (f"| {name} / {folder.path.name} | {padded_tokens(real).mean():.0f} / {padded_tokens(sim).mean():.0f} | "
            f"{share[0]:.2f} / {share[1]:.2f} | {lag:+.2f} | {latency[0][True]:.2f} / {latency[1][True]:.2f} | "
            f"{latency[0][False]:.2f} / {latency[1][False]:.2f} |")


def at_midpoints(starts: np.ndarray, ends: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Whether each time in t lies inside one of the intervals [starts, ends) (disjoint)."""
    order = np.argsort(starts)
    starts, ends = starts[order], ends[order]
    i = np.searchsorted(starts, t, side="right") - 1
    return (i >= 0) & (t < ends[np.clip(i, 0, None)])


def crowd_rows(name: str, cfg, pred) -> list[str]:
    """Median decode-step ratio by the other workers in an engine step at its midpoint and by occupancy."""
    folders = [RunFolder(HERE / name / run_dir("measured", r)) for r in range(3)]
    runs = [(read_trace(f.trace_dir), f.read_engine_steps()) for f in folders]
    cost = cost_model_for(pred, rollout_idle(end_to_end([t for t, _ in runs])))  # as validate charges them
    steps = []
    for trace, engine_steps in runs:
        timed, _ = decode_step_ratios(trace, engine_steps, cost)
        mid = (timed["t_start"] + timed["seconds"] / 2).to_numpy()
        others = sum((timed["worker_id"].to_numpy() != w) & at_midpoints(
            log["t_start"].to_numpy(), (log["t_start"] + log["seconds"]).to_numpy(), mid)
            for w, log in engine_steps.groupby("worker_id"))
        training = at_midpoints(trace.steps["t_start"].to_numpy(), trace.steps["t_end"].to_numpy(), mid)
        steps.append(timed.assign(others=others)[training])
    steps = pd.concat(steps)
    slots = cfg.cluster.max_concurrency
    bands = [steps[steps["active"] <= slots / 4], steps[steps["active"] == slots]]  # nearly empty, full
    rows = []
    for k in sorted(steps["others"].unique()):
        cells = [f"x{b['ratio'][b['others'] == k].median():.2f} ({(b['others'] == k).sum()})"
                 if (b["others"] == k).any() else "" for b in bands]
        rows.append(f"| {name} | {k} | {cells[0]} | {cells[1]} |")
    busy = cfg.cluster.rollout_workers - 1
    rows.append(f"| {name} | all others busy: share of steps | "
                + " | ".join(f"{(b['others'] == busy).mean():.2f}" for b in bands) + " |")
    return rows


def main(names: list[str]) -> None:
    print("| cell / run | padded tokens a step, real / sim | steps holding a capped group, real / sim | capped groups' "
          "step, real - sim | admission to last answer, capped groups, real / sim (s) | the others (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    cells = [(name, *read_cell([name])[1:]) for name in names]
    for name, cfg, pred in cells:
        for r, seed in enumerate(measured_seeds(cfg, 3)):
            print(mix_row(name, cfg, pred, r, seed))
    print()
    print("| cell | other workers in an engine step | decode step, measured / charged (steps): at <= 1/4 of the "
          "slots | at all of them |")
    print("| --- | --- | ---: | ---: |")
    for name, cfg, pred in cells:
        print("\n".join(crowd_rows(name, cfg, pred)))


if __name__ == "__main__":
    main(sys.argv[1:])
