"""The validation report: Markdown and JSON with the same numbers, and figures readable without the text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from sim.metrics import compute_metrics, sample_staleness
from sim.trace import Trace
from validate.compare import PASS, Row, not_judged, rows_as_dicts, verdict
from validate.costs import costs_table


def _num(x) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.4g}"


def _table(rows: list[Row]) -> list[str]:
    lines = ["| metric | predicted | measured | error | rel. error | tolerance | ok |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        rel = "n/a" if r.rel_error is None else f"{100 * r.rel_error:+.1f}%"
        ok = r.status if r.ok is not False else "**NO**"
        lines.append(f"| {r.metric} | {_num(r.predicted)} | {_num(r.measured)} | {_num(r.error)} | {rel} | "
                     f"{r.tolerance} | {ok} |")
    return lines


def runs_table(runs: list[dict]) -> list[str]:
    """Markdown lines: each measured pair of runs on its own."""
    mode = runs[0]["mode"]
    lines = [f"| run | seed | samples/s ({mode}) | s/step ({mode}) | s/step (sync) | speedup over sync |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['run']} | {r['seed']} | {_num(r['samples_per_s'])} | {_num(r['step_s'])} | "
              f"{_num(r['sync_step_s'])} | {_num(r['speedup_vs_sync'])} |" for r in runs]
    return lines


def markdown(title: str, rows: list[Row], notes: list[str], recalibrated: list[Row] | None = None,
             costs: dict | None = None, runs: list[dict] | None = None) -> str:
    lines = [f"# {title}", "", f"**Result: {verdict(rows)}**", ""]
    lines += [f"- not judged: {line}" for line in not_judged(rows)]
    lines += [f"- {n}" for n in notes]
    lines += ["", *_table(rows)]
    if runs is not None:
        lines += ["", "## The measured runs one by one (not judged)", "",
                  "The table above compares each side's runs laid end to end; here is each pair alone, with its "
                  "seed: how far one run of this machine and seed is from another.", "", *runs_table(runs)]
    if recalibrated is not None:
        lines += ["", "## Recalibrated post hoc (not the prediction, not judged)", "",
                  "The same simulation with the measured run's prompt and response lengths replayed: how much of "
                  "the error above the length distribution explains.", "", *_table(recalibrated)]
    if costs is not None:
        lines += ["", "## In-run costs against the profile (post hoc, not judged)", "",
                  "Median over the run of measured / charged: each learner step against the profile's cost at its "
                  "padded tokens, each generation batch (static batching) against what the simulator charges for "
                  "its prompts and responses, each decode step a worker timed (continuous batching, steps that "
                  "prefilled nothing) against the simulator's at its sequences and their context, also at a "
                  "quarter of a worker's slots or fewer and at all of them (the simulator charges one co-location "
                  "factor at every occupancy). Near x1: the costs held as profiled; both runs off alike: the machine "
                  "ran faster or slower than when it was profiled. Busy worker time outside engine steps (admitting, "
                  "handing over, loading weights) is not charged by the simulator.", "", *costs_table(costs)]
    lines += ["", "Figures: `staleness.png` (histograms and ECDFs), `throughput.png` (rates and idle ratios), "
              "`timeline.png` (learner steps and buffer length over time).", ""]
    return "\n".join(lines)


def write_report(out: Path, title: str, rows: list[Row], notes: list[str], predicted: Trace, measured: Trace,
                 recalibrated: list[Row] | None = None, costs: dict | None = None,
                 runs: list[dict] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(title, rows, notes, recalibrated, costs, runs))
    result = verdict(rows)
    payload = {"title": title, "verdict": result, "pass": result == PASS, "not_judged": not_judged(rows),
               "notes": notes, "rows": rows_as_dicts(rows),
               "recalibrated_rows": rows_as_dicts(recalibrated) if recalibrated is not None else None,
               "costs": costs, "runs": runs}
    (out / "report.json").write_text(json.dumps(payload, indent=2, default=float))
    figures(out, predicted, measured)


def figures(out: Path, predicted: Trace, measured: Trace) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    palette = {"predicted": "#4C72B0", "measured": "#DD8452"}
    stale = pd.concat([pd.DataFrame({"staleness": sample_staleness(t.samples), "source": name})
                       for name, t in (("predicted", predicted), ("measured", measured))], ignore_index=True)

    fig, (hist, ecdf) = plt.subplots(1, 2, figsize=(11, 4.2))
    sns.histplot(stale, x="staleness", hue="source", stat="probability", common_norm=False, discrete=True,
                 multiple="dodge", shrink=0.8, palette=palette, ax=hist)
    hist.set(xlabel="staleness (learner versions behind)", ylabel="share of consumed samples",
             title="staleness distribution")
    sns.ecdfplot(stale, x="staleness", hue="source", palette=palette, ax=ecdf)
    ecdf.set(xlabel="staleness (learner versions behind)", ylabel="fraction of samples <= x", title="staleness ECDF")
    fig.tight_layout()
    fig.savefig(out / "staleness.png", dpi=120)
    plt.close(fig)

    mp, mm = compute_metrics(predicted), compute_metrics(measured)
    bars = pd.DataFrame([
        {"metric": label, "value": m[key], "source": name}
        for name, m in (("predicted", mp), ("measured", mm))
        for label, key in (("samples/s", "throughput/samples_per_s"), ("learner idle", "idle/trainer"),
                           ("rollout idle", "idle/rollout"))])
    fig, (rate, idle) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [1, 2]})
    sns.barplot(bars[bars.metric == "samples/s"], x="metric", y="value", hue="source", palette=palette, ax=rate)
    rate.set(xlabel="", ylabel="samples consumed per second", title="throughput")
    sns.barplot(bars[bars.metric != "samples/s"], x="metric", y="value", hue="source", palette=palette, ax=idle)
    idle.set(xlabel="", ylabel="fraction of wall time", ylim=(0, 1), title="idle ratios")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)

    fig, (steps_ax, queue_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, t in (("predicted", predicted), ("measured", measured)):
        st = t.steps
        steps_ax.step(st["t_end"], st["step"] + 1, where="post", label=name, color=palette[name])
        queue_ax.plot(st["t_start"], st["queue_len"], marker=".", label=name, color=palette[name])
    steps_ax.set(xlabel="wall time (s)", ylabel="learner steps completed", title="learner progress")
    queue_ax.set(xlabel="wall time (s)", ylabel="groups waiting at step start", title="buffer length")
    steps_ax.legend()
    queue_ax.legend()
    fig.tight_layout()
    fig.savefig(out / "timeline.png", dpi=120)
    plt.close(fig)
