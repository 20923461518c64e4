"""`stalecast calibrate LOG... --format SYSTEM`: fit a measured profile to a run you already have, print the fit, its
residuals per step and what the log could not identify, and (with --out) write the profile and its calibration."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from sim.calibrate.fit import DECODE_COMPUTE_RANGE, OTHER, SERIAL_SHARE_RANGE, Calibration, Layout, Options, \
    calibrate, write_profile
from sim.calibrate.logs import FORMATS, LEARNER_PHASES
from sim.cli import positive_float, positive_int
from sim.config import ConfigError


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1, got {text!r}")
    return values


def _range(low: float, high: float | None):
    """argparse type for 'LO,HI' within [low, high] (high None: no upper bound)."""
    def parse(text: str) -> tuple[float, float]:
        try:
            lo, hi = (float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), got {text!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and low <= lo <= hi and (high is None or hi < high)):
            bound = f"in [{low:g}, {high:g})" if high is not None else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"expected LO <= HI, both {bound}, got {text!r}")
        return lo, hi
    parse.__name__ = "range"
    return parse


def add_calibration_options(p: argparse.ArgumentParser, layout_prefix: str = "") -> None:
    """The options that say what a log may not: its layout (`layout_prefix` keeps them apart from a what-if's own
    --gpus), hardware, batch shape, lengths, and the assumed ranges of what no log identifies."""
    pre = layout_prefix
    p.add_argument(f"--{pre}gpus", type=_int_list, metavar="N[,N...]", dest="log_gpus",
                   help="GPUs the logged run was colocated on (rollout and learner on the same N); one value, or one "
                        "per log (default: verl's own count, from perf/throughput)")
    p.add_argument(f"--{pre}rollout-gpus", type=_int_list, metavar="R[,R...]", dest="log_rollout_gpus",
                   help="a disaggregated run: its rollout GPUs (with --%slearner-gpus)" % pre)
    p.add_argument(f"--{pre}learner-gpus", type=_int_list, metavar="L[,L...]", dest="log_learner_gpus",
                   help="a disaggregated run: its learner GPUs")
    p.add_argument("--gpus-per-worker", type=positive_int, default=1, help="GPUs per rollout engine (its "
                                                                          "tensor-parallel degree; default 1)")
    p.add_argument("--gpu", help="named GPU whose roofline shapes the decode cost (sim/hardware/specs.py)")
    p.add_argument("--model", help="model-shape preset (sim/hardware/specs.py)")
    p.add_argument("--batch-prompts", type=positive_int, help="prompts per step, where the log does not say")
    p.add_argument("--group-size", type=positive_int, help="responses per prompt (verl rollout.n, AReaL "
                                                           "gconfig.n_samples, TRL num_generations)")
    p.add_argument("--prompt-len", type=positive_int, help="prompt tokens, where the log gives no mean")
    p.add_argument("--max-new-tokens", type=positive_int, help="the response cap, where the log does not show it")
    p.add_argument("--response-sigma", type=positive_float, help="lognormal sigma of response lengths, where the "
                                                                  "log gives only their mean")
    p.add_argument("--lengths-dump", metavar="DUMP", help="a per-sample dump of the same run, in its system's format "
                                                          "(validate/importers.py): its whole groups' lengths are "
                                                          "resampled instead of fitting a distribution")
    p.add_argument("--max-concurrency", type=positive_int, help="sequences an engine decodes at once (default: its "
                                                                "share of the logged batch)")
    p.add_argument("--skip-steps", type=int, default=0, help="leave out the log's first steps (warm-up)")
    p.add_argument("--serial-share-range", type=_range(0.0, 1.0), default=SERIAL_SHARE_RANGE,
                   help="with one learner size logged: the range assumed for the serial share of the per-token "
                        "learner time (default %s)" % ",".join(map(str, SERIAL_SHARE_RANGE)))
    p.add_argument("--decode-compute-range", type=_range(1e-3, None), default=DECODE_COMPUTE_RANGE,
                   help="the range assumed for a factor on the roofline's decode compute time against its memory "
                        "time (default %s)" % ",".join(map(str, DECODE_COMPUTE_RANGE)))
    p.add_argument("--sim-steps", type=positive_int, default=100, help="sync steps simulated to fit the generation "
                                                                       "scale (default 100)")


def options_from(args: argparse.Namespace) -> Options:
    if args.skip_steps < 0:
        raise ConfigError(f"--skip-steps {args.skip_steps}: must be >= 0")
    return Options(gpus=args.log_gpus, rollout_gpus=args.log_rollout_gpus, learner_gpus=args.log_learner_gpus,
                   gpus_per_worker=args.gpus_per_worker, gpu=args.gpu, model=args.model,
                   batch_prompts=args.batch_prompts, group_size=args.group_size, prompt_len=args.prompt_len,
                   max_new_tokens=args.max_new_tokens, response_sigma=args.response_sigma,
                   lengths_dump=args.lengths_dump,
                   max_concurrency=args.max_concurrency, skip_steps=args.skip_steps,
                   serial_share_range=tuple(args.serial_share_range),
                   decode_compute_range=tuple(args.decode_compute_range), sim_steps=args.sim_steps)


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="fit a measured profile to a run you already have (verl, AReaL, prime-rl, "
                                         "TRL or stalecast per-step log)",
                       description="Read the per-step timings and lengths of a run (several LOGs: runs of one "
                                   "workload at several sizes), fit generation, learner and sync costs and the "
                                   "response lengths, print the fit, its residuals per step and what the log could "
                                   "not identify, and with --out write a measured profile (any config can name it as "
                                   "hardware.profile) with its calibration beside it (for `stalecast whatif`). "
                                   "docs/calibrate.md lists the metric names read per system.")
    p.add_argument("logs", nargs="+", metavar="LOG", help="the log: JSON lines, CSV (a W&B export too) or a "
                                                          "trainer_state.json; stalecast: a run folder")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="the system that wrote the log")
    add_calibration_options(p)
    p.add_argument("--out", metavar="PROFILE", help="write the profile YAML here, its calibration beside it "
                                                    "(PROFILE stem + .calibration.yaml) and the residuals (.csv)")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not a calibrated profile")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace, console: Console) -> int:
    cal, residuals = calibrate(args.logs, args.format, options_from(args))
    print_calibration(cal, residuals, console)
    if args.out:
        out = Path(args.out)
        side = write_profile(cal, out, args.force)
        table = out.with_name(out.stem + ".residuals.csv")
        residuals.to_csv(table, index=False)
        console.print(f"wrote {out} (the profile), {side} (the calibration) and {table} (residuals per step)")
    else:
        console.print("(nothing written: pass --out PROFILE to keep the profile)")
    return 0


# --------------------------------------------------------------------------- printing
def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values)))) if len(values) else math.nan


def print_calibration(cal: Calibration, residuals: pd.DataFrame, console: Console) -> None:
    console.print(f"[bold]calibration[/] from {len(cal.logs)} {cal.format} log(s):", highlight=False)
    for log in cal.logs:
        console.print(f"  {log['path']}: {log['steps']} steps, {Layout(**log['layout']).describe()}", highlight=False)
    gpus = f"{cal.reference_gpus} learner GPU" + ("" if cal.reference_gpus == 1 else "s")
    phases = Table(title=f"learner phases: fixed + per token (at {gpus})", show_edge=False)
    for col in ("phase", "fixed s", "s per 1k tokens", "serial share", "rms residual s"):
        phases.add_column(col, justify="left" if col == "phase" else "right")
    for name, fit in cal.phases.items():
        res = residuals[residuals["part"] == name]
        phases.add_row(name, f"{fit.fixed_s:.3f}", f"{1e3 * fit.rate_s_per_token:.4f}",
                       "n/a (one size)" if fit.serial_share is None else f"{fit.serial_share:.3f}",
                       f"{_rms(res['logged_s'] - res['fitted_s']):.3f}")
    console.print(phases)
    gen = residuals[residuals["part"] == "gen_s"]
    scales = ", ".join(f"{k} x{v:.3f}" for k, v in cal.decode_scale.items())
    console.print(f"generation: {', '.join(f'{1e3 * c:.2f}' for c in cal.decode_step_mean_s)} ms per decode step "
                  f"(longest response), roofline scaled {scales}; rms residual per step "
                  f"{_rms(gen['logged_s'] - gen['fitted_s']):.3f} s", highlight=False)
    console.print(f"weight sync: {cal.sync_s:.3f} s", highlight=False)
    _print_steps(residuals, console)
    console.print("[bold]sync step time reproduced[/] (simulated with the fit against the log):")
    for log in cal.logs:
        err = log["step_s_reproduced"] / log["step_s_logged"] - 1
        console.print(f"  {log['path']}: {log['step_s_reproduced']:.3f} s vs {log['step_s_logged']:.3f} s logged "
                      f"({log['step_s_source']}): {100 * err:+.1f} %", highlight=False)
    console.print("[bold]what the log identified, and what it could not[/]:")
    for note in cal.notes:
        console.print(f"  - {note}", highlight=False, markup=False)


def _print_steps(residuals: pd.DataFrame, console: Console, shown: int = 40) -> None:
    """Per step: generation and learner time logged / fitted (the learner: its phases and `other` summed)."""
    learner = residuals[residuals["part"].isin((*LEARNER_PHASES, OTHER))]
    per = learner.groupby(["log", "step"])[["logged_s", "fitted_s"]].sum()
    gen = residuals[residuals["part"] == "gen_s"].set_index(["log", "step"])[["logged_s", "fitted_s"]]
    both = gen.add_suffix("_gen").join(per.add_suffix("_learner"), how="outer")
    table = Table(title="residuals per step (logged / fitted, seconds; the full table with --out)", show_edge=False)
    for col in ("log", "step", "generation", "learner", "learner residual"):
        table.add_column(col, justify="left" if col == "log" else "right")
    rows = list(both.itertuples())
    if len(rows) > shown:  # the first and the last steps
        rows = rows[:shown // 2] + rows[-shown // 2:]
    for (log, step), g_log, g_fit, l_log, l_fit in rows:
        table.add_row(Path(log).name, str(step), f"{g_log:.3f} / {g_fit:.3f}", f"{l_log:.3f} / {l_fit:.3f}",
                      f"{l_log - l_fit:+.3f}")
    console.print(table)
    if len(both) > shown:
        console.print(f"({len(both) - shown} steps in the middle not shown)")
