"""Does the stability rule predict what real training did? The constants' fit, held-out agreement, and the
paper's reverse test (does the largest stable learning rate scale like 1/S where the staleness term binds?).

Input: the stability study's table (one row per real run, see `studies.stability`) with the rule's inputs per
run — `S` (the configured statistic of its consumed staleness), `lr/applied` (mean applied learning rate up to
the collapse or the end), `steps` (its horizon T) — and what was measured, `collapse_step` (NaN when stable),
plus each run's per-step metric rows (for G_upd and R_batch).

Held-out agreement: every cell is predicted by a fit that did not see it, in two schemes: leave one run out,
and leave one staleness bound out (all runs of that bound at once: the rule must extrapolate in S).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from sim.stability import (Estimate, RuleFit, StabilityConstants, constants_from_fit, fit_clip_radius, fit_rule,
                           fit_update_norm, predict)

SCHEMES = {"run": "leave one run out", "bound": "leave one staleness bound out"}
LABELS = ("stable", "collapsed")


@dataclass(frozen=True)
class ScalingCheck:
    """The largest stable lr against S for one schedule, where the staleness term binds."""
    schedule: str
    brackets: pd.DataFrame        # per S: largest stable lr below the first collapse, smallest collapsed lr
    slope: float | None           # least-squares slope of log(bracket midpoint) on log S
    slope_ci: tuple[float, float] | None
    consistent: bool | None       # does some c/S pass through every bracket? None: fewer than 2 bracketed
    note: str


@dataclass
class Analysis:
    fit: RuleFit
    g_upd: Estimate | None
    r_batch: Estimate | None
    constants: StabilityConstants
    units: str
    heldout: dict[str, pd.DataFrame] = field(default_factory=dict)   # scheme -> cells with their predictions
    scaling: list[ScalingCheck] = field(default_factory=list)


# --------------------------------------------------------------------------- predictions
def _fit(cells: pd.DataFrame, early_step: int, n_boot: int = 0, seed: int = 0) -> RuleFit:
    return fit_rule(cells["S"], cells["lr/applied"], cells["steps"], cells["collapse_step"], early_step,
                    n_boot=n_boot, seed=seed)


def predictions(cells: pd.DataFrame, rule: RuleFit) -> pd.DataFrame:
    """cells plus `predicted_collapse`, `max_stable_lr` and `binding` under a fitted rule."""
    constants = rule.as_constants()
    preds = [predict(constants, lr, s, t) for s, lr, t in zip(cells["S"], cells["lr/applied"], cells["steps"])]
    return cells.assign(predicted_collapse=[not p.stable for p in preds],
                        max_stable_lr=[p.max_stable_lr for p in preds], binding=[p.binding for p in preds])


def heldout(cells: pd.DataFrame, early_step: int, scheme: str) -> pd.DataFrame:
    """Every cell predicted by a fit on the others (scheme "run") or on the other bounds (scheme "bound")."""
    groups = np.arange(len(cells)) if scheme == "run" else cells["pipeline.max_staleness"].to_numpy()
    parts = []
    for g in pd.unique(groups):
        train, test = cells[groups != g], cells[groups == g]
        if train.empty:
            continue
        parts.append(predictions(test, _fit(train, early_step)))
    return pd.concat(parts).loc[cells.index] if parts else cells.iloc[:0]


def confusion(pred: pd.DataFrame) -> pd.DataFrame:
    """2 x 2 counts: rows predicted, columns measured (stable / collapsed)."""
    measured = pred["collapse_step"].notna().map({False: "stable", True: "collapsed"})
    predicted = pred["predicted_collapse"].map({False: "stable", True: "collapsed"})
    table = pd.crosstab(predicted, measured).reindex(index=list(LABELS), columns=list(LABELS), fill_value=0)
    table.index.name, table.columns.name = "predicted", "measured"
    return table


def agreement(pred: pd.DataFrame) -> float:
    return float((pred["predicted_collapse"] == pred["collapse_step"].notna()).mean()) if len(pred) else math.nan


# --------------------------------------------------------------------------- the 1/S test
def scaling_checks(cells: pd.DataFrame, rule: RuleFit) -> list[ScalingCheck]:
    """Per schedule: for each bound S > 0 the bracket of the largest stable applied lr (largest stable lr
    below the smallest collapsed one, where half or more of a cell's replications collapsed), kept where the
    fitted staleness term binds at that S; then whether a c/S curve passes through every bracket, and the
    least-squares slope of log(midpoint) on log S (-1 under the rule)."""
    a, b = rule.staleness_threshold.value, rule.drift_threshold.value
    out = []
    for schedule, group in cells[cells["pipeline.max_staleness"] > 0].groupby("optim.schedule", sort=False):
        rows = []
        for bound, per_bound in group.groupby("pipeline.max_staleness"):
            per_lr = per_bound.groupby("optim.lr").agg(lr=("lr/applied", "mean"), S=("S", "median"),
                                                       T=("steps", "median"),
                                                       collapsed=("collapse_step", lambda c: c.notna().mean() >= 0.5))
            per_lr = per_lr.sort_values("lr")
            first = per_lr[per_lr["collapsed"]]
            hi = float(first["lr"].iloc[0]) if len(first) else math.inf
            below = per_lr[(per_lr["lr"] < hi) & ~per_lr["collapsed"]]
            lo = float(below["lr"].iloc[-1]) if len(below) else 0.0
            s, t = float(per_lr["S"].median()), float(per_lr["T"].median())
            staleness_binds = s > 0 and a / s < b / t
            rows.append({"bound": int(bound), "S": s, "largest stable lr": lo, "smallest collapsed lr": hi,
                         "staleness term binds": staleness_binds})
        brackets = pd.DataFrame(rows)
        out.append(_scaling_verdict(str(schedule), brackets))
    return out


def _scaling_verdict(schedule: str, brackets: pd.DataFrame) -> ScalingCheck:
    bracketed = brackets[(brackets["largest stable lr"] > 0) & np.isfinite(brackets["smallest collapsed lr"])]
    usable = bracketed[bracketed["staleness term binds"]]
    scope = "bounds where the fitted staleness term binds"
    if len(usable) < 2:  # the fit gives S no role: test the brackets themselves, or the fit could hide a failure
        usable, scope = bracketed, "every bracketed bound (the fitted staleness term binds at fewer than 2)"
    if len(usable) < 2:
        return ScalingCheck(schedule, brackets, None, None, None,
                            f"cannot be tested: {len(usable)} bound(s) where the grid brackets the largest stable lr "
                            f"(a stable and a collapsed lr); 2 or more are needed")
    s = usable["S"].to_numpy()
    lo, hi = usable["largest stable lr"].to_numpy(), usable["smallest collapsed lr"].to_numpy()
    # c/S passes through [lo, hi] at every S iff the intervals [lo·S, hi·S] of c overlap.
    consistent = bool((lo * s).max() <= (hi * s).min())
    x, y = np.log(s), 0.5 * (np.log(lo) + np.log(hi))
    slope, intercept = np.polyfit(x, y, 1)
    ci = None
    if len(usable) >= 3:
        from scipy import stats

        resid = y - (slope * x + intercept)
        se = math.sqrt(float(resid @ resid) / (len(x) - 2) / float(((x - x.mean()) ** 2).sum()))
        half = float(stats.t.ppf(0.975, len(x) - 2)) * se
        ci = (float(slope - half), float(slope + half))
    verdict = (f"over {scope}: " + ("consistent with 1/S, one c/S curve passes through every bracket" if consistent
                                     else "not consistent with 1/S at this grid's resolution, no c/S curve passes "
                                          "through every bracket"))
    return ScalingCheck(schedule, brackets, float(slope), ci, consistent, verdict)


# --------------------------------------------------------------------------- the whole analysis
def analyse(cells: pd.DataFrame, step_rows: Sequence[Sequence[Mapping]], clip_eps: float, early_step: int,
            n_boot: int = 200, seed: int = 0) -> Analysis:
    """Fit on every cell (with bootstrap intervals), measure G_upd and R_batch from the runs' pre-collapse
    rows, derive the constants, predict held-out cells in both schemes, and run the 1/S test."""
    rule = _fit(cells, early_step, n_boot, seed)
    g_upd = fit_update_norm(step_rows, seed=seed)
    r_batch = fit_clip_radius(step_rows, clip_eps, g_upd.value if g_upd is not None else 1.0, seed=seed)
    constants, units = constants_from_fit(rule, g_upd, r_batch)
    analysis = Analysis(rule, g_upd, r_batch, constants, units)
    for scheme in SCHEMES:  # a held-out cell needs other cells (other bounds) to fit on
        if len(cells) < 2 or (scheme == "bound" and cells["pipeline.max_staleness"].nunique() < 2):
            continue
        analysis.heldout[scheme] = heldout(cells, early_step, scheme)
    analysis.scaling = scaling_checks(cells, rule)
    return analysis


def fit_payload(analysis: Analysis, statistic: str, source: str) -> dict:
    """What fit.json holds (see `sim.stability.read_fit`)."""
    def est(e: Estimate | None):
        return None if e is None else {"value": e.value, "low": e.low, "high": e.high, "n": e.n, "method": e.method}
    c = analysis.constants
    return {"source": source, "staleness_statistic": statistic, "units": analysis.units,
            "constants": {"r_batch": c.r_batch, "g_upd": c.g_upd, "r_crit": c.r_crit, "scale": c.scale},
            "thresholds": {"staleness": est(analysis.fit.staleness_threshold),
                           "drift": est(analysis.fit.drift_threshold)},
            "measured": {"g_upd": est(analysis.g_upd), "r_batch": est(analysis.r_batch)},
            "training_errors": analysis.fit.errors, "cells": analysis.fit.n,
            "heldout_agreement": {s: agreement(p) for s, p in analysis.heldout.items()}}


# --------------------------------------------------------------------------- Markdown
def _g(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return "no limit seen" if math.isinf(x) else f"{x:.3g}"


def _interval(e: Estimate | None) -> str:
    if e is None:
        return "not measured"
    return f"{_g(e.value)} [{_g(e.low)}, {_g(e.high)}]"


def markdown(analysis: Analysis, statistic: str) -> list[str]:
    f, c = analysis.fit, analysis.constants
    lines = ["## Fitted constants", "",
             f"S is the {statistic} of each run's consumed staleness; η its mean applied learning rate up to the "
             f"collapse (or the end); T its steps. Values with 95 % bootstrap intervals; constants in "
             f"{analysis.units}.",
             "", "| quantity | estimate [95 % interval] | how |", "|---|---|---|",
             f"| a = scale·R_batch/G_upd (largest stable S·η) | {_interval(f.staleness_threshold)} | "
             f"{f.staleness_threshold.method} |",
             f"| b = scale·R_crit/G_upd (largest stable T·η) | {_interval(f.drift_threshold)} | "
             f"{f.drift_threshold.method} |",
             f"| G_upd | {_interval(analysis.g_upd)} | "
             f"{analysis.g_upd.method if analysis.g_upd else 'needs update_norm in metrics.jsonl'} |",
             f"| R_batch (measured) | {_interval(analysis.r_batch)} | "
             f"{analysis.r_batch.method if analysis.r_batch else 'needs stale samples'} |",
             f"| scale | {_g(c.scale)} | a·G_upd/R_batch (1 where R_batch is not measured or a is unbounded) |",
             f"| R_crit | {_g(c.r_crit)} | b·G_upd/scale |", "",
             f"On the {f.n} runs it was fitted to, the rule labels {f.n - f.errors} correctly "
             f"({f.errors} wrong).", "", "## Prediction check (held out)", ""]
    for scheme, pred in analysis.heldout.items():
        table = confusion(pred)
        lines += [f"{SCHEMES[scheme].capitalize()}: **{agreement(pred):.0%}** of {len(pred)} runs agree.", "",
                  "| predicted \\ measured | stable | collapsed |", "|---|---|---|",
                  *(f"| {p} | {table.loc[p, 'stable']} | {table.loc[p, 'collapsed']} |" for p in LABELS), ""]
        wrong = pred[pred["predicted_collapse"] != pred["collapse_step"].notna()]
        for _, r in wrong.iterrows():
            measured = f"collapsed at step {r['collapse_step']:.0f}" if pd.notna(r["collapse_step"]) else "stable"
            schedule = "sync" if r["pipeline.max_staleness"] == 0 else r["optim.schedule"]
            why = ("the fit saw no limit" if r["binding"] == "none" else
                   f"{r['binding']} term, largest stable lr {_g(r['max_stable_lr'])}")
            lines.append(f"- wrong: S={r['S']:g} (bound {r['pipeline.max_staleness']:.0f}), {schedule}, "
                         f"lr {r['optim.lr']:.3g} (applied {r['lr/applied']:.3g}): predicted "
                         f"{'collapse' if r['predicted_collapse'] else 'stable'} ({why}), measured {measured}")
        if len(wrong):
            lines.append("")
    lines += ["## Does the largest stable learning rate scale like 1/S?", ""]
    for check in analysis.scaling:
        lines.append(f"**{check.schedule}**: {check.note}"
                     + (f"; log-log slope {check.slope:.2f}" if check.slope is not None else "")
                     + (f" (95 % CI {check.slope_ci[0]:.2f} to {check.slope_ci[1]:.2f})" if check.slope_ci else "")
                     + " (the rule says -1).")
        lines += ["", "| bound | S | largest stable lr | smallest collapsed lr | staleness term binds |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['bound']} | {r['S']:g} | {_g(r['largest stable lr']) if r['largest stable lr'] else 'none'} | "
                  f"{_g(r['smallest collapsed lr']) if np.isfinite(r['smallest collapsed lr']) else 'none'} | "
                  f"{'yes' if r['staleness term binds'] else 'no'} |" for _, r in check.brackets.iterrows()]
        lines.append("")
    return lines
