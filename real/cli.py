"""`stalecast train CONFIG`: run the configuration for real and write a measured trace in the sim's schema."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sim.cli import parse_overrides
from sim.config import load_config


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="run the configuration for real (async GRPO on torch) and write the measured trace",
        description="Train CONFIG with real rollout workers and a learner (separate processes), write "
                    "config.yaml, trace/, metrics.jsonl, summary.json and checkpoint/ to --out "
                    "(default runs/NAME-train-MODE).")
    p.add_argument("config", nargs="?", help="run config YAML (see examples/)")
    p.add_argument("--mode", choices=("sync", "one_step_off", "async"), help="override pipeline.mode")
    p.add_argument("--steps", type=int, help="override run.steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--out", help="output folder (replaced if it exists)")
    p.add_argument("--timeout", type=float, default=3600.0, help="stop with an error after this many seconds")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    from real.learner import WorkerError
    from real.trainer import Trainer

    overrides = parse_overrides(args.set)
    if args.mode is not None:
        overrides["pipeline.mode"] = args.mode
        if args.mode != "async":  # interruptible workers only exist in async mode
            overrides["pipeline.interruptible"] = False
    if args.steps is not None:
        overrides["run.steps"] = args.steps
    cfg = load_config(args.config, overrides)

    # Without a terminal (a log file, a batch job) a bar shows nothing: print the start-up and every step instead.
    log = on_step = None
    if not console.is_terminal:
        log = lambda message: console.print(message, markup=False, highlight=False)  # noqa: E731
        on_step = lambda trainer, step, m: log(  # noqa: E731
            f"step {step + 1}/{cfg.run.steps}  reward {m['reward/mean']:.3f}  staleness {m['staleness/mean']:.2f}  "
            f"train {m['time/train_s']:.2f} s  wait {m['time/queue_wait_s']:.2f} s  sync {m['time/weight_sync_s']:.3f} s")
    with Progress(TextColumn(f"training [bold]{cfg.pipeline.mode}[/]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("reward {task.fields[reward]:.3f}  staleness {task.fields[stale]:.2f}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=log is not None) as bar:
        try:
            result = Trainer(cfg, args.out, timeout_s=args.timeout, progress=bar, log=log, on_step=on_step).run()
        except (WorkerError, TimeoutError) as exc:
            console.print(f"training failed: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
            return 1
    print_summary(result, console)
    return 0


def print_summary(result, console: Console) -> None:
    m, s = result.metrics, result.summary
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    acc = s["accounting"]
    console.print(f"[bold]{s['mode']}[/]: {len(result.trace.steps)} learner steps in {fmt(m['time/wall_s'], '.1f')} s "
                  f"({fmt(m['time/step_s'])} s/step, idle trainer {fmt(m['idle/trainer'], '.2f')}, "
                  f"rollout {fmt(m['idle/rollout'], '.2f')})")
    console.print(f"staleness mean {fmt(m.get('staleness/mean'), '.2f')} max {fmt(m.get('staleness/max'), '.0f')}  "
                  f"histogram {s['staleness_histogram']}  dropped groups {m['dropped/groups']}")
    console.print(f"reward first fifth {s['reward']['first_fifth']:.3f} -> last fifth {s['reward']['last_fifth']:.3f}  "
                  f"ESS {fmt(m['ess/token'])}  KL {fmt(m['kl/k3'], '.4f')}  "
                  f"weight sync {fmt(m['time/weight_sync_s'] * 1e3, '.1f')} ms")
    console.print(f"groups: {acc['consumed']} consumed, {acc['dropped']} dropped, {acc['waiting']} waiting, "
                  f"{acc['in_flight']} in flight (of {acc['admitted_groups']} admitted)")
    if s["collapse_step"] is not None:
        console.print(f"[red]unstable[/] at step {s['collapse_step']}: {s['collapse_reason']}")
    console.print(f"wrote {result.out_dir}/ (config.yaml, trace/, metrics.jsonl, summary.json, checkpoint/)")
