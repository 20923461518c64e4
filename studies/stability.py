"""`stalecast study stability CONFIG --out DIR`: does staleness move the edge of stable learning rates, and by how much?

Real `stalecast train` runs, one at a time, over lags S x learning rates x seeds. S > 0 runs in fixed_lag mode
(batch j is generated with version j - S exactly, so S is the controlled variable and a seed gives the same run on
any machine load); S = 0 is the synchronous baseline, shown beside but kept out of the fit. Every run trains for
--steps (T); at the --horizon-bounds it trains for the longest of --horizons and the shorter horizons are its
prefixes (a run is causal and deterministic, so its first T steps are what a T-step run does).

Collapse label (docs/design.md, `sim.stability`): first by reward and loss alone (the KL criterion off); then the
KL threshold is set to --kl-factor x the largest per-step KL (k3) of the runs that label calls stable, and every
run is labelled again with it. Then `validate.stability`: a logistic fit of collapse on log lr, log S (and log T),
the S exponent of the largest stable lr with a bootstrap interval and a verdict, and held-out comparisons with
majority-class, lr-only and S-only baselines. Writes table.*, fit.json (read by `stalecast plan --stability-fit`
and a config's `stability.fit`), figures and summary.md.

Resumable: each finished run is stored under OUT/runs/KEY.json (KEY hashes the config it trains), so running the
command again trains only what is missing and redoes the analysis; a failed run is retried next time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shlex
import shutil
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import ValidationError
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sim.config import ConfigError, Optim, RunConfig, load_config
from sim.outputs import check_out, claim
from sim.stability import (KLCalibration, calibrate_kl, criterion_of, detect_collapse, max_kl, with_kl,
                           without_kl, write_fit)
from studies import plots
from studies.sweep import RunStore, replication_seeds
from validate import stability as check

RECORD_FORMAT = "stalecast.stability-run/2"
SCHEDULES = typing.get_args(Optim.model_fields["schedule"].annotation)
SYNC = {"pipeline.mode": "sync", "pipeline.interruptible": False, "pipeline.max_staleness": 0}
# 14 learning rates a factor sqrt(2) apart, 2.5e-4 to 2.26e-2 (4 significant digits): on the tiny CPU model runs at
# S <= 4 collapse from ~3e-3 to 6e-3 on; a largest stable lr falling like 1/S from there reaches ~2.5e-4 at S = 16,
# so the grid goes down that far (a study that could not see the rule's edge could not confirm it)
DEFAULT_LRS = [float(f"{1e-3 * 2 ** (k / 2):.4g}") for k in range(-4, 10)]
CRITERIA = ("reward", "kl", "loss")


@dataclass
class StabilitySpec:
    bounds: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16], metadata={
        "help": "lags S, pipeline.max_staleness in fixed_lag mode (batch j is generated with version j - S); 0 = the "
                "synchronous baseline (shown, not fitted)", "min": 0})
    lrs: list[float] = field(default_factory=lambda: list(DEFAULT_LRS), metadata={
        "help": "learning rates", "gt": 0, "sets": "optim.lr"})
    steps: int = field(default=60, metadata={"help": "learner steps of every run: its horizon T", "min": 1})
    horizons: list[int] = field(default_factory=lambda: [30, 60, 120], metadata={
        "help": "horizons T at the --horizon-bounds (those runs train for the longest; shorter horizons are their "
                "prefixes)", "min": 1})
    horizon_bounds: list[int] = field(default_factory=lambda: [1, 8], metadata={
        "help": "lags S at which the horizon varies (each one of --bounds)", "min": 0})
    reps: int = field(default=4, metadata={"help": "seeds (independent runs) per (S, lr) cell", "min": 1})
    schedule: str = field(default="constant", metadata={"help": "learning-rate schedule (constant = fixed)",
                                                        "choices": SCHEDULES})
    kl_factor: float = field(default=2.0, metadata={
        "help": "KL threshold = this x the largest per-step KL (k3) of the runs stable by reward and loss", "gt": 0})
    boot: int = field(default=1000, metadata={"help": "bootstrap resamples for the S exponent's interval", "min": 0})
    timeout: float = field(default=900.0, metadata={"help": "seconds one run may take before it fails", "gt": 0})

    def __post_init__(self):
        from studies.named import check_spec

        check_spec(self)
        stray = [s for s in self.horizon_bounds if s not in self.bounds]
        if stray:
            raise ConfigError(f"--horizon-bounds {','.join(map(str, self.horizon_bounds))}: {stray[0]} is not one of "
                              f"--bounds")

    def run_horizons(self, lag: int) -> list[int]:
        """The horizons a run at this lag is labelled at (its steps are the largest)."""
        return sorted({self.steps, *self.horizons}) if lag in self.horizon_bounds else [self.steps]


@dataclass
class _Run:
    lag: int
    lr: float
    seed_index: int
    seed: int
    horizons: list[int]
    cfg: RunConfig
    key: str

    @property
    def label(self) -> str:
        return f"{'sync' if self.lag == 0 else f'S={self.lag}'} lr={self.lr:g} seed#{self.seed_index}"


def run_key(cfg: RunConfig) -> str:
    """Hash of everything that shapes the training run: not the name, the stability rule, nor the collapse
    detector's settings (labels are computed from the stored rows)."""
    data = cfg.model_dump(mode="json", exclude={"name": True, "stability": True, "real": {"instability"}})
    text = json.dumps([RECORD_FORMAT, data], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def plan_runs(spec: StabilitySpec, cfg: RunConfig, source: str) -> list[_Run]:
    """Seed-major order: every cell gets its first seed before any gets its second, so a partial study covers
    the whole grid."""
    runs = []
    for index, seed in enumerate(replication_seeds(cfg.seed, spec.reps)):
        for lag in sorted(set(spec.bounds)):
            horizons = spec.run_horizons(lag)
            for lr in spec.lrs:
                pipeline = SYNC if lag == 0 else {"pipeline.mode": "fixed_lag", "pipeline.max_staleness": lag}
                overrides = {**pipeline, "optim.lr": lr, "optim.schedule": spec.schedule, "run.steps": horizons[-1],
                             "seed": seed, "real.checkpoint_every": 0}
                try:
                    run_cfg = cfg.with_overrides(overrides)
                except ValidationError as exc:
                    reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                    raise ConfigError(f"{source}: the grid point {overrides} is not a valid config: "
                                      f"{reasons}") from None
                runs.append(_Run(lag, lr, index, seed, horizons, run_cfg, run_key(run_cfg)))
    return runs


# --------------------------------------------------------------------------- running
def train_run(run: _Run, scratch: Path, timeout: float, on_step=None) -> dict:
    """One real training run; a record {status, error, steps (metrics.jsonl rows), metrics, compute_s}. A
    worker failure or a timeout is a failed record; the run's own folder is not kept."""
    from real.learner import WorkerError
    from real.trainer import Trainer

    start = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix=f"{run.key}-", dir=scratch))
    try:
        result = Trainer(run.cfg, folder / "run", timeout_s=timeout, on_step=on_step).run()
    except (WorkerError, TimeoutError) as exc:
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0], "steps": [],
                "metrics": {}, "compute_s": time.perf_counter() - start}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"status": "ok", "error": None, "steps": result.step_metrics, "metrics": result.metrics,
            "compute_s": time.perf_counter() - start}


def run_all(runs: list[_Run], out: Path, timeout: float, console: Console | None, train: bool = True
            ) -> tuple[dict[str, dict], int, int]:
    """Train every run not stored yet, one at a time (none with train=False); (records by key, runs trained, runs
    already stored)."""
    store = RunStore(out / "runs")
    records = {r.key: rec for r in runs if (rec := store.get(r.key)) is not None}
    todo = [r for r in runs if r.key not in records]
    cached = len(runs) - len(todo)
    if not todo or not train:
        return records, 0, cached
    scratch = out / ".training"
    scratch.mkdir(parents=True, exist_ok=True)
    bar = Progress(TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console, transient=True,
                   disable=console is None)
    overall = bar.add_task("study stability", total=len(todo), note="runs")
    steps = bar.add_task("", total=1, note="")

    def on_step(trainer, step, metrics):
        bar.update(steps, completed=step + 1, note=f"reward {metrics['reward/mean']:.3f}")
    try:
        with bar:
            for i, run in enumerate(todo):
                bar.reset(steps, total=run.cfg.run.steps, description=f"run {i + 1}/{len(todo)}: {run.label}",
                          note="")
                record = train_run(run, scratch, timeout, on_step)
                if record["status"] == "ok":  # a failed run is retried by the next invocation
                    store.put(run.key, record)
                records[run.key] = record
                bar.advance(overall)
                if console is not None and not console.is_terminal:  # a log file: one line per run
                    console.print(f"run {i + 1}/{len(todo)} {run.label} T={run.cfg.run.steps}: {record['status']} "
                                  f"({record['compute_s']:.1f} s)", highlight=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return records, len(todo), cached


# --------------------------------------------------------------------------- labels
def _values(rows: list[dict], key: str) -> np.ndarray:
    """A metric over steps; null (a non-finite value as JSON writes it) is NaN."""
    return np.array([math.nan if r.get(key) is None else float(r[key]) for r in rows], dtype=np.float64)


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def _first_above(rows: list[dict], key: str, threshold: float | None, warmup: int) -> float:
    if threshold is None:
        return math.nan
    for r in rows:
        v = r.get(key)
        if r["step"] >= warmup and v is not None and float(v) > threshold:
            return float(r["step"])
    return math.nan


def label_runs(runs: list[_Run], records: dict[str, dict], instability, kl_factor: float
               ) -> tuple[pd.DataFrame, KLCalibration]:
    """One row per (run, horizon): the grid point, and its label by reward and loss alone, then with the KL
    threshold calibrated on the runs stable by that label (over their whole length)."""
    ok = {r.key: records[r.key]["steps"] for r in runs if records.get(r.key, {}).get("status") == "ok"}
    calibration = calibrate_kl(ok, instability, kl_factor)
    plain, final = without_kl(instability), with_kl(instability, calibration.threshold)
    warmup = instability.warmup_steps
    out = []
    for run in runs:
        record = records.get(run.key, {"status": "missing", "error": "not trained yet", "compute_s": math.nan})
        base = {"S": run.lag, "mode": run.cfg.pipeline.mode, "lr": run.lr, "seed_index": run.seed_index,
                "seed": run.seed, "run": run.key, "steps_trained": run.cfg.run.steps, "status": record["status"],
                "error": record["error"], "compute_s": record["compute_s"]}
        if record["status"] != "ok":
            out.append({**base, "T": run.horizons[-1]})
            continue
        every = record["steps"]
        for T in run.horizons:
            rows = [r for r in every if r["step"] < T]
            p_step, p_reason = detect_collapse(rows, plain)
            step, reason = detect_collapse(rows, final)
            reward = _values(rows, "reward/mean")
            fifth = max(1, len(rows) // 5)
            losses = _values(rows, "loss")
            out.append({
                **base, "T": T, "steps": len(rows),
                "collapsed": step is not None, "collapse_step": math.nan if step is None else step,
                "criterion": criterion_of(reason), "reason": reason,
                "reward_loss_collapse_step": math.nan if p_step is None else p_step,
                "reward_loss_criterion": criterion_of(p_reason),
                "kl_first_above_step": _first_above(rows, "kl/k3", calibration.threshold, warmup),
                "loss_nonfinite": bool((~np.isfinite(losses)).any()),
                "kl/k3_max": max_kl(rows, warmup), "kl/k3_median": float(np.nanmedian(_values(rows, "kl/k3"))),
                "reward/final": _mean(reward[-fifth:]), "reward/auc": _mean(reward),
                "staleness/max_seen": max((int(s) for r in rows for s in r["staleness/hist"]), default=0),
                "time/step_s": record["metrics"].get("time/step_s"),
            })
    return pd.DataFrame(out), calibration


def criterion_counts(table: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per training run over its whole length: how many collapses each criterion produced (the first to fire), and
    how many runs each criterion would mark by itself."""
    full = table[(table["status"] == "ok") & (table["T"] == table["steps_trained"])]
    if full.empty:
        return {"first": dict.fromkeys(CRITERIA, 0), "alone": dict.fromkeys(CRITERIA, 0),
                "runs": {"total": 0, "collapsed": 0}}
    first = {c: int((full["criterion"] == c).sum()) for c in CRITERIA}
    alone = {"reward": int((full["reward_loss_criterion"] == "reward").sum()),
             "kl": int(full["kl_first_above_step"].notna().sum()),
             "loss": int(full["loss_nonfinite"].sum())}
    return {"first": first, "alone": alone, "runs": {"total": len(full), "collapsed": int(full["collapsed"].sum())}}


# --------------------------------------------------------------------------- figures
def _cell_fraction(data: pd.DataFrame, rows: str) -> pd.DataFrame:
    return data.groupby([rows, "lr"])["collapsed"].agg(["mean", "sum", "size"]).reset_index()


def collapse_map(table: pd.DataFrame, spec: StabilitySpec, title: str, out: Path) -> list[Path]:
    """Fraction of seeds collapsed per cell: S x lr at T = --steps, and T x lr at each horizon lag."""
    ok = table[table["status"] == "ok"]
    lrs = sorted(ok["lr"].unique())
    panels = [("S", ok[ok["T"] == spec.steps], f"T = {spec.steps} steps", "lag S (versions)")]
    for lag in spec.horizon_bounds:
        panels.append(("T", ok[ok["S"] == lag], f"S = {lag}", "horizon T (learner steps)"))
    fig, axes = plots.panels(len(panels), title, width=0.55 * len(lrs) + 2.6, height=3.8)
    cmap = plots.plt.get_cmap("rocket_r")
    for ax, (rows, data, name, ylabel) in zip(axes, panels):
        cells = _cell_fraction(data, rows)
        ys = sorted(cells[rows].unique())
        grid = np.full((len(ys), len(lrs)), np.nan)
        for _, c in cells.iterrows():
            grid[ys.index(c[rows]), lrs.index(c["lr"])] = c["mean"]
            ax.text(lrs.index(c["lr"]), ys.index(c[rows]), f"{int(c['sum'])}/{int(c['size'])}", ha="center",
                    va="center", fontsize=7, color="white" if c["mean"] > 0.55 else "black")
        image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="lower")
        ax.set(xticks=range(len(lrs)), yticks=range(len(ys)), xlabel="learning rate", ylabel=ylabel, title=name,
               yticklabels=[("sync" if rows == "S" and y == 0 else f"{y:g}") for y in ys])
        ax.set_xticklabels([f"{lr:.2g}" for lr in lrs], rotation=60, fontsize=7)
        ax.grid(False)
    fig.colorbar(image, ax=axes[-1], label="fraction of seeds collapsed", fraction=0.05, pad=0.03)
    return plots.save(fig, out, "collapse_map")


def boundary_figure(table: pd.DataFrame, analysis: check.Analysis, spec: StabilitySpec, title: str,
                    out: Path) -> list[Path]:
    """Cells in the (S, lr) plane at T = --steps, coloured by the fraction collapsed; the fitted largest stable lr
    (P = 1/2) against S with its 95 % bootstrap band; and the rule's slope -1 through the fit at the middle S."""
    ok = table[(table["status"] == "ok") & (table["S"] >= 1) & (table["T"] == spec.steps)]
    cells = _cell_fraction(ok, "S")
    fig, axes = plots.panels(1, title, width=6.2, height=5.6)
    ax = axes[0]
    points = ax.scatter(cells["S"], cells["lr"], c=cells["mean"], cmap="rocket_r", vmin=0, vmax=1, s=70,
                        edgecolor="grey", linewidth=0.5, zorder=3)
    fig.colorbar(points, ax=ax, label="fraction of seeds collapsed")
    s_grid = np.geomspace(max(1.0, float(ok["S"].min())), float(ok["S"].max()), 60)
    fitted = np.array([analysis.max_stable_lr(s, spec.steps) for s in s_grid])
    if np.isfinite(fitted).all():
        ax.plot(s_grid, fitted, color="black", linewidth=2,
                label=f"fit: largest stable lr, S^k with k = {analysis.k.value:.2f}")
        if len(analysis.draws):
            band = np.array([analysis.max_stable_band(s, spec.steps) for s in s_grid])
            ax.fill_between(s_grid, band[:, 0], band[:, 1], color="black", alpha=0.15, label="95 % bootstrap band")
        middle = math.sqrt(s_grid[0] * s_grid[-1])
        anchor = analysis.max_stable_lr(middle, spec.steps)
        ax.plot(s_grid, anchor * middle / s_grid, color="crimson", linestyle="--", linewidth=1.5,
                label="the rule's slope -1 (through the fit at the middle S)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted(cells["S"].unique()))
    ax.xaxis.set_major_formatter(plots.matplotlib.ticker.FormatStrFormatter("%g"))
    lo, hi = float(ok["lr"].min()), float(ok["lr"].max())
    ax.set_ylim(lo / 1.6, hi * 1.6)
    ax.set(xlabel="lag S (versions)", ylabel="learning rate")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1)
    return plots.save(fig, out, "boundary")


def probability_figure(table: pd.DataFrame, analysis: check.Analysis, spec: StabilitySpec, title: str,
                       out: Path) -> list[Path]:
    """Fraction collapsed per cell (T = --steps) against lr and against S·lr, one colour per S, with the fitted
    collapse probability: under the rule the curves coincide against S·lr; without an S effect, against lr."""
    import seaborn as sns

    ok = table[(table["status"] == "ok") & (table["T"] == spec.steps)]
    cells = _cell_fraction(ok, "S")
    cells["S·lr"] = cells["S"] * cells["lr"]
    lags = sorted(cells["S"].unique())
    colors = dict(zip(lags, sns.color_palette("viridis", len(lags))))
    fig, axes = plots.panels(2, title, width=5.4, height=4.2)
    for ax, x in zip(axes, ("lr", "S·lr")):
        for lag in lags:
            if x == "S·lr" and lag == 0:
                continue
            c = cells[cells["S"] == lag].sort_values("lr")
            name = "sync" if lag == 0 else f"S = {lag}"
            ax.scatter(c[x], c["mean"], color=colors[lag], s=22, zorder=3, label=name)
            if lag >= 1:
                lr_grid = np.geomspace(c["lr"].min(), c["lr"].max(), 80)
                obs = pd.DataFrame({"lr": lr_grid, "S": float(lag), "T": float(spec.steps)})
                p = check.proba(analysis.rule, obs)
                ax.plot(lr_grid * (lag if x == "S·lr" else 1), p, color=colors[lag], linewidth=1.2)
            else:
                ax.plot(c[x], c["mean"], color=colors[lag], linewidth=1, linestyle=":")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plots.matplotlib.ticker.NullFormatter())
        ax.set(xlabel="learning rate" if x == "lr" else "S x learning rate", ylabel="collapse probability",
               ylim=(-0.04, 1.04))
    axes[0].set_title("dots: fraction of seeds collapsed; lines: fit", fontsize="small")
    axes[1].set_title("under the rule the S curves coincide here", fontsize="small")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[1].legend(handles, labels, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    return plots.save(fig, out, "collapse_probability")


# --------------------------------------------------------------------------- summary
def _map_lines(table: pd.DataFrame, rows: str, data: pd.DataFrame, lrs: list[float], header: str) -> list[str]:
    cells = _cell_fraction(data, rows).set_index([rows, "lr"])
    lines = [f"| {header} | " + " | ".join(f"{lr:.3g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for y in sorted(data[rows].unique()):
        cell = [f"{int(cells.loc[(y, lr), 'sum'])}/{int(cells.loc[(y, lr), 'size'])}" if (y, lr) in cells.index
                else "-" for lr in lrs]
        name = "sync" if rows == "S" and y == 0 else f"{y:g}"
        lines.append(f"| {name} | " + " | ".join(cell) + " |")
    return lines


def _edge_lines(table: pd.DataFrame, analysis: check.Analysis, spec: StabilitySpec) -> list[str]:
    ok = table[(table["status"] == "ok") & (table["T"] == spec.steps)]
    lines = ["| S | largest lr with fewer than half the seeds collapsed, below the first lr where half or more did "
             "| fitted largest stable lr [95 % band] |", "|---|---|---|"]
    for lag in sorted(ok["S"].unique()):
        per_lr = ok[ok["S"] == lag].groupby("lr")["collapsed"].mean().sort_index()
        unstable = per_lr[per_lr >= 0.5]
        first = unstable.index[0] if len(unstable) else math.inf
        below = per_lr[(per_lr.index < first) & (per_lr < 0.5)]
        empirical = f"{below.index[-1]:.3g}" if len(below) else "none (the smallest lr collapsed)"
        if not len(unstable):
            empirical = f"above {per_lr.index[-1]:.3g} (no lr collapsed half the seeds)"
        if lag >= 1:
            fitted = analysis.max_stable_lr(lag, spec.steps)
            band = analysis.max_stable_band(lag, spec.steps) if len(analysis.draws) else (math.nan, math.nan)
            fit_text = f"{fitted:.3g} [{band[0]:.3g}, {band[1]:.3g}]"
        else:
            fit_text = "(sync: not in the fit)"
        lines.append(f"| {'sync' if lag == 0 else lag} | {empirical} | {fit_text} |")
    return lines


def summary_lines(spec: StabilitySpec, cfg: RunConfig, table: pd.DataFrame, calibration: KLCalibration,
                  analysis: check.Analysis | None, command: str, trained: int, cached: int, seconds: float
                  ) -> list[str]:
    ok = table[table["status"] == "ok"]
    runs = table.drop_duplicates("run")
    inst = cfg.real.instability
    counts = criterion_counts(table)
    lrs = sorted(table["lr"].unique())
    lags = ", ".join("0 (sync)" if s == 0 else str(s) for s in sorted(set(spec.bounds)))
    lines = [f"# stability study: {cfg.name}", "", *([f"Made by: `{command}`", ""] if command else []),
             f"**{len(runs)} real training runs** ({int((runs['status'] == 'ok').sum())} finished), "
             f"**{spec.reps} seeds per cell**: lags S {lags} x {len(spec.lrs)} learning rates {lrs[0]:.3g} to {lrs[-1]:.3g} (a factor "
             f"{(lrs[-1] / lrs[0]) ** (1 / max(1, len(lrs) - 1)):.3f} apart), schedule {spec.schedule}, T = "
             f"{spec.steps} steps; at S = {', '.join(map(str, spec.horizon_bounds))} the runs train "
             f"{max(spec.horizons + [spec.steps])} steps and are also labelled at T = "
             f"{', '.join(str(t) for t in sorted(set(spec.horizons + [spec.steps])))} (their prefixes). S > 0 runs in "
             f"fixed_lag mode (batch j generated with version j - S); S = 0 is the synchronous pipeline. "
             f"{trained} runs trained now ({seconds:.0f} s), {cached} already stored. No GPU was lent to this "
             f"study's session: every run trained on this machine's CPU.", ""]
    thr = calibration.threshold
    lines += ["## Collapse label", "",
              f"Reward and loss first (docs/design.md; real.instability: warm-up {inst.warmup_steps} steps, the "
              f"reward's {inst.reward_window}-step moving average below {1 - inst.reward_drop:.2f} x its best for "
              f"{inst.recover_window} steps, or a non-finite loss), with the KL criterion off. Then the KL threshold: "
              f"**{_num(thr)}** = {calibration.factor:g} x {_num(calibration.largest_stable_kl)}, the largest per-step "
              f"KL (k3, from the warm-up on) of the {calibration.stable_runs} of {calibration.runs} runs stable by "
              f"reward and loss over their whole length"
              + (f" (reached by run {calibration.at})" if calibration.at else "") + ". Every run is labelled again "
              f"with it. Runs whose reward was falling when they ended (a fall not yet confirmed) are left out of the "
              f"calibration: {calibration.falling}. A threshold above every stable run's KL never marks a run "
              f"that reward and loss call stable over its whole length: KL can only fire first in a run they also "
              f"mark, in a run whose reward was falling at its end, or in a shorter horizon's prefix of a run that "
              f"collapses later. The threshold is recorded in fit.json (kl_threshold; instability.kl_max for the "
              f"detector of later runs). Why calibrate at all: the behaviour-to-current KL grows with S itself, so a "
              f"threshold set on sync or low-S runs would mark healthy high-S runs as collapsed and manufacture an "
              f"S effect.", "",
              "| criterion | collapses it produced (first to fire) | runs it marks by itself |", "|---|---|---|",
              *(f"| {name} | {counts['first'][c]} | {counts['alone'][c]} |"
                for c, name in zip(CRITERIA, ("reward fall", f"KL (k3) > {_num(thr)}", "non-finite loss"))),
              "", f"Over their whole length, {counts['runs']['collapsed']} of {counts['runs']['total']} runs "
                  f"collapsed.", ""]
    lines += [f"## Collapse map (seeds collapsed / seeds, T = {spec.steps})", "",
              *_map_lines(table, "S", ok[ok["T"] == spec.steps], lrs, "S \\ lr"), ""]
    for lag in spec.horizon_bounds:
        lines += [f"Horizon at S = {lag}:", "", *_map_lines(table, "T", ok[ok["S"] == lag], lrs, "T \\ lr"), ""]
    if analysis is None:
        return lines + ["No run with S >= 1 finished: nothing to fit.", ""]
    lines += check.markdown(analysis)
    lines += [f"## Largest stable learning rate by S (T = {spec.steps})", "", *_edge_lines(table, analysis, spec), ""]
    if analysis.verdict_kind == "none":
        lines += ["**S has no measurable effect on the edge of stability at this scale**: the S exponent's interval "
                  "contains 0, so `stalecast plan --lr` and `stalecast simulate` apply the fitted lr bound without S "
                  "(fit.json's coefficients_without_S).", ""]
    lines += ["Figures: `collapse_map` (fraction of seeds collapsed per cell), `boundary` (the fitted largest stable "
              "lr against S with the rule's slope -1 beside it), `collapse_probability` (against lr and against S x lr).",
              ""]
    return lines


def _num(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3g}"


# --------------------------------------------------------------------------- the study
def run_stability_study(spec: StabilitySpec, cfg: RunConfig, out: Path, console: Console | None = None,
                        command: str = "", source: str = "config", force: bool = False, train: bool = True
                        ) -> tuple[pd.DataFrame, list[Path]]:
    """train=False: analyse the runs stored so far (another process may still be training the rest)."""
    runs = plan_runs(spec, cfg, source)  # rejects a grid the config cannot run before --out is touched
    claim(out, "study stability", force)
    start = time.perf_counter()
    records, trained, cached = run_all(runs, out, spec.timeout, console, train)
    seconds = time.perf_counter() - start
    table, calibration = label_runs(runs, records, cfg.real.instability, spec.kl_factor)
    paths = [out / "table.parquet", out / "table.csv"]
    table.to_parquet(paths[0], index=False)
    table.to_csv(paths[1], index=False)

    ok = table[table["status"] == "ok"]
    fitted = ok[ok["S"] >= 1]
    analysis = None
    if not fitted.empty:
        analysis = check.analyse(fitted[["run", "seed", "S", "lr", "T", "collapsed"]].astype({"collapsed": bool}),
                                 n_boot=spec.boot, seed=cfg.seed)
    payload = {"source": command or str(out), "staleness_statistic": "max",
               "kl_threshold": calibration.as_dict(), "collapse_counts": criterion_counts(table),
               "instability": {**cfg.real.instability.model_dump(mode="json"), "kl_max": calibration.threshold},
               "design": {"bounds": sorted(set(spec.bounds)), "lrs": spec.lrs, "steps": spec.steps,
                          "horizons": spec.horizons, "horizon_bounds": spec.horizon_bounds, "reps": spec.reps,
                          "schedule": spec.schedule, "mode": "fixed_lag (S > 0), sync (S = 0)"}}
    if analysis is not None:
        payload["rule"] = check.fit_payload(analysis)
        write_fit(out / "fit.json", payload)
        paths.append(out / "fit.json")
    if not ok.empty:
        paths += collapse_map(table, spec, f"{cfg.name}: collapsed runs", out)
        if analysis is not None:
            paths += boundary_figure(table, analysis, spec, f"{cfg.name}: edge of stability against S", out)
            paths += probability_figure(table, analysis, spec, f"{cfg.name}: collapse probability", out)
    failures = [f"- failed: {'sync' if r['S'] == 0 else 'S=' + str(r['S'])}, lr {r['lr']:g}, seed #{r['seed_index']}: "
                f"{r['error']}" for _, r in table[table["status"] == "failed"].iterrows()]
    missing = int((table["status"] == "missing").sum())
    if missing:
        failures.append(f"- **partial results**: {missing} of {len(runs)} runs not trained yet (--analyse-only)")
    text = summary_lines(spec, cfg, table, calibration, analysis, command, trained, cached, seconds) if not ok.empty \
        else [f"# stability study: {cfg.name}", "", "No run has finished: nothing to analyse."]
    (out / "summary.md").write_text("\n".join([*text, *([""] + failures if failures else []), ""]))
    return table, [*paths, out / "summary.md"]


# --------------------------------------------------------------------------- command line
def _command(args: argparse.Namespace, spec: StabilitySpec, out: Path) -> str:
    words = ["stalecast", "study", "stability", args.config, "--out", str(out)]
    for f in dataclasses.fields(StabilitySpec):
        value = getattr(spec, f.name)
        if value is not None:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            words += [f"--{f.name.replace('_', '-')}", text]
    for pair in args.set:
        words += ["--set", pair]
    return shlex.join(words)


def cmd_stability(args: argparse.Namespace, console: Console) -> int:
    from sim.cli import parse_overrides

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(StabilitySpec)
              if getattr(args, f.name) is not None}
    spec = StabilitySpec(**values)
    cfg = load_config(args.config, parse_overrides(args.set))
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-stability"
    check_out(out, args.force)
    table, paths = run_stability_study(spec, cfg, out, console, _command(args, spec, out), args.config, args.force,
                                       train=not args.analyse_only)
    console.print(Markdown((out / "summary.md").read_text()))
    console.print(f"wrote {out}/: " + ", ".join(p.name for p in paths))
    return 0 if (table["status"] == "ok").all() else 1


def add_parser(names) -> None:
    """`stalecast study stability`, added to the study subcommands."""
    from studies.named import add_spec_options, add_study_out_options

    doc = __doc__.split("\n\n")
    sp = names.add_parser("stability", help="staleness x learning rate on the real trainer: where runs collapse, "
                                            "and whether the largest stable lr falls with S as the rule says",
                          description=" ".join(doc[1].split()))
    sp.add_argument("config", help="run config YAML for the real trainer (e.g. examples/tiny_cpu.yaml)")
    add_study_out_options(sp, "default runs/NAME-stability")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of the config, e.g. --set real.instability.reward_drop=0.4 (repeatable)")
    sp.add_argument("--analyse-only", action="store_true",
                    help="train nothing: analyse the runs stored so far (e.g. while another invocation still trains)")
    add_spec_options(sp, StabilitySpec)
    sp.set_defaults(func=cmd_stability)
