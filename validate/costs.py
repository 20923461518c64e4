"""In-run costs against the profile's, post hoc: did a miss come from the hardware costs or from the pipeline model?

For a `stalecast train` trace and the cost model the prediction used, two ratios (measured / charged), each the
median over the run:

- learner: a step's time (t_start..t_end) over the profile's learner cost at the step's padded tokens (rows x
  the longest row), the step alone (co-location not applied);
- generation: a worker's batch (its samples admitted together into an empty engine) from its start to its last
  sample's end, over what the simulator charges such a static batch: one prefill of all its prompt tokens, then
  each decode step at its active sequences and their context (sequences leave as they end), co-location
  included as the simulator applies it in that mode, at the run's own worker idle fraction. Static batching
  only: under continuous batching a worker's sequences join and leave between any two steps, so there is no
  batch to charge;
- decode step (continuous batching): each engine step a worker timed (the run folder's engine_steps.parquet)
  that prefilled nothing, over the simulator's decode step at its active sequences and their context, with the
  same co-location. Which samples a step advanced, and how many tokens each had, comes from the trace (a sample
  takes one token a step, the first in the step that prefills it, up to the step its last token ended; one still
  generating from the first step after its group's start to the last step); steps where that count disagrees
  with the logged one are left out. A sequence evicted under a KV budget takes no token while evicted and is
  prefilled again when it resumes, which the trace does not place: its steps are counted as if it ran through,
  and a step they make disagree is left out. Beside it, the share of the workers' busy time spent outside engine
  steps (admitting, handing over, loading weights, the loop itself), which the simulator does not charge.

Near 1 means the costs held in the run as profiled, so the remaining error is the pipeline model's (or the
lengths'); far from 1 with both runs alike means the machine ran faster or slower than when it was profiled.
Never used for the prediction.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sim.metrics import busy_periods, group_intervals, run_wall_s
from sim.trace import Trace


def padded_tokens(trace: Trace) -> pd.Series:
    """Per consumed step (indexed by step): the tokens its learner computes, rows x the longest row (prompt +
    response), as the learner pads a batch."""
    used = trace.samples[trace.samples["learner_step"] >= 0]
    rows = (used["prompt_len"] + used["response_len"]).groupby(used["learner_step"])
    return rows.max() * rows.size()


def learner_ratios(trace: Trace, cost) -> np.ndarray:
    """Per consumed step: measured seconds / profile seconds at its padded tokens."""
    padded = padded_tokens(trace)
    steps = trace.steps.set_index("step").loc[padded.index]
    measured = (steps["t_end"] - steps["t_start"]).to_numpy()
    return measured / np.array([cost.train_s(int(t)) for t in padded])


def batch_charge_s(prompt_len: np.ndarray, response_len: np.ndarray, cost) -> float:
    """Seconds the simulator charges one static batch: a prefill of every prompt, then one decode step per token
    until the longest response ends, step k with the sequences longer than k at context prompt + k."""
    total = cost.prefill_s(int(prompt_len.sum()))
    for k in range(int(response_len.max())):
        active = response_len > k
        total += cost.decode_step_s(int(active.sum()), float((prompt_len[active] + k).sum()))
    return total


def generation_ratios(trace: Trace, cost) -> np.ndarray:
    """Per batch (worker, admission time): measured seconds / charged seconds."""
    s = trace.samples.dropna(subset=["t_end"])
    ratios = []
    for _, batch in s.groupby(["worker_id", "t_admit"]):
        measured = batch["t_end"].max() - batch["t_start"].min()
        charged = batch_charge_s(batch["prompt_len"].to_numpy(), np.maximum(batch["response_len"].to_numpy(), 1),
                                 cost)
        ratios.append(measured / charged)
    return np.asarray(ratios)


def decode_step_ratios(trace: Trace, engine_steps: pd.DataFrame, cost) -> tuple[pd.DataFrame, float]:
    """(each decode step alone, a row of worker_id, t_start, seconds, active (the sequences it advanced) and ratio
    (measured seconds / charged seconds); the share of the workers' busy time outside engine steps) of one run: its
    trace and its run folder's engine steps (one segment)."""
    s = trace.samples.copy()
    s["t_start"] = s["t_start"].fillna(s["t_admit"])  # a real trace's samples still generating: admitted only
    s = s.dropna(subset=["t_start"])
    rows, inside, until = [], 0.0, run_wall_s(trace.steps)
    for w, log in engine_steps.groupby("worker_id"):
        log = log.sort_values("t_start")
        t, seconds, logged = (log[c].to_numpy() for c in ("t_start", "seconds", "active"))
        # within the run, as busy time is counted: workers go on generating until they are told to stop
        inside += float(np.clip(np.minimum(t + seconds, until) - t, 0.0, None).sum())
        mine = s[s["worker_id"] == w]
        # the step that ended it; still generating (no end): the last step
        last = np.searchsorted(t, mine["t_end"].fillna(np.inf).to_numpy(), side="right") - 1
        # the step that prefilled it: a token a step back from its end (a group's samples may start at different
        # steps, admitted per sample, and the trace gives the group's start); still generating: its group's start
        first = np.where(mine["t_end"].notna(), last - mine["response_len"].to_numpy() + 1,
                         np.searchsorted(t, mine["t_start"].to_numpy(), side="left"))
        # Per step j: active count and total context sum(prompt + j - first) over the samples it advanced.
        count, base = np.zeros(len(t) + 1), np.zeros(len(t) + 1)
        np.add.at(count, first, 1)
        np.add.at(count, last + 1, -1)
        np.add.at(base, first, mine["prompt_len"].to_numpy() - first)
        np.add.at(base, last + 1, -(mine["prompt_len"].to_numpy() - first))
        n = np.cumsum(count)[:-1]
        context = np.cumsum(base)[:-1] + np.arange(len(t)) * n
        prefills = np.zeros(len(t), bool)
        prefills[first[first < len(t)]] = True
        for j in np.flatnonzero((n == logged) & ~prefills & (n > 0)):
            rows.append((w, t[j], seconds[j], int(n[j]), seconds[j] / cost.decode_step_s(int(n[j]), float(context[j]))))
    worker, start, end, _ = group_intervals(trace.samples)
    _, starts, ends = busy_periods(worker, start, end, until)
    busy = float(np.sum(ends - starts))
    steps = pd.DataFrame(rows, columns=["worker_id", "t_start", "seconds", "active", "ratio"]).astype(
        {"worker_id": np.int64, "active": np.int64})
    return steps, (1.0 - inside / busy) if busy > 0 else float("nan")


def cost_ratios(trace: Trace, cost, static: bool = True,
                runs: list[tuple[Trace, pd.DataFrame | None]] | None = None, slots: int | None = None
                ) -> dict[str, float]:
    """Median measured / charged (the learner's mean too: throughput pays the mean, a ratio of medians can hide a few
    slow steps), for the learner step, the generation batch (static batching) and the decode
    step (continuous batching: from `runs`, each run's own trace and engine steps, pooled; with `slots`, a worker's
    max_concurrency, also at a quarter of the slots or fewer and at all of them, since the simulator charges one
    co-location factor at every occupancy), and the share of busy worker time outside engine steps (continuous;
    busy-time weighted over the runs)."""
    learner = learner_ratios(trace, cost)
    gen = generation_ratios(trace, cost) if static else np.array([])
    steps, outside = [], []
    for run_trace, engine_steps in ([] if static else runs or []):
        if engine_steps is not None and len(engine_steps):
            timed, out = decode_step_ratios(run_trace, engine_steps, cost)
            steps.append(timed)
            outside.append(out)
    decode = np.concatenate([t["ratio"].to_numpy() for t in steps]) if steps else np.array([])
    n = np.concatenate([t["active"].to_numpy() for t in steps]) if steps else np.array([], np.int64)
    median = lambda a: float(np.median(a)) if len(a) else float("nan")  # noqa: E731
    few, full = ((decode[n <= slots / 4], decode[n == slots]) if slots is not None else (np.array([]),) * 2)
    return {"learner_step": median(learner), "generation_batch": median(gen), "decode_step": median(decode),
            "decode_step_few": median(few), "decode_step_full": median(full),
            "learner_step_mean": float(np.mean(learner)) if len(learner) else float("nan"),
            "outside_steps": float(np.mean(outside)) if outside else float("nan"),
            "steps": int(len(learner)), "batches": int(len(gen)), "decode_steps": int(len(decode))}


def in_run_costs(mode_cfg, together: Trace, runs: list[tuple[Trace, pd.DataFrame | None]], static: bool
                 ) -> dict[str, float]:
    """`cost_ratios` of one mode's measured runs (`together`: laid end to end; `runs`: each run's trace and engine
    steps), charged as the prediction (`mode_cfg`, the prediction's config in that mode) at the runs' own worker
    idle fraction and, in sync mode, their own crowd: the ratios then ask whether the costs held as profiled."""
    from sim.hardware.cost import cost_model_for
    from sim.metrics import generating_beside, rollout_idle

    beside = generating_beside(together) if mode_cfg.pipeline.mode == "sync" else None
    return cost_ratios(together, cost_model_for(mode_cfg, rollout_idle(together), beside), static, runs,
                       mode_cfg.cluster.max_concurrency)


def costs_table(costs: dict[str, dict[str, float]]) -> list[str]:
    """Markdown lines: one row per run."""
    lines = ["| run | learner step, measured / profile (median, mean) | generation batch, measured / charged | "
             "decode step, measured / charged (all; at <= 1/4 of the slots; at all of them) | busy worker time "
             "outside engine steps | steps, batches, decode steps |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for run, c in costs.items():
        lines.append(f"| {run} | x{c['learner_step']:.3f}, x{c['learner_step_mean']:.3f} | "
                     f"x{c['generation_batch']:.3f} | x{c['decode_step']:.3f}; x{c['decode_step_few']:.3f}; "
                     f"x{c['decode_step_full']:.3f} | {c['outside_steps']:.1%} | "
                     f"{c['steps']}, {c['batches']}, {c['decode_steps']} |")
    return lines
