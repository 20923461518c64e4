"""Predicted against measured: one number per line, its error, and whether it is within tolerance.

Both sides are traces in the shared schema, so every number comes from `sim.metrics` on either side.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from sim.config import ConfigError
from sim.metrics import compute_metrics, sample_staleness
from sim.trace import Trace

PASS, FAIL, INCOMPLETE = "PASS", "FAIL", "INCOMPLETE"


@dataclass(frozen=True)
class Tolerances:
    """How far a prediction may be from the measurement and still pass."""
    rel: float = field(default=0.10, metadata={"help": "relative error allowed on rates, times and means"})
    small_mean_abs: float = field(default=0.15, metadata={"help": "absolute error allowed on mean staleness "
                                                                  "(and its parts) when the measured mean < 1.5"})
    quantile_abs: float = field(default=1.0, metadata={"help": "absolute error (versions) on staleness quantiles"})
    idle_abs: float = field(default=0.10, metadata={"help": "absolute error on idle ratios (fractions)"})
    distance_max: float = field(default=0.5, metadata={"help": "largest Wasserstein-1 distance (versions) allowed"})
    share_abs: float = field(default=0.10, metadata={"help": "absolute error on the share of samples evicted from "
                                                             "the KV cache (fractions)"})

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"tolerance {f.name}: must be a finite number >= 0 (0 = exact), got {value}")


@dataclass(frozen=True)
class Row:
    metric: str
    predicted: float | None
    measured: float | None
    error: float | None       # predicted - measured (or the distance itself)
    rel_error: float | None   # error / measured, where measured != 0
    tolerance: str
    ok: bool | None           # None when not judged
    kind: str = "judged"      # judged (counts toward the verdict), reported (never judged), not requested
    note: str = ""            # why a row is not judged, where the reader should know

    @property
    def status(self) -> str:
        """yes, NO, not computed (judged, but a side has no value), reported, or not requested."""
        return {True: "yes", False: "NO"}.get(self.ok) or ("not computed" if self.kind == "judged" else self.kind)


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
    "kv/preempted_share": "share",
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
    if kind == "share":
        return err <= tol.share_abs, f"±{tol.share_abs:g}"
    return err <= tol.rel * abs(meas), f"±{100 * tol.rel:g}%"


def _why_missing(metric: str) -> str:
    """What a trace lacks when compute_metrics has no value for a judged metric."""
    if metric.startswith(("staleness/", "off_policy/")):
        return "no sample the learner trained on"
    if metric == "speedup/vs_sync":
        return "no sync-mode step time"
    if metric.startswith("kv/"):
        return "no sample records its evictions"
    return "no finite value"


def _sides(p, m) -> str:
    return "either side" if p is None and m is None else ("the predicted side" if p is None else "the measured side")


def compare(predicted: Trace, measured: Trace, tol: Tolerances = Tolerances(),
            predicted_sync_step_s: float | None = None, measured_sync_step_s: float | None = None) -> list[Row]:
    """Rows for every judged metric plus the distance between the two staleness distributions. speedup/vs_sync is
    judged only when a sync-mode step time is given (on either side): otherwise it was not requested. The KV-cache
    evictions have rows only when the prediction modelled a KV budget (its trace header's `kv`)."""
    mp = compute_metrics(predicted, predicted_sync_step_s)
    mm = compute_metrics(measured, measured_sync_step_s)
    sync_requested = predicted_sync_step_s is not None or measured_sync_step_s is not None
    kv_requested = (predicted.header.get("kv") or {}).get("budget_tokens") is not None
    rows = []
    for metric, kind in JUDGED.items():
        p, m = mp.get(metric), mm.get(metric)
        if metric == "speedup/vs_sync" and not sync_requested:
            rows.append(Row(metric, p, m, None, None, "", None, kind="not requested",
                            note="not requested: no sync-mode step times to compare"))
        elif kind == "share" and not kv_requested:
            continue
        elif p is None or m is None:
            rows.append(Row(metric, p, m, None, None, "", None,
                            note=f"not computed on {_sides(p, m)}: {_why_missing(metric)}"))
        else:
            ok, text = _judge(kind, p, m, tol)
            rows.append(Row(metric, p, m, p - m, (p - m) / m if m else None, text, ok))
    if kv_requested:
        p, m = mp["kv/preemptions"], mm["kv/preemptions"]
        rows.append(Row("kv/preemptions", p, m, None if None in (p, m) else p - m,
                        (p - m) / m if p is not None and m else None, "reported", None, kind="reported"))
    sp, sm = sample_staleness(predicted.samples), sample_staleness(measured.samples)
    if len(sp) and len(sm):
        w1 = wasserstein1(sp, sm)
        rows.append(Row("staleness/wasserstein1", None, None, w1, None, f"<= {tol.distance_max:g}",
                        bool(w1 <= tol.distance_max)))
        rows.append(Row("staleness/ks", None, None, ks_distance(sp, sm), None, "reported", None, kind="reported"))
    else:
        rows.append(Row("staleness/wasserstein1", None, None, None, None, f"<= {tol.distance_max:g}", None,
                        note=f"not computed on {_sides(len(sp) or None, len(sm) or None)}: "
                             f"{_why_missing('staleness/')}"))
        rows.append(Row("staleness/ks", None, None, None, None, "reported", None, kind="reported"))
    return rows


def verdict(rows: list[Row]) -> str:
    """FAIL when a judged metric is out of tolerance; else INCOMPLETE when a judged metric could not be computed
    on a side; else PASS. A row only reported, or not requested, does not count."""
    if any(r.ok is False for r in rows):
        return FAIL
    if any(r.kind == "judged" and r.ok is None for r in rows):
        return INCOMPLETE
    return PASS


def not_judged(rows: list[Row]) -> list[str]:
    """`metric (why)` for each row that was not judged for a reason the reader should know."""
    return [f"{r.metric} ({r.note})" for r in rows if r.note]


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
