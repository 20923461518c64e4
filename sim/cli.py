"""The `stalecast` command. `simulate` lives here; the other subcommands register by module path and are imported
only when they run, so `sim` stays free of torch and a simulation never loads the studies' or validation's
libraries. `main` is the one error boundary of every subcommand."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from datetime import datetime
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sim.config import ConfigError, RunConfig, config_help, load_config
from sim.errors import StalecastError, Terminated
from sim.outputs import check_out, staged

# name -> ("module:function" that adds the subcommand's parser, one-line help for `stalecast --help`).
EXTERNAL_COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("validate.cli:add_parser", "profile, predict, train for real, compare (or compare with a given trace)"),
    "train": ("real.cli:add_parser", "run the configuration for real (async GRPO on torch) and write the measured trace"),
    "profile": ("real.cli:add_profile_parser", "measure this machine for the configured model and device; write a "
                                               "profile YAML"),
    "study": ("studies.named:add_parser", "run a named what-if study (ratio, bound, tail, sync-vs-async; stability on "
                                          "the real trainer)"),
    "plan": ("studies.plan:add_parser", "recommend a rollout/learner split, staleness bound and concurrency"),
    "calibrate": ("sim.calibrate.cli:add_parser", "fit a measured profile to a run you already have (its per-step "
                                                  "log: verl, AReaL, prime-rl, TRL, stalecast)"),
    "whatif": ("studies.whatif:add_parser", "from a calibrated run: async step time, speedup, staleness and idle per "
                                            "rollout/learner split and bound"),
}


def positive_int(text: str) -> int:
    """argparse type for counts where 0 or less means nothing (steps, replications, GPUs, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type for durations and sizes that must be finite and > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_out_options(p: argparse.ArgumentParser, what: str) -> None:
    """--out and --force, the same on every subcommand that writes a folder."""
    p.add_argument("--out", help=f"output folder ({what}); an existing folder is replaced only if stalecast wrote it "
                                 f"or it is empty")
    p.add_argument("--force", action="store_true", help="replace --out even if it holds files stalecast did not write")


def parse_overrides(pairs: list[str]) -> dict:
    """`key.path=value` pairs; values are read as YAML (numbers, booleans, null, lists)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key.path=value")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            reason = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({reason})") from None
    return out


def run_simulation(cfg: RunConfig, console: Console | None = None, label: str = "simulating",
                   trace_columns: tuple[str, ...] | None = None):
    """Simulate with a progress bar over learner steps; returns (trace, seconds). trace_columns: the sample columns
    the trace holds in memory (default: all; with fewer, it writes the whole table from the simulation's ledger)."""
    from sim.engine.pipeline import Simulation
    from sim.resources import release_freed_memory

    try:
        sim = Simulation(cfg, trace_columns=trace_columns)
    except ValueError as exc:  # a profile or trace the config names is unreadable: say which and why
        raise ConfigError(str(exc)) from None
    start = time.perf_counter()
    if console is None:
        trace = sim.run()
    else:
        with Progress(TextColumn(f"{label} [bold]{cfg.pipeline.mode}[/]"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("steps"), TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task("", total=cfg.run.steps)
            sim.on_step = lambda step: bar.update(task, completed=step + 1)
            trace = sim.run()
    seconds = time.perf_counter() - start
    # Only the trace goes on: free the Simulation's workload stream and engine state before the metrics need room.
    del sim
    release_freed_memory()
    return trace, seconds


def _sync_baseline(cfg: RunConfig, args: argparse.Namespace, console: Console) -> dict | None:
    """Metrics of cfg run in sync mode, for the speedup; None in sync mode or with --no-sync-baseline."""
    from sim.metrics import METRIC_COLUMNS, compute_metrics

    if cfg.pipeline.mode == "sync" or args.no_sync_baseline:
        return None
    sync_cfg = cfg.with_overrides({"pipeline.mode": "sync", "pipeline.interruptible": False,
                                   "run.steps": min(cfg.run.steps, args.sync_steps)})
    return compute_metrics(run_simulation(sync_cfg, console, "baseline", METRIC_COLUMNS)[0])


def check_memory(cfg: RunConfig, source: str, allow: bool, console: Console):
    """The configuration's GPU memory (`sim.hardware.memory.MemoryReport`, None when no GPU is modelled). One that
    does not fit is refused (a ConfigError naming `source`) unless `allow` or hardware.memory.check is false; then it
    is simulated with a warning. A KV budget the workers cannot work with is refused whatever `allow` says."""
    from sim.hardware.memory import infeasible_message, kv_capacity, memory_report
    from sim.workload import workload_lengths

    try:
        lengths = workload_lengths(cfg.workload)
        report = memory_report(cfg, lengths)
    except ValueError as exc:  # an empirical trace that cannot be read
        raise ConfigError(str(exc)) from None
    try:
        kv_capacity(cfg, lengths)
    except ValueError as exc:  # a KV budget the workers cannot work with
        raise ConfigError(f"{source}: {exc}") from None
    if report is None or report.feasible:
        return report
    message = infeasible_message(report)
    if cfg.hardware.memory.check and not allow:
        raise ConfigError(f"{source}: {message} (--allow-infeasible simulates it anyway; hardware.memory sets the "
                          f"budget)")
    console.print(f"warning: {message}; simulating it anyway", style="yellow", markup=False, highlight=False)
    return report


def cmd_simulate(args: argparse.Namespace, console: Console) -> int:
    from sim.metrics import METRIC_COLUMNS, compute_metrics, staleness_histogram
    from sim.report import FIGURE_COLUMNS, print_memory, print_summary
    from sim.resources import check_simulation_memory
    from sim.stability import predict_config
    from sim.trace import SAMPLE_COLUMNS

    overrides = parse_overrides(args.set)
    if args.steps is not None:
        overrides["run.steps"] = args.steps
    if args.seed is not None:
        overrides["seed"] = args.seed
    cfg = load_config(args.config, overrides)
    memory = check_memory(cfg, args.config, args.allow_infeasible, console)
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-sim"
    check_out(out, args.force)  # before the simulation: a refused --out costs nothing
    # The trace holds in memory only the columns the metrics and the figure read; it writes the whole table
    # straight from the ledger. The baseline runs first, so that its trace is gone before this run's exists, but
    # not before this run's size is checked.
    held = tuple(c for c in SAMPLE_COLUMNS if c in {*METRIC_COLUMNS, *FIGURE_COLUMNS})
    check_simulation_memory(cfg, held)
    sync_metrics = _sync_baseline(cfg, args, console)
    trace, seconds = run_simulation(cfg, console, trace_columns=held)

    sync_step = sync_metrics["time/step_s"] if sync_metrics else None
    if cfg.pipeline.mode == "sync":
        sync_step = None
    metrics = compute_metrics(trace, sync_step_s=sync_step)
    if cfg.pipeline.mode == "sync":
        metrics["speedup/vs_sync"] = 1.0
    histogram = staleness_histogram(trace.samples)
    try:
        stability = predict_config(cfg, histogram, metrics.get("staleness/mean") or 0.0)
    except ValueError as exc:  # an unreadable fit file: say which and why
        raise ConfigError(str(exc)) from None
    print_summary(cfg, metrics, histogram, console, seconds, sync_metrics, stability,
                  trace.header["kv"]["budget_tokens"])
    if memory is not None:
        print_memory(memory, cfg, console)

    _write_outputs(out, trace, metrics, histogram, cfg, args.format, sync_metrics, stability, args.force, memory)
    console.print(f"wrote {out}/ (trace/, metrics.json, staleness.png)")
    return 0


def _write_outputs(out: Path, trace, metrics: dict, histogram: dict, cfg: RunConfig, fmt: str,
                   sync_metrics: dict | None, stability=None, force: bool = False, memory=None) -> None:
    """Everything goes to a scratch folder first and appears under `out` in one rename: nothing half-written."""
    from sim.report import staleness_figure

    with staged(out, "simulate", force) as tmp:
        trace.write(tmp / "trace", fmt)
        payload = {"metrics": metrics, "staleness_histogram": {str(k): v for k, v in histogram.items()},
                   "sync_baseline": sync_metrics, "config": cfg.model_dump(mode="json"),
                   "stability": stability.as_dict() if stability is not None else None,
                   "memory": memory.as_dict() if memory is not None else None}
        (tmp / "metrics.json").write_text(json.dumps(payload, indent=2))
        staleness_figure(trace, tmp / "staleness.png", f"{cfg.name}: {cfg.pipeline.mode}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; of the other packages' subcommands only the one `argv` names is imported (all, without argv)."""
    parser = argparse.ArgumentParser(prog="stalecast", description="Predict and verify the staleness, throughput and "
                                     "stability of asynchronous RLHF (GRPO) pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("simulate", help="predict staleness, throughput and speedup of a run config",
                       description="Simulate CONFIG, print a summary and write the trace, metrics.json and "
                                   "staleness.png to --out (default runs/NAME-sim).")
    p.add_argument("config", nargs="?", help="run config YAML (see examples/)")
    p.add_argument("--steps", type=positive_int, help="override run.steps")
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, e.g. --set pipeline.max_staleness=4 (repeatable)")
    add_out_options(p, "default runs/NAME-sim")
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet", help="trace file format")
    p.add_argument("--no-sync-baseline", action="store_true", help="skip the sync-mode run used for the speedup")
    p.add_argument("--sync-steps", type=positive_int, default=200,
                   help="learner steps of the sync baseline (sync steps are alike, so fewer suffice)")
    p.add_argument("--allow-infeasible", action="store_true",
                   help="simulate a configuration that does not fit in GPU memory (hardware.memory), with a warning, "
                        "instead of refusing it")
    p.add_argument("--help-config", action="store_true", help="print every config field with its meaning")
    p.set_defaults(func=cmd_simulate)
    chosen = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    for name, (target, help_text) in EXTERNAL_COMMANDS.items():
        if argv is None or name == chosen:
            module, func = target.split(":")
            getattr(importlib.import_module(module), func)(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)  # listed in --help; imported when chosen
    return parser


def crash_log_dir() -> Path:
    """Where an unexpected error's traceback goes: $STALECAST_CRASH_DIR, else the system's temporary folder."""
    return Path(os.environ.get("STALECAST_CRASH_DIR") or Path(tempfile.gettempdir()) / "stalecast-crashes")


def _write_crash_log(argv: list[str]) -> Path | None:
    try:
        folder = crash_log_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"crash-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
        path.write_text(f"stalecast {' '.join(argv)}\n\n{traceback.format_exc()}")
        return path
    except OSError:
        return None


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _os_error(exc: OSError) -> str:
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    reason = exc.strerror or str(exc)
    return f"{' -> '.join(names)}: {reason}" if names else reason


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done (validate: PASS), 1 a verdict or run that failed (validate FAIL, a training run that
    ended early), 2 bad input (one line: file, field or option, reason), 3 validate INCOMPLETE (a judged metric
    could not be compared), 70 an unexpected error (traceback written to a file), 130 Ctrl-C, 143 SIGTERM."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad option (2, argparse printed why)
        return exc.code if isinstance(exc.code, int) else 2
    console = Console(stderr=False)
    console.soft_wrap = not console.is_terminal  # logs get whole lines, not an 80-column wrap
    err = Console(stderr=True, soft_wrap=True)

    def say_error(text: str) -> None:  # one line per problem (a config can have several), each self-contained
        for line in filter(None, (part.strip() for part in str(text).splitlines())):
            err.print(f"error: {line}", style="red", markup=False, highlight=False)
    if getattr(args, "help_config", False):
        console.print(config_help(), markup=False, highlight=False, soft_wrap=True)
        return 0
    if getattr(args, "config", "") is None and getattr(args, "resume", None) is None:
        say_error("a config file is required (try examples/tiny_cpu.yaml)")
        return 2
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (a test harness): leave signals alone
        previous = None
    try:
        return args.func(args, console)
    except StalecastError as exc:
        say_error(str(exc))
        return 2
    except OSError as exc:
        say_error(_os_error(exc))
        return 2
    except Terminated:
        err.print("terminated (SIGTERM)", style="yellow", highlight=False)
        return 143
    except KeyboardInterrupt:
        err.print("interrupted", style="yellow", highlight=False)
        return 130
    except Exception as exc:  # noqa: BLE001 - the boundary: a bug, reported briefly, traceback to a file
        log = _write_crash_log(argv)
        where = f"; full traceback in {log}" if log else ""
        say_error(f"unexpected {type(exc).__name__}: {_one_line(exc)[:300]}{where}")
        return 70
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
