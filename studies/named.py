"""Named what-if studies: `stalecast study NAME CONFIG --out DIR`.

- ratio: throughput, staleness and idle ratios against the rollout:learner split of the config's GPUs;
- bound: only the staleness bound varies, at fixed hardware;
- tail: the response-length tail (lognormal p99/median at a fixed median), with and without
  interruptible workers;
- sync-vs-async: speedup over sync against model size and cluster size.

Each writes into the output folder its tidy table (`table.parquet`/`.csv`, one row per run and replication)
and the per-point aggregate with 95 % confidence intervals (`table_aggregate.*`), its figure (PNG and SVG),
`summary.md` with the headline numbers, and `runs/` (one file per finished run: re-running resumes).
Study fields (the dataclasses below) become command-line options, with their help texts.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markdown import Markdown

from sim.cli import positive_int
from sim.config import POLICY_KNOBS, ConfigError, RunConfig, load_config
from sim.outputs import check_out, claim
from sim.engine.policies import POLICIES
from sim.hardware.specs import MODELS
from studies import plots
from studies.sweep import (Backend, Sweep, SweepResult, aggregate, describe_failures, run_sweep, status_line,
                           write_tables)


@dataclass
class Study:
    steps: int | None = field(default=None, metadata={
        "help": "learner steps per run (default: the config's run.steps)", "min": 1})
    reps: int = field(default=3, metadata={"help": "replications (independent seeds) per grid point", "min": 1})
    sync_steps: int = field(default=20, metadata={
        "help": "learner steps of each sync baseline (sync steps are alike: 20 give the mean step time "
                "within 0.6 %% on the 64-GPU example)", "min": 1})

    name: ClassVar[str]

    def __post_init__(self):
        check_spec(self)

    def grid(self, cfg: RunConfig) -> tuple[RunConfig, list[dict], list[dict]]:
        """(base config, override dict per point, label columns per point)."""
        raise NotImplementedError

    def figures(self, table: pd.DataFrame, cfg: RunConfig, out: Path) -> list[Path]:
        raise NotImplementedError

    def summary(self, table: pd.DataFrame, cfg: RunConfig) -> list[str]:
        """Markdown lines after the common header."""
        raise NotImplementedError


# --------------------------------------------------------------------------- helpers
def _means(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    ok = table[table["status"] == "ok"]
    cols = [c for c in ok.columns if "/" in c and pd.api.types.is_numeric_dtype(ok[c])]
    return ok.groupby(by, sort=True)[cols].mean().reset_index()


def _half_ci(table: pd.DataFrame, by: list[str], metric: str) -> np.ndarray:
    """Half width of the 95 % confidence interval of `metric` per group, in `_means` order (NaN for one
    replication)."""
    agg = aggregate(table, by)
    agg = agg[agg["metric"] == metric].sort_values(by)
    return (agg["ci95_high"] - agg["mean"]).to_numpy()


def md_table(frame: pd.DataFrame) -> list[str]:
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "n/a" if np.isnan(v) else f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return lines


def _pm(mean: float, half: float, fmt: str = ".1f") -> str:
    return f"{mean:{fmt}}" if np.isnan(half) else f"{mean:{fmt}} ± {half:{fmt}}"


def _bound_label(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(bound=[f"S={s}" for s in table["pipeline.max_staleness"]])


def _at_bound(cfg: RunConfig, bound: int) -> dict:
    """Overrides that set staleness bound `bound` where the config's own policy keeps its bound (its knob:
    `bound_overrides`); the column pipeline.max_staleness carries it in the tables either way. Async only: no other
    mode has a bound to vary (fixed_lag's lag aside, which the stability study varies)."""
    pl = cfg.pipeline
    if pl.mode != "async":
        raise ConfigError(f"pipeline.mode: the study varies the staleness bound, which only async mode has (it is "
                          f"{pl.mode})")
    if pl.staleness_control == "none":
        raise ConfigError("pipeline.staleness_control: none has no staleness bound to vary (choose a policy with one)")
    return bound_overrides(pl.staleness_control, pl.knobs(), bound, cfg.workload.batch_prompts)


# --------------------------------------------------------------------------- the studies
@dataclass
class RatioStudy(Study):
    """Throughput, staleness and idle ratios against the rollout:learner split of a fixed GPU budget."""
    name: ClassVar[str] = "ratio"
    bounds: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata={
        "help": "staleness bounds S, one curve each", "min": 0})
    rollout_workers: list[int] | None = field(default=None, metadata={
        "help": "rollout worker counts to try (default: every split, 1 worker up to all GPUs but one for the "
                "learner)", "min": 1})

    def grid(self, cfg):
        cl = cfg.cluster
        if cl.colocated:
            raise ConfigError("the ratio study splits GPUs between workers and learner: the config is colocated")
        budget, tp = cl.total_gpus, cl.gpus_per_worker
        workers = self.rollout_workers or list(range(1, (budget - 1) // tp + 1))
        points, labels = [], []
        for r in workers:
            for s in self.bounds:
                points.append({"cluster.rollout_workers": r, "cluster.learner_gpus": budget - r * tp,
                               **_at_bound(cfg, s)})
                labels.append({"rollout_gpus": r * tp})
        return cfg, points, labels

    def figures(self, table, cfg, out):
        data = _bound_label(table[table["status"] == "ok"])
        fig, axes = plots.panels(4, f"{cfg.name}: rollout:learner split of {cfg.cluster.total_gpus} GPUs")
        for ax, metric in zip(axes, ("throughput/samples_per_s", "staleness/mean", "idle/trainer", "idle/rollout")):
            plots.line(ax, data, "rollout_gpus", metric, hue="bound",
                       xlabel=f"rollout GPUs (learner: {cfg.cluster.total_gpus} minus these)")
        plots.one_legend(axes)
        return plots.save(fig, out, "ratio")

    def summary(self, table, cfg):
        by = ["pipeline.max_staleness", "rollout_gpus", "cluster.learner_gpus"]
        means = _means(table, by)
        means["ci"] = _half_ci(table, by, "throughput/samples_per_s")
        best = means.loc[means.groupby("pipeline.max_staleness")["throughput/samples_per_s"].idxmax()]
        rows = pd.DataFrame({
            "bound S": best["pipeline.max_staleness"], "rollout GPUs": best["rollout_gpus"],
            "learner GPUs": best["cluster.learner_gpus"],
            "samples/s (95% CI)": [_pm(m, h) for m, h in zip(best["throughput/samples_per_s"], best["ci"])],
            "mean staleness": best["staleness/mean"], "p99 staleness": best["staleness/p99"],
            "learner idle": best["idle/trainer"], "rollout idle": best["idle/rollout"],
            "speedup vs sync": best["speedup/vs_sync"]})
        top = best.loc[best["throughput/samples_per_s"].idxmax()]
        cl = cfg.cluster
        current = means[(means["rollout_gpus"] == cl.rollout_workers * cl.gpus_per_worker)
                        & (means["pipeline.max_staleness"] == own_bound(cfg))]
        lines = [f"Best split per staleness bound (mean over replications; S is set in "
                 f"{bound_knob(cfg.pipeline.staleness_control)}):", "", *md_table(rows), "",
                 f"Fastest overall: {top['rollout_gpus']:.0f} rollout GPUs and {top['cluster.learner_gpus']:.0f} "
                 f"learner GPUs at S={top['pipeline.max_staleness']:.0f}: {top['throughput/samples_per_s']:.1f} "
                 f"samples/s, mean staleness {top['staleness/mean']:.2f}."]
        if not current.empty:
            c = current.iloc[0]
            lines.append(f"The config's own split ({c['rollout_gpus']:.0f} rollout GPUs, S={c['pipeline.max_staleness']:.0f}) "
                         f"reaches {c['throughput/samples_per_s']:.1f} samples/s "
                         f"({100 * c['throughput/samples_per_s'] / top['throughput/samples_per_s']:.0f} % of the fastest).")
        return lines


@dataclass
class BoundStudy(Study):
    """Throughput and staleness against the staleness bound, hardware fixed."""
    name: ClassVar[str] = "bound"
    bounds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 6, 8, 12, 16], metadata={
        "help": "staleness bounds S to try", "min": 0})

    def grid(self, cfg):
        return cfg, [_at_bound(cfg, s) for s in self.bounds], [{} for _ in self.bounds]

    def figures(self, table, cfg, out):
        data = table[table["status"] == "ok"]
        stale = data.melt(id_vars=["pipeline.max_staleness"], value_vars=["staleness/mean", "staleness/p99"],
                          var_name="statistic", value_name="staleness")
        stale["statistic"] = stale["statistic"].str.removeprefix("staleness/")
        fig, axes = plots.panels(3, f"{cfg.name}: staleness bound at fixed hardware")
        plots.line(axes[0], data, "pipeline.max_staleness", "throughput/samples_per_s")
        plots.line(axes[1], stale, "pipeline.max_staleness", "staleness", hue="statistic",
                   ylabel="staleness (versions)")
        plots.line(axes[2], data, "pipeline.max_staleness", "speedup/vs_sync")
        return plots.save(fig, out, "bound")

    def summary(self, table, cfg):
        by = ["pipeline.max_staleness"]
        means = _means(table, by)
        half = _half_ci(table, by, "throughput/samples_per_s")
        rows = pd.DataFrame({
            "bound S": means["pipeline.max_staleness"],
            "samples/s (95% CI)": [_pm(m, h) for m, h in zip(means["throughput/samples_per_s"], half)],
            "mean staleness": means["staleness/mean"], "p99 staleness": means["staleness/p99"],
            "learner idle": means["idle/trainer"], "speedup vs sync": means["speedup/vs_sync"]})
        peak = means["throughput/samples_per_s"].max()
        enough = means[means["throughput/samples_per_s"] >= 0.95 * peak].iloc[0]
        return [f"S is set in {bound_knob(cfg.pipeline.staleness_control)}.", "", *md_table(rows), "",
                f"The smallest bound within 5 % of the best throughput ({peak:.1f} samples/s) is "
                f"S={enough['pipeline.max_staleness']:.0f}: {enough['throughput/samples_per_s']:.1f} samples/s at mean "
                f"staleness {enough['staleness/mean']:.2f} (p99 {enough['staleness/p99']:.0f})."]


@dataclass
class TailStudy(Study):
    """Staleness and throughput against the response-length tail, with and without interruptible workers."""
    name: ClassVar[str] = "tail"
    tail_ratios: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0, 16.0], metadata={
        "help": "response-length p99/median ratios (lognormal; the median stays fixed; max_new_tokens still caps)",
        "gt": 1, "why": "the p99 must exceed the median"})
    median: float | None = field(default=None, metadata={
        "help": "median response tokens (default: the config's lognormal median)", "gt": 0})

    def grid(self, cfg):
        if cfg.pipeline.mode != "async":
            raise ConfigError("the tail study compares interruptible workers, which need pipeline.mode: async")
        median = self.median or getattr(cfg.workload.response_len, "median", None)
        if median is None:
            raise ConfigError("the tail study needs --median: the config's response length is not lognormal")
        base = cfg.with_overrides({"workload.response_len": {"kind": "lognormal", "median": median,
                                                             "p99": median * max(self.tail_ratios)}})
        points, labels = [], []
        for ratio in self.tail_ratios:
            for interruptible in (False, True):
                points.append({"workload.response_len.p99": median * ratio, "pipeline.interruptible": interruptible})
                labels.append({"tail_ratio": ratio})
        return base, points, labels

    @staticmethod
    def _gain(table: pd.DataFrame) -> pd.DataFrame:
        """Throughput gain of interruptible workers, paired by tail ratio and replication (same workload)."""
        ok = table[table["status"] == "ok"]
        wide = ok.pivot_table(index=["tail_ratio", "replication"], columns="pipeline.interruptible",
                              values="throughput/samples_per_s")
        return (100 * (wide[True] / wide[False] - 1)).rename("gain").reset_index()

    def figures(self, table, cfg, out):
        data = table[table["status"] == "ok"].assign(
            workers=lambda d: np.where(d["pipeline.interruptible"].astype(bool), "interruptible", "drain first"))
        # Sample staleness counts from the first token; token staleness shows what interrupting buys.
        stale = data.melt(id_vars=["tail_ratio", "workers"], value_vars=["staleness/mean", "staleness/token_mean"],
                          var_name="staleness of", value_name="staleness")
        stale["staleness of"] = stale["staleness of"].map({"staleness/mean": "samples", "staleness/token_mean": "tokens"})
        fig, axes = plots.panels(3, f"{cfg.name}: response-length tail")
        plots.line(axes[0], stale, "tail_ratio", "staleness", hue="workers", style_by="staleness of", logx=2,
                   ylabel="mean staleness (versions)")
        plots.line(axes[1], data, "tail_ratio", "throughput/samples_per_s", hue="workers", logx=2)
        plots.one_legend(axes[:2])
        plots.line(axes[2], self._gain(table), "tail_ratio", "gain", logx=2,
                   ylabel="interruptible throughput gain (%)")
        axes[2].axhline(0, color="grey", linewidth=0.8)
        return plots.save(fig, out, "tail")

    def summary(self, table, cfg):
        means = _means(table, ["tail_ratio", "pipeline.interruptible"])
        wide = means.pivot(index="tail_ratio", columns="pipeline.interruptible")
        gain = self._gain(table).groupby("tail_ratio")["gain"].mean()
        rows = pd.DataFrame({
            "p99/median": wide.index,
            "samples/s, drain first": wide[("throughput/samples_per_s", False)].to_numpy(),
            "samples/s, interruptible": wide[("throughput/samples_per_s", True)].to_numpy(),
            "interruptible gain %": gain.to_numpy(),
            "mean staleness, drain first": wide[("staleness/mean", False)].to_numpy(),
            "mean staleness, interruptible": wide[("staleness/mean", True)].to_numpy(),
            "token staleness, interruptible": wide[("staleness/token_mean", True)].to_numpy()})
        widest = gain.idxmax()
        verdict = (f"Interruptible workers gain most at p99/median = {widest:g}: {gain[widest]:+.1f} % throughput."
                   if gain[widest] > 0 else
                   f"Interruptible workers do not raise throughput here ({gain.min():+.1f} to {gain.max():+.1f} %); "
                   f"without them the learner waits for data {wide[('idle/trainer', False)].mean():.0%} of the time "
                   f"and workers are idle {wide[('idle/rollout', False)].mean():.0%} of theirs.")
        return [*md_table(rows), "", verdict,
                f"Responses are capped at max_new_tokens = {cfg.workload.max_new_tokens}, which clips the widest tails."]


@dataclass
class SyncVsAsyncStudy(Study):
    """Speedup of the config's pipeline over sync against model size and cluster size."""
    name: ClassVar[str] = "sync-vs-async"
    models: list[str] = field(default_factory=lambda: ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b",
                                                       "qwen2.5-14b"], metadata={
        "help": f"model presets ({', '.join(MODELS)})", "choices": tuple(MODELS)})
    scales: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0], metadata={
        "help": "cluster sizes as multiples of the config's GPUs; workers and learner GPUs scale alike", "gt": 0})

    def grid(self, cfg):
        if cfg.hardware.constant is not None:
            raise ConfigError("the sync-vs-async study varies the model: it needs analytic costs (hardware.gpu), "
                              "not hardware.constant")
        unknown = [m for m in self.models if m not in MODELS]
        if unknown:
            raise ConfigError(f"unknown model preset(s) {', '.join(unknown)} (known: {', '.join(MODELS)})")
        cl = cfg.cluster
        points, labels = [], []
        for model in self.models:
            for scale in self.scales:
                workers = max(1, round(cl.rollout_workers * scale))
                learner = max(1, round(cl.learner_gpus * scale))
                points.append({"hardware.model": model, "cluster.rollout_workers": workers,
                               "cluster.learner_gpus": learner})
                labels.append({"params_b": MODELS[model].params / 1e9,
                               "gpus": learner if cl.colocated else workers * cl.gpus_per_worker + learner})
        return cfg, points, labels

    def figures(self, table, cfg, out):
        data = table[table["status"] == "ok"].assign(cluster=lambda d: [f"{g} GPUs" for g in d["gpus"]],
                                                     model=lambda d: d["hardware.model"])
        fig, axes = plots.panels(2, f"{cfg.name}: speedup of {cfg.pipeline.mode} over sync")
        plots.line(axes[0], data, "params_b", "speedup/vs_sync", hue="cluster", logx=10)
        plots.line(axes[1], data, "gpus", "speedup/vs_sync", hue="model", logx=2)
        for ax in axes:
            ax.axhline(1, color="grey", linewidth=0.8)
        return plots.save(fig, out, "sync_vs_async")

    def summary(self, table, cfg):
        means = _means(table, ["params_b", "hardware.model", "gpus"])
        wide = means.pivot(index="hardware.model", columns="gpus", values="speedup/vs_sync")
        wide = wide.loc[means.drop_duplicates("hardware.model")["hardware.model"]]
        rows = wide.reset_index().rename(columns={"hardware.model": "model"})
        rows.columns = ["model", *(f"{g} GPUs" for g in wide.columns)]
        best = means.loc[means["speedup/vs_sync"].idxmax()]
        return ["Speedup over sync (mean over replications), model by cluster size:", "", *md_table(rows), "",
                f"Largest: {best['speedup/vs_sync']:.2f}x for {best['hardware.model']} on {best['gpus']:.0f} GPUs."]


# The knob that carries a policy's staleness bound (oldest_unconsumed and drop use pipeline.max_staleness itself).
BOUND_KNOBS = {"areal": "max_head_offpolicyness", "prime_rl": "max_async_level", "tinker": "sampling_steps_ahead",
               "verl_fully_async": "staleness_threshold"}


def bound_overrides(name: str, knobs, bound: int, batch: int) -> dict:
    """Overrides that set staleness bound `bound` in policy `name`'s own knob, its other knobs as in `knobs` (its
    knob section, or None for its defaults): the bound itself where the policy has one (oldest_unconsumed, drop:
    max_staleness; areal: max_head_offpolicyness; prime_rl: max_async_level; tinker: sampling_steps_ahead); verl:
    staleness_threshold = bound (up to `bound` extra syncs' worth of groups admitted per sync); queue_drop: a buffer
    of (bound + 1) batches; none: no knob."""
    out: dict = {"pipeline.max_staleness": bound}
    if name in BOUND_KNOBS:
        values = knobs.model_dump() if knobs is not None else {}
        out[f"pipeline.{name}"] = {**values, BOUND_KNOBS[name]: float(bound) if name == "verl_fully_async" else bound}
    elif name == "queue_drop":
        out["pipeline.queue_drop"] = {"capacity": (bound + 1) * batch}
    return out


def bound_knob(name: str) -> str:
    """Where policy `name` keeps the staleness bound `bound_overrides` sets."""
    if name in BOUND_KNOBS:
        return f"pipeline.{name}.{BOUND_KNOBS[name]}"
    return "pipeline.queue_drop.capacity (S + 1 batches)" if name == "queue_drop" else "pipeline.max_staleness"


def own_bound(cfg: RunConfig) -> float | None:
    """The bound S the config itself runs at, as `bound_overrides` would set it (None: a queue_drop capacity that
    is not a whole number of batches)."""
    pl = cfg.pipeline
    if pl.staleness_control in BOUND_KNOBS:
        return float(getattr(pl.knobs(), BOUND_KNOBS[pl.staleness_control]))
    if pl.staleness_control == "queue_drop":
        batches, rest = divmod(pl.knobs().capacity, cfg.workload.batch_prompts)
        return float(batches - 1) if rest == 0 else None
    return float(pl.max_staleness)


def matched_policy(name: str, bound: int, batch: int) -> dict:
    """Overrides that run policy `name`, at its defaults, at staleness bound `bound` (`bound_overrides`); workers
    take weights in flight as the system does (pipeline.interruptible left to the policy)."""
    return {"pipeline.staleness_control": name, "pipeline.interruptible": None, "pipeline.drop_stale": False,
            **{f"pipeline.{other}": None for other in POLICY_KNOBS}, **bound_overrides(name, None, bound, batch)}


@dataclass
class PoliciesStudy(Study):
    """The same workload and hardware under every staleness-control policy at matched bounds: what each system's
    rule costs in throughput, staleness, idle time and dropped work."""
    name: ClassVar[str] = "policies"
    bounds: list[int] = field(default_factory=lambda: [1, 4], metadata={
        "help": "staleness bounds S to match the policies at (each in its own knob)", "min": 0})
    policies: list[str] = field(default_factory=lambda: list(POLICIES), metadata={
        "help": f"policies to compare ({', '.join(POLICIES)})", "choices": tuple(POLICIES)})

    def grid(self, cfg):
        if cfg.pipeline.mode != "async":
            raise ConfigError("the policies study compares staleness control, which only async mode uses "
                              f"(pipeline.mode is {cfg.pipeline.mode})")
        if cfg.pipeline.queue_capacity is not None:  # queue_drop's buffer replaces a blocking one
            cfg = cfg.with_overrides({"pipeline.queue_capacity": None})
        B = cfg.workload.batch_prompts
        points = [matched_policy(p, s, B) for p in self.policies for s in self.bounds]
        labels = [{"policy": p, "bound": s} for p in self.policies for s in self.bounds]
        return cfg, points, labels

    def figures(self, table, cfg, out):
        import seaborn as sns

        data = table[table["status"] == "ok"].assign(bound=lambda d: [f"S={b}" for b in d["bound"]])
        fig, axes = plots.panels(6, f"{cfg.name}: staleness-control policies at matched bounds", width=5.2)
        for ax, metric in zip(axes, ("throughput/samples_per_s", "staleness/mean", "staleness/p99", "staleness/max",
                                     "idle/trainer", "dropped/groups")):
            sns.barplot(data=data, x="policy", y=metric, hue="bound", errorbar=plots.band, ax=ax,
                        palette=plots.PALETTE, order=self.policies)
            ax.set(xlabel="", ylabel=plots.LABELS.get(metric, metric))
            ax.tick_params(axis="x", rotation=45)
        plots.one_legend(axes)
        return plots.save(fig, out, "policies")

    def summary(self, table, cfg):
        means = _means(table, ["policy", "bound"])
        means = means.set_index("policy").loc[[p for p in self.policies if p in set(means["policy"])]].reset_index()
        rows = pd.DataFrame({
            "policy": means["policy"], "bound": means["bound"],
            "samples/s": means["throughput/samples_per_s"], "mean staleness": means["staleness/mean"],
            "p99 staleness": means["staleness/p99"], "max staleness": means["staleness/max"],
            "learner idle": means["idle/trainer"], "rollout idle": means["idle/rollout"],
            "dropped groups": means["dropped/groups"], "speedup vs sync": means["speedup/vs_sync"]})
        lines = [*md_table(rows), ""]
        for bound, part in means.groupby("bound"):
            top = part.loc[part["throughput/samples_per_s"].idxmax()]
            lines.append(f"At S={bound}: fastest {top['policy']} ({top['throughput/samples_per_s']:.1f} samples/s, "
                         f"mean staleness {top['staleness/mean']:.2f}, max {top['staleness/max']:.0f}).")
        lines.append("Matched bounds: each policy's own knob set to S (`studies.named.matched_policy`); their "
                     "guarantees differ (docs/policies-sources.md): a max staleness above S is the rule's doing.")
        return lines


STUDIES: dict[str, type[Study]] = {cls.name: cls for cls in (RatioStudy, BoundStudy, TailStudy, SyncVsAsyncStudy,
                                                              PoliciesStudy)}


# --------------------------------------------------------------------------- running a study
def run_study(study: Study, cfg: RunConfig, out: Path, backend: Backend, console: Console | None = None,
              force: bool = False) -> tuple[SweepResult, list[Path]]:
    base, points, labels = study.grid(cfg)  # rejects a config the study cannot vary before --out is touched
    claim(out, f"study {study.name}", force)
    sweep = Sweep(base, points, labels, reps=study.reps, steps=study.steps, sync_steps=study.sync_steps)
    result = run_sweep(sweep, out, backend, console, label=f"study {study.name}")
    paths = write_tables(result, out)
    if (result.table["status"] == "ok").any():
        paths += study.figures(result.table, base, out)
    steps = study.steps or base.run.steps
    header = [f"# {study.name} study: {base.name}", "",
              f"{len(points)} grid points x {study.reps} replications, {steps} learner steps per run "
              f"(sync baselines {min(steps, study.sync_steps)} steps). "
              f"Numbers are means over replications, from `table.csv`; `table_aggregate.csv` has the 95 % "
              f"confidence intervals.", ""]
    ok = (result.table["status"] == "ok").any()
    body = study.summary(result.table, base) if ok else ["Every run failed."]
    failures = [f"- {line}" for line in describe_failures(result.table)]
    text = "\n".join([*header, *body, *([""] + failures if failures else []), ""])
    (out / "summary.md").write_text(text)
    return result, [*paths, out / "summary.md"]


def cmd_study(args: argparse.Namespace, console: Console) -> int:
    from sim.cli import parse_overrides

    cls = STUDIES[args.study]
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}
    study = cls(**values)
    cfg = load_config(args.config, parse_overrides(args.set))
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{study.name}"
    check_out(out, args.force)
    with Backend(jobs=args.jobs, ray=args.ray) as backend:
        result, paths = run_study(study, cfg, out, backend, console, args.force)
        console.print(status_line(result, backend))
    console.print(Markdown((out / "summary.md").read_text()))
    console.print(f"wrote {out}/: " + ", ".join(p.name for p in paths))
    return 0


_KIND = {int: "whole number", float: "number", str: "name"}


def _option_type(annotation):
    """argparse type for a study field: comma-separated lists, plain scalars. Bounds are checked by `check_spec`
    when the spec is built, so that a spec built in Python is checked too."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    inner = args[0] if args and typing.get_origin(annotation) is not list else annotation
    if typing.get_origin(inner) is list:
        item = typing.get_args(inner)[0]

        def parse_list(text: str) -> list:
            try:
                return [item(v.strip()) for v in text.split(",") if v.strip()]
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated {_KIND.get(item, 'value')}s, "
                                                 f"got {text!r}") from None
        parse_list.__name__ = f"list of {_KIND.get(item, 'value')}s"
        return parse_list
    return inner


def check_spec(spec) -> None:
    """Check a spec dataclass's values against its fields' metadata; ConfigError `--option VALUE: reason`.

    Metadata keys: min / max (inclusive), gt / lt (exclusive), choices (the known values), why (appended to a
    bound's reason), sets (the config field the option sets, named in the reason). For a list they apply to each
    value; a list needs at least one value, none twice. Floats must be finite."""
    for f in dataclasses.fields(spec):
        value, meta = getattr(spec, f.name), f.metadata
        if value is None:
            continue
        option = f"--{f.name.replace('_', '-')}"
        many = isinstance(value, list)
        shown = ",".join(map(str, value)) if many else str(value)
        if many and not value:
            raise ConfigError(f"{option}: needs at least one value")
        if many and len(set(value)) < len(value):
            twice = next(v for v in value if value.count(v) > 1)
            raise ConfigError(f"{option} {shown}: {twice} is given twice")
        unknown = [v for v in (value if many else [value]) if "choices" in meta and v not in meta["choices"]]
        if unknown:
            raise ConfigError(f"{option} {shown}: unknown {', '.join(map(repr, unknown))} (known: "
                              f"{', '.join(map(str, meta['choices']))})")
        for item in value if many else [value]:
            problem = _bound_problem(item, meta)
            if problem:
                extra = [f"got {item}"] if many else []
                extra += [f"it sets {meta['sets']}"] if "sets" in meta else []
                raise ConfigError(f"{option} {shown}: {'each value ' if many else ''}{problem}"
                                  + (f" ({'; '.join(extra)})" if extra else ""))


def _bound_problem(value, meta) -> str | None:
    why = f": {meta['why']}" if "why" in meta else ""
    if isinstance(value, float) and not np.isfinite(value):
        return "must be a finite number"
    if "min" in meta and value < meta["min"]:
        return f"must be at least {meta['min']}{why}"
    if "gt" in meta and not value > meta["gt"]:
        return f"must be greater than {meta['gt']}{why}"
    if "max" in meta and value > meta["max"]:
        return f"must be at most {meta['max']}{why}"
    if "lt" in meta and not value < meta["lt"]:
        return f"must be less than {meta['lt']}{why}"
    return None


def add_study_out_options(p: argparse.ArgumentParser, default: str) -> None:
    """--out (resumed where runs are stored) and --force."""
    p.add_argument("--out", help=f"output folder ({default}); runs stored there are reused; a folder stalecast did "
                                 f"not write is refused")
    p.add_argument("--force", action="store_true", help="write into --out even if it holds files stalecast did not "
                                                        "write")


def add_backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=positive_int, help="local processes (default: one per CPU core)")
    p.add_argument("--ray", metavar="ADDRESS", help="run on Ray instead: a cluster address, 'auto' (the running "
                                                    "cluster) or 'local' (start one on this machine)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the config, e.g. --set run.steps=50 (repeatable)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("study", help="run a named what-if study (ratio, bound, tail, sync-vs-async; "
                                            "stability on the real trainer)",
                              description=__doc__.split("\n\n")[0])
    names = p.add_subparsers(dest="study", required=True, metavar="NAME")
    for name, cls in STUDIES.items():
        sp = names.add_parser(name, help=cls.__doc__, description=cls.__doc__)
        sp.add_argument("config", help="run config YAML (see examples/)")
        add_study_out_options(sp, "default runs/NAME-STUDY")
        add_spec_options(sp, cls)
        add_backend_options(sp)
        sp.set_defaults(func=cmd_study)
    from studies.stability import add_parser as add_stability  # real training runs, not a simulator sweep

    add_stability(names)


def add_spec_options(p: argparse.ArgumentParser, spec: type) -> None:
    """One option per field of a spec dataclass, with its help text and default."""
    hints = typing.get_type_hints(spec)
    for f in dataclasses.fields(spec):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        text = f.metadata["help"] + ("" if default is None else f" (default: {shown})")
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_option_type(hints[f.name]), help=text)
