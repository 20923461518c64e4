"""A `stalecast train` run folder as a calibration log: metrics.jsonl for the learner's timings, config.yaml for the
layout, model and workload shape, trace/ for every sample's length (so lengths are not fitted but replayed) and for
the generation time and the step.

Generation is the learner's wait for its batch after its previous sync, from the trace's step times (`learner_wait_s`,
what the simulator's time/queue_wait_s measures), not metrics.jsonl's time/queue_wait_s: that one starts after the
learner has written the step's rows, which it does while the workers already generate, so it misses that part of the
generation. The difference between the two is the learner's bookkeeping (`bookkeeping_s`: metrics, the run folder's
rows, checkpoints; real/learner.py Learner.step, real/trainer.py Trainer._train_steps), which a learner-bound async
run pays at every step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sim.calibrate.logs import FORMATS, RunLog, read_steps
from sim.config import ConfigError, load_config
from sim.metrics import learner_bookkeeping_s, learner_wait_s
from sim.trace import read_trace


def read_stalecast_run(path: Path) -> RunLog:
    """`path`: the run folder or its metrics.jsonl."""
    from validate.loop import lengths_from  # the consumed groups whole, as validate replays a pilot's

    folder = path if path.is_dir() else path.parent
    metrics = folder / "metrics.jsonl" if path.is_dir() else path
    steps, sources = read_steps(metrics, FORMATS["stalecast"])
    for needed in ("config.yaml", "trace"):
        if not (folder / needed).exists():
            raise ConfigError(f"{folder}: no {needed} beside {metrics.name}; calibrate reads a stalecast run from its "
                              f"whole folder (config.yaml: layout, model, workload shape; trace/: every sample's "
                              f"length)")
    cfg = load_config(folder / "config.yaml")
    trace = read_trace(folder / "trace")
    used = trace.samples[(trace.samples["learner_step"] >= 0) & ~trace.samples["dropped"]]
    by_step = used.groupby("learner_step")
    total = used["prompt_len"] + used["response_len"]
    st = trace.steps
    ends = (st["t_end"] + st["weight_sync_s"].fillna(0.0)).to_numpy()
    index = pd.Index(st["step"].to_numpy(), name="step")
    # metrics.jsonl's time/queue_wait_s, read as gen_s (NaN where a run's log lacks it: bookkeeping not identified)
    queue_wait = steps["gen_s"].reindex(index).to_numpy() if "gen_s" in steps else np.nan
    timed = pd.DataFrame({"gen_s": learner_wait_s(st), "step_s": np.diff(np.r_[0.0, ends]),
                          "bookkeeping_s": learner_bookkeeping_s(st, queue_wait)}, index=index)
    per_step = timed.join(pd.DataFrame({
        "response_mean": by_step["response_len"].mean(), "response_max": by_step["response_len"].max(),
        "response_clip": (used["response_len"] >= cfg.workload.max_new_tokens).groupby(used["learner_step"]).mean(),
        "prompt_mean": by_step["prompt_len"].mean(), "n_samples": by_step.size().astype(np.float64),
        # the tokens the learner is charged for, as the simulator charges them (hardware.train_tokens)
        "n_tokens": (total.groupby(used["learner_step"]).sum() if cfg.hardware.train_tokens == "packed"
                     else by_step.size() * total.groupby(used["learner_step"]).max()).astype(np.float64)}),
        how="inner")
    steps = steps.drop(columns=[c for c in per_step.columns if c in steps]).join(per_step, how="inner")
    if steps.empty:
        raise ConfigError(f"{metrics}: none of its steps appears in {folder / 'trace'} (learner_step)")
    where = f"{folder / 'trace'} (its step times; its consumed samples per learner step)"
    sources = {**sources, **{q: where for q in per_step.columns},
               "bookkeeping_s": f"{where} less {metrics.name}'s time/queue_wait_s"}
    return RunLog(metrics, "stalecast", steps, sources, config=cfg, groups=lengths_from(trace)["workload.groups"])
