"""`stalecast whatif PROFILE-or-LOG --gpus N [--bounds 1,2,4]`: from a calibrated run (or a log, calibrated first),
what the async pipeline would give on N GPUs: for every rollout/learner split and staleness bound, the predicted step
time, speedup over the logged sync run, staleness (mean, p99, max) and idle, under the staleness control of the system
that wrote the log (its bound set in its own knob, `studies.named.matched_policy`), and the recommended split.

Every number carries an interval: what the log could not identify (the serial share of the learner's per-token time
with one learner size logged; the balance of decode compute against memory time) is simulated at the ends of its
stated range, each end refitted to the log, and the interval is the range of the results over those ends, beside
the point estimate. The runs go through the sweep machinery (`studies.sweep`), stored under OUT/runs/ (a repeated
what-if is instant); the measured profile of each end, per learner size, under OUT/profiles/ (named by the
calibration's digest, so a changed calibration never reuses old runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console

from sim.calibrate.cli import add_calibration_options, options_from
from sim.calibrate.fit import Calibration, Layout, calibrate, load_calibration, policy_of
from sim.calibrate.logs import FORMATS
from sim.cli import add_out_options, positive_int
from sim.config import ConfigError
from sim.hardware.measured import save_profile
from sim.outputs import check_out, claim
from studies import plots
from studies.named import md_table, matched_policy
from studies.sweep import Backend, Sweep, describe_failures, run_sweep, write_tables

METRICS = {"time/step_s": "s/step", "speedup": "speedup", "throughput/samples_per_s": "samples/s",
           "staleness/mean": "mean staleness", "staleness/p99": "p99 staleness", "staleness/max": "max staleness",
           "idle/trainer": "learner idle", "idle/rollout": "rollout idle"}
SPLIT = ["rollout_gpus", "learner_gpus", "bound"]
TIE = 0.01  # throughputs within 1 % count as equal: short runs are that noisy


def splits(gpus: int, gpus_per_worker: int) -> list[Layout]:
    """Every rollout/learner split of `gpus`: R engines of `gpus_per_worker` GPUs, the learner the rest (>= 1)."""
    out = [Layout(r, gpus_per_worker, gpus - r * gpus_per_worker, False)
           for r in range(1, (gpus - 1) // gpus_per_worker + 1)]
    if not out:
        raise ConfigError(f"--gpus {gpus}: too few to split between an engine of {gpus_per_worker} GPU(s) and a "
                          f"learner GPU")
    return out


def plan(cal: Calibration, gpus: int, bounds: list[int], policy: str, profiles: Path) -> tuple[list[dict], list[dict]]:
    """Sweep points (override dicts) and their labels: the logged run in sync mode (the baseline), then every split x
    bound x corner of the unidentified ranges in async mode under `policy`."""
    corners = cal.corners()
    paths: dict[tuple[int, int], str] = {}

    def profile(learner_gpus: int, i: int) -> str:
        if (learner_gpus, i) not in paths:
            path = profiles / f"{cal.digest()}-L{learner_gpus}-{i}.yaml"
            save_profile(cal.profile(learner_gpus, corners[i]), path)
            paths[learner_gpus, i] = str(path.resolve())
        return paths[learner_gpus, i]

    logged = Layout(**cal.logs[0]["layout"])
    points = [{**_cluster(logged), "pipeline.mode": "sync", "hardware.profile": profile(logged.learner_gpus, 0)}]
    labels = [{"kind": "baseline", "rollout_gpus": logged.rollout_workers * logged.gpus_per_worker,
               "learner_gpus": logged.learner_gpus, "bound": -1, "corner": corners[0].label}]
    batch = cal.workload["batch_prompts"]
    for layout in splits(gpus, cal.cluster["gpus_per_worker"]):
        for bound in bounds:
            for i, corner in enumerate(corners):
                points.append({**_cluster(layout), "pipeline.mode": "async", **matched_policy(policy, bound, batch),
                               "hardware.profile": profile(layout.learner_gpus, i)})
                labels.append({"kind": "async", "rollout_gpus": layout.rollout_workers * layout.gpus_per_worker,
                               "learner_gpus": layout.learner_gpus, "bound": bound, "corner": corner.label})
    return points, labels


def _cluster(layout: Layout) -> dict:
    return {"cluster.rollout_workers": layout.rollout_workers, "cluster.learner_gpus": layout.learner_gpus,
            "cluster.colocated": layout.colocated}


def summarise(table: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """Per split and bound, each metric's point estimate and its interval (low, high) over the corners (each a mean
    over replications); and the baseline's sync step time."""
    ok = table[table["status"] == "ok"]
    base = ok[ok["kind"] == "baseline"]
    if base.empty:
        raise ConfigError("the sync baseline (the logged run, simulated) failed: "
                          + "; ".join(table.loc[table["kind"] == "baseline", "error"].astype(str).unique()))
    sync_step = float(base["time/step_s"].mean())
    runs = ok[ok["kind"] == "async"].assign(speedup=lambda d: sync_step / d["time/step_s"])
    if runs.empty:
        raise ConfigError("every async run failed: " + "; ".join(describe_failures(table)))
    per_corner = runs.groupby([*SPLIT, "corner"], sort=False)[list(METRICS)].mean().reset_index()
    point = per_corner[per_corner["corner"] == "point"].set_index(SPLIT)[list(METRICS)]
    low = per_corner.groupby(SPLIT)[list(METRICS)].min()
    high = per_corner.groupby(SPLIT)[list(METRICS)].max()
    out = point.join(low.add_suffix(" low")).join(high.add_suffix(" high")).reset_index()
    return out.sort_values(["bound", "rollout_gpus"]).reset_index(drop=True), sync_step



def recommend(summary: pd.DataFrame, corner_table: pd.DataFrame) -> tuple[pd.Series, bool | None]:
    """The split and bound of the most samples/s (point estimate; within TIE of the most, the least mean staleness,
    then the smaller bound), and whether it is within TIE of the fastest at every end of the unidentified ranges
    (None: the logs left none)."""
    rate = "throughput/samples_per_s"
    near = summary[summary[rate] >= (1 - TIE) * summary[rate].max()]
    best = near.sort_values(["staleness/mean", "bound", "rollout_gpus"]).iloc[0]
    ok = corner_table[(corner_table["status"] == "ok") & (corner_table["kind"] == "async")]
    means = ok.groupby([*SPLIT, "corner"])[rate].mean().reset_index()
    if means["corner"].nunique() == 1:
        return best, None
    mine = means[(means[SPLIT] == best[SPLIT].to_numpy()).all(axis=1)].set_index("corner")[rate]
    robust = bool((mine >= (1 - TIE) * means.groupby("corner")[rate].max().reindex(mine.index)).all())
    return best, robust


def _interval(row: pd.Series, metric: str, fmt: str) -> str:
    point, lo, hi = row[metric], row[f"{metric} low"], row[f"{metric} high"]
    if any(np.isnan(v) for v in (point, lo, hi)):
        return "n/a"
    same = f"{lo:{fmt}}" == f"{hi:{fmt}}"
    return f"{point:{fmt}}" if same else f"{point:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def display(summary: pd.DataFrame) -> pd.DataFrame:
    """The table a user reads: point estimate [interval] per metric."""
    fmts = {"time/step_s": ".3g", "speedup": ".2f", "throughput/samples_per_s": ".3g", "staleness/mean": ".2f",
            "staleness/p99": ".0f", "staleness/max": ".0f", "idle/trainer": ".2f", "idle/rollout": ".2f"}
    rows = {"rollout GPUs": summary["rollout_gpus"], "learner GPUs": summary["learner_gpus"],
            "bound": summary["bound"]}
    for metric, name in METRICS.items():
        rows[name] = [_interval(r, metric, fmts[metric]) for _, r in summary.iterrows()]
    return pd.DataFrame(rows)


def figure(summary: pd.DataFrame, title: str, out: Path) -> list[Path]:
    """Samples/s, speedup, mean staleness and learner idle against rollout GPUs, a line per bound (the point
    estimate) with its interval as a band."""
    import seaborn as sns

    fig, axes = plots.panels(4, title)
    colours = sns.color_palette(plots.PALETTE, summary["bound"].nunique())
    for ax, metric in zip(axes, ("throughput/samples_per_s", "speedup", "staleness/mean", "idle/trainer")):
        for colour, (bound, part) in zip(colours, summary.groupby("bound")):
            x = part["rollout_gpus"]
            ax.plot(x, part[metric], marker="o", markersize=4, color=colour, label=f"S={bound}")
            ax.fill_between(x, part[f"{metric} low"], part[f"{metric} high"], color=colour, alpha=0.2, linewidth=0)
        ax.set(xlabel="rollout GPUs (the learner: the rest)",
               ylabel=plots.LABELS.get(metric, "speedup over the logged sync run (x)"))
    axes[1].axhline(1.0, color="grey", linewidth=0.8)
    axes[0].legend(fontsize="small", title="bound")
    return plots.save(fig, out, "whatif")


def add_parser(sub) -> None:
    p = sub.add_parser("whatif", help="from a calibrated run: async step time, speedup, staleness and idle per "
                                      "rollout/learner split and bound",
                       description=__doc__.split("\n\n")[0] + " PROFILE-or-LOG: a profile written by "
                                   "`stalecast calibrate --out` (its calibration beside it) or a log (with --format "
                                   "and the options calibrate takes; the log's own layout as --log-gpus, or "
                                   "--log-rollout-gpus and --log-learner-gpus).")
    p.add_argument("source", metavar="PROFILE-or-LOG")
    p.add_argument("--gpus", type=positive_int, required=True, help="the GPU budget to split")
    p.add_argument("--format", choices=list(FORMATS), help="the system that wrote the log (with a profile: "
                                                           "overrides its calibration's, for the staleness control)")
    p.add_argument("--bounds", type=_bounds, default=[1, 2, 4], help="staleness bounds, in the system's own knob "
                                                                     "(default 1,2,4)")
    p.add_argument("--steps", type=positive_int, default=100, help="learner steps per simulated run (default 100)")
    p.add_argument("--reps", type=positive_int, default=1, help="replications (seeds) per run (default 1)")
    p.add_argument("--jobs", type=positive_int, default=1, help="local processes (default 1)")
    add_out_options(p, "default runs/whatif-SOURCE")
    add_calibration_options(p, layout_prefix="log-")
    p.set_defaults(func=cmd_whatif)


def _bounds(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 0 or len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"expected distinct whole numbers >= 0, got {text!r}")
    return values


def load_source(args: argparse.Namespace, console: Console) -> Calibration:
    """The calibration of a profile, or of a log calibrated now."""
    source = Path(args.source)
    if source.suffix in (".yaml", ".yml"):
        return load_calibration(source)
    if args.format is None:
        raise ConfigError(f"{source}: a log needs --format (the system that wrote it); a calibrated profile is a "
                          f".yaml file")
    cal, _ = calibrate([source], args.format, options_from(args))
    console.print(f"calibrated {source} ({args.format}): sync step {cal.logs[0]['step_s_reproduced']:.3f} s "
                  f"reproduced against {cal.logs[0]['step_s_logged']:.3f} s logged", highlight=False)
    return cal


def cmd_whatif(args: argparse.Namespace, console: Console) -> int:
    cal = load_source(args, console)
    fmt = args.format or cal.format
    policy = policy_of(fmt)
    out = Path(args.out) if args.out else Path("runs") / f"whatif-{Path(args.source).stem}"
    check_out(out, args.force)
    splits(args.gpus, cal.cluster["gpus_per_worker"])  # a budget too small fails before --out is touched
    claim(out, "whatif", args.force)
    points, labels = plan(cal, args.gpus, args.bounds, policy, out / "profiles")
    base = cal.config(Layout(**cal.logs[0]["layout"]), steps=args.steps)
    sweep = Sweep(base, points, labels, reps=args.reps, steps=args.steps, sync_baseline=False)
    with Backend(jobs=args.jobs) as backend:
        result = run_sweep(sweep, out, backend, console, label="whatif")
    write_tables(result, out, stem="runs_table")  # every run (each corner of each split), as studies write them
    summary, sync_step = summarise(result.table)
    best, robust = recommend(summary, result.table)
    summary.to_csv(out / "whatif.csv", index=False)
    summary.to_parquet(out / "whatif.parquet", index=False)
    logged = Layout(**cal.logs[0]["layout"])
    title = (f"your {fmt} sync run ({logged.gpus} GPUs, {sync_step:.3g} s/step) -> async {policy} on {args.gpus} "
             f"GPUs\nlines: point estimates; bands: the ends of what the log could not identify")
    figure(summary, title, out)
    lines = _summary_lines(cal, args, policy, summary, sync_step, best, robust, result.table)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _print(cal, summary, sync_step, best, robust, policy, args.gpus, console)
    console.print(f"wrote {out}/: summary.md, whatif.csv, whatif.png/svg, runs_table.csv, profiles/, runs/")
    return 0


def _recommendation(best: pd.Series, robust: bool | None, sync_step: float) -> str:
    text = (f"recommended: {best['rollout_gpus']:.0f} rollout GPUs and {best['learner_gpus']:.0f} learner GPUs at "
            f"bound {best['bound']:.0f}: {_interval(best, 'throughput/samples_per_s', '.3g')} samples/s, "
            f"{_interval(best, 'time/step_s', '.3g')} s/step, {_interval(best, 'speedup', '.2f')}x over the sync "
            f"run ({sync_step:.3g} s/step), mean staleness {_interval(best, 'staleness/mean', '.2f')}")
    if robust is None:
        return text
    return text + ("; the fastest (within 1 %) at every end of the ranges too" if robust else
                   "; at some end of the ranges another split is faster (see whatif.csv)")


def _summary_lines(cal: Calibration, args, policy: str, summary: pd.DataFrame, sync_step: float, best: pd.Series,
                   robust: bool | None, table: pd.DataFrame) -> list[str]:
    logged = cal.logs[0]
    err = logged["step_s_reproduced"] / logged["step_s_logged"] - 1
    return [f"# what-if: {args.source} on {args.gpus} GPUs", "",
            f"Calibrated from {', '.join(log['path'] for log in cal.logs)} ({cal.format}). The sync step it "
            f"reproduces: {logged['step_s_reproduced']:.3f} s against {logged['step_s_logged']:.3f} s logged "
            f"({100 * err:+.1f} %); simulated here (the logged layout, sync mode, the speedups' baseline): "
            f"{sync_step:.3f} s per step.", "",
            f"Async under `{policy}` (the bound in its own knob), {args.steps} learner steps per run, "
            f"{args.reps} replication(s). Each cell: the point estimate [the range over the ends of what the log "
            f"could not identify].", "", *md_table(display(summary)), "",
            _recommendation(best, robust, sync_step) + ".", "",
            *[f"- {line}" for line in describe_failures(table)],
            "What the log identified, and what it could not:", "", *[f"- {note}" for note in cal.notes], ""]


def _print(cal: Calibration, summary: pd.DataFrame, sync_step: float, best: pd.Series, robust: bool | None, policy: str,
           gpus: int, console: Console) -> None:
    logged = cal.logs[0]
    err = logged["step_s_reproduced"] / logged["step_s_logged"] - 1
    console.print(f"sync step reproduced: {logged['step_s_reproduced']:.3f} s vs {logged['step_s_logged']:.3f} s "
                  f"logged ({100 * err:+.1f} %); baseline simulated: {sync_step:.3f} s/step", highlight=False,
                  markup=False)
    console.print(f"async ({policy}) on {gpus} GPUs: point estimate [interval over the ends of the unidentified "
                  f"ranges]", highlight=False, markup=False)
    for line in md_table(display(summary)):  # plain lines: a log keeps them whole, where a table would wrap cells
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print(_recommendation(best, robust, sync_step), highlight=False, markup=False)
