"""One simulator run as a study needs it: a validated config in, one flat record out.

Three things make this cheaper than `simulate` + `compute_metrics`, without changing a number (beyond the
rounding of one float sum):

- Metrics come straight from the Simulation's group and sample arrays. Every sample of a group shares its
  start and consumption versions, so staleness is computed per group (each group weighs group_size
  samples); the per-sample quantities (lengths, end versions, token versions) are summed in one compiled
  pass. This skips the per-sample DataFrame, its dtype copies and temporaries (trace + compute_metrics cost
  more than a whole compiled 300-step run). A test checks the result equals `sim.metrics.compute_metrics`.
- A run records whether its staleness bound ever acted: the admission gate refused a group, or a group
  was dropped as too stale. If it never did, the same config with a larger bound runs event for event the
  same (the bound enters the simulator only through those two rules), and the sweep reuses the run.
- A process keeps the workloads it drew (GroupStream): group n's lengths depend only on the seed and the
  workload section, and every grid point of a sweep replays the same seeds.
"""

from __future__ import annotations

import json
import math
import time
from typing import Callable

import numpy as np
import pandas as pd

from sim.config import RunConfig
from sim.engine.kernel import njit
from sim.engine.pipeline import Simulation
from sim.metrics import (LEARNING_COLUMNS, STALENESS_QUANTILES, busy_fraction, kv_metrics, learner_wait_s,
                         run_wall_s)
from sim.workload import GroupStream

# Column order of Simulation.steps tuples (as sim.engine.pipeline.Simulation.trace names them).
_STEP_TUPLE = ["step", "t_start", "t_end", "version", "n_samples", "n_tokens", "queue_len", "weight_sync_s"]

_STREAMS: dict[str, GroupStream] = {}  # (seed, workload) -> its stream, most recently used last
_MAX_STREAMS = 4                      # a sweep's replications; each holds ~25 MB for 300 steps of 512 x 16


def _stream(cfg: RunConfig) -> GroupStream:
    key = json.dumps([cfg.seed, cfg.workload.model_dump(mode="json")], sort_keys=True)
    stream = _STREAMS.pop(key, None) or GroupStream(cfg, np.random.SeedSequence(cfg.seed))
    _STREAMS[key] = stream
    while len(_STREAMS) > _MAX_STREAMS:
        del _STREAMS[next(iter(_STREAMS))]
    return stream


def run_config(cfg: RunConfig) -> dict:
    """Simulate `cfg`; a record {status, error, metrics, compute_s, bound_free}. A config the simulator
    rejects or a pipeline that stalls is a failed record, not an exception."""
    start = time.perf_counter()
    try:
        sim = Simulation(cfg, stream=_stream(cfg))
    except ValueError as exc:  # e.g. a profile or length trace the config names is unusable
        return failed_record(f"invalid config: {exc}")
    try:
        sim.run_to_end()
    except RuntimeError as exc:  # the simulator's word for a pipeline that cannot go on (stalled)
        return failed_record(str(exc))
    metrics = simulation_metrics(sim)
    bound_free = sim.gate_refusals == 0 and metrics["dropped/groups"] == 0
    # The simulation's actors reference each other, so only a (slow, full) GC pass would free its arrays:
    # drop them now, or a worker process grows with every run (1.7 GB each in the 64-GPU ratio study).
    vars(sim).clear()
    return {"status": "ok", "error": None, "metrics": metrics, "compute_s": time.perf_counter() - start,
            "bound_free": bound_free}


def failed_record(reason: str) -> dict:
    return {"status": "failed", "error": reason, "metrics": {}, "compute_s": 0.0, "bound_free": False}


def run_chain(items: list[tuple[str, RunConfig, dict | None]],
              save: Callable[[str, dict], None] | None = None) -> list[tuple[str, dict]]:
    """Run configs that differ only in pipeline.max_staleness, in ascending order of the bound; `items` are
    (key, config, finished record or None). A run whose bound never acted stands for every larger bound.
    Returns (key, record) for the items that had no record; `save(key, record)`, if given, stores each as it
    is made, so a killed sweep keeps the runs of a chain it was halfway through."""
    out = []
    previous: tuple[str, dict] | None = None
    for key, cfg, record in items:
        if record is None:
            if previous is not None and previous[1]["bound_free"]:
                source = previous[1].get("reused_from") or previous[0]
                record = {**previous[1], "compute_s": 0.0, "reused_from": source}
            else:
                record = {**run_config(cfg), "reused_from": None}
            if save is not None:
                save(key, record)
            out.append((key, record))
        previous = (key, record)
    return out


# --------------------------------------------------------------------------- metrics from the arrays
@njit(cache=True, _nrt=False)
def _sample_pass(g, used, v_cons, response_len, v_end, v_mean, t_end, now, group_end):
    """One pass over the samples of groups 0..len(used)-1 (no per-sample temporaries). Over the consumed
    (`used`) groups: Σ length, Σ length * (version_consumed - version_mean), Σ version_end. Over all: samples
    generated by `now`, and group_end[i] = group i's last end (NaN while a sample of it is generating)."""
    len_sum = v_end_sum = generated = 0
    token_stale = 0.0
    for i in range(used.shape[0]):
        end = -np.inf
        for sid in range(i * g, (i + 1) * g):
            if t_end[sid] <= now:  # NaN (never ended) compares false
                generated += 1
                end = max(end, t_end[sid])
            else:
                end = np.nan
            if used[i]:
                len_sum += response_len[sid]
                token_stale += response_len[sid] * (v_cons[i] - v_mean[sid])
                v_end_sum += v_end[sid]
        group_end[i] = end
    return len_sum, token_stale, v_end_sum, generated


def simulation_metrics(sim: Simulation) -> dict:
    """`sim.metrics.compute_metrics` of a finished Simulation, from its arrays (speedup left None); equal
    to it up to float rounding in sums."""
    n, g = sim.n_groups, sim.group_size
    steps = pd.DataFrame(sim.steps, columns=_STEP_TUPLE)
    wall = run_wall_s(steps)
    v_start, v_cons = sim.g_v_start[:n].astype(np.int64), sim.g_v_consumed[:n].astype(np.int64)
    dropped = sim.g_dropped[:n]
    used = (v_cons >= 0) & ~dropped
    # A sample whose end a worker committed past the end of the run is not generated (as in Simulation.trace).
    group_end = np.empty(n)
    len_sum, token_stale, v_end_sum, generated = _sample_pass(g, used, v_cons, sim.response_len, sim.v_end,
                                                              sim.v_mean, sim.t_end, sim.now, group_end)
    n_used = int(used.sum()) * g
    out = {}
    if n_used:
        stale = (v_cons - v_start)[used]  # one value per group; each stands for g samples
        out["staleness/mean"] = float(stale.mean())
        out["staleness/max"] = float(stale.max())
        for name, q in STALENESS_QUANTILES.items():  # quantiles of g-fold repeated values are the same
            out[f"staleness/{name}"] = float(np.quantile(stale.astype(np.float64), q, method="inverted_cdf"))
        out["staleness/token_mean"] = token_stale / len_sum
        # Integer sums are exact, so these equal the per-sample float means.
        out["off_policy/in_flight/mean"] = float((v_end_sum - g * v_start[used].sum()) / n_used)
        out["off_policy/in_queue/mean"] = float((g * v_cons[used].sum() - v_end_sum) / n_used)
        out["len/mean"] = len_sum / n_used

    start = sim.g_t_start[:n]
    started = ~np.isnan(start)
    busy = busy_fraction(sim.g_worker[:n][started], start[started], group_end[started],
                         sim.cfg.cluster.rollout_workers, wall)
    sync = steps["weight_sync_s"].fillna(0.0)
    train_busy = float(np.sum(steps["t_end"] - steps["t_start"]) + sync.sum())
    step_s = wall / len(steps)
    out.update({
        "throughput/samples_per_s": n_used / wall,
        "throughput/tokens_per_s": len_sum / wall,
        "throughput/steps_per_h": 3600.0 / step_s,
        "idle/trainer": max(0.0, 1.0 - train_busy / wall),
        "idle/rollout": 1.0 - busy,
        "speedup/vs_sync": None,
        "time/step_s": step_s,
        "time/wall_s": wall,
        "time/weight_sync_s": float(sync.mean()),
        "time/queue_wait_s": float(learner_wait_s(steps).mean()),
        "dropped/groups": int(dropped.sum()),
        "samples/generated": generated,
        "samples/in_flight": n * g - generated,
        **kv_metrics(sim.n_preempt[:n * g], sim.kv_summary()),
    })
    out.update(dict.fromkeys(LEARNING_COLUMNS))  # a simulated run has no learning signals
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in out.items()}
