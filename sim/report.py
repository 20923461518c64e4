"""What a person reads after a simulation: the printed summary and the staleness figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from sim.config import RunConfig
from sim.engine.policies import describe
from sim.metrics import consumed_mask, sample_staleness
from sim.stability import ConfigPrediction
from sim.trace import Trace


def _fmt(value, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value:,.{digits}f}{unit}"


def print_summary(cfg: RunConfig, metrics: dict, histogram: dict[int, int], console: Console,
                  sim_seconds: float | None = None, sync_metrics: dict | None = None,
                  stability: ConfigPrediction | None = None, kv_budget: int | None = None) -> None:
    """kv_budget: the KV tokens a worker holds (trace header "kv"), for the KV rows."""
    pl, cl = cfg.pipeline, cfg.cluster
    control = f", {describe(pl)}" if pl.mode == "async" else ""
    console.print(f"[bold]{cfg.name}[/]: {pl.mode}{control}, {cl.rollout_workers} workers x {cl.gpus_per_worker} GPU, "
                  f"{cl.learner_gpus} learner GPU(s), {cfg.workload.batch_prompts}x{cfg.workload.group_size} "
                  f"per step, {cfg.run.steps} steps")

    table = Table(title="staleness (versions)", show_edge=False)
    for col in ("mean", "p50", "p90", "p99", "max", "token mean", "in-flight", "in-queue"):
        table.add_column(col, justify="right")
    table.add_row(*(_fmt(metrics.get(k)) for k in (
        "staleness/mean", "staleness/p50", "staleness/p90", "staleness/p99", "staleness/max",
        "staleness/token_mean", "off_policy/in_flight/mean", "off_policy/in_queue/mean")))
    console.print(table)

    total = sum(histogram.values()) or 1
    dist = Table(title="staleness distribution (share of consumed samples)", show_edge=False)
    for s in histogram:
        dist.add_column(str(s), justify="right")
    dist.add_row(*(f"{100 * c / total:.1f}%" for c in histogram.values()))
    console.print(dist)

    perf = Table(title="throughput and time", show_edge=False)
    perf.add_column("metric")
    perf.add_column("value", justify="right")
    rows = [
        ("samples/s", _fmt(metrics["throughput/samples_per_s"])),
        ("tokens/s", _fmt(metrics["throughput/tokens_per_s"], digits=0)),
        ("learner steps/h", _fmt(metrics["throughput/steps_per_h"])),
        ("time per learner step", _fmt(metrics["time/step_s"], " s")),
        ("learner idle (waiting for data)", _fmt(100 * metrics["idle/trainer"], " %", 1)),
        ("rollout idle (nothing in flight)", _fmt(100 * metrics["idle/rollout"], " %", 1)),
        ("learner wait per step", _fmt(metrics["time/queue_wait_s"], " s")),
        ("weight sync per step", _fmt(metrics["time/weight_sync_s"], " s")),
        ("dropped groups", _fmt(metrics["dropped/groups"])),
        ("samples in flight at the end", _fmt(metrics["samples/in_flight"])),
    ]
    if metrics.get("kv/peak_occupancy") is not None:
        rows.append((f"KV budget in use (peak / mean of {kv_budget:,} tokens a worker)", f"{_fmt(100 * metrics['kv/peak_occupancy'], ' %', 1)} / "
                                                      f"{_fmt(100 * metrics['kv/mean_occupancy'], ' %', 1)}"))
        rows.append(("KV evictions (share of samples evicted)",
                     f"{_fmt(metrics['kv/preemptions'])} ({_fmt(100 * metrics['kv/preempted_share'], ' %', 1)})"))
    if sync_metrics is not None:
        rows.append(("sync pipeline time per step", _fmt(sync_metrics["time/step_s"], " s")))
        rows.append(("speedup over sync", _fmt(metrics["speedup/vs_sync"], "x")))
    for name, value in rows:
        perf.add_row(name, value)
    console.print(perf)
    if stability is not None:
        print_stability(stability, console)
    if sim_seconds is not None:
        n = metrics["samples/generated"] + metrics["samples/in_flight"]
        console.print(f"simulated {cfg.run.steps:,} learner steps ({n:,} rollouts) in {sim_seconds:.2f} s")


def print_memory(report, cfg: RunConfig, console: Console) -> None:
    """GPU memory (a `sim.hardware.memory.MemoryReport`), and a note when max_concurrency is above what the KV
    budget holds."""
    console.print(f"memory: {report.summary()}", highlight=False, markup=False)
    note = report.concurrency_note(cfg.cluster.max_concurrency)
    if note is not None and report.feasible:
        console.print(f"note: max_{note}", highlight=False, markup=False)


def print_stability(stability: ConfigPrediction, console: Console) -> None:
    """The stability rule at this configuration's staleness: the rule, the largest stable lr, the margin, the
    verdict, and where the prediction leaves what the rule was fitted on."""
    p = stability.prediction
    fitted = p.binding.startswith("fit")
    caption = stability.rule.describe()
    table = Table(title="stability rule", caption=caption, show_edge=False)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [(f"S ({stability.statistic} consumed staleness)", f"{p.staleness:g} versions"),
            ("T (horizon)", f"{p.horizon:,} steps"),
            (f"lr ({stability.schedule_note})", f"{p.lr:.3g}")]
    if fitted:
        rows += [("fitted collapse probability at this lr", f"{p.collapse_probability:.2f}"),
                 ("largest stable lr" + (" (without S: no S effect measured)" if p.binding == "fit without S" else ""),
                  f"{p.max_stable_lr:.3g}")]
    else:
        rows += [("largest stable lr, staleness term", f"{p.staleness_lr:.3g}"),
                 ("largest stable lr, horizon term", f"{p.horizon_lr:.3g}"),
                 ("largest stable lr",
                  f"{p.max_stable_lr:.3g}" + ("" if p.binding == "none" else f" ({p.binding} term binds)"))]
    rows.append(("margin (largest stable lr / lr)", f"{p.margin:.2f}"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    verdict = "[green]stable[/]" if p.stable else "[red]predicted unstable[/]"
    console.print(f"stability: {verdict} at lr {p.lr:.3g} (margin {p.margin:.2f})")
    for note in p.notes:
        console.print(f"  note: {note}", highlight=False)


# The sample columns staleness_figure reads.
FIGURE_COLUMNS = ("version_start", "version_end", "version_consumed", "learner_step", "dropped")


def staleness_figure(trace: Trace, path: Path, title: str) -> None:
    """Left: share of consumed samples per staleness, split into in-flight and in-queue parts, each bar labelled
    with its count. Right: mean staleness per learner step, to show warm-up and steady state."""
    # Plain matplotlib through its object API: seaborn would load scipy.stats (~0.5 s) and pyplot its global
    # figure state on every `stalecast simulate`, for one static PNG.
    from matplotlib.figure import Figure

    queue_color, flight_color = "#4C72B0", "#DD8452"
    s = trace.samples
    used = consumed_mask(s)
    stale = sample_staleness(s)
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    if len(stale):
        levels = np.arange(stale.max() + 1)
        counts = np.bincount(stale, minlength=len(levels))
        share = counts / len(stale)
        # Each sample's staleness = in-flight + in-queue versions: split each bar by the mean parts.
        # Sums with np.add.at, in integers: bincount's weights would take a float64 copy of 40 M samples (and
        # its index a copy of the learner steps).
        flight = np.zeros(len(levels), np.int64)
        np.add.at(flight, stale, s["version_end"].to_numpy()[used] - s["version_start"].to_numpy()[used])
        denom = counts * levels
        frac_flight = np.divide(flight, denom, out=np.zeros(len(levels)), where=denom > 0)
        in_queue = share * (1 - frac_flight)
        left.bar(levels, in_queue, width=0.8, color=queue_color, label="in queue")
        left.bar(levels, share * frac_flight, width=0.8, bottom=in_queue, color=flight_color, label="in flight")
        for x, y, n in zip(levels, share, counts):
            if n:
                left.annotate(f"{n:,}", (x, y), xytext=(0, 2), textcoords="offset points", ha="center",
                              va="bottom", fontsize=8)
        left.set_ylim(0, share.max() * 1.12)  # room for the counts above the bars
        left.set_xticks(levels)
        left.legend(title="staleness part")
        step = s["learner_step"].to_numpy()[used]
        first = step.min()
        step -= first
        n_step, total = np.zeros((2, step.max() + 1), np.int64)
        np.add.at(n_step, step, 1)
        np.add.at(total, step, stale)
        steps = np.flatnonzero(n_step)
        right.plot(steps + first, total[steps] / n_step[steps], color=queue_color)
    left.set(xlabel="staleness (learner versions behind)", ylabel="share of consumed samples",
             title=f"staleness distribution ({len(stale):,} consumed samples)")
    right.set(xlabel="learner step", ylabel="mean staleness (versions)", title="staleness per step")
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
