"""Does staleness move the edge of stability, and by the exponent the rule says? The analysis of a stability study.

Input: one row per observation (a run's outcome within a horizon T: the run's first T steps), with columns
`run` (the training run: a run trained to 120 steps gives its 30- and 60-step horizons too), `seed`, `S` (the
lag, >= 1: the sync baseline is not in the fit), `lr`, `T` and `collapsed`.

- **The fit**: P(collapse) = σ(c0 + c_η log η + c_S log S + c_T log T) (log T only where T varies), by
  `sim.stability.fit_logistic`. The largest stable lr (P = 1/2) is η* ∝ S^k T^k_T with k = -c_S/c_η and
  k_T = -c_T/c_η; the rule predicts k = -1 where staleness binds (and k_T = -1 where the horizon binds).
- **The interval**: a bootstrap over training runs (resampled with replacement, a run's horizons together),
  percentile 95 % interval.
- **The verdict**: "consistent with the rule" only if k's interval excludes 0 and contains -1; "no measurable S
  effect" if it contains 0; otherwise S matters with another exponent.
- **Baselines on the same held-out splits** (leave one seed out; leave one S out): the majority class, lr only,
  S only, and, where T varies, lr and T without S, beside the full fit; accuracy (P >= 1/2 predicts a collapse)
  and log-loss of each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sim.stability import FEATURES, RIDGE, LogisticFit, fit_logistic, log_loss, logit

SPLITS = {"seed": "Leave one seed out", "S": "Leave one S out"}
RULE = "rule fit"


def models(horizon_varied: bool) -> dict[str, tuple[str, ...]]:
    """The compared models: name -> features (the majority class has none)."""
    out = {"majority class": (), "lr only": ("log_lr",), "S only": ("log_S",)}
    if horizon_varied:
        out["lr and T, no S"] = ("log_lr", "log_T")
    out[RULE] = ("log_lr", "log_S", "log_T") if horizon_varied else ("log_lr", "log_S")
    return out


def features(obs: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"log_lr": np.log(obs["lr"].to_numpy(float)), "log_S": np.log(obs["S"].to_numpy(float)),
                         "log_T": np.log(obs["T"].to_numpy(float))}, index=obs.index)


def fit(obs: pd.DataFrame, names: tuple[str, ...], ridge: float = RIDGE) -> LogisticFit:
    """The logistic fit on the named features (none: the collapse rate, as a constant model)."""
    y = obs["collapsed"].to_numpy(float)
    if not names:
        return fit_logistic(np.zeros((len(obs), 0)), y, (), ridge)
    return fit_logistic(features(obs)[list(names)].to_numpy(), y, names, ridge)


def proba(model: LogisticFit, obs: pd.DataFrame) -> np.ndarray:
    if not model.features:
        return np.full(len(obs), float(1 / (1 + math.exp(-model.intercept))))
    return model.proba(features(obs)[list(model.features)].to_numpy())


# --------------------------------------------------------------------------- held out
def heldout(obs: pd.DataFrame, split: str, horizon_varied: bool, ridge: float = RIDGE) -> pd.DataFrame:
    """Every observation's collapse probability under each model fitted without its group (its seed, or its S);
    columns "p/<model>". A group whose held-out fit has no data left is skipped (its rows stay NaN)."""
    out = obs.copy()
    compared = models(horizon_varied)
    for name in compared:
        out[f"p/{name}"] = np.nan
    for g in pd.unique(obs[split]):
        train, test = obs[obs[split] != g], obs[obs[split] == g]
        if train.empty:
            continue
        for name, names in compared.items():
            out.loc[test.index, f"p/{name}"] = proba(fit(train, names, ridge), test)
    return out


def scores(pred: pd.DataFrame, horizon_varied: bool) -> pd.DataFrame:
    """Accuracy and log-loss of each model over the predicted observations."""
    rows = []
    y = pred["collapsed"].to_numpy(float)
    for name in models(horizon_varied):
        p = pred[f"p/{name}"].to_numpy(float)
        ok = ~np.isnan(p)
        rows.append({"model": name, "n": int(ok.sum()),
                     "accuracy": float(((p[ok] >= 0.5) == (y[ok] == 1)).mean()) if ok.any() else math.nan,
                     "log_loss": log_loss(y[ok], p[ok]) if ok.any() else math.nan})
    return pd.DataFrame(rows).set_index("model")


# --------------------------------------------------------------------------- exponent and its interval
@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def text(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


def exponents(model: LogisticFit) -> tuple[float, float]:
    """(k, k_T) = (-c_S/c_η, -c_T/c_η) of a fit (NaN where c_η is 0 or negative: no lr edge)."""
    eta = model.get("log_lr")
    if not eta > 0:
        return math.nan, math.nan
    return -model.get("log_S") / eta, -model.get("log_T") / eta


def bootstrap(obs: pd.DataFrame, names: tuple[str, ...], n_boot: int, seed: int, ridge: float = RIDGE
              ) -> np.ndarray:
    """Coefficient draws [n_boot, 1 + len(names)] (intercept first): the training runs resampled with
    replacement (a pairs bootstrap; a run's horizons travel together, as they are one run's prefixes)."""
    rng = np.random.default_rng(seed)
    runs = list(obs.groupby("run", sort=False).indices.values())   # row positions of each run
    X = features(obs)[list(names)].to_numpy()
    y = obs["collapsed"].to_numpy(float)
    draws = np.empty((n_boot, 1 + len(names)))
    for b in range(n_boot):
        rows = np.concatenate([runs[i] for i in rng.integers(0, len(runs), len(runs))])
        m = fit_logistic(X[rows], y[rows], names, ridge)
        draws[b] = (m.intercept, *m.coef)
    return draws


def interval(values: np.ndarray, point: float) -> Interval:
    """Percentile 95 % interval of draws; a draw that is NaN (no lr edge in that resample) counts as unbounded on
    both sides, so that a fit without an lr edge in over 2.5 % of resamples has an unbounded interval."""
    v = np.asarray(values, dtype=np.float64)
    bad = np.isnan(v)
    v = np.concatenate([v[~bad], np.full(bad.sum(), -np.inf)])
    low = float(np.quantile(v, 0.025, method="inverted_cdf"))
    v[np.isinf(v)] = np.inf
    high = float(np.quantile(v, 0.975, method="inverted_cdf"))
    return Interval(point, low, high)


VERDICTS = {"rule": "consistent with the rule", "none": "no measurable S effect", "other": "S matters, not as 1/S",
            "undetermined": "undetermined"}


def verdict(k: Interval) -> tuple[str, str]:
    """(kind, sentence): kind "rule" (the interval excludes 0 and contains -1), "none" (it contains 0), "other"
    (it excludes both), or "undetermined" (no lr edge, or no interval)."""
    if not math.isfinite(k.value):
        return "undetermined", "undetermined: the fit's collapse probability does not rise with the lr (no lr edge)"
    if math.isnan(k.low) or math.isnan(k.high):
        return "undetermined", "undetermined: no bootstrap interval"
    if k.contains(0.0):
        return "none", ("S has no measurable effect at this scale: the exponent's interval contains 0 (the lr bound "
                        "is applied without S)")
    if k.contains(-1.0):
        return "rule", "consistent with the rule: the exponent's interval excludes 0 and contains -1"
    if k.high < 0 and k.low > -1:
        return "other", ("S matters, but less than the rule says: the interval excludes 0 and -1 (the largest stable "
                         "lr falls more slowly than 1/S)")
    if k.high < -1:
        return "other", ("S matters more than the rule says: the interval excludes 0 and -1 (the largest stable lr "
                         "falls faster than 1/S)")
    return "other", "S matters with the wrong sign: the largest stable lr rises with S (the interval excludes 0 and -1)"


# --------------------------------------------------------------------------- the whole analysis
@dataclass
class Analysis:
    obs: pd.DataFrame                # the fitted observations (S >= 1)
    horizon_varied: bool
    rule: LogisticFit                # the full fit on every observation
    no_s: LogisticFit                # log lr (and log T) only: what predictions use when S has no effect
    k: Interval                      # S exponent of the largest stable lr
    k_T: Interval | None             # T exponent, where T varies
    verdict: str
    verdict_kind: str                # see `verdict`
    n_boot: int
    draws: np.ndarray                # bootstrap coefficient draws of the rule fit
    heldout: dict[str, pd.DataFrame] = field(default_factory=dict)   # split -> predictions
    scores: dict[str, pd.DataFrame] = field(default_factory=dict)    # split -> per-model accuracy and log-loss
    ridge: float = RIDGE

    @property
    def staleness_effect(self) -> bool:
        """S moves the edge measurably (the exponent's interval excludes 0): predictions use the fit with S."""
        return self.verdict_kind in ("rule", "other")

    def max_stable_lr(self, S: float, T: float, coef: np.ndarray | None = None, probability: float = 0.5) -> float:
        """η* at (S, T) under the rule fit (or one bootstrap draw's coefficients)."""
        c = np.asarray((self.rule.intercept, *self.rule.coef) if coef is None else coef, dtype=np.float64)
        names = self.rule.features
        get = lambda f: c[1 + names.index(f)] if f in names else 0.0  # noqa: E731
        if not get("log_lr") > 0:
            return math.inf
        rest = c[0] + get("log_S") * math.log(S) + get("log_T") * math.log(T)
        return math.exp((logit(probability) - rest) / get("log_lr"))

    def max_stable_band(self, S: float, T: float) -> tuple[float, float]:
        values = np.array([self.max_stable_lr(S, T, d) for d in self.draws])
        return (float(np.quantile(values, 0.025, method="inverted_cdf")),
                float(np.quantile(values, 0.975, method="inverted_cdf")))


def analyse(obs: pd.DataFrame, n_boot: int = 1000, seed: int = 0, ridge: float = RIDGE) -> Analysis:
    """Fit, interval, verdict and held-out comparison of the observations with S >= 1."""
    obs = obs[obs["S"] >= 1].reset_index(drop=True)
    if obs.empty:
        raise ValueError("no runs with S >= 1 to fit")
    horizon_varied = obs["T"].nunique() > 1
    compared = models(horizon_varied)
    names = compared[RULE]
    rule = fit(obs, names, ridge)
    no_s = fit(obs, compared["lr and T, no S"] if horizon_varied else compared["lr only"], ridge)
    draws = bootstrap(obs, names, n_boot, seed, ridge) if n_boot else np.empty((0, 1 + len(names)))
    k_point, kt_point = exponents(rule)
    eta = draws[:, 1 + names.index("log_lr")] if len(draws) else np.empty(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = eta > 0
        k_draws = np.where(ok, -draws[:, 1 + names.index("log_S")] / np.where(ok, eta, 1.0), np.nan) if len(draws) \
            else np.empty(0)
        kt_draws = (np.where(ok, -draws[:, 1 + names.index("log_T")] / np.where(ok, eta, 1.0), np.nan)
                    if horizon_varied and len(draws) else None)
    k = interval(k_draws, k_point) if len(k_draws) else Interval(k_point, math.nan, math.nan)
    k_T = interval(kt_draws, kt_point) if kt_draws is not None else None
    kind, text = verdict(k)
    analysis = Analysis(obs, horizon_varied, rule, no_s, k, k_T, text, kind, n_boot, draws, ridge=ridge)
    for split in SPLITS:
        if obs[split].nunique() < 2:
            continue
        pred = heldout(obs, split, horizon_varied, ridge)
        analysis.heldout[split] = pred
        analysis.scores[split] = scores(pred, horizon_varied)
    return analysis


def fit_payload(analysis: Analysis, probability: float = 0.5) -> dict:
    """The "rule" part of fit.json (see `sim.stability.read_fit`)."""
    obs, r, n = analysis.obs, analysis.rule, analysis.no_s
    coef = {"intercept": r.intercept, **{f: r.get(f) if f in r.features else None for f in FEATURES}}
    return {
        "model": "logistic: P(collapse) = sigmoid(intercept + log_lr*ln(lr) + log_S*ln(S) + log_T*ln(T))",
        "coefficients": coef,
        "standard_errors": r.standard_errors(),
        "coefficients_without_S": {"intercept": n.intercept, "log_lr": n.get("log_lr"),
                                   "log_T": n.get("log_T") if "log_T" in n.features else None},
        "ridge": analysis.ridge,
        "probability": probability,
        "staleness_exponent": {"value": analysis.k.value, "low": analysis.k.low, "high": analysis.k.high,
                               "method": f"k = -log_S/log_lr; 95 % percentile interval of {analysis.n_boot} bootstrap "
                                         f"resamples of the training runs (a run's horizons together)"},
        "horizon_exponent": None if analysis.k_T is None else {
            "value": analysis.k_T.value, "low": analysis.k_T.low, "high": analysis.k_T.high},
        "staleness_effect": analysis.staleness_effect,
        "verdict": analysis.verdict, "verdict_kind": analysis.verdict_kind,
        "range": {"lr": [float(obs["lr"].min()), float(obs["lr"].max())],
                  "S": [float(obs["S"].min()), float(obs["S"].max())],
                  "T": [int(obs["T"].min()), int(obs["T"].max())]},
        "observations": len(obs), "runs": int(obs["run"].nunique()), "seeds": int(obs["seed"].nunique()),
        "heldout": {split: {m: {"accuracy": row["accuracy"], "log_loss": row["log_loss"], "n": int(row["n"])}
                            for m, row in table.iterrows()} for split, table in analysis.scores.items()},
    }


# --------------------------------------------------------------------------- Markdown
def markdown(analysis: Analysis) -> list[str]:
    a, r = analysis, analysis.rule
    se = r.standard_errors()
    terms = ["log_lr", "log_S"] + (["log_T"] if a.horizon_varied else [])
    obs = a.obs
    lines = ["## The fit", "",
             f"Logistic regression of collapse on {', '.join(terms)} over {len(obs)} observations "
             f"({obs['run'].nunique()} runs with S >= 1, {obs['seed'].nunique()} seeds; ridge {a.ridge:g} on the "
             f"standardised coefficients):", "",
             "| term | coefficient | s.e. |", "|---|---|---|",
             f"| intercept | {r.intercept:.3g} | {se.get('intercept', math.nan):.2g} |",
             *(f"| {t} | {r.get(t):.3g} | {se.get(t, math.nan):.2g} |" for t in terms), "",
             f"The rule predicts equal coefficients on log lr and log S (k = -1). **S exponent of the largest stable "
             f"lr: k = -c_S/c_lr = {a.k.text()}** (95 % interval: {a.n_boot} bootstrap resamples of the training runs, "
             f"a run's horizons together)."]
    if a.k_T is not None:
        lines.append(f"Horizon exponent k_T = -c_T/c_lr = {a.k_T.text()} (the rule: -1 where the horizon binds).")
    lines += ["", f"**Verdict: {a.verdict}.**", "", "## Held out: the fit against baselines", ""]
    for split, table in a.scores.items():
        n = int(table["n"].max())
        lines += [f"{SPLITS[split]} ({n} observations, each predicted by fits that did not see its "
                  f"{'seed' if split == 'seed' else 'S'}):", "",
                  "| model | accuracy | log-loss |", "|---|---|---|",
                  *(f"| {m}{' (log lr, log S' + (', log T' if a.horizon_varied else '') + ')' if m == RULE else ''} "
                    f"| {row['accuracy']:.1%} | {row['log_loss']:.3f} |" for m, row in table.iterrows()), ""]
    return lines
