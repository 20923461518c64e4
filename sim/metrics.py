"""Every metric of docs/design.md, computed one way from any trace (simulated, real or external).

Names are fixed (slash-namespaced); values are plain floats, or None where the trace has no data for them
(a simulated trace has no learning columns).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sim.trace import Trace

STALENESS_QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}
# The sample columns compute_metrics and staleness_histogram read: a trace may hold only these in memory (a large
# simulation writes the others straight from its ledger).
METRIC_COLUMNS = ("group_id", "worker_id", "response_len", "t_start", "t_end", "version_start", "version_end",
                  "version_mean", "version_consumed", "dropped", "preemptions")
LEARNING_COLUMNS = {"ess/token": "ess_token", "ess/seq": "ess_seq", "kl/k3": "kl", "grad_norm": "grad_norm",
                    "clip_frac": "clip_frac", "reward/mean": "reward_mean", "lr": "lr"}


# --------------------------------------------------------------------------- importance-weight statistics
def ess(weights: np.ndarray) -> float:
    """Normalised effective sample size (Σw)² / (N Σw²), in (0, 1]."""
    w = np.asarray(weights, dtype=np.float64)
    return float(w.sum() ** 2 / (len(w) * np.square(w).sum()))


def kl_estimates(log_ratio: np.ndarray) -> dict[str, float]:
    """Mean k1, k2 and k3 estimates of KL(π_behav ‖ π_θ) from log r = log π_θ/π_behav of tokens π_behav sampled:
    k1 = -log r (unbiased, may be negative), k2 = (log r)²/2 (biased, low variance), k3 = (r - 1) - log r (unbiased,
    never negative). With r inverted (π_behav/π_θ) k3 would estimate a χ²-like quantity one token can dominate."""
    lr = np.asarray(log_ratio, dtype=np.float64)
    if lr.size == 0:
        return {"k1": math.nan, "k2": math.nan, "k3": math.nan}
    return {"k1": float(np.mean(-lr)), "k2": float(np.mean(0.5 * lr * lr)), "k3": float(np.mean(np.expm1(lr) - lr))}


# --------------------------------------------------------------------------- staleness
def consumed_mask(samples: pd.DataFrame) -> np.ndarray:
    """Samples the learner trained on (consumed and not dropped)."""
    return (samples["version_consumed"].to_numpy() >= 0) & ~samples["dropped"].to_numpy()


def sample_staleness(samples: pd.DataFrame) -> np.ndarray:
    """Learner version at consumption minus version at the sample's first token, per consumed sample."""
    return _staleness(samples, consumed_mask(samples))


def _staleness(samples: pd.DataFrame, used: np.ndarray) -> np.ndarray:
    stale = samples["version_consumed"].to_numpy()[used].astype(np.int64)
    stale -= samples["version_start"].to_numpy()[used]
    return stale


def staleness_histogram(samples: pd.DataFrame) -> dict[int, int]:
    counts = np.bincount(sample_staleness(samples))
    return {s: int(c) for s, c in enumerate(counts) if c}


def _finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _staleness_metrics(samples: pd.DataFrame, used: np.ndarray) -> dict:
    # Versions and lengths are whole numbers, so the float64 sums behind these means are exact whether the columns
    # are read as integers or as floats: integers spare a float64 copy of each column (330 MB at 41 M samples).
    # Each part runs in its own function, so one part's arrays are freed before the next part allocates.
    if not used.any():
        return {}
    col = lambda name: samples[name].to_numpy()[used]  # noqa: E731 - a column's consumed samples
    return {**_staleness_stats(samples, used), "staleness/token_mean": _token_staleness(samples, used),
            "off_policy/in_flight/mean": float(np.mean(col("version_end") - col("version_start"))),
            "off_policy/in_queue/mean": float(np.mean(col("version_consumed") - col("version_end"))),
            "len/mean": float(np.mean(col("response_len")))}


def _staleness_stats(samples: pd.DataFrame, used: np.ndarray) -> dict:
    stale = _staleness(samples, used)
    out = {"staleness/mean": float(stale.mean()), "staleness/max": float(stale.max())}
    # overwrite_input: partition `stale` itself rather than a copy (it is not used after)
    quantiles = np.quantile(stale, list(STALENESS_QUANTILES.values()), method="inverted_cdf", overwrite_input=True)
    return {**out, **{f"staleness/{name}": float(q) for name, q in zip(STALENESS_QUANTILES, quantiles)}}


def _token_staleness(samples: pd.DataFrame, used: np.ndarray) -> float:
    """Σ length x (consumption version - token-averaged version) / Σ length over consumed samples."""
    behind = samples["version_mean"].to_numpy()[used]
    np.subtract(samples["version_consumed"].to_numpy()[used], behind, out=behind)
    lengths = samples["response_len"].to_numpy()[used]
    behind *= lengths
    return float(np.sum(behind) / lengths.sum())


# --------------------------------------------------------------------------- time
def run_wall_s(steps: pd.DataFrame) -> float:
    """Run length: from t=0 to the end of the last step's weight sync."""
    last = steps.iloc[-1]
    return float(last["t_end"] + np.nan_to_num(last["weight_sync_s"]))


def learner_wait_s(steps: pd.DataFrame) -> np.ndarray:
    """Per step, how long the learner waited for its batch after finishing the previous step's sync."""
    prev_free = np.concatenate([[0.0], (steps["t_end"] + steps["weight_sync_s"].fillna(0.0)).to_numpy()[:-1]])
    return np.maximum(steps["t_start"].to_numpy() - prev_free, 0.0)


def learner_bookkeeping_s(steps: pd.DataFrame, queue_wait_s) -> np.ndarray:
    """Per step, the learner's own work after its previous sync (metrics, rows, checkpoints) before it began to wait
    for its batch: its wait (`learner_wait_s`) less the wait it timed itself (`queue_wait_s`, per step in the
    steps' order: a real run's time/queue_wait_s, which starts once the step is written; NaN where not timed)."""
    return np.maximum(learner_wait_s(steps) - np.asarray(queue_wait_s, dtype=np.float64), 0.0)


def group_intervals(samples: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(worker, start, end, group id) per started group; end is NaN while any of its samples is still generating."""
    gid = samples["group_id"].to_numpy()
    order = None if np.all(gid[1:] >= gid[:-1]) else np.argsort(gid, kind="stable")
    pick = (lambda name: samples[name].to_numpy()) if order is None else (lambda name: samples[name].to_numpy()[order])
    gid, t_end = pick("group_id"), pick("t_end")
    first = np.r_[0, np.flatnonzero(gid[1:] != gid[:-1]) + 1]
    end = np.fmax.reduceat(t_end, first)  # a group with a sample still generating ends at NaN, set below
    end[np.add.reduceat(np.isnan(t_end), first) > 0] = np.nan
    start = pick("t_start")[first]
    keep = ~np.isnan(start)
    return pick("worker_id")[first][keep], start[keep], end[keep], gid[first][keep]


def busy_periods(worker_id: np.ndarray, t_start: np.ndarray, t_end: np.ndarray,
                 until: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(worker, start, end) of each worker's periods with at least one sequence in flight: the union of its
    intervals, each counted up to `until`, the end of its run; one still open (end NaN) runs to it."""
    t_start = np.minimum(t_start, until)  # a group started after its run's last step ended adds nothing
    t_end = np.where(np.isnan(t_end), until, np.minimum(t_end, until))
    order = np.lexsort((t_start, worker_id))
    w, s, e = worker_id[order], t_start[order], np.asarray(t_end)[order]
    workers, starts, ends = [], [], []
    bounds = np.flatnonzero(np.diff(w)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(w)]):
        ws, we = s[lo:hi], np.maximum.accumulate(e[lo:hi])
        # A new busy period starts where a start lies beyond every earlier end.
        new = np.r_[True, ws[1:] > we[:-1]]
        starts.append(ws[new])
        ends.append(we[np.r_[np.flatnonzero(new)[1:] - 1, len(ws) - 1]])
        workers.append(np.full(len(starts[-1]), w[lo]))
    if not starts:
        return np.array([], dtype=np.int64), np.array([]), np.array([])
    return np.concatenate(workers), np.concatenate(starts), np.concatenate(ends)


def busy_fraction(worker_id: np.ndarray, t_start: np.ndarray, t_end: np.ndarray, n_workers: int, wall: float,
                  until: np.ndarray | float | None = None) -> float:
    """Fraction of worker-time with at least one sequence in flight (union of intervals per worker). Each interval
    counts up to `until`, the end of its run (default the wall time); one still open (end NaN) runs to it."""
    if len(t_start) == 0 or wall <= 0:
        return 0.0
    _, starts, ends = busy_periods(worker_id, t_start, t_end, wall if until is None else until)
    return min(1.0, float(np.sum(ends - starts)) / (n_workers * wall))  # busy throughout: 1, not 1 + rounding


def generating_beside(trace: Trace) -> np.ndarray:
    """Shares of the workers' generating time spent beside k = 0, 1, ..., n_workers - 1 other workers generating
    (worker-seconds, so a moment with b generating counts b times, at k = b - 1); all zero if none generated.
    What a co-location factor measured against the crowd depends on (`sim.hardware.cost.crowding`)."""
    n = trace.n_workers
    worker, start, end, _ = group_intervals(trace.samples)
    _, starts, ends = busy_periods(worker, start, end, run_wall_s(trace.steps))
    times = np.concatenate([starts, ends])
    order = np.argsort(times, kind="stable")
    generating = np.cumsum(np.concatenate([np.ones(len(starts)), -np.ones(len(ends))])[order])[:-1]
    seconds = np.bincount(generating.astype(np.int64), weights=np.diff(times[order]), minlength=n + 1)[:n + 1]
    worker_seconds = seconds[1:] * np.arange(1, n + 1)
    total = worker_seconds.sum()
    return worker_seconds / total if total > 0 else worker_seconds


def rollout_idle(trace: Trace) -> float:
    """Fraction of worker-time with nothing in flight, over the run's wall time (the `idle/rollout` metric). In runs
    laid end to end (validate's repeats; header `runs_laid_end_to_end`), a group counts within its own run: one
    still generating when its run ended was busy until that run's end, not the last run's."""
    worker, start, end, group = group_intervals(trace.samples)
    runs = trace.header.get("runs_laid_end_to_end")  # {"first_group": [...], "end": [...]}
    until = None
    if runs:
        run_of = np.searchsorted(np.asarray(runs["first_group"]), group, side="right") - 1
        until = np.asarray(runs["end"], dtype=np.float64)[run_of]
    return 1.0 - busy_fraction(worker, start, end, trace.n_workers, run_wall_s(trace.steps), until)


def kv_metrics(counts: np.ndarray, kv: dict | None) -> dict:
    """KV-cache evictions (from the samples' `preemptions` counts; None where no row records them) and, from a trace
    header's "kv" record, the peak and time-average share of a worker's KV budget in use (None without a budget)."""
    recorded = counts >= 0
    kv = kv or {}
    return {"kv/preemptions": int(counts[recorded].sum()) if recorded.any() else None,
            "kv/preempted_share": float((counts[recorded] > 0).mean()) if recorded.any() else None,
            "kv/peak_occupancy": kv.get("peak_occupancy"), "kv/mean_occupancy": kv.get("mean_occupancy")}


def compute_metrics(trace: Trace, sync_step_s: float | None = None) -> dict:
    """All docs/design.md metrics of a trace. `sync_step_s`: time per learner step of the synchronous pipeline
    on the same hardware and workload, for speedup/vs_sync."""
    samples, steps = trace.samples, trace.steps
    if steps.empty:
        raise ValueError("trace has no learner steps")
    wall = run_wall_s(steps)
    used = consumed_mask(samples)
    waits = learner_wait_s(steps)
    sync = steps["weight_sync_s"].fillna(0.0)
    train_busy = float(np.sum(steps["t_end"] - steps["t_start"]) + sync.sum())
    step_s = wall / len(steps)
    generated = ~np.isnan(samples["t_end"].to_numpy())
    dropped = samples["dropped"].to_numpy()
    out = {
        **_staleness_metrics(samples, used),
        "throughput/samples_per_s": int(used.sum()) / wall,
        "throughput/tokens_per_s": float(samples["response_len"].to_numpy()[used].sum(dtype=np.int64)) / wall,
        "throughput/steps_per_h": 3600.0 / step_s,
        "idle/trainer": max(0.0, 1.0 - train_busy / wall),
        "idle/rollout": rollout_idle(trace),
        "speedup/vs_sync": (sync_step_s / step_s) if sync_step_s else None,
        "time/step_s": step_s,
        "time/wall_s": wall,
        "time/weight_sync_s": float(sync.mean()),
        "time/queue_wait_s": float(waits.mean()),
        "dropped/groups": int(len(np.unique(samples["group_id"].to_numpy()[dropped]))),
        "samples/generated": int(generated.sum()),
        "samples/in_flight": int((~generated).sum()),
        **kv_metrics(samples["preemptions"].to_numpy() if "preemptions" in samples else np.full(len(samples), -1),
                     trace.header.get("kv")),
    }
    for name, col in LEARNING_COLUMNS.items():
        out[name] = _finite_or_none(float(steps[col].mean())) if steps[col].notna().any() else None
    return {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in out.items()}
