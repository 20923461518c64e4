"""`stalecast train CONFIG`: run the configuration for real and write a measured trace in the sim's schema."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sim.cli import add_out_options, parse_overrides, positive_float, positive_int
from sim.config import ConfigError, load_config


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="run the configuration for real (async GRPO on torch) and write the measured trace",
        description="Train CONFIG with real rollout workers and a learner (separate processes), writing config.yaml, "
                    "trace/, metrics.jsonl, summary.json and checkpoint/ to --out (default runs/NAME-train-MODE) as "
                    "the run goes: a run that fails or is stopped keeps every step it completed, and --resume DIR "
                    "continues it from its last checkpoint. Ctrl-C or SIGTERM stops after the current step (twice: at "
                    "once).")
    p.add_argument("config", nargs="?", help="run config YAML (see examples/); not with --resume")
    p.add_argument("--mode", choices=("sync", "one_step_off", "fixed_lag", "async"), help="override pipeline.mode")
    p.add_argument("--steps", type=positive_int, help="override run.steps (with --resume: the new total)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, e.g. --set optim.lr=3e-4 (repeatable)")
    add_out_options(p, "default runs/NAME-train-MODE")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint, with its config "
                                                    "and seeds")
    p.add_argument("--timeout", type=positive_float, default=3600.0,
                   help="stop with an error after this many seconds")
    p.set_defaults(func=cmd_train)


def router_note(cfg) -> str | None:
    """What `stalecast train` tells a user whose config names a router its workers do not run: each real worker
    takes every group its free slots hold, first come, first served (real/worker.py `RolloutWorker.admit`), which
    the simulator's `fill_first` models."""
    router, workers = cfg.cluster.router, cfg.cluster.rollout_workers
    if workers < 2 or router == "fill_first":
        return None
    return (f"note: cluster.router is {router}, but the workers of stalecast train take groups first come, first "
            f"served (the simulator's fill_first, which stalecast validate predicts with); {router} applies to "
            f"simulations only")


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    from real.learner import WorkerError
    from real.trainer import Trainer

    if args.resume is not None:
        given = [name for name, value in (("CONFIG", args.config), ("--mode", args.mode), ("--set", args.set),
                                          ("--out", args.out), ("--force", args.force)) if value]
        if given:
            raise ConfigError(f"--resume {args.resume}: continues the run with its own config and folder; "
                              f"{', '.join(given)} cannot be given with it (only --steps and --timeout)")
    elif args.config is None:
        raise ConfigError("a config file is required (try examples/tiny_cpu.yaml), or --resume DIR")

    # Without a terminal (a log file, a batch job) a bar shows nothing: print the start-up and every step instead.
    log = on_step = None
    if not console.is_terminal:
        log = lambda message: console.print(message, markup=False, highlight=False)  # noqa: E731
        on_step = lambda trainer, step, m: log(  # noqa: E731
            f"step {step + 1}/{trainer.cfg.run.steps}  reward {m['reward/mean']:.3f}  "
            f"staleness {m['staleness/mean']:.2f}  train {m['time/train_s']:.2f} s  "
            f"wait {m['time/queue_wait_s']:.2f} s  sync {m['time/weight_sync_s']:.3f} s")
    options = dict(timeout_s=args.timeout, log=log, on_step=on_step)
    if args.resume is not None:
        trainer = Trainer.resume(args.resume, args.steps, **options)
        start = trainer.checkpoint["steps_done"]
        console.print(f"resuming {args.resume} at step {start} of {trainer.cfg.run.steps}" if start else
                      f"{args.resume} has no checkpoint: training it again from step 0", highlight=False)
    else:
        trainer = Trainer(load_config(args.config, _overrides(args)), args.out, force=args.force, **options)
    if (note := router_note(trainer.cfg)) is not None:
        console.print(note, style="yellow", markup=False, highlight=False, soft_wrap=True)
    with Progress(TextColumn(f"training [bold]{trainer.cfg.pipeline.mode}[/]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("reward {task.fields[reward]:.3f}  staleness {task.fields[stale]:.2f}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=log is not None) as bar:
        trainer.progress = bar
        try:
            result = trainer.run()
        except (WorkerError, TimeoutError) as exc:
            console.print(f"training failed: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
            _say_kept(trainer, console)
            return 1
        except KeyboardInterrupt:
            _say_kept(trainer, console)
            raise
    print_summary(result, console)
    return 0


def _overrides(args: argparse.Namespace) -> dict:
    overrides = parse_overrides(args.set)
    if args.mode is not None:
        overrides["pipeline.mode"] = args.mode
        if args.mode != "async":  # interruptible workers only exist in async mode
            overrides["pipeline.interruptible"] = False
    if args.steps is not None:
        overrides["run.steps"] = args.steps
    return overrides


def _say_kept(trainer, console: Console) -> None:
    if trainer.folder.summary_path.is_file():
        console.print(f"{trainer.out_dir}/ keeps the {trainer.steps_done} completed step(s); continue with: "
                      f"stalecast train --resume {trainer.out_dir}", markup=False, highlight=False, soft_wrap=True)


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
    console.print(f"wrote {result.out_dir}/ (config.yaml, trace/, metrics.jsonl, summary.json, checkpoint/)",
                  markup=False, highlight=False)


def add_profile_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="measure this machine for the configured model and device; write a profile YAML",
        description="Time decode steps (against active sequences and context), prefill, learner steps (against "
                    "tokens), weight sync and the co-location slowdown with the real trainer's own code, and write "
                    "a measured profile that `simulate` uses with --set hardware.profile=PATH.")
    p.add_argument("config", nargs="?", help="run config YAML (see examples/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any field (repeatable)")
    p.add_argument("--out", help="profile YAML to write (default profiles/NAME-DEVICE.yaml); an existing file is "
                                 "replaced only if it is a stalecast profile")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not a stalecast profile")
    p.add_argument("--quick", action="store_true", help="the ends of each table only (seconds, for smoke tests)")
    p.set_defaults(func=cmd_profile)


def check_profile_out(out, force: bool) -> None:
    """Before an expensive profile: --out may be a new file or a stalecast profile (any file with --force)."""
    from sim.errors import OutputError
    from sim.hardware.measured import load_profile

    if out.is_dir():
        raise OutputError(f"--out {out}: is a folder; name the profile YAML file to write")
    if out.exists() and not force:
        try:
            load_profile(out)
        except ValueError:
            raise OutputError(f"--out {out}: the file exists and is not a stalecast profile; name another file or "
                              f"pass --force to replace it") from None


def cmd_profile(args: argparse.Namespace, console: Console) -> int:
    from pathlib import Path

    from real.engine import check_engine
    from real.model import resolve_device
    from real.profile import measure_profile, plan_for
    from sim.hardware.measured import describe_factor, save_profile

    cfg = load_config(args.config, parse_overrides(args.set))
    check_engine(cfg)
    plan = plan_for(cfg, quick=args.quick)
    out = Path(args.out) if args.out else Path("profiles") / f"{cfg.name}-{resolve_device(cfg).type}.yaml"
    check_profile_out(out, args.force)
    colocation = 3 * cfg.cluster.colocated
    n_stages = 1 + 2 * plan.rounds + 1 + colocation  # warm-up, decode and learner rounds, weight load, co-location
    with Progress(TextColumn("profiling"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("", total=n_stages)

        def progress(label: str) -> None:
            if not console.is_terminal:
                console.print(label, markup=False, highlight=False)
            bar.update(task, description=label, advance=0 if bar.tasks[0].description == "" else 1)

        profile = measure_profile(cfg, plan, progress)
    save_profile(profile, out)
    d = profile.decode
    console.print(f"decode step: {d.seconds[0][0] * 1e3:.2f} ms ({d.active[0]} seq, context {d.context[0]:.0f}) .. "
                  f"{d.seconds[-1][-1] * 1e3:.2f} ms ({d.active[-1]} seq, context {d.context[-1]:.0f});  "
                  f"learner step {profile.train.seconds[0]:.3f} s ({profile.train.tokens[0]:.0f} tokens) .. "
                  f"{profile.train.seconds[-1]:.3f} s ({profile.train.tokens[-1]:.0f} tokens);  "
                  f"sync {profile.sync_s * 1e3:.1f} ms", markup=False, highlight=False)
    if profile.colocation is not None:
        c = profile.colocation
        console.print(f"co-location slowdown: generation {describe_factor(c.gen_slowdown)}, training "
                      f"x{c.train_slowdown:.2f}, generation in sync mode {describe_factor(c.sync_gen_slowdown)}"
                      + ("" if c.sync_gen_beside is None else ", beside " + " / ".join(
                          f"x{v:.2f}" for v in c.sync_gen_beside) + " at "
                         + " / ".join(str(k) for k in range(len(c.sync_gen_beside))) + " other(s) generating"),
                      markup=False, highlight=False)
    console.print(f"wrote {out} (use it: --set hardware.profile={out})", markup=False, highlight=False)
    return 0
