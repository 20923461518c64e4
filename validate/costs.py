"""In-run costs against the profile's, post hoc: did a miss come from the hardware costs or from the pipeline model?

For a `stalecast train` trace and the cost model the prediction used, two ratios (measured / charged), each the
median over the run:

- learner: a step's time (t_start..t_end) over the profile's learner cost at the step's padded tokens (rows x
  the longest row), the step alone (co-location not applied);
- generation: a worker's batch (its samples admitted together into an empty engine) from its start to its last
  sample's end, over what the simulator charges such a static batch: one prefill of all its prompt tokens, then
  each decode step at its active sequences and their context (sequences leave as they end), co-location
  included as the simulator applies it in that mode, at the run's own worker idle fraction. Static batching
  only: under continuous batching a worker's sequences join and leave between any two steps, and the trace
  does not say which step each sample started in, so there is no batch to charge (reported as nan).

Near 1 means the costs held in the run as profiled, so the remaining error is the pipeline model's (or the
lengths'); far from 1 with both runs alike means the machine ran faster or slower than when it was profiled.
Never used for the prediction.
"""

from __future__ import annotations

import numpy as np

from sim.trace import Trace


def learner_ratios(trace: Trace, cost) -> np.ndarray:
    """Per consumed step: measured seconds / profile seconds at its padded tokens."""
    used = trace.samples[trace.samples["learner_step"] >= 0]
    rows = (used["prompt_len"] + used["response_len"]).groupby(used["learner_step"])
    padded = rows.max() * rows.size()
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


def cost_ratios(trace: Trace, cost, static: bool = True) -> dict[str, float]:
    """Median measured / charged, for the learner step and (static batching) the generation batch."""
    learner = learner_ratios(trace, cost)
    gen = generation_ratios(trace, cost) if static else np.array([])
    return {"learner_step": float(np.median(learner)) if len(learner) else float("nan"),
            "generation_batch": float(np.median(gen)) if len(gen) else float("nan"),
            "steps": int(len(learner)), "batches": int(len(gen))}


def costs_table(costs: dict[str, dict[str, float]]) -> list[str]:
    """Markdown lines: one row per run."""
    lines = ["| run | learner step, measured / profile | generation batch, measured / charged | steps, batches |",
             "| --- | ---: | ---: | ---: |"]
    for run, c in costs.items():
        lines.append(f"| {run} | x{c['learner_step']:.3f} | x{c['generation_batch']:.3f} | "
                     f"{c['steps']}, {c['batches']} |")
    return lines
