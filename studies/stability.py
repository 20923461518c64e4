"""`stalecast study stability CONFIG --out DIR`: the seed paper's experiment on the real trainer.

Only the staleness bound varies (pipeline.max_staleness, same workers and learner, so the same hardware and
generation throughput; each run's measured throughput is in the table), across a grid of learning rates and
schedules (constant = fixed, ess_coupled, staleness_aware). Bound 0 is the synchronous baseline
(pipeline.mode sync), run once per learning rate: with no staleness every schedule applies the base lr.
Runs are real `stalecast train` runs, one at a time (they share the CPU cores or the GPU).

Per run the table records the collapse step (the instability rule of docs/design.md, `sim.stability.detect_collapse`,
or none), final reward (mean over the last fifth of steps), reward area under the curve (per step, i.e. the
mean reward), max grad norm, mean KL and ESS, and the rule's inputs: S (the configured statistic of the
consumed staleness) and the mean applied lr up to the collapse. `by_staleness.*` holds KL, ESS and grad norm
per staleness range (means over the steps before any collapse). Then the rule is fitted (`fit.json`,
readable by `stalecast plan --stability-fit` and a config's `stability.fit`), checked on held-out runs and
against 1/S (`validate.stability`), and drawn: `stability_map` (bound x lr, coloured by collapse step, the
fitted boundary drawn), `collapse` (collapse step against S·η and T·η), `ess_staleness`.

Resumable: each finished run is stored under OUT/runs/KEY.json (KEY hashes its config), so running the
command again redoes nothing and a killed study finishes the rest; a failed run is retried next time.
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
from sim.stability import detect_collapse, staleness_of, write_fit
from studies import plots
from studies.sweep import RunStore, replication_seeds
from validate import stability as check

RECORD_FORMAT = "stalecast.stability-run/1"
SCHEDULES = typing.get_args(Optim.model_fields["schedule"].annotation)
SYNC = {"pipeline.mode": "sync", "pipeline.interruptible": False, "pipeline.max_staleness": 0}
PER_RANGE = ("n_samples", "kl/k3", "ess/token", "ess/seq", "grad_norm")


@dataclass
class StabilitySpec:
    bounds: list[int] = field(default_factory=lambda: [0, 1, 2, 4], metadata={
        "help": "staleness bounds S; 0 = the synchronous baseline, run once per learning rate", "min": 0})
    lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3, 1e-2], metadata={
        "help": "base learning rates", "gt": 0, "sets": "optim.lr"})
    schedules: list[str] = field(default_factory=lambda: ["constant", "ess_coupled"], metadata={
        "help": f"learning-rate schedules ({', '.join(SCHEDULES)}; constant = fixed)"})
    steps: int | None = field(default=None, metadata={
        "help": "learner steps per run, also the rule's horizon T (default: the config's run.steps)", "min": 1})
    reps: int = field(default=1, metadata={"help": "replications (independent seeds) per cell", "min": 1})
    timeout: float = field(default=900.0, metadata={"help": "seconds one run may take before it fails", "gt": 0})

    def __post_init__(self):
        from studies.named import check_spec

        _check_schedules(self.schedules)
        check_spec(self)


def _check_schedules(schedules: list[str]) -> None:
    unknown = [s for s in schedules if s not in SCHEDULES]
    if unknown or not schedules:
        raise ConfigError(f"--schedules: unknown schedule(s) {', '.join(unknown) or '(none given)'} "
                          f"(known: {', '.join(SCHEDULES)})")


@dataclass
class _Run:
    bound: int
    lr: float
    schedule: str
    replication: int
    seed: int
    cfg: RunConfig
    key: str

    @property
    def label(self) -> str:
        return f"{'sync' if self.bound == 0 else f'S={self.bound}'} lr={self.lr:g} {self.schedule}"


def run_key(cfg: RunConfig) -> str:
    """Hash of everything that shapes the training run (not the name, nor the stability constants)."""
    data = cfg.model_dump(mode="json", exclude={"name", "stability"})
    text = json.dumps([RECORD_FORMAT, data], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def plan_runs(spec: StabilitySpec, cfg: RunConfig, source: str) -> list[_Run]:
    _check_schedules(spec.schedules)
    if not spec.bounds or not spec.lrs:
        raise ConfigError("--bounds and --lrs need at least one value each")
    if any(b > 0 for b in spec.bounds) and cfg.pipeline.mode != "async":
        raise ConfigError(f"{source}: the stability study varies pipeline.max_staleness, which only async mode "
                          f"uses (pipeline.mode is {cfg.pipeline.mode})")
    steps = spec.steps or cfg.run.steps
    runs = []
    for lr in spec.lrs:
        for bound in sorted(set(spec.bounds)):
            for schedule in (spec.schedules if bound > 0 else spec.schedules[:1]):
                pipeline = SYNC if bound == 0 else {"pipeline.max_staleness": bound}
                for rep, seed in enumerate(replication_seeds(cfg.seed, spec.reps)):
                    overrides = {**pipeline, "optim.lr": lr, "optim.schedule": schedule, "run.steps": steps,
                                 "seed": seed}
                    try:
                        run_cfg = cfg.with_overrides(overrides)
                    except ValidationError as exc:
                        reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                        raise ConfigError(f"{source}: the grid point {overrides} is not a valid config: "
                                          f"{reasons}") from None
                    runs.append(_Run(bound, lr, schedule, rep, seed, run_cfg, run_key(run_cfg)))
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


def run_all(runs: list[_Run], out: Path, timeout: float, console: Console | None) -> tuple[dict[str, dict], int, int]:
    """Train every run not stored yet, one at a time; (records by key, runs trained, runs already stored)."""
    store = RunStore(out / "runs")
    records = {r.key: rec for r in runs if (rec := store.get(r.key)) is not None}
    todo = [r for r in runs if r.key not in records]
    cached = len(runs) - len(todo)
    if not todo:
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
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return records, len(todo), cached


# --------------------------------------------------------------------------- tables
def _step(value: float) -> int | None:
    """A table's collapse step (NaN when stable) as an int or None."""
    return None if pd.isna(value) else int(value)


def _before_collapse(rows: list[dict], collapse: int | None) -> list[dict]:
    return rows if collapse is None else [r for r in rows if r["step"] < collapse]


def _values(rows: list[dict], key: str) -> np.ndarray:
    """A metric over steps; null (a non-finite value as JSON writes it) is NaN."""
    return np.array([math.nan if r.get(key) is None else float(r[key]) for r in rows], dtype=np.float64)


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def run_row(run: _Run, record: dict) -> dict:
    """One table row: the grid point, what happened, and the rule's inputs."""
    row = {"pipeline.max_staleness": run.bound, "pipeline.mode": run.cfg.pipeline.mode,
           "optim.schedule": run.schedule, "optim.lr": run.lr, "replication": run.replication, "seed": run.seed,
           "key": run.key, "status": record["status"], "error": record["error"], "compute_s": record["compute_s"]}
    rows = record["steps"]
    if record["status"] != "ok":
        return row
    cfg = run.cfg
    collapse, reason = detect_collapse(rows, cfg.real.instability)
    upto = [r for r in rows if collapse is None or r["step"] <= collapse]
    reward = _values(rows, "reward/mean")
    hist: dict[str, int] = {}
    for r in rows:
        for s, n in r["staleness/hist"].items():
            hist[s] = hist.get(s, 0) + n
    fifth = max(1, len(rows) // 5)
    update = [r["update_norm"] / r["lr"] for r in rows if r.get("update_norm") is not None]
    m = record["metrics"]
    row.update({
        "steps": len(rows), "collapse_step": collapse if collapse is not None else math.nan,
        "collapsed": collapse is not None, "collapse_reason": reason,
        "S": staleness_of(hist, cfg.stability.staleness_statistic),
        "lr/applied": _mean(_values(upto, "lr")),
        "reward/final": _mean(reward[-fifth:]), "reward/auc": _mean(reward),
        "grad_norm/max": float(np.nanmax(_values(rows, "grad_norm"))),
        "kl/k3": _mean(_values(rows, "kl/k3")), "ess/token": _mean(_values(rows, "ess/token")),
        "ess/seq": _mean(_values(rows, "ess/seq")),
        "update_norm/per_lr": float(np.median(update)) if update else math.nan,
        "staleness/mean": m.get("staleness/mean"), "staleness/max": m.get("staleness/max"),
        "throughput/samples_per_s": m.get("throughput/samples_per_s"), "time/step_s": m.get("time/step_s"),
    })
    return row


def range_rows(run: _Run, rows: list[dict], collapse: int | None) -> list[dict]:
    """Per staleness range of one run: means over its steps before any collapse."""
    rows = _before_collapse(rows, collapse)
    ranges = sorted({int(s) for r in rows for s in r["staleness/hist"]})
    out = []
    for s in ranges:
        present = [r for r in rows if f"by_staleness/{s}/n_samples" in r]
        out.append({"key": run.key, "pipeline.max_staleness": run.bound, "optim.schedule": run.schedule,
                    "optim.lr": run.lr, "replication": run.replication, "staleness": s, "steps_present": len(present),
                    **{name: _mean(_values(present, f"by_staleness/{s}/{name}")) for name in PER_RANGE}})
    return out


def write_table(frame: pd.DataFrame, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.parquet", out / f"{stem}.csv"]
    frame.to_parquet(paths[0], index=False)
    frame.to_csv(paths[1], index=False)
    return paths


# --------------------------------------------------------------------------- figures
LR_LABEL = "base learning rate"
BOUND_LABEL = "staleness bound S (versions)"


def _cells(table: pd.DataFrame, schedule: str) -> pd.DataFrame:
    """The map of one schedule: its async runs and the shared sync runs, per (bound, lr)."""
    ok = table[(table["status"] == "ok")
               & ((table["optim.schedule"] == schedule) | (table["pipeline.max_staleness"] == 0))]
    return ok.groupby(["pipeline.max_staleness", "optim.lr"]).agg(
        collapsed=("collapsed", "mean"), step=("collapse_step", "median"), n=("collapsed", "size"),
        S=("S", "median"), applied=("lr/applied", "mean")).reset_index()


def stability_map(table: pd.DataFrame, analysis: check.Analysis | None, schedules: list[str], title: str,
                  out: Path) -> list[Path]:
    """Bound x lr per schedule: stable cells green, collapsed ones coloured by collapse step; the fitted rule's
    boundary (largest stable lr per bound, in base lr via each row's applied/base ratio) as a staircase."""
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    horizon = float(table["steps"].max())
    lrs = sorted(table["optim.lr"].unique())
    bounds = sorted(table["pipeline.max_staleness"].unique())
    fig, axes = plots.panels(len(schedules), title, width=1.3 * len(lrs) + 2.5, height=0.7 * len(bounds) + 2.2)
    cmap = plt.get_cmap("rocket")
    for ax, schedule in zip(axes, schedules):
        cells = _cells(table, schedule)
        for _, c in cells.iterrows():
            x, y = lrs.index(c["optim.lr"]), bounds.index(c["pipeline.max_staleness"])
            collapsed = c["collapsed"] >= 0.5
            color = cmap(0.15 + 0.7 * c["step"] / horizon) if collapsed else "#b8e0b0"
            ax.add_patch(patches.Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor=color, edgecolor="white"))
            text = f"t={c['step']:.0f}" if collapsed else "stable"
            if c["n"] > 1:
                text += f"\n{round(c['collapsed'] * c['n'])}/{int(c['n'])} collapsed"
            ax.text(x, y, text, ha="center", va="center", fontsize=8, color="white" if collapsed else "black")
        if analysis is not None and not cells.empty:
            _draw_boundary(ax, cells, analysis, lrs, bounds, horizon)
        ax.set(xlim=(-0.5, len(lrs) - 0.5), ylim=(-0.5, len(bounds) - 0.5), xticks=range(len(lrs)),
               yticks=range(len(bounds)), xticklabels=[f"{lr:g}" for lr in lrs],
               yticklabels=["sync" if b == 0 else b for b in bounds],
               xlabel=LR_LABEL, ylabel=BOUND_LABEL, title=schedule)
        ax.grid(False)
        # the colours span 0.15-0.85 of the map, so the bar runs from -0.15/0.7 T to 0.85/0.7 T: clip to 0..T
        bar = fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(-0.15 / 0.7 * horizon,
                                                                               0.85 / 0.7 * horizon)),
                           ax=ax, label="collapse step (learner steps)", fraction=0.06)
        bar.ax.set_ylim(0, horizon)
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize="small", handles=[
        patches.Patch(facecolor="#b8e0b0", label="stable"),
        *([plt.Line2D([], [], color="black", linewidth=2, label="rule: largest stable lr")] if analysis else [])])
    return plots.save(fig, out, "stability_map")


def _draw_boundary(ax, cells, analysis, lrs, bounds, horizon) -> None:
    from sim.stability import predict

    # Column i sits at log lr_i; the map's edges half a gap beyond the outer columns; np.interp clips beyond.
    log_lrs = np.log(lrs)
    gaps = np.diff(log_lrs) if len(lrs) > 1 else np.array([math.log(2.0)])
    xp = np.concatenate([[log_lrs[0] - gaps[0] / 2], log_lrs, [log_lrs[-1] + gaps[-1] / 2]])
    fp = np.concatenate([[-0.5], np.arange(len(lrs)), [len(lrs) - 0.5]])
    xs, ys = [], []
    for y, bound in enumerate(bounds):
        row = cells[cells["pipeline.max_staleness"] == bound]
        if row.empty:
            continue
        ratio = float((row["applied"] / row["optim.lr"]).mean())  # applied lr per unit base lr in this row
        limit = predict(analysis.fit.as_constants(), 1.0, float(row["S"].median()), horizon).max_stable_lr / ratio
        x = float(np.interp(math.log(limit), xp, fp)) if math.isfinite(limit) else len(lrs) - 0.5
        xs += [x, x]
        ys += [y - 0.5, y + 0.5]
    ax.plot(xs, ys, color="black", linewidth=2)


def _schedule_names(frame: pd.DataFrame) -> pd.Series:
    """The schedule of async runs; "sync" for the synchronous baseline (every schedule is the base lr there)."""
    return frame["optim.schedule"].where(frame["pipeline.max_staleness"] > 0, "sync")


def _schedule_colors() -> dict[str, tuple]:
    """One colour per schedule, the same in every panel."""
    import seaborn as sns

    order = ["sync", *SCHEDULES]
    return dict(zip(order, sns.color_palette(plots.PALETTE, len(order))))


def collapse_figure(table: pd.DataFrame, analysis: check.Analysis | None, title: str, out: Path) -> list[Path]:
    """Collapse step against S·η and against T·η (η: applied lr); stable runs sit at T (censored). The fitted
    thresholds: a on S·η, and the horizon term's collapse step b/η."""
    import seaborn as sns
    from matplotlib.ticker import NullFormatter

    ok = table[table["status"] == "ok"].copy()
    horizon = float(ok["steps"].max())
    ok["S·η"] = ok["S"] * ok["lr/applied"]
    ok["T·η"] = ok["steps"] * ok["lr/applied"]
    ok["step"] = ok["collapse_step"].fillna(ok["steps"])
    ok["outcome"] = np.where(ok["collapsed"], "collapsed", "stable (shown at T)")
    ok["schedule"] = _schedule_names(ok)
    fig, axes = plots.panels(2, title, width=5.2)
    for ax, x, data in ((axes[0], "S·η", ok[ok["S"] > 0]), (axes[1], "T·η", ok)):
        if not data.empty:  # one legend (the second panel's: it also has the sync runs)
            sns.scatterplot(data=data, x=x, y="step", hue="schedule", style="outcome", s=60, ax=ax,
                            palette=_schedule_colors(), markers={"collapsed": "X", "stable (shown at T)": "^"},
                            legend=ax is axes[1])
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axhline(horizon, color="grey", linewidth=0.8, linestyle=":")
        ax.set(ylabel="collapse step (learner steps)", ylim=(0, horizon * 1.08))
    axes[0].set_xlabel("S·η: staleness x applied lr (versions x lr)")
    axes[1].set_xlabel("T·η: horizon x applied lr (steps x lr)")
    if analysis is not None:
        a, b = analysis.fit.staleness_threshold.value, analysis.fit.drift_threshold.value
        if math.isfinite(a):
            axes[0].axvline(a, color="crimson", linestyle="--", label=f"fitted a = {a:.3g}")
            axes[0].legend(fontsize="small", loc="center left")
        if math.isfinite(b):
            x = np.geomspace(b, max(b, float(ok["T·η"].max())) * 1.5, 50)
            axes[1].plot(x, b * horizon / x, color="crimson", linestyle="--", label=f"step = b/η, b = {b:.3g}")
    if axes[1].get_legend() is not None or axes[1].get_lines():
        axes[1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    return plots.save(fig, out, "collapse")


def ess_figure(ranges: pd.DataFrame, title: str, out: Path) -> list[Path]:
    """ESS (token and sequence) and KL against staleness range, one line per learning rate (95 % band over runs)."""
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    data = ranges.assign(lr=[f"{lr:g}" for lr in ranges["optim.lr"]], schedule=_schedule_names(ranges))
    fig, axes = plots.panels(3, title)
    for ax, y, label in ((axes[0], "ess/token", "token ESS (fraction of N)"),
                         (axes[1], "ess/seq", "sequence ESS (fraction of N)"),
                         (axes[2], "kl/k3", "KL k3 to the behavior policy (nats)")):
        plots.line(ax, data, "staleness", y, hue="lr", style_by="schedule",
                   xlabel="staleness of the samples (versions)", ylabel=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    plots.one_legend(axes[::-1])  # the last panel's legend, beside it, clear of the lines
    sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1))
    return plots.save(fig, out, "ess_staleness")


# --------------------------------------------------------------------------- the study
def markdown_map(table: pd.DataFrame, schedules: list[str]) -> list[str]:
    lrs = sorted(table["optim.lr"].unique())
    lines = []
    for schedule in schedules:
        cells = _cells(table, schedule).set_index(["pipeline.max_staleness", "optim.lr"])
        lines += [f"**{schedule}** (collapse step, or stable):", "",
                  "| bound S | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
        for bound in sorted(table["pipeline.max_staleness"].unique()):
            cell = []
            for lr in lrs:
                if (bound, lr) not in cells.index:
                    cell.append("-")
                    continue
                c = cells.loc[(bound, lr)]
                text = f"collapsed at {c['step']:.0f}" if c["collapsed"] >= 0.5 else "stable"
                cell.append(text + (f" ({round(c['collapsed'] * c['n'])}/{c['n']:.0f})" if c["n"] > 1 else ""))
            lines.append(f"| {'sync' if bound == 0 else bound} | " + " | ".join(cell) + " |")
        lines.append("")
    return lines


def run_stability_study(spec: StabilitySpec, cfg: RunConfig, out: Path, console: Console | None = None,
                        command: str = "", source: str = "config", force: bool = False
                        ) -> tuple[pd.DataFrame, list[Path]]:
    runs = plan_runs(spec, cfg, source)  # rejects a grid the config cannot run before --out is touched
    claim(out, "study stability", force)
    start = time.perf_counter()
    records, trained, cached = run_all(runs, out, spec.timeout, console)
    table = pd.DataFrame([run_row(r, records[r.key]) for r in runs])
    ranges = pd.DataFrame([x for r, (_, row) in zip(runs, table.iterrows()) if row["status"] == "ok"
                           for x in range_rows(r, records[r.key]["steps"], _step(row["collapse_step"]))])
    paths = write_table(table, out, "table")
    if not ranges.empty:
        paths += write_table(ranges, out, "by_staleness")

    ok = table[table["status"] == "ok"]
    statistic = cfg.stability.staleness_statistic
    analysis = None
    if not ok.empty:
        step_rows = [_before_collapse(records[key]["steps"], _step(step))
                     for key, step in zip(ok["key"], ok["collapse_step"])]
        analysis = check.analyse(ok.reset_index(drop=True), step_rows, cfg.real.clip_eps,
                                 cfg.real.instability.warmup_steps, seed=cfg.seed)
        write_fit(out / "fit.json", check.fit_payload(analysis, statistic, command or str(out)))
        paths.append(out / "fit.json")
        async_schedules = [s for s in spec.schedules if s in set(ok["optim.schedule"])] or spec.schedules[:1]
        paths += stability_map(table, analysis, async_schedules, f"{cfg.name}: stability map", out)
        paths += collapse_figure(table, analysis, f"{cfg.name}: when runs collapse", out)
        if not ranges.empty:
            paths += ess_figure(ranges, f"{cfg.name}: importance weights by staleness (before any collapse)", out)

    bounds = ", ".join("0 (sync)" if b == 0 else str(b) for b in sorted(set(spec.bounds)))
    header = [f"# stability study: {cfg.name}", "", *([f"Made by: `{command}`", ""] if command else []),
              f"{len(runs)} real training runs of {spec.steps or cfg.run.steps} learner steps (bounds {bounds}; "
              f"learning rates {', '.join(f'{lr:g}' for lr in spec.lrs)}; schedules {', '.join(spec.schedules)}; "
              f"{spec.reps} replication(s)); {trained} trained now ({time.perf_counter() - start:.0f} s), {cached} "
              f"already stored. Collapse: DESIGN.md's instability rule with real.instability (warm-up "
              f"{cfg.real.instability.warmup_steps} steps).", ""]
    body = ["Every run failed."] if analysis is None else [
        "## Stability map", "", *markdown_map(table, async_schedules), *check.markdown(analysis, statistic),
        "## Runs", "", *_runs_table(ok)]
    failures = [f"- failed: bound {r['pipeline.max_staleness']}, lr {r['optim.lr']:g}, {r['optim.schedule']}: "
                f"{r['error']}" for _, r in table[table["status"] != "ok"].iterrows()]
    (out / "summary.md").write_text("\n".join([*header, *body, *([""] + failures if failures else []), ""]))
    return table, [*paths, out / "summary.md"]


def _runs_table(ok: pd.DataFrame) -> list[str]:
    cols = {"pipeline.max_staleness": "bound", "optim.schedule": "schedule", "optim.lr": "lr",
            "lr/applied": "applied lr", "S": "S", "collapse_step": "collapse step", "reward/final": "final reward",
            "reward/auc": "reward AUC/step", "grad_norm/max": "max grad norm", "kl/k3": "KL", "ess/token": "ESS token",
            "time/step_s": "s/step"}
    frame = ok[list(cols)].rename(columns=cols)

    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "-" if np.isnan(v) else f"{v:.3g}"
        return str(v)
    return ["| " + " | ".join(frame.columns) + " |", "|---" * len(frame.columns) + "|",
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False))]


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
    table, paths = run_stability_study(spec, cfg, out, console, _command(args, spec, out), args.config, args.force)
    console.print(Markdown((out / "summary.md").read_text()))
    console.print(f"wrote {out}/: " + ", ".join(p.name for p in paths))
    return 0 if (table["status"] == "ok").all() else 1


def add_parser(names) -> None:
    """`stalecast study stability`, added to the study subcommands."""
    from studies.named import add_spec_options, add_study_out_options

    doc = __doc__.split("\n\n")
    sp = names.add_parser("stability", help="staleness x learning rate on the real trainer: where runs collapse, "
                                            "and how well the stability rule predicts it",
                          description=" ".join(doc[1].split()))
    sp.add_argument("config", help="run config YAML for the real trainer (e.g. examples/tiny_cpu.yaml)")
    add_study_out_options(sp, "default runs/NAME-stability")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of the config, e.g. --set real.instability.kl_max=0.5 (repeatable)")
    add_spec_options(sp, StabilitySpec)
    sp.set_defaults(func=cmd_stability)
