"""Predicted against measured: one number per line, its error, and whether it is within tolerance.

Both sides are traces in the shared schema, so every number comes from `sim.metrics` on either side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from sim.metrics import compute_metrics, sample_staleness
from sim.trace import Trace


@dataclass(frozen=True)
class Tolerances:
    """How far a prediction may be from the measurement and still pass."""
    rel: float = field(default=0.10, metadata={"help": "relative error allowed on rates, times and means"})
    small_mean_abs: float = field(default=0.15, metadata={"help": "absolute error allowed on mean staleness "
                                                                  "(and its parts) when the measured mean < 1.5"})
    quantile_abs: float = field(default=1.0, metadata={"help": "absolute error (versions) on staleness quantiles"})
    idle_abs: float = field(default=0.10, metadata={"help": "absolute error on idle ratios (fractions)"})
    distance_max: float = field(default=0.5, metadata={"help": "largest Wasserstein-1 distance (versions) allowed"})


@dataclass(frozen=True)
class Row:
    metric: str
    predicted: float | None
    measured: float | None
    error: float | None       # predicted - measured (or the distance itself)
    rel_error: float | None   # error / measured, where measured != 0
    tolerance: str
    ok: bool | None           # None when a side has no value (not judged)


def _cdfs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empirical CDFs of two integer-valued samples on 0..max."""
    top = int(max(a.max(), b.max())) + 1
    return (np.cumsum(np.bincount(a, minlength=top)) / len(a), np.cumsum(np.bincount(b, minlength=top)) / len(b))


def wasserstein1(a: np.ndarray, b: np.ndarray) -> float:
    """W1 between two empirical distributions on the integers: Σ_k |F_a(k) - F_b(k)|."""
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    fa, fb = _cdfs(a, b)
    return float(np.abs(fa - fb).sum())


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance sup_k |F_a(k) - F_b(k)| for integer-valued samples."""
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    fa, fb = _cdfs(a, b)
    return float(np.abs(fa - fb).max())


# metric -> kind of tolerance it is judged by
JUDGED = {
    "staleness/mean": "mean", "off_policy/in_flight/mean": "mean", "off_policy/in_queue/mean": "mean",
    "staleness/p50": "quantile", "staleness/p90": "quantile", "staleness/p99": "quantile",
    "staleness/max": "quantile",
    "throughput/samples_per_s": "rel", "throughput/tokens_per_s": "rel", "time/step_s": "rel",
    "speedup/vs_sync": "rel",
    "idle/trainer": "idle", "idle/rollout": "idle",
}


def _judge(kind: str, pred: float, meas: float, tol: Tolerances) -> tuple[bool, str]:
    err = abs(pred - meas)
    if kind == "mean":
        if meas < 1.5:
            return err <= tol.small_mean_abs, f"±{tol.small_mean_abs:g} (mean < 1.5)"
        return err <= tol.rel * abs(meas), f"±{100 * tol.rel:g}%"
    if kind == "quantile":
        return err <= tol.quantile_abs, f"±{tol.quantile_abs:g} version"
    if kind == "idle":
        return err <= tol.idle_abs, f"±{tol.idle_abs:g}"
    return err <= tol.rel * abs(meas), f"±{100 * tol.rel:g}%"


def compare(predicted: Trace, measured: Trace, tol: Tolerances = Tolerances(),
            predicted_sync_step_s: float | None = None, measured_sync_step_s: float | None = None) -> list[Row]:
    """Rows for every judged metric plus the distance between the two staleness distributions."""
    mp = compute_metrics(predicted, predicted_sync_step_s)
    mm = compute_metrics(measured, measured_sync_step_s)
    rows = []
    for metric, kind in JUDGED.items():
        p, m = mp.get(metric), mm.get(metric)
        if p is None or m is None:
            rows.append(Row(metric, p, m, None, None, "", None))
            continue
        ok, text = _judge(kind, p, m, tol)
        rows.append(Row(metric, p, m, p - m, (p - m) / m if m else None, text, ok))
    sp, sm = sample_staleness(predicted.samples), sample_staleness(measured.samples)
    w1 = wasserstein1(sp, sm)
    rows.append(Row("staleness/wasserstein1", None, None, w1, None, f"<= {tol.distance_max:g}",
                    bool(w1 <= tol.distance_max) if np.isfinite(w1) else None))
    rows.append(Row("staleness/ks", None, None, ks_distance(sp, sm), None, "reported", None))
    return rows


def all_ok(rows: list[Row]) -> bool:
    return all(r.ok is not False for r in rows)


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
