"""The `stalecast` command. `simulate` lives here; subcommands of other packages register by module path
and are imported only when used, so `sim` stays free of torch."""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sim.config import ConfigError, RunConfig, config_help, load_config
from sim.trace import replace_dir

# name -> "module:function" that adds the subcommand's parser; filled in as packages land.
EXTERNAL_COMMANDS: dict[str, str] = {
    "validate": "validate.cli:add_parser",
    "train": "real.cli:add_parser",
    "profile": "real.cli:add_profile_parser",
    "study": "studies.named:add_parser",
    "plan": "studies.plan:add_parser",
}


def parse_overrides(pairs: list[str]) -> dict:
    """`key.path=value` pairs; values are read as YAML (numbers, booleans, null, lists)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key.path=value")
        out[key] = yaml.safe_load(value)
    return out


def run_simulation(cfg: RunConfig, console: Console | None = None, label: str = "simulating"):
    """Simulate with a progress bar over learner steps; returns (trace, seconds)."""
    from sim.engine.pipeline import Simulation

    try:
        sim = Simulation(cfg)
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
    return trace, time.perf_counter() - start


def cmd_simulate(args: argparse.Namespace, console: Console) -> int:
    from sim.metrics import compute_metrics, staleness_histogram
    from sim.report import print_summary
    from sim.stability import predict_config

    overrides = parse_overrides(args.set)
    if args.steps is not None:
        overrides["run.steps"] = args.steps
    if args.seed is not None:
        overrides["seed"] = args.seed
    cfg = load_config(args.config, overrides)
    trace, seconds = run_simulation(cfg, console)

    sync_metrics = None
    if cfg.pipeline.mode != "sync" and not args.no_sync_baseline:
        sync_cfg = cfg.with_overrides({"pipeline.mode": "sync", "pipeline.interruptible": False,
                                       "run.steps": min(cfg.run.steps, args.sync_steps)})
        sync_trace, _ = run_simulation(sync_cfg, console, "baseline")
        sync_metrics = compute_metrics(sync_trace)
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
    print_summary(cfg, metrics, histogram, console, seconds, sync_metrics, stability)

    out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-sim"
    _write_outputs(out, trace, metrics, histogram, cfg, args.format, sync_metrics, stability)
    console.print(f"wrote {out}/ (trace/, metrics.json, staleness.png)")
    return 0


def _write_outputs(out: Path, trace, metrics: dict, histogram: dict, cfg: RunConfig, fmt: str,
                   sync_metrics: dict | None, stability=None) -> None:
    """Everything goes to a scratch folder first and appears under `out` in one rename: nothing half-written."""
    from sim.report import staleness_figure

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        trace.write(tmp / "trace", fmt)
        payload = {"metrics": metrics, "staleness_histogram": {str(k): v for k, v in histogram.items()},
                   "sync_baseline": sync_metrics, "config": cfg.model_dump(mode="json"),
                   "stability": stability.as_dict() if stability is not None else None}
        (tmp / "metrics.json").write_text(json.dumps(payload, indent=2))
        staleness_figure(trace, tmp / "staleness.png", f"{cfg.name}: {cfg.pipeline.mode}")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stalecast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("simulate", help="predict staleness, throughput and speedup of a run config",
                       description="Simulate CONFIG, print a summary and write the trace, metrics.json and "
                                   "staleness.png to --out (default runs/NAME-sim).")
    p.add_argument("config", nargs="?", help="run config YAML (see examples/)")
    p.add_argument("--steps", type=int, help="override run.steps")
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, e.g. --set pipeline.max_staleness=4 (repeatable)")
    p.add_argument("--out", help="output folder (replaced if it exists)")
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet", help="trace file format")
    p.add_argument("--no-sync-baseline", action="store_true", help="skip the sync-mode run used for the speedup")
    p.add_argument("--sync-steps", type=int, default=200,
                   help="learner steps of the sync baseline (sync steps are alike, so fewer suffice)")
    p.add_argument("--help-config", action="store_true", help="print every config field with its meaning")
    p.set_defaults(func=cmd_simulate)
    for name, target in EXTERNAL_COMMANDS.items():
        module, func = target.split(":")
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=False)
    console.soft_wrap = not console.is_terminal  # logs get whole lines, not an 80-column wrap
    if getattr(args, "help_config", False):
        console.print(config_help(), markup=False, highlight=False, soft_wrap=True)
        return 0
    if getattr(args, "config", "") is None:
        console.print("[red]error:[/] a config file is required (try examples/tiny_cpu.yaml)")
        return 2
    try:
        return args.func(args, console)
    except ConfigError as exc:
        console.print(f"config error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
