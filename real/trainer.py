"""Runs a configuration for real: spawns the rollout workers, drives the learner, writes the run folder.

Processes: R rollout workers (spawned, `real.worker.worker_main`) and the learner, which runs in this
(main) process so the progress bar, Ctrl-C and the outputs stay in one place. They share the weight
channel (`real.weights`), the ledger of counters and one message queue (`real.worker`).

Clock: time zero is the pipeline start, after the learner's warm start and once every worker has built its
model; every process stamps `time.monotonic() - t0` (one system-wide clock). A resumed run's clock continues
where its checkpoint's last step ended (the restart itself is not counted).

Nothing is lost (`real.runfolder`): every completed step is in the run folder the moment it ends, so a run that
fails, is interrupted or is killed outright keeps them, readable as a trace; a run that ends in any way this process
sees writes its whole trace (groups waiting and in flight too), a checkpoint of its last completed step (unless it
failed in the middle of a weight update) and a summary saying how and why it ended. Ctrl-C or SIGTERM asks the run
to stop at the next point where the learner's weights are whole (a second one stops at once); the command then
exits 130 or 143. `Trainer.resume(DIR)` continues a run from its checkpoint with the same config and seeds.

Nothing hangs: workers wait with timeouts and leave when `stop` is set or this process dies; the learner
checks worker exit codes, stop requests and a global deadline while it waits; shutdown sets `stop`, keeps
draining the queue (so workers can flush), joins with a timeout and terminates stragglers. When a worker is the
cause of an error, the error names the worker and its exit code.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from real.learner import GroupRecord, Learner, WorkerError
from real.runfolder import COMPLETE, ENGINE_STEP_COLUMNS, FAILED, INTERRUPTED, RUNNING, RunFolder
from real.weights import SharedMemoryChannel
from real.worker import Ledger, worker_main
from sim.config import ConfigError
from sim.engine.control import Control
from sim.errors import Terminated
from sim.metrics import compute_metrics, staleness_histogram
from sim.resources import check_shared_memory
from sim.trace import SAMPLE_COLUMNS, STEP_COLUMNS, Trace, provenance

STARTUP_TIMEOUT_S = 300.0   # spawned workers import torch and build the model
SHUTDOWN_GRACE_S = 10.0


@dataclass
class TrainResult:
    out_dir: Path
    trace: Trace
    metrics: dict        # compute_metrics of the trace
    summary: dict        # what summary.json holds
    step_metrics: list[dict]


def default_out_dir(cfg) -> Path:
    return Path("runs") / f"{cfg.name}-train-{cfg.pipeline.mode}"


def _signal_name(code: int) -> str:
    try:
        return f" ({signal.Signals(-code).name})" if code < 0 else ""
    except ValueError:
        return ""


class Trainer:
    """One real run of `cfg` into `out_dir` (replaced if stalecast wrote it or it is empty; any folder with
    `force`). `on_step(trainer, step, metrics)` is called after every learner step."""

    def __init__(self, cfg, out_dir: str | Path | None = None, timeout_s: float = 3600.0,
                 on_step: Callable | None = None, progress=None, log: Callable[[str], None] | None = None,
                 force: bool = False):
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else default_out_dir(cfg)
        self.folder = RunFolder(self.out_dir)
        self.timeout_s = timeout_s
        self.on_step = on_step
        self.progress = progress  # a rich Progress (or None)
        self.log = log or (lambda message: None)  # start-up milestones, for logs of runs without a terminal
        self.force = force
        self.checkpoint: dict | None = None  # where a resumed run starts (the checkpoint's state.json)
        self.segments: list[dict] = []      # one per process that ran this run's steps (a resumed run has several)
        self.startup_s: dict[str, float] = {}
        self.workers: list = []
        self.steps_done = 0
        self._stopping = False
        self._signal: int | None = None  # a stop asked for by SIGINT/SIGTERM, taken at the next safe point

    @classmethod
    def resume(cls, out_dir: str | Path, steps: int | None = None, **kwargs) -> "Trainer":
        """Continue the run in `out_dir` from its checkpoint (from step 0 if it has none), to `steps` learner steps
        in all (default: its config's)."""
        folder = RunFolder(out_dir)
        if not folder.path.is_dir():
            raise ConfigError(f"--resume {out_dir}: no such run folder")
        cfg = folder.read_config()
        if steps is not None:
            cfg = cfg.with_overrides({"run.steps": steps})
        state = folder.checkpoint_state() or {"steps_done": 0}
        done = state["steps_done"]
        if done > cfg.run.steps:
            raise ConfigError(f"--steps {cfg.run.steps}: the run's checkpoint is already at step {done}")
        summary = folder.read_summary() or {}
        if summary.get("status") == COMPLETE and done >= cfg.run.steps:
            raise ConfigError(f"--resume {out_dir}: the run is complete ({done} steps); pass --steps N with N > {done} "
                              f"to train it further")
        trainer = cls(cfg, out_dir, **kwargs)
        trainer.checkpoint = state
        trainer.segments = summary.get("segments", [])
        return trainer

    # ------------------------------------------------------------------ worker health and stop requests
    def check_workers(self) -> None:
        """Called wherever the learner waits: raises for a dead worker, or for a stop asked by a signal."""
        if self._stopping:
            return
        if self._signal is not None:
            raise Terminated if self._signal == signal.SIGTERM else KeyboardInterrupt
        error = self._dead_worker()
        if error is not None:
            raise error

    def _dead_worker(self) -> WorkerError | None:
        for i, p in enumerate(self.workers):
            if p.exitcode is not None:
                self.learner.receive(0.2, strict=False)  # a crash report may be on its way
                detail = self.learner.failures.get(i)
                return WorkerError(f"rollout worker {i} (pid {p.pid}) exited with code {p.exitcode}"
                                   f"{_signal_name(p.exitcode)}" + (f":\n{detail}" if detail else ""))
        return None

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:  # the second one: stop now
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self._signal = signum
        self.log(f"{signal.Signals(signum).name}: stopping after the current step (again to stop at once)")

    def _handle_signals(self) -> dict:
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                break
        return previous

    def _wait_ready(self) -> None:
        limit = min(STARTUP_TIMEOUT_S, self.learner.deadline - time.monotonic())
        deadline = time.monotonic() + limit
        while self.ledger.ready.value < len(self.workers):
            self.learner.receive(0.1)
            self.check_workers()
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout workers not ready after {max(limit, 0):.0f} s; "
                                   + self.learner.describe_workers())

    def _shutdown(self) -> None:
        self._stopping = True
        self.stop.set()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while any(p.is_alive() for p in self.workers) and time.monotonic() < deadline:
            self.learner.receive(0.05, strict=False)  # keep reading: workers flush their last messages
        for p in self.workers:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        self.learner.receive(0.0, strict=False)

    # ------------------------------------------------------------------ the run
    def run(self) -> TrainResult:
        from real.engine import check_engine
        from real.model import LEARNER, build_policy, init_seed, pinned, resolve_device

        cfg, ckpt = self.cfg, self.checkpoint
        t_begin = time.monotonic()
        device = resolve_device(cfg)
        check_engine(cfg)
        header = trace_header(cfg)
        start = ckpt["steps_done"] if ckpt else 0
        if start:
            kept, history = self.folder.rewind(start, header)
        else:
            self.folder.create(cfg, header, self.force or ckpt is not None)
            kept, history = pd.DataFrame(columns=list(SAMPLE_COLUMNS)), []
        self.steps_done = self.checkpointed_at = start
        self.first_new_id = ckpt["n_admitted"] if start else 0
        self.retired = {int(g): bool(d) for g, d in kept.groupby("group_id")["dropped"].first().items()}
        self.segments.append({"from_step": start, "pid": os.getpid()})
        self.folder.write_summary({"status": RUNNING, "steps_done": start, "steps": cfg.run.steps,
                                   "segments": self.segments, **provenance("real")})
        previous_handlers = self._handle_signals()
        ending: BaseException | None = None
        warm: list[float] = []
        step_metrics: list[dict] = []
        try:
            ctx = torch.multiprocessing.get_context("spawn")
            if device.type == "cpu":
                torch.set_num_threads(1)
            learner_cfg = cfg.with_overrides({"real.model": str(self.folder.checkpoint_dir)}) if start else cfg
            model, tok = build_policy(learner_cfg, device)
            self._milestone("policy built", t_begin)
            # Generation may need version j - lag while the learner has published up to j: lag + 1 versions, and one
            # slot for the copy being written.
            slots = max(3, (Control.from_config(cfg).lag or 0) + 2)
            check_shared_memory(cfg, sum(p.numel() for p in model.parameters()), slots)
            self.channel = SharedMemoryChannel(model, ctx, slots)
            self.ledger = self._ledger(ctx, start)
            self.queue, self.stop, self.start = ctx.Queue(), ctx.Event(), ctx.Event()
            self.learner = Learner(cfg, model, tok, self.channel, self.ledger, self.queue, self.check_workers,
                                   deadline=time.monotonic() + self.timeout_s,
                                   version=ckpt["version"] if start else 0, history=history)
            cfg_data = cfg.model_dump(mode="json")
            self.workers = [ctx.Process(target=worker_main, name=f"stalecast-rollout-{i}", daemon=True,
                                        args=(i, cfg_data, self.channel, self.ledger, self.queue, self.stop,
                                              self.start, len(self.segments) - 1))
                            for i in range(cfg.cluster.rollout_workers)]
            for p in self.workers:
                p.start()  # before the learner pins itself: a worker picks its core from the whole set
            if not start:  # supervised steps may take a larger lr than GRPO's; they overlap worker start-up
                warm = self.learner.warm_start(cfg.real.warm_start_steps, init_seed(cfg),
                                                cfg.real.warm_start_lr or cfg.optim.lr)
                self._milestone("warm start done", t_begin)
            self.learner.start_optimizer()
            if start:
                self.folder.load_optimizer(self.learner.opt)
                for version, flat in sorted(self.folder.older_weights().items()):  # what generation still needs
                    self.channel.publish_flat(flat, int(version))
            self.learner.publish()  # the version to start from
            self._wait_ready()
            self._milestone("rollout workers ready", t_begin)
            self.ledger.t0.value = time.monotonic() - (ckpt or {}).get("t_offset", 0.0)
            self.start.set()
            step_metrics = self._train_steps(start, LEARNER, device, pinned)
        except BaseException as exc:  # noqa: BLE001 - recorded in the run folder, then raised again below
            ending = exc
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
        return self._finish(ending, warm, step_metrics)

    def _ledger(self, ctx, start: int) -> Ledger:
        """The shared counters, as the checkpoint left them for a resumed run."""
        state = self.checkpoint if start else {}
        return Ledger(ctx, self.cfg.pipeline.max_staleness, self.cfg.cluster.rollout_workers,
                      n_admitted=state.get("n_admitted", 0), n_dropped=state.get("n_dropped", 0),
                      redo=state.get("redo", []))

    def _train_steps(self, start: int, role: int, device, pinned) -> list[dict]:
        cfg = self.cfg
        every = cfg.real.checkpoint_every
        step_metrics: list[dict] = []
        writer = _tensorboard(self.out_dir / "tensorboard")
        task = self.progress.add_task("train", total=cfg.run.steps, completed=start, reward=math.nan,
                                      stale=math.nan) if self.progress is not None else None
        try:
            with pinned(role, device, cfg):
                for step in range(start, cfg.run.steps):
                    res = self.learner.step(step)
                    retired = [*res.dropped, *res.records]
                    self.folder.append_step(res.metrics, res.row, [r for rec in retired for r in group_rows(cfg, rec)])
                    self.retired.update((rec.gid, rec.dropped) for rec in retired)
                    self.steps_done, self.last_row = step + 1, res.row
                    step_metrics.append(res.metrics)
                    if writer is not None:
                        for k, v in res.metrics.items():
                            if isinstance(v, (int, float)) and not isinstance(v, bool):
                                writer.add_scalar(k, v, step)
                    if task is not None:
                        self.progress.update(task, completed=step + 1, reward=res.metrics["reward/mean"],
                                             stale=res.metrics["staleness/mean"])
                    if self.on_step is not None:
                        self.on_step(self, step, res.metrics)
                    if every and self.steps_done % every == 0 and self.steps_done < cfg.run.steps:
                        self._checkpoint()
        finally:
            if writer is not None:
                writer.close()
        return step_metrics

    def _checkpoint(self) -> None:
        """The learner after `steps_done` steps, and what the workers' side needs to go on from there: the group ids
        handed out (in fixed-lag modes exactly the batches trained; async: every id so far, and those not yet taken
        or dropped to redo), the older weights a fixed lag generates with, and where the clock stands."""
        cfg, done = self.cfg, self.steps_done
        lag = self.learner.control.lag
        if lag is not None:  # batch j is generated with version j - lag: go on with batch `done`
            n_admitted, redo = done * cfg.workload.batch_prompts, []
        else:
            n_admitted = int(self.ledger.n_admitted.value)
            redo = [g for g in range(n_admitted) if g not in self.retired]
        last = self.last_row
        state = {"steps_done": done, "version": self.learner.version, "n_admitted": n_admitted,
                 "n_dropped": sum(self.retired.values()), "redo": redo,
                  "t_offset": float(last["t_end"] + last["weight_sync_s"])}
        older = {v: self.channel.snapshot(v) for v in range(max(done - (lag or 0), 0), done)}
        self.folder.save_checkpoint(self.learner.model, self.learner.tok, self.learner.opt, state, older)
        self.checkpointed_at = done

    def _finish(self, ending: BaseException | None, warm: list[float], step_metrics: list[dict]) -> TrainResult:
        """However the run ended: stop the workers, checkpoint the last whole step, write the trace and the summary;
        then raise what ended it, if anything did."""
        cause = None
        learner = getattr(self, "learner", None)
        if learner is not None:
            if ending is not None and not isinstance(ending, (WorkerError, KeyboardInterrupt)):
                cause = self._dead_worker()  # a lock timeout or a broken queue is usually a dead worker's doing
            self._shutdown()
        ending = cause or ending
        status = COMPLETE if ending is None else INTERRUPTED if isinstance(ending, KeyboardInterrupt) else FAILED
        notes = []
        if learner is not None and self.steps_done > self.checkpointed_at and not learner.updating:
            try:
                self._checkpoint()
            except Exception as exc:  # noqa: BLE001 - the run's other outputs still get written
                notes.append(f"no checkpoint at the end: {type(exc).__name__}: {exc}")
        trace = self._trace()
        metrics = compute_metrics(trace) if len(trace.steps) else {}
        if metrics and self.cfg.pipeline.mode == "sync":
            metrics["speedup/vs_sync"] = 1.0
        summary = self._summary(trace, metrics, warm, status, ending, notes)
        self.folder.write_trace(trace)
        if learner is not None:
            self.folder.write_engine_steps(engine_steps_frame(learner.engine_steps, len(self.segments) - 1))
        self.folder.write_summary(summary)
        if ending is not None:
            if cause is not None:
                raise cause from None
            raise ending
        return TrainResult(self.out_dir, trace, metrics, summary, step_metrics)

    def _trace(self) -> Trace:
        """Every completed step's rows from the run folder, and the groups not taken or dropped (waiting, in
        flight) from this segment's records."""
        samples, steps = self.folder.completed_rows()
        records = self.learner.records if hasattr(self, "learner") else {}
        pending = [gid for gid in self._segment_ids() if gid not in self.retired]
        rows = pd.DataFrame([r for gid in pending for r in group_rows(self.cfg, records.get(gid), gid, taken=False)],
                            columns=list(SAMPLE_COLUMNS))
        samples = pd.concat([samples, rows.astype(SAMPLE_COLUMNS)], ignore_index=True) if len(rows) else samples
        samples = samples.sort_values("sample_id", kind="stable").reset_index(drop=True).astype(SAMPLE_COLUMNS)
        return Trace(samples, steps.astype(STEP_COLUMNS), trace_header(self.cfg))

    def _segment_ids(self) -> list[int]:
        """The group ids this process's workers admitted: ids redone, then new ones."""
        if not hasattr(self, "ledger"):
            return []
        L = self.ledger
        return [*L.redo[:L.redo_next.value], *range(self.first_new_id, L.n_admitted.value)]

    def _milestone(self, what: str, t_begin: float) -> None:
        self.startup_s[what] = time.monotonic() - t_begin
        self.log(f"{what} after {self.startup_s[what]:.1f} s")

    def _summary(self, trace: Trace, metrics: dict, warm_losses: list[float], status: str,
                 ending: BaseException | None, notes: list[str]) -> dict:
        steps = trace.steps
        fifth = max(1, len(steps) // 5)
        learner = getattr(self, "learner", None)
        loads = [ld.seconds for ld in learner.loads] if learner else []
        det = learner.instability if learner else None
        self.segments[-1]["startup_s"] = self.startup_s
        return {
            "status": status,
            "ended_because": None if ending is None else _describe_ending(ending),
            "steps_done": self.steps_done, "steps": self.cfg.run.steps,
            "checkpoint_step": (self.folder.checkpoint_state() or {}).get("steps_done"),
            "notes": notes,
            "metrics": metrics,
            "staleness_histogram": {str(k): v for k, v in staleness_histogram(trace.samples).items()},
            "reward": {"first_fifth": float(steps["reward_mean"].iloc[:fifth].mean()) if len(steps) else None,
                       "last_fifth": float(steps["reward_mean"].iloc[-fifth:].mean()) if len(steps) else None},
            "collapse_step": det.step if det else None, "collapse_reason": det.reason if det else None,
            "accounting": accounting(trace, self.cfg.workload.group_size),
            "weight_load_s": {"mean": float(np.mean(loads)) if loads else None, "count": len(loads)},
            "warm_start": {"steps": len(warm_losses), "first_loss": warm_losses[0] if warm_losses else None,
                           "last_loss": warm_losses[-1] if warm_losses else None},
            "segments": self.segments,
            "mode": self.cfg.pipeline.mode,
            **provenance("real"),
        }


def _describe_ending(exc: BaseException) -> str:
    if isinstance(exc, Terminated):
        return "SIGTERM"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT / Ctrl-C)"
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.jsonl holds the same numbers
        return None
    return SummaryWriter(str(folder))


# --------------------------------------------------------------------------- the trace
def engine_steps_frame(logs, segment: int) -> pd.DataFrame:
    """The workers' `EngineSteps` messages as rows, each worker's in the order it sent them."""
    frames = [pd.DataFrame({"worker_id": log.worker_id, "segment": segment, "t_start": log.t_start,
                            "seconds": log.seconds, "active": log.active}) for log in logs]
    if not frames:
        return pd.DataFrame({k: pd.Series(dtype=v) for k, v in ENGINE_STEP_COLUMNS.items()})
    return pd.concat(frames, ignore_index=True).astype(ENGINE_STEP_COLUMNS)


def trace_header(cfg) -> dict:
    return {"schema": "stalecast.trace/1", **provenance("real"), "config": cfg.model_dump(mode="json"),
            "rollout_workers": cfg.cluster.rollout_workers}


def group_rows(cfg, rec: GroupRecord | None, gid: int | None = None, taken: bool = True) -> list[dict]:
    """The trace's rows of one admitted group (in flight: t_end NaN, version_end -1). rec None: admitted by a worker
    killed before its message left (worker -1, nothing known but the id). taken False: a group the learner had not
    taken or dropped in a completed step (a run stopped in the middle of one) is written as waiting."""
    G = cfg.workload.group_size
    gid = rec.gid if rec is not None else gid
    done = rec.done if rec is not None else None
    rec_taken = rec if taken else None
    # KV-cache evictions per sample (hardware.memory.kv_budget_tokens)
    if done is None:
        evictions = [0] * G   # in flight: none reported yet
    else:
        evictions = done.preemptions if done.preemptions is not None else [-1] * G   # -1: not measured
    rows = []
    for i in range(G):
        toks = done.tokens[i] if done else []
        vers = done.versions[i] if done else []
        rows.append({
            "sample_id": gid * G + i, "group_id": gid, "worker_id": rec.worker_id if rec else -1,
            "prompt_len": rec.prompt_len if rec else -1, "response_len": len(toks),
            "t_admit": rec.t_admit if rec else math.nan, "t_start": done.t_start if done else math.nan,
            "t_end": done.t_end[i] if done else math.nan,
            "t_consumed": rec_taken.t_consumed if rec_taken else math.nan,
            "version_start": rec.version_start if rec else -1, "version_end": vers[-1] if vers else -1,
            "version_mean": float(np.mean(vers)) if vers else math.nan,
            "version_consumed": rec_taken.version_consumed if rec_taken else -1,
            "learner_step": rec_taken.step if rec_taken else -1, "dropped": rec_taken.dropped if rec_taken else False,
            "reward": rec_taken.rewards[i] if rec_taken is not None and rec_taken.rewards is not None else math.nan,
            "preemptions": evictions[i],
        })
    return rows


def accounting(trace: Trace, group_size: int) -> dict:
    """Every admitted group exactly once: consumed, dropped, waiting in the buffer, or in flight. `complete`
    checks what could go wrong: an admission never reported (a killed worker), a trained sample missing."""
    s = trace.samples.groupby("group_id").agg(step=("learner_step", "first"), dropped=("dropped", "first"),
                                              worker=("worker_id", "first"),
                                              done=("t_end", lambda t: bool(np.isfinite(t).all())))
    consumed = int(((s["step"] >= 0) & ~s["dropped"]).sum())
    unreported = int((s["worker"] < 0).sum())
    trained = int(trace.steps["n_samples"].sum())
    return {"admitted_groups": len(s), "consumed": consumed, "dropped": int(s["dropped"].sum()),
            "waiting": int(((s["step"] < 0) & s["done"]).sum()),
            "in_flight": int(((s["step"] < 0) & ~s["done"]).sum()), "unreported": unreported,
            "complete": (unreported == 0 and len(trace.samples) == len(s) * group_size
                         and list(s.index) == list(range(len(s))) and consumed * group_size == trained)}
