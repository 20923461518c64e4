"""Mean staleness simulated against the closed form E[staleness] = C / B + rho, inside and outside its regime.

The form is derived in tests/test_engine.py (test_mean_staleness_of_a_rollout_bound_pipeline_is_c_over_b_plus_rho):
no bound, one sample per group, C slots always generating, rollout-bound, exponential lengths. Here each row
changes one assumption, and the table shows how far the simulation moves from the form and why. rho is
lambda * tau / B with lambda = C / (the run's mean sample life, admission to end): Little's law on the run's own
lives, so a row's gap comes from the pipeline, not from the cost of a sample.

    python results/closed-form/departures.py > results/closed-form/table.md   (about 20 s)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sim.config import parse_config  # noqa: E402
from sim.engine.pipeline import simulate  # noqa: E402
from sim.metrics import sample_staleness  # noqa: E402

DECODE, PER_TOKEN, STEPS = 0.01, 0.000737, 2000
EXPONENTIAL = {"kind": "exponential", "mean": 100}


def config(*, workers=32, slots=1, batch=8, group=1, tau=0.0, response=EXPONENTIAL, pipeline=None):
    return parse_config({
        "workload": {"batch_prompts": batch, "group_size": group,
                     "prompt_len": {"kind": "lognormal", "median": 20, "sigma": 0.5},
                     "response_len": response, "max_new_tokens": 10**6},
        "cluster": {"rollout_workers": workers, "max_concurrency": slots, "batching": "continuous",
                    "group_prefill": "per_sample"},
        "pipeline": {"mode": "async", "staleness_control": "none", "interruptible": False, **(pipeline or {})},
        "hardware": {"constant": {"decode_step_s": DECODE, "prefill_s_per_token": PER_TOKEN, "train_step_s": tau}},
        "run": {"steps": STEPS},
    })


def row(name: str, why: str, rho: float, **kw) -> str:
    """Simulate at the learner step that gives `rho` on this case's own sample lives; one markdown row."""
    first = simulate(config(tau=1e-6, **kw))  # near-free learner: the lives of slots that never wait on it
    done = first.samples.dropna(subset=["t_end"])
    c = kw.get("workers", 32) * kw.get("slots", 1)
    b = kw.get("batch", 8) * kw.get("group", 1)  # samples per learner step
    lam = c / float((done["t_end"] - done["t_start"]).mean())
    trace = simulate(config(tau=rho * b / lam, **kw))
    stale = sample_staleness(trace.samples)
    busy = float((trace.steps["t_end"] - trace.steps["t_start"]).sum() / trace.steps["t_end"].max())
    form = c / b + rho
    return (f"| {name} | {c} | {b} | {rho:.1f} | {busy:.2f} | {stale.mean():.3f} | {form:.3f} | "
            f"{stale.mean() - form:+.3f} | {int(np.percentile(stale, 99))} | {why} |")


def main() -> None:
    lognormal = {"kind": "lognormal", "median": 40, "sigma": 1.5}
    rows = [
        row("in the regime", "the form's assumptions hold", 0.3),
        row("in the regime, rho 0.6", "learner queues when B samples end within one step (11 % of steps)", 0.6),
        row("lognormal lengths (sigma 1.5)", "32 slots' completions are near-Poisson whatever one slot's law",
            0.3, response=lognormal),
        row("lognormal, 4 slots, B 4", "few slots: a slot that just completed is not memoryless, (b) != rho",
            0.3, workers=4, batch=4, response=lognormal),
        row("constant lengths", "all slots end together: 4 batches at once, the learner queues them", 0.3,
            response={"kind": "constant", "value": 100}),
        row("8 slots a worker, drained to load", "a worker that sees new weights stops admitting until its "
            "in-flight samples end: fewer than C generate (busy falls short of rho)", 0.3, workers=4, slots=8),
        row("8 slots a worker, interruptible", "staleness counts from the first token, after a load that lands "
            "during the prefill", 0.3, workers=4, slots=8, pipeline={"interruptible": True}),
        row("groups of 4 (B = 2 groups), interruptible", "a group is admitted whole, when one worker has 4 "
            "free slots: slots wait empty, fewer than C generate (busy falls short of rho)", 0.3, workers=8, slots=4, batch=2, group=4,
            pipeline={"interruptible": True}),
        row("bound S = 2 (oldest_unconsumed)", "admission gating caps staleness at 2", 0.3,
            pipeline={"staleness_control": "oldest_unconsumed", "max_staleness": 2}),
        row("learner-bound (rho 1.5)", "the queue grows for the whole run: staleness has no steady state", 1.5),
    ]
    print(f"Mean staleness, simulated (fast engine, {STEPS} learner steps) against C / B + rho. C: slots "
          "generating at once; B: samples a learner step; rho: lambda * tau / B on the run's own sample lives; "
          "busy: the learner's busy fraction in the run.\n")
    print("| case | C | B | rho | busy | mean staleness | C / B + rho | simulated - form | p99 | why |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
