"""The seed paper's stability rule (docs/design.md), collapse detection, and the rule fitted to a study's runs.

The rule: per-step surrogate-gradient bias grows like O(S·η), and training stays stable while

    η ≪ min{ R_batch / (S·G_upd),  R_crit / (T·G_upd) }

with S the maximum rollout lag (versions), T the horizon (learner steps). Two ways to use it here:

- **Given constants** (a config's `stability` section: r_batch, g_upd, r_crit, scale): the formula itself, the
  largest stable learning rate min(a/S, b/T) with a = scale·R_batch/G_upd, b = scale·R_crit/G_upd
  (`StabilityConstants`, `predict`).
- **A fit** (`stalecast study stability`, its fit.json; `StabilityFit`): a logistic regression of collapse on
  log η, log S and (where the study varied it) log T,

      P(collapse) = σ(c0 + c_η log η + c_S log S + c_T log T),

  whose largest stable learning rate (P = 1/2, or `stability.collapse_probability`) falls like S^k with
  k = −c_S/c_η. The rule predicts k = −1 where staleness binds (and −c_T/c_η = −1 where the horizon binds). When
  the study found no S effect (k's 95 % interval contains 0) the fit file says so, and predictions use the fit
  without S (log η and log T only).

S from a staleness distribution: by default its maximum, as the paper's S is the maximum rollout lag (with
fixed_lag or admission gating it is the lag or the bound); p99 is the option for measured distributions where
one straggler group would otherwise set S.

Also here: the collapse detector (`InstabilityDetector`, `detect_collapse`), the KL threshold's calibration on
stable runs (`calibrate_kl`), and the logistic fit itself (`fit_logistic`: Newton's method with a small ridge
penalty, in numpy). Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

FIT_SCHEMA = "stalecast.stability-fit/2"
STATISTICS = ("max", "p99")


# --------------------------------------------------------------------------- predictions
@dataclass(frozen=True)
class Prediction:
    """The largest stable learning rate at one (S, T), by given constants or by a fit, and the lr against it."""
    lr: float
    staleness: float          # S, versions
    horizon: int              # T, learner steps
    max_stable_lr: float      # inf: nothing limits the lr
    binding: str              # constants: "staleness", "horizon" or "none"; a fit: "fit" or "fit without S"
    staleness_lr: float | None = None           # constants: a/S (inf when S = 0)
    horizon_lr: float | None = None             # constants: b/T
    collapse_probability: float | None = None   # a fit: its P(collapse) at this lr, S, T
    notes: tuple[str, ...] = ()                 # where the prediction leaves what the fit saw

    @property
    def margin(self) -> float:
        """Largest stable lr over the lr: above 1 stable (2 = the lr could double), below 1 unstable."""
        return self.max_stable_lr / self.lr

    @property
    def stable(self) -> bool:
        return self.lr < self.max_stable_lr

    def as_dict(self) -> dict:
        return {**asdict(self), "notes": list(self.notes), "margin": self.margin, "stable": self.stable}


@dataclass(frozen=True)
class StabilityConstants:
    """The rule's constants; math.inf in r_batch or r_crit means that term never limits the learning rate."""
    r_batch: float
    g_upd: float
    r_crit: float
    scale: float = 1.0
    statistic: str = "max"

    @property
    def staleness_threshold(self) -> float:
        """a = scale·R_batch/G_upd: the largest stable S·η."""
        return self.scale * self.r_batch / self.g_upd

    @property
    def drift_threshold(self) -> float:
        """b = scale·R_crit/G_upd: the largest stable T·η."""
        return self.scale * self.r_crit / self.g_upd

    def predict(self, lr: float, staleness: float, horizon: int) -> Prediction:
        return predict(self, lr, staleness, horizon)

    def describe(self) -> str:
        return (f"the paper's rule with given constants: lr < {self.scale:.3g} x min(R_batch/(S G_upd), "
                f"R_crit/(T G_upd)), a = {self.staleness_threshold:.3g}, b = {self.drift_threshold:.3g}")

    def as_dict(self) -> dict:
        return {"kind": "constants", **asdict(self), "a": self.staleness_threshold, "b": self.drift_threshold}


def predict(constants: StabilityConstants, lr: float, staleness: float, horizon: int) -> Prediction:
    """The paper's rule with given constants: largest stable lr min(a/S, b/T)."""
    a, b = constants.staleness_threshold, constants.drift_threshold
    s_lr = a / staleness if staleness > 0 else math.inf
    h_lr = b / horizon
    best = min(s_lr, h_lr)
    binding = "none" if math.isinf(best) else ("staleness" if s_lr < h_lr else "horizon")
    return Prediction(lr, float(staleness), int(horizon), best, binding, s_lr, h_lr)


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


# --------------------------------------------------------------------------- the logistic fit
FEATURES = ("log_lr", "log_S", "log_T")
PROB_CLIP = 1e-6   # probabilities are kept in [1e-6, 1 - 1e-6] where a log-loss is taken
RIDGE = 1.0        # ridge penalty on the standardised coefficients (not the intercept): a N(0, 1) prior


@dataclass(frozen=True)
class LogisticFit:
    """P(y = 1) = σ(intercept + Σ coef[f]·x_f) on raw features; `constant` when the data had one class only
    (then the probability is (k + 1/2)/(n + 1), the smoothed rate, and every coef is 0)."""
    features: tuple[str, ...]
    intercept: float
    coef: tuple[float, ...]
    n: int
    iterations: int = 0
    constant: bool = False
    covariance: np.ndarray | None = field(default=None, compare=False, repr=False)  # of (intercept, coef...)

    def logit(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64).reshape(-1, len(self.features))
        return self.intercept + X @ np.asarray(self.coef, dtype=np.float64)

    def proba(self, X: np.ndarray) -> np.ndarray:
        return _sigmoid(self.logit(X))

    def get(self, name: str) -> float:
        return self.coef[self.features.index(name)] if name in self.features else 0.0

    def standard_errors(self) -> dict[str, float]:
        """From the inverse of the penalised Hessian at the optimum (the ridge's posterior, approximately)."""
        if self.covariance is None:
            return {}
        se = np.sqrt(np.diag(self.covariance))
        return dict(zip(("intercept", *self.features), map(float, se)))


def _sigmoid(z):
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def fit_logistic(X, y, features: Sequence[str], ridge: float = RIDGE, max_iter: int = 100,
                 tol: float = 1e-10) -> LogisticFit:
    """Penalised maximum likelihood by Newton's method (IRLS) with step halving: features standardised, ridge on
    their coefficients (the intercept is free), coefficients returned on the raw scale. A feature constant over
    the data gets coefficient 0. The penalty keeps the fit finite where the classes separate."""
    X = np.asarray(X, dtype=np.float64).reshape(len(y), len(features))
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    if n == 0:
        raise ValueError("no observations to fit")
    k = float(y.sum())
    if k == 0 or k == n:
        p = (k + 0.5) / (n + 1.0)
        return LogisticFit(tuple(features), math.log(p / (1 - p)), (0.0,) * len(features), n, 0, True)
    mu, sd = X.mean(axis=0), X.std(axis=0)
    used = sd > 1e-12
    Z = np.column_stack([np.ones(n), (X[:, used] - mu[used]) / sd[used]])
    penalty = np.full(Z.shape[1], ridge)
    penalty[0] = 0.0

    def objective(b):
        z = Z @ b
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(penalty * b * b))

    beta = np.zeros(Z.shape[1])
    beta[0] = math.log(k / (n - k))
    current = objective(beta)
    it = 0
    for it in range(1, max_iter + 1):
        p = _sigmoid(Z @ beta)
        grad = Z.T @ (y - p) - penalty * beta
        hess = (Z * (p * (1 - p))[:, None]).T @ Z + np.diag(penalty)
        step = np.linalg.solve(hess + 1e-12 * np.eye(len(beta)), grad)
        t = 1.0
        while True:
            trial = beta + t * step
            value = objective(trial)
            if value <= current + 1e-12 or t < 1e-8:
                break
            t /= 2
        beta, change, current = trial, float(np.max(np.abs(t * step))), value
        if change < tol:
            break
    p = _sigmoid(Z @ beta)
    hess = (Z * (p * (1 - p))[:, None]).T @ Z + np.diag(penalty)
    cov_std = np.linalg.inv(hess)
    # back to the raw scale: x_std = (x - mu)/sd, so coef = b/sd and intercept = b0 - Σ b·mu/sd
    coef = np.zeros(len(features))
    coef[used] = beta[1:] / sd[used]
    intercept = beta[0] - float(np.sum(beta[1:] * mu[used] / sd[used]))
    J = np.zeros((1 + len(features), len(beta)))  # d(raw)/d(std)
    J[0, 0] = 1.0
    cols = np.flatnonzero(used)
    for j, c in enumerate(cols):
        J[0, 1 + j] = -mu[c] / sd[c]
        J[1 + c, 1 + j] = 1.0 / sd[c]
    return LogisticFit(tuple(features), float(intercept), tuple(map(float, coef)), n, it, False, J @ cov_std @ J.T)


def log_loss(y, p) -> float:
    """Mean negative log-likelihood of outcomes y under probabilities p (clipped to [PROB_CLIP, 1 - PROB_CLIP])."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), PROB_CLIP, 1 - PROB_CLIP)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# --------------------------------------------------------------------------- the fit as a rule (fit.json)
@dataclass(frozen=True)
class StabilityFit:
    """What `stalecast study stability` found, as a rule: the logistic fit with S and the fit without it, whether
    S has a measurable effect, and the ranges the runs covered (a prediction outside them says so)."""
    coef: dict            # intercept, log_lr, log_S, log_T (log_T 0 when the study did not vary T)
    coef_no_s: dict       # intercept, log_lr, log_T: the fit without S
    staleness_effect: bool
    exponent: tuple[float, float, float]        # k = -c_S/c_η and its 95 % interval
    verdict: str
    lr_range: tuple[float, float]
    staleness_range: tuple[float, float]
    horizon_range: tuple[int, int]
    statistic: str = "max"
    probability: float = 0.5                    # the collapse probability that defines "largest stable"
    kl_threshold: float | None = None
    source: str = ""

    @property
    def horizon_varied(self) -> bool:
        return self.horizon_range[0] != self.horizon_range[1]

    def with_probability(self, probability: float | None) -> "StabilityFit":
        return self if probability is None else replace(self, probability=float(probability))

    def _coefficients(self) -> tuple[dict, bool]:
        """The fit with S where S has a measurable effect, else the fit without it."""
        return (self.coef, True) if self.staleness_effect else (self.coef_no_s, False)

    def collapse_probability(self, lr: float, staleness: float, horizon: float) -> float:
        c, use_s = self._coefficients()
        z = (c["intercept"] + c["log_lr"] * math.log(lr) + c.get("log_T", 0.0) * math.log(horizon)
             + (c.get("log_S", 0.0) * math.log(max(staleness, 1.0)) if use_s else 0.0))
        return float(_sigmoid(z))

    def predict(self, lr: float, staleness: float, horizon: int) -> Prediction:
        c, use_s = self._coefficients()
        notes = []
        s_used = float(staleness)
        if use_s and staleness < 1:
            s_used = 1.0
            notes.append(f"S = {staleness:g} lies below the fit's S >= 1 (sync runs are not in the fit): "
                         f"predicted as S = 1")
        lo, hi = self.staleness_range
        if use_s and not lo <= s_used <= hi:
            notes.append(f"S = {s_used:g} is outside the fitted S range {lo:g}-{hi:g}: extrapolated")
        tlo, thi = self.horizon_range
        if self.horizon_varied and not tlo <= horizon <= thi:
            notes.append(f"T = {horizon} is outside the fitted horizon range {tlo}-{thi}: extrapolated")
        if not self.horizon_varied and horizon != tlo:
            notes.append(f"the fit saw one horizon only (T = {tlo}); T = {horizon} is not accounted for")
        rest = (c["intercept"] + c.get("log_T", 0.0) * math.log(horizon)
                + (c.get("log_S", 0.0) * math.log(s_used) if use_s else 0.0))
        if c["log_lr"] <= 0:
            best = math.inf
            notes.append("the fit's collapse probability does not rise with the lr: no lr limit")
        else:
            best = math.exp((logit(self.probability) - rest) / c["log_lr"])
            if not self.lr_range[0] <= best <= self.lr_range[1]:
                notes.append(f"the largest stable lr lies outside the studied lr range "
                             f"{self.lr_range[0]:.3g}-{self.lr_range[1]:.3g}: extrapolated")
        return Prediction(lr, float(staleness), int(horizon), best, "fit" if use_s else "fit without S",
                          collapse_probability=self.collapse_probability(lr, staleness, horizon), notes=tuple(notes))

    def describe(self) -> str:
        k, lo, hi = self.exponent
        terms = "log lr, log S" + (", log T" if self.horizon_varied else "")
        base = (f"logistic fit of collapse on {terms} (largest stable lr at P(collapse) = {self.probability:g}); "
                f"S exponent k = {k:.2f} [{lo:.2f}, {hi:.2f}] (the rule: -1)")
        if not self.staleness_effect:
            return base + "; no measurable S effect, so the lr bound is applied without S"
        return base

    def as_dict(self) -> dict:
        return {"kind": "fit", **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}}


def write_fit(path: Path, payload: dict) -> None:
    """fit.json: non-finite values are written as null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, (np.floating, np.integer)):
            return clean(v.item())
        if isinstance(v, np.bool_):
            return bool(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    path.write_text(json.dumps(clean({"schema": FIT_SCHEMA, **payload}), indent=2))


def read_fit(path: str | Path) -> StabilityFit:
    """The rule of a fit.json written by `stalecast study stability`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such stability fit file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a stability fit file (invalid JSON: {exc})") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != FIT_SCHEMA:
        older = " (an older study's constants fit: run `stalecast study stability` again)" if (
            isinstance(schema, str) and schema.startswith("stalecast.stability-fit/")) else ""
        raise ValueError(f"{path}: not a stability fit file (schema is not {FIT_SCHEMA}){older}")
    try:
        rule = data["rule"]
        coef = {k: float(rule["coefficients"][k] or 0.0) for k in ("intercept", *FEATURES)}
        no_s = {k: float(rule["coefficients_without_S"][k] or 0.0) for k in ("intercept", "log_lr", "log_T")}
        e = rule["staleness_exponent"]
        exponent = tuple(math.nan if e[k] is None else float(e[k]) for k in ("value", "low", "high"))
        r = rule["range"]
        fit = StabilityFit(coef, no_s, bool(rule["staleness_effect"]), exponent, str(rule["verdict"]),
                           (float(r["lr"][0]), float(r["lr"][1])), (float(r["S"][0]), float(r["S"][1])),
                           (int(r["T"][0]), int(r["T"][1])), data["staleness_statistic"],
                           float(rule.get("probability", 0.5)),
                           None if data.get("kl_threshold", {}).get("value") is None
                           else float(data["kl_threshold"]["value"]), str(data.get("source", "")))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"{path}: not a stability fit file (rule: {exc!r})") from None
    if fit.statistic not in STATISTICS:
        raise ValueError(f"{path}: unknown staleness_statistic '{fit.statistic}' (known: {', '.join(STATISTICS)})")
    return fit


# --------------------------------------------------------------------------- the rule of a config
def rule_from_config(cfg):
    """The config's stability rule: its fit file (`stability.fit`), its constants, or None when neither is given."""
    st = cfg.stability
    if st.fit is not None:
        return read_fit(st.fit).with_probability(st.collapse_probability)
    if st.r_batch is None:
        return None
    return StabilityConstants(st.r_batch, st.g_upd, st.r_crit, st.scale if st.scale is not None else 1.0,
                              st.staleness_statistic)


def horizon_of(cfg) -> int:
    return cfg.stability.horizon or cfg.run.steps


@dataclass(frozen=True)
class ConfigPrediction:
    """The rule applied to a configuration: what `stalecast simulate` reports."""
    prediction: Prediction
    rule: object              # StabilityConstants or StabilityFit
    statistic: str            # which statistic of the staleness distribution is S
    schedule_note: str        # how the lr was chosen from the schedule

    def as_dict(self) -> dict:
        """For metrics.json (non-finite values are null, as JSON has no infinity)."""
        def finite(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: finite(x) for k, x in v.items()}
            if isinstance(v, list):
                return [finite(x) for x in v]
            return v
        return finite({**self.prediction.as_dict(), "staleness_statistic": self.statistic,
                       "rule": self.rule.as_dict(), "rule_text": self.rule.describe(), "lr_note": self.schedule_note})


def predict_config(cfg, histogram: Mapping, mean_staleness: float) -> ConfigPrediction | None:
    """The rule for `cfg` at its (simulated or measured) consumed-staleness histogram; None when the config gives
    no rule. Reads the config's fit file, if it names one."""
    rule = rule_from_config(cfg)
    if rule is None or not histogram:
        return None
    lr = applied_lr(cfg.optim, mean_staleness)
    note = {"constant": "the constant lr",
            "staleness_aware": f"lr / (1 + {cfg.optim.staleness_alpha:g} x mean staleness {mean_staleness:.2f})",
            "ess_coupled": "the base lr, an upper bound on what the ESS-coupled schedule applies"}[cfg.optim.schedule]
    return ConfigPrediction(rule.predict(lr, staleness_of(histogram, rule.statistic), horizon_of(cfg)), rule,
                            rule.statistic, note)


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


# --------------------------------------------------------------------------- the KL threshold, calibrated
def without_kl(cfg):
    """A copy of an `Instability` config whose KL criterion never fires (kl_max = inf): reward and loss only."""
    return cfg.model_copy(update={"kl_max": math.inf})


def with_kl(cfg, kl_max: float | None):
    """A copy with the given KL threshold (None: no KL criterion)."""
    return cfg.model_copy(update={"kl_max": math.inf if kl_max is None else float(kl_max)})


def criterion_of(reason: str | None) -> str | None:
    """Which criterion a detector's reason names: "reward", "kl", "loss" (None when stable)."""
    if reason is None:
        return None
    if reason.startswith("loss"):
        return "loss"
    if reason.startswith("KL"):
        return "kl"
    return "reward"


def max_kl(rows: Iterable[Mapping], warmup_steps: int) -> float:
    """The largest finite per-step KL (k3) from the warm-up on (the steps the detector checks KL on); NaN if none."""
    values = [_number(r.get("kl/k3")) for r in rows if int(r["step"]) >= warmup_steps]
    values = [v for v in values if math.isfinite(v)]
    return max(values) if values else math.nan


@dataclass(frozen=True)
class KLCalibration:
    """The KL threshold from the runs stable by reward and loss: factor x the largest per-step k3 any reached."""
    threshold: float | None       # None: no stable run to calibrate on (the KL criterion is off)
    factor: float
    largest_stable_kl: float | None
    stable_runs: int              # runs it was calibrated on
    runs: int                     # runs labelled
    falling: int = 0              # runs left out: stable by the label, but their reward falling when they ended
    at: str | None = None         # the run that reached the largest KL

    def as_dict(self) -> dict:
        return {"value": self.threshold, "factor": self.factor, "largest_stable_kl": self.largest_stable_kl,
                "stable_runs": self.stable_runs, "falling_runs_left_out": self.falling, "runs": self.runs,
                "at": self.at,
                "method": "factor x the largest per-step KL (k3, from the warm-up on) of the runs stable by reward "
                          "and loss alone, leaving out runs whose reward was falling when they ended"}


def calibrate_kl(runs: Mapping[str, Sequence[Mapping]], cfg, factor: float = 2.0) -> KLCalibration:
    """Label every run by reward and loss only (KL off), then set the KL threshold to `factor` x the largest
    per-step k3 (from the warm-up on) reached by a run that label calls stable. A run whose reward's moving average
    is below the fall line when it ends (a fall too recent to be confirmed) is left out: it is not known to be
    stable. `runs`: {name: metrics rows}; `cfg`: the `Instability` config (its warm-up and reward settings)."""
    if factor <= 0:
        raise ValueError(f"the KL factor must be positive, not {factor}")
    plain = without_kl(cfg)
    best, at, stable, falling = -math.inf, None, 0, 0
    for name, rows in runs.items():
        det = InstabilityDetector(plain)
        for row in rows:
            det.update_row(row)
        if det.step is not None:
            continue
        if det.fall_since is not None:
            falling += 1
            continue
        stable += 1
        kl = max_kl(rows, cfg.warmup_steps)
        if math.isfinite(kl) and kl > best:
            best, at = kl, name
    if not math.isfinite(best):
        return KLCalibration(None, factor, None, stable, len(runs), falling)
    return KLCalibration(factor * best, factor, best, stable, len(runs), falling, at)
