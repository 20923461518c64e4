"""Which groups make an async batch, measured against simulated with the same lengths: for the long-tail cells
whose measured batches carried more padded tokens than their simulations (continuous.md, "Which groups make an
async batch"). From the run folders a cell kept (git ignores them):

    python3 results/validate-tiny-cpu/batch_mix.py continuous-w2-s4 continuous-w3-s4 per-sample-w3-s4 ...

Per measured async run: padded tokens a step; the share of steps whose batch holds a group with an answer at the
cap (max_new_tokens); the mean step at which those capped groups were consumed, measured minus simulated (negative:
the real run consumed them earlier); the seconds from a group's admission to its last answer, capped groups and the
others.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from costs_now import read_cell  # noqa: E402  (this folder: the script's own)
from real.runfolder import RunFolder  # noqa: E402
from sim.engine.pipeline import simulate  # noqa: E402
from sim.trace import read_trace  # noqa: E402
from validate.costs import padded_tokens  # noqa: E402
from validate.loop import lengths_from, measured_seeds, run_dir  # noqa: E402


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


def main(names: list[str]) -> None:
    print("| cell / run | padded tokens a step, real / sim | steps holding a capped group, real / sim | capped groups' "
          "step, real - sim | admission to last answer, capped groups, real / sim (s) | the others (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        _, cfg, pred = read_cell([name])
        for r, seed in enumerate(measured_seeds(cfg, 3)):
            print(mix_row(name, cfg, pred, r, seed))


if __name__ == "__main__":
    main(sys.argv[1:])
