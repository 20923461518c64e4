"""The seed paper's stability rule (docs/design.md), collapse detection, and fitting the rule's constants.

The rule: per-step surrogate-gradient bias grows like O(S·η), and training stays stable while

    η < scale · min{ R_batch / (S·G_upd),  R_crit / (T·G_upd) }

with S the maximum rollout lag (versions), T the horizon (learner steps), R_batch the batch-level clipping
radius, R_crit the critical cumulative drift (both parameter-norm units), G_upd the update norm per unit
learning rate, and `scale` the paper's "≪" made a number (1 = the bound itself; a calibration grid fits it).
Only two combinations matter for a prediction:

    a = scale·R_batch/G_upd   the largest stable S·η (the staleness term: binds when staleness dominates)
    b = scale·R_crit/G_upd    the largest stable T·η (the horizon term: binds when the horizon dominates)

so the largest stable learning rate is min(a/S, b/T), and the margin of a learning rate η is that over η.

S from a staleness distribution: by default its maximum, as the paper's S is the maximum rollout lag (with
admission gating it equals the bound once the bound binds, so it is also what a user sets); p99 is the
option for measured distributions where one straggler group would otherwise set S.

Fitting (`fit_update_norm`, `fit_clip_radius`, `fit_rule`) works from per-step metric rows (metrics.jsonl of
`stalecast train`) and from the collapse steps of a calibration grid; every estimate carries a 95 %
bootstrap interval. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

FIT_SCHEMA = "stalecast.stability-fit/1"
STATISTICS = ("max", "p99")


# --------------------------------------------------------------------------- the rule
@dataclass(frozen=True)
class StabilityConstants:
    """The rule's constants; math.inf in r_batch or r_crit means that term never limits the learning rate."""
    r_batch: float
    g_upd: float
    r_crit: float
    scale: float = 1.0

    @property
    def staleness_threshold(self) -> float:
        """a = scale·R_batch/G_upd: the largest stable S·η."""
        return self.scale * self.r_batch / self.g_upd

    @property
    def drift_threshold(self) -> float:
        """b = scale·R_crit/G_upd: the largest stable T·η."""
        return self.scale * self.r_crit / self.g_upd


@dataclass(frozen=True)
class Prediction:
    lr: float
    staleness: float          # S, versions
    horizon: int              # T, learner steps
    staleness_lr: float       # largest stable lr by the staleness term (inf when S = 0)
    horizon_lr: float         # largest stable lr by the horizon term

    @property
    def max_stable_lr(self) -> float:
        return min(self.staleness_lr, self.horizon_lr)

    @property
    def margin(self) -> float:
        """Largest stable lr over the lr: above 1 stable (2 = the lr could double), below 1 unstable."""
        return self.max_stable_lr / self.lr

    @property
    def binding(self) -> str:
        """Which term sets the largest stable lr: "staleness", "horizon", or "none" (neither limits it)."""
        if math.isinf(self.max_stable_lr):
            return "none"
        return "staleness" if self.staleness_lr < self.horizon_lr else "horizon"

    @property
    def stable(self) -> bool:
        return self.lr < self.max_stable_lr

    def as_dict(self) -> dict:
        return {**asdict(self), "max_stable_lr": self.max_stable_lr, "margin": self.margin,
                "binding": self.binding, "stable": self.stable}


def predict(constants: StabilityConstants, lr: float, staleness: float, horizon: int) -> Prediction:
    a, b = constants.staleness_threshold, constants.drift_threshold
    return Prediction(lr, float(staleness), int(horizon), a / staleness if staleness > 0 else math.inf, b / horizon)


def staleness_of(histogram: Mapping, statistic: str = "max") -> float:
    """S of a consumed-staleness histogram {staleness: count} (keys may be strings, as in metrics.jsonl):
    its maximum, or its 99th percentile (inverted CDF, as `sim.metrics` computes quantiles)."""
    if statistic not in STATISTICS:
        raise ValueError(f"unknown staleness statistic '{statistic}' (known: {', '.join(STATISTICS)})")
    pairs = sorted((int(s), int(c)) for s, c in histogram.items() if int(c) > 0)
    if not pairs:
        raise ValueError("the staleness histogram is empty: no consumed samples")
    if statistic == "max":
        return float(pairs[-1][0])
    values, counts = zip(*pairs)
    cumulative = np.cumsum(counts) / sum(counts)
    return float(values[int(np.searchsorted(cumulative, 0.99 - 1e-12))])


def applied_lr(optim, mean_staleness: float) -> float:
    """The learning rate a schedule applies at a mean staleness, where it can be known before training:
    exact for constant and staleness_aware; the base lr (an upper bound) for ess_coupled."""
    if optim.schedule == "staleness_aware":
        return optim.lr / (1.0 + optim.staleness_alpha * mean_staleness)
    return optim.lr


# --------------------------------------------------------------------------- constants from a config or fit file
def write_fit(path: Path, payload: dict) -> None:
    """fit.json: infinite values (a term the data never saw binding) and undefined ones are written as null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v
    path.write_text(json.dumps(clean({"schema": FIT_SCHEMA, **payload}), indent=2))


def read_fit(path: str | Path) -> tuple[StabilityConstants, str]:
    """(constants, staleness statistic) of a fit.json; null constants mean unbounded (math.inf)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such stability fit file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a stability fit file (invalid JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("schema") != FIT_SCHEMA:
        raise ValueError(f"{path}: not a stability fit file (schema is not {FIT_SCHEMA})")
    inf = lambda v: math.inf if v is None else float(v)  # noqa: E731
    try:
        c = data["constants"]
        constants = StabilityConstants(inf(c["r_batch"]), float(c["g_upd"]), inf(c["r_crit"]), float(c["scale"]))
        statistic = data["staleness_statistic"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a stability fit file (constants or staleness_statistic: {exc!r})") from None
    if statistic not in STATISTICS:
        raise ValueError(f"{path}: unknown staleness_statistic '{statistic}' (known: {', '.join(STATISTICS)})")
    return constants, statistic


def constants_from_config(cfg) -> tuple[StabilityConstants, str] | None:
    """The config's stability constants (a fit file fills the fields left null) and the staleness statistic,
    or None when they are not known."""
    st = cfg.stability
    statistic = st.staleness_statistic
    given = {"r_batch": st.r_batch, "g_upd": st.g_upd, "r_crit": st.r_crit}
    scale = st.scale
    if st.fit is not None:
        fitted, statistic = read_fit(st.fit)  # its constants were fitted with its own statistic
        given = {k: v if v is not None else getattr(fitted, k) for k, v in given.items()}
        scale = scale if scale is not None else fitted.scale
    elif None in given.values():
        return None
    return StabilityConstants(scale=scale if scale is not None else 1.0, **given), statistic


def horizon_of(cfg) -> int:
    return cfg.stability.horizon or cfg.run.steps


@dataclass(frozen=True)
class ConfigPrediction:
    """The rule applied to a configuration: what `stalecast simulate` reports."""
    prediction: Prediction
    constants: StabilityConstants
    statistic: str            # which statistic of the staleness distribution is S
    schedule_note: str        # how the lr was chosen from the schedule

    def as_dict(self) -> dict:
        """For metrics.json: a term that never limits the lr (infinite) is null, as JSON has no infinity."""
        finite = lambda d: {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in d.items()}  # noqa: E731
        return {**finite(self.prediction.as_dict()), "staleness_statistic": self.statistic,
                "constants": finite(asdict(self.constants)), "lr_note": self.schedule_note}


def predict_config(cfg, histogram: Mapping, mean_staleness: float) -> ConfigPrediction | None:
    """The rule for `cfg` at its (simulated or measured) consumed-staleness histogram; None when the config's
    stability constants are not known. Reads the config's fit file, if it names one."""
    known = constants_from_config(cfg)
    if known is None or not histogram:
        return None
    constants, statistic = known
    lr = applied_lr(cfg.optim, mean_staleness)
    note = {"constant": "the constant lr",
            "staleness_aware": f"lr / (1 + {cfg.optim.staleness_alpha:g} x mean staleness {mean_staleness:.2f})",
            "ess_coupled": "the base lr, an upper bound on what the ESS-coupled schedule applies"}[cfg.optim.schedule]
    return ConfigPrediction(predict(constants, lr, staleness_of(histogram, statistic), horizon_of(cfg)), constants,
                            statistic, note)


# --------------------------------------------------------------------------- collapse detection
class InstabilityDetector:
    """When a run collapses (docs/design.md; fields in `sim.config.Instability`): at the first step, after warm-up,
    where
    - its reward has fallen for good: the moving average over `reward_window` steps is below (1 - reward_drop) x the
      best moving average so far, and stays below for `recover_window` steps (the collapse step is where it fell);
    - its KL(behavior || current), k3 with r = π_θ/π_behav, passes `kl_max`;
    - or, at any step, its loss is not finite.
    A grad-norm spike alone is not a collapse (on a small model it is noise as often as not). Only the first
    collapse is kept."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.recent: deque[float] = deque(maxlen=cfg.reward_window)
        self.best = -math.inf
        self.fall_since: int | None = None
        self.step: int | None = None
        self.reason: str | None = None

    def update(self, step: int, reward: float, kl: float, loss: float) -> None:
        c, armed = self.cfg, step >= self.cfg.warmup_steps
        reason = None
        if not math.isfinite(loss):
            reason = f"loss is {loss}"
        elif armed and kl > c.kl_max:
            reason = f"KL {kl:.3g} > {c.kl_max:g}"
        self.recent.append(reward)
        if len(self.recent) == c.reward_window:
            average = float(np.mean(self.recent))
            if armed and average < (1 - c.reward_drop) * self.best:
                self.fall_since = step if self.fall_since is None else self.fall_since
                if step - self.fall_since + 1 >= c.recover_window and reason is None:
                    reason = (f"reward's {c.reward_window}-step average {average:.3g} below {1 - c.reward_drop:.2f} "
                              f"x its best {self.best:.3g} since step {self.fall_since}")
                    step = self.fall_since
            else:
                self.fall_since = None
            self.best = max(self.best, average)
        if reason is not None and self.step is None:
            self.step, self.reason = step, reason

    def update_row(self, row: Mapping) -> None:
        """`update` from a per-step metrics row (metrics.jsonl: "step", "reward/mean", "kl/k3", "loss"; null, a
        non-finite value as JSON writes it, is NaN)."""
        self.update(int(row["step"]), _number(row["reward/mean"]), _number(row["kl/k3"]), _number(row["loss"]))


def _number(value) -> float:
    """A metrics.jsonl value as a float; null (a non-finite value written as null) is NaN."""
    return math.nan if value is None else float(value)


def detect_collapse(rows: Iterable[Mapping], cfg) -> tuple[int | None, str | None]:
    """(collapse step, reason) of a series of per-step metric rows (metrics.jsonl: "step", "reward/mean", "kl/k3",
    "loss"), by the same detector the learner runs; (None, None) when stable."""
    det = InstabilityDetector(cfg)
    for row in rows:
        det.update_row(row)
    return det.step, det.reason


# --------------------------------------------------------------------------- estimates
@dataclass(frozen=True)
class Estimate:
    value: float
    low: float            # 95 % interval
    high: float
    n: int                # observations behind it
    method: str           # how it was estimated, in words


def _bootstrap(stat, data: Sequence, n_boot: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of stat over resamples (with replacement) of data's items."""
    rng = np.random.default_rng(seed)
    n = len(data)
    values = np.array([stat([data[i] for i in rng.integers(0, n, n)]) for _ in range(n_boot)], dtype=np.float64)
    # inverted_cdf picks observed values: no interpolation between a finite and an infinite one
    return (float(np.quantile(values, 0.025, method="inverted_cdf")),
            float(np.quantile(values, 0.975, method="inverted_cdf")))


UPDATE_QUANTILE = 0.95


def fit_update_norm(runs: Sequence[Sequence[Mapping]], n_boot: int = 400, seed: int = 0) -> Estimate | None:
    """G_upd: the 95th percentile over steps of ||Δθ||/lr (rows' "update_norm" and "lr"): a bound on the update
    norm per unit learning rate that one spike does not set. None when the rows carry no update norm."""
    ratios = [float(r["update_norm"]) / float(r["lr"]) for rows in runs for r in rows
              if r.get("update_norm") is not None and r.get("lr") and math.isfinite(float(r["update_norm"]))]
    if not ratios:
        return None
    stat = lambda xs: float(np.quantile(xs, UPDATE_QUANTILE))  # noqa: E731
    low, high = _bootstrap(stat, ratios, n_boot, seed)
    return Estimate(stat(ratios), low, high, len(ratios),
                    f"{UPDATE_QUANTILE:.0%} quantile of update_norm / lr over steps")


def drift_and_spread(rows: Sequence[Mapping], g_upd: float) -> list[tuple[float, float]]:
    """(drift, log-ratio spread) per step and staleness range s >= 1 of one run's rows, in step order.

    Drift: parameter distance between the policy that generated the range's samples and the one training on
    them, bounded as the paper does by the sum of the s previous updates: their logged update norms, or
    G_upd x their learning rates. Spread: sqrt(2 KL_k3) of the range, as KL ≈ E[(log r)²]/2 for small drift."""
    by_step = {int(r["step"]): r for r in rows}
    pairs = []
    for step, r in by_step.items():
        for s in (int(k) for k in (r.get("staleness/hist") or {})):
            kl = r.get(f"by_staleness/{s}/kl/k3")
            previous = [by_step.get(step - j) for j in range(1, s + 1)]
            if s < 1 or kl is None or not math.isfinite(kl) or any(p is None for p in previous):
                continue
            drift = sum(float(p["update_norm"]) if p.get("update_norm") is not None else g_upd * float(p["lr"])
                        for p in previous)
            pairs.append((drift, math.sqrt(2.0 * max(kl, 0.0))))
    return pairs


def fit_clip_radius(runs: Sequence[Sequence[Mapping]], clip_eps: float, g_upd: float = 1.0, n_boot: int = 400,
                    seed: int = 0) -> Estimate | None:
    """R_batch: the drift at which the importance ratios' spread reaches the clip, |log r| = log(1 + clip_eps).

    Spread = k · drift is fitted through the origin over every (step, staleness range) of the runs (least
    squares), and R_batch = log(1 + clip_eps) / k; 95 % interval by bootstrap over those observations.
    With g_upd = 1 (update norms not logged) R_batch comes in units of G_upd. None without stale samples."""
    pairs = [p for rows in runs for p in drift_and_spread(rows, g_upd)]
    pairs = [(d, s) for d, s in pairs if d > 0]
    if not pairs:
        return None
    target = math.log1p(clip_eps)

    def radius(items) -> float:
        d = np.array([x for x, _ in items])
        s = np.array([y for _, y in items])
        k = float((d * s).sum() / (d * d).sum())
        return target / k if k > 0 else math.inf

    low, high = _bootstrap(radius, pairs, n_boot, seed)
    return Estimate(radius(pairs), low, high, len(pairs),
                    f"drift where sqrt(2 KL) of stale samples reaches log(1 + {clip_eps:g})")


# --------------------------------------------------------------------------- fitting the rule to collapses
@dataclass(frozen=True)
class RuleFit:
    staleness_threshold: Estimate   # a: the largest stable S·η
    drift_threshold: Estimate       # b: the largest stable t·η (cumulative drift per G_upd at a collapse)
    errors: int                     # cells of the data it was fitted on that it labels wrongly
    n: int

    def as_constants(self) -> StabilityConstants:
        """The thresholds as constants in units of G_upd, scale 1 (predictions need nothing else)."""
        return StabilityConstants(self.staleness_threshold.value, 1.0, self.drift_threshold.value)


def _candidates(values: np.ndarray) -> np.ndarray:
    """Thresholds that split sorted positive values differently: the smallest, the geometric midpoints, inf."""
    u = np.unique(values[values > 0])
    if len(u) == 0:
        return np.array([math.inf])
    return np.concatenate([u[:1], np.sqrt(u[:-1] * u[1:]), [math.inf]])


def _fit_thresholds(staleness, lr, horizon, collapse_step, early_step: int) -> tuple[float, float, int]:
    """(a, b, errors) minimising, in order: cells labelled wrongly (collapsed within the horizon or not); the
    squared log error of the predicted collapse steps (early_step in the staleness regime, b/η in the
    horizon regime); then, where both terms explain the collapses equally, the staleness term (the larger b,
    then the larger a): a calibration grid varies S, and its sync runs are what show a horizon limit."""
    s, e, t = (np.asarray(v, dtype=np.float64) for v in (staleness, lr, horizon))
    tc = np.asarray(collapse_step, dtype=np.float64)
    collapsed = ~np.isnan(tc)
    x, y = s * e, t * e
    log_tc = np.log(np.maximum(tc, 1.0))
    log_early = math.log(max(early_step, 1))
    best = None
    for a in _candidates(x):
        stale_hit = x >= a
        horizon_hit = collapsed & ~stale_hit
        b_cands = np.concatenate([_candidates(y), (e * tc)[horizon_hit]])
        if horizon_hit.any():  # the least-squares b for this a's horizon-regime collapses
            b_cands = np.append(b_cands, math.exp(float(np.mean(np.log(e * tc)[horizon_hit]))))
        b_cands = np.unique(b_cands)
        pred = stale_hit[None, :] | (y[None, :] >= b_cands[:, None])                      # [B, n]
        errors = (pred != collapsed[None, :]).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_pred = np.where(stale_hit[None, :], log_early, np.log(np.maximum(b_cands[:, None] / e[None, :], 1.0)))
        step_err = np.where(pred & collapsed[None, :], (log_pred - log_tc[None, :]) ** 2, 0.0).sum(axis=1)
        for b, err, se in zip(b_cands, errors, step_err):
            key = (int(err), round(float(se), 12), -b, -a)
            if best is None or key < best[0]:
                best = (key, a, b)
    (err, _, _, _), a, b = best
    return float(a), float(b), err


def fit_rule(staleness, lr, horizon, collapse_step, early_step: int, n_boot: int = 200, seed: int = 0) -> RuleFit:
    """Fit a and b to a calibration grid: per cell its S, applied lr, horizon (steps run) and collapse step
    (NaN when stable). 95 % intervals by bootstrap over cells; an infinite a or b means the data never showed
    that term binding (no limit is claimed)."""
    cols = [np.asarray(v, dtype=np.float64) for v in (staleness, lr, horizon, collapse_step)]
    n = len(cols[0])
    if n == 0:
        raise ValueError("no cells to fit the stability rule to")
    a, b, errors = _fit_thresholds(*cols, early_step)
    rng = np.random.default_rng(seed)
    boot = np.array([_fit_thresholds(*(c[idx] for c in cols), early_step)[:2]
                     for idx in (rng.integers(0, n, n) for _ in range(n_boot))]).reshape(n_boot, 2)

    def ci(j: int) -> tuple[float, float]:  # n_boot = 0 (held-out refits): no interval
        if not n_boot:
            return math.nan, math.nan
        return tuple(float(np.quantile(boot[:, j], q, method="inverted_cdf")) for q in (0.025, 0.975))
    return RuleFit(Estimate(a, *ci(0), n, "threshold on S·η separating stable from collapsed cells"),
                   Estimate(b, *ci(1), n,
                            "threshold on T·η, centred on η x collapse step of horizon-regime collapses"),
                   errors, n)


def constants_from_fit(rule: RuleFit, g_upd: Estimate | None, r_batch: Estimate | None
                       ) -> tuple[StabilityConstants, str]:
    """The rule's constants from fitted thresholds and the measured G_upd and R_batch, and their units.

    a = scale·R_batch/G_upd gives the scale where R_batch was measured (scale 1 and R_batch = a·G_upd where it
    was not, or where a is unbounded); then R_crit = b·G_upd/scale. Without a measured G_upd the constants
    are in units of G_upd (G_upd = 1)."""
    g = g_upd.value if g_upd is not None else 1.0
    units = "parameter L2 norm" if g_upd is not None else "units of G_upd (update norms not logged: G_upd = 1)"
    a, b = rule.staleness_threshold.value, rule.drift_threshold.value
    if r_batch is not None and math.isfinite(a) and math.isfinite(r_batch.value):
        scale, rb = a * g / r_batch.value, r_batch.value
    else:
        scale, rb = 1.0, a * g
    return StabilityConstants(rb, g, b * g / scale, scale), units
