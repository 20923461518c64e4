"""`stalecast validate`: compare the simulator's prediction for a config with a measured trace."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sim.config import load_config
from sim.engine.policies import describe
from sim.cli import add_out_options, positive_int
from sim.outputs import staged
from validate.compare import FAIL, INCOMPLETE, PASS, Tolerances, compare, not_judged, verdict
from validate.importers import FORMATS as TRACE_FORMATS, read_trace_as
from validate.report import write_report

EXIT_CODES = {PASS: 0, FAIL: 1, INCOMPLETE: 3}
COLOURS = {PASS: "green", FAIL: "red", INCOMPLETE: "yellow"}


def tolerance(text: str) -> float:
    """argparse type for a tolerance: a finite number >= 0 (0 = exact)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = exact), got {text}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="profile, predict, train for real, compare (or compare with a given trace)",
                       description="Without --trace: the whole loop. Profile this machine (or reuse --profile), "
                                   "predict CONFIG with the simulator, train it for real in its mode and in sync "
                                   "mode, and compare; a post-hoc recalibration (the measured lengths replayed) is "
                                   "reported apart. With --trace: predict CONFIG and compare with a measured trace "
                                   "(a stalecast trace folder, or one samples file from another system). Exits 0 "
                                   "on PASS, 1 on FAIL (an error exceeds its tolerance), 3 on INCOMPLETE (a judged "
                                   "metric could not be computed on a side), 2 on bad input (a trace that breaks the "
                                   "schema's rules, a bad option).")
    p.add_argument("config", help="run config YAML")
    p.add_argument("--trace", help="measured trace: folder, or samples .parquet/.csv with columns "
                   "group_id, worker_id, prompt_len, response_len, t_start, t_end, t_consumed, version_start, "
                   "version_consumed, learner_step (optional: version_end, version_mean, dropped)")
    p.add_argument("--sync-trace", help="with --trace: measured sync-mode trace of the same config, to check "
                                        "speedup/vs_sync")
    p.add_argument("--trace-format", choices=TRACE_FORMATS, default="stalecast",
                   help="with --trace: whose per-sample dump it is; another system's is mapped onto the trace "
                        "schema (validate/importers.py; a dump lacking a column is an error naming it)")
    p.add_argument("--profile", help="loop: a measured profile YAML to predict with (default: measure one first)")
    p.add_argument("--lengths", choices=("config", "pilot"), default="pilot",
                   help="loop: where the prediction's prompt/response lengths come from: the config's "
                        "distributions, or an earlier run of the config with another seed (default), its groups "
                        "replayed in order")
    p.add_argument("--pilot-steps", type=positive_int, default=None,
                   help="loop: learner steps of the pilot run (default: the config's run.steps, so the lengths follow "
                        "the whole run as training changes them)")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="loop: runs of each kind (pilot, measured in the config's mode, measured in sync mode), each "
                        "with its own seed; the measured modes alternate, and each side's runs are compared laid end "
                        "to end (a shared machine's speed and a seed's lengths vary from run to run)")
    p.add_argument("--quick-profile", action="store_true", help="loop: profile the ends of each table only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    add_out_options(p, "default runs/NAME-validate")
    defaults = Tolerances()
    p.add_argument("--tol-rel", type=tolerance, default=defaults.rel, help="relative tolerance on rates and means")
    p.add_argument("--tol-mean-abs", type=tolerance, default=defaults.small_mean_abs,
                   help="absolute tolerance on mean staleness when the measured mean < 1.5")
    p.add_argument("--tol-quantile", type=tolerance, default=defaults.quantile_abs,
                   help="absolute tolerance (versions) on staleness quantiles")
    p.add_argument("--tol-idle", type=tolerance, default=defaults.idle_abs, help="absolute tolerance on idle ratios")
    p.add_argument("--tol-share", type=tolerance, default=defaults.share_abs,
                   help="absolute tolerance on the share of samples evicted from the KV cache")
    p.add_argument("--tol-w1", type=tolerance, default=defaults.distance_max,
                   help="largest Wasserstein-1 distance (versions) between the staleness distributions")
    p.set_defaults(func=cmd_validate)


def print_rows(rows, console: Console) -> None:
    table = Table(title="predicted vs measured", show_edge=False)
    for col in ("metric", "predicted", "measured", "error", "tolerance", "ok"):
        table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=col == "metric")
    fmt = lambda x: "n/a" if x is None else f"{x:.4g}"  # noqa: E731
    for r in rows:
        ok = {True: "[green]yes[/]", False: "[red]NO[/]"}.get(r.ok, f"[yellow]{r.status}[/]")
        table.add_row(r.metric, fmt(r.predicted), fmt(r.measured), fmt(r.error), r.tolerance, ok)
    console.print(table)


def _step_s(trace) -> float:
    from sim.metrics import compute_metrics
    return compute_metrics(trace)["time/step_s"]


def cmd_validate(args: argparse.Namespace, console: Console) -> int:
    from sim.cli import parse_overrides

    cfg = load_config(args.config, parse_overrides(args.set))
    tol = Tolerances(rel=args.tol_rel, small_mean_abs=args.tol_mean_abs, quantile_abs=args.tol_quantile,
                     idle_abs=args.tol_idle, distance_max=args.tol_w1, share_abs=args.tol_share)
    if args.trace is None:  # the loop trains for real
        from real.engine import check_engine

        check_engine(cfg)
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-validate"
    with staged(out, "validate", args.force) as tmp:
        if args.trace is None:
            rows = _loop(args, cfg, tol, tmp, console)
        else:
            rows = _against_trace(args, cfg, tol, tmp, console)
    result = verdict(rows)
    console.print(f"[{COLOURS[result]}]{result}[/]: report in {out}/ (report.md, report.json, figures)")
    for line in not_judged(rows):
        console.print(f"  not judged: {line}", highlight=False)
    return EXIT_CODES[result]


def _loop(args, cfg, tol: Tolerances, tmp: Path, console: Console):
    from validate.loop import run_loop

    say = lambda text: console.print(f"[dim]{text}[/]", highlight=False)  # noqa: E731
    res = run_loop(cfg, tmp, profile=args.profile, lengths=args.lengths, pilot_steps=args.pilot_steps, say=say,
                   repeats=args.repeats, quick_profile=args.quick_profile)
    measured_sync_s = _step_s(res.measured_sync)
    rows = compare(res.predicted, res.measured, tol, _step_s(res.predicted_sync), measured_sync_s)
    recalibrated = compare(res.recalibrated, res.measured, tol, _step_s(res.recalibrated_sync), measured_sync_s)
    print_rows(rows, console)
    console.print("recalibrated post hoc (measured lengths replayed; not judged):", highlight=False)
    print_rows(recalibrated, console)
    for run, c in res.costs.items():
        generation = (f"generation batch x{c['generation_batch']:.3f}" if c["batches"] else
                      f"decode step x{c['decode_step']:.3f} (x{c['decode_step_few']:.3f} at <= 1/4 of the slots, "
                      f"x{c['decode_step_full']:.3f} at all of them), {c['outside_steps']:.1%} of busy worker time "
                      "outside engine steps")
        console.print(f"in-run costs against the profile (post hoc), {run}: learner step x{c['learner_step']:.3f} "
                      f"(mean x{c['learner_step_mean']:.3f}), "
                      f"{generation}", highlight=False)
    if len(res.runs) > 1:
        for run in res.runs:
            console.print(f"run {run['run']} (seed {run['seed']}): {run['samples_per_s']:.1f} samples/s, "
                          f"{run['step_s']:.3f} s/step, sync {run['sync_step_s']:.3f} s/step, speedup "
                          f"{run['speedup_vs_sync']:.2f}", highlight=False)
    control = f"{describe(cfg.pipeline)}, " if cfg.pipeline.mode == "async" else ""
    notes = [f"config: {args.config} ({cfg.pipeline.mode}, {cfg.cluster.rollout_workers} worker(s), {control}"
             f"{cfg.run.steps} steps)", *res.notes]
    write_report(tmp, f"{cfg.name}: prediction vs measurement", rows, notes, res.predicted, res.measured,
                 recalibrated=recalibrated, costs=res.costs, runs=res.runs if len(res.runs) > 1 else None)
    return rows


def _against_trace(args, cfg, tol: Tolerances, tmp: Path, console: Console):
    from sim.cli import run_simulation

    measured = read_trace_as(args.trace, args.trace_format)
    measured_sync = read_trace_as(args.sync_trace, args.trace_format) if args.sync_trace else None
    # The prediction runs as many learner steps as the measurement holds.
    cfg = cfg.with_overrides({"run.steps": len(measured.steps)})
    predicted, _ = run_simulation(cfg, console, "predicting")
    pred_sync_step = meas_sync_step = None
    if measured_sync is not None:
        sync_cfg = cfg.with_overrides({"pipeline.mode": "sync", "pipeline.interruptible": False,
                                       "run.steps": len(measured_sync.steps)})
        pred_sync_step = _step_s(run_simulation(sync_cfg, console, "predicting")[0])
        meas_sync_step = _step_s(measured_sync)
    rows = compare(predicted, measured, tol, pred_sync_step, meas_sync_step)
    print_rows(rows, console)
    lengths = ("the config's workload.groups" + (", replayed in order" if cfg.workload.groups_in_order else "")
               if cfg.workload.groups is not None else "the config's distributions")
    notes = [f"config: {args.config}; measured trace: {args.trace}",
             f"prediction made from the config alone (lengths from {lengths}), not fitted to the measured trace"]
    write_report(tmp, f"{cfg.name}: prediction vs {args.trace}", rows, notes, predicted, measured)
    return rows
