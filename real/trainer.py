"""Runs a configuration for real: spawns the rollout workers, drives the learner, writes the run directory.

Processes: R rollout workers (spawned, `real.worker.worker_main`) and the learner, which runs in this
(main) process so the progress bar, Ctrl-C and the outputs stay in one place. They share the weight
channel (`real.weights`), the ledger of counters and one message queue (`real.worker`).

Clock: time zero is the pipeline start, after the learner's warm start and once every worker has built its
model; every process stamps `time.monotonic() - t0` (one system-wide clock).

Nothing hangs: workers wait with timeouts and leave when `stop` is set or this process dies; the learner
checks worker exit codes and a global deadline while it waits; shutdown sets `stop`, keeps draining the
queue (so workers can flush), joins with a timeout and terminates stragglers. On any error the run
directory is not written; the error names the worker and its exit code when a worker is the cause.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import transformers
import yaml

from real.learner import GroupRecord, Learner, WorkerError
from real.weights import SharedMemoryChannel
from real.worker import Ledger, worker_main
from sim.metrics import compute_metrics, staleness_histogram
from sim.outputs import replace_dir
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
    """One real run of `cfg`. `on_step(trainer, step, metrics)` is called after every learner step."""

    def __init__(self, cfg, out_dir: str | Path | None = None, timeout_s: float = 3600.0,
                 on_step: Callable | None = None, progress=None, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else default_out_dir(cfg)
        self.timeout_s = timeout_s
        self.on_step = on_step
        self.progress = progress  # a rich Progress (or None)
        self.log = log or (lambda message: None)  # start-up milestones, for logs of runs without a terminal
        self.startup_s: dict[str, float] = {}
        self.workers: list = []
        self._stopping = False

    # ------------------------------------------------------------------ worker health
    def check_workers(self) -> None:
        if self._stopping:
            return
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
        from real.model import LEARNER, build_policy, pinned, resolve_device, save_policy

        cfg = self.cfg
        t_begin = time.monotonic()
        ctx = torch.multiprocessing.get_context("spawn")
        device = resolve_device(cfg)
        if device.type == "cpu":
            torch.set_num_threads(1)
        model, tok = build_policy(cfg, device)
        self._milestone("policy built", t_begin)
        self.channel = SharedMemoryChannel(model, ctx)
        self.ledger = Ledger(ctx, cfg.run.steps + 2, cfg.cluster.rollout_workers)
        self.queue, self.stop, self.start = ctx.Queue(), ctx.Event(), ctx.Event()
        self.learner = Learner(cfg, model, tok, self.channel, self.ledger, self.queue, self.check_workers,
                               deadline=time.monotonic() + self.timeout_s)

        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", dir=self.out_dir.parent))
        old_term = _install_sigterm()
        step_metrics: list[dict] = []
        steps_rows: list[dict] = []
        try:
            cfg_data = cfg.model_dump(mode="json")
            self.workers = [ctx.Process(target=worker_main, name=f"stalecast-rollout-{i}", daemon=True,
                                        args=(i, cfg_data, self.channel, self.ledger, self.queue, self.stop,
                                              self.start))
                            for i in range(cfg.cluster.rollout_workers)]
            for p in self.workers:
                p.start()  # before the learner pins itself: a worker picks its core from the whole set
            # Supervised steps may take a larger lr than GRPO's.
            warm_lr = cfg.real.warm_start_lr or cfg.optim.lr
            warm = self.learner.warm_start(cfg.real.warm_start_steps, cfg.seed, warm_lr)  # overlaps worker start-up
            self._milestone("warm start done", t_begin)
            self.learner.start_optimizer()
            self.learner.publish()  # version 0
            self._wait_ready()
            self._milestone("rollout workers ready", t_begin)
            self.ledger.t0.value = time.monotonic()
            self.start.set()

            writer = _tensorboard(tmp / "tensorboard")
            task = self.progress.add_task("train", total=cfg.run.steps, reward=math.nan, stale=math.nan) \
                if self.progress is not None else None
            with open(tmp / "metrics.jsonl", "w") as jsonl, pinned(LEARNER, device, cfg.pipeline.mode):
                for step in range(cfg.run.steps):
                    res = self.learner.step(step)
                    steps_rows.append(res.row)
                    step_metrics.append(res.metrics)
                    jsonl.write(json.dumps(res.metrics) + "\n")
                    jsonl.flush()
                    if writer is not None:
                        for k, v in res.metrics.items():
                            if isinstance(v, (int, float)) and not isinstance(v, bool):
                                writer.add_scalar(k, v, step)
                    if task is not None:
                        self.progress.update(task, completed=step + 1, reward=res.metrics["reward/mean"],
                                             stale=res.metrics["staleness/mean"])
                    if self.on_step is not None:
                        self.on_step(self, step, res.metrics)
            if writer is not None:
                writer.close()
        except BaseException as exc:
            # A lock timeout or a broken queue is usually a dead worker's doing: name the worker then.
            cause = None if isinstance(exc, (WorkerError, KeyboardInterrupt)) else self._dead_worker()
            try:
                self._shutdown()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                signal.signal(signal.SIGTERM, old_term)
            if cause is not None:
                raise cause from exc
            raise
        self._shutdown()
        signal.signal(signal.SIGTERM, old_term)

        try:
            trace = build_trace(cfg, self.learner.records, steps_rows, int(self.ledger.n_admitted.value))
            metrics = compute_metrics(trace)
            if cfg.pipeline.mode == "sync":
                metrics["speedup/vs_sync"] = 1.0
            summary = self._summary(trace, metrics, warm)
            (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            trace.write(tmp / "trace")
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
            transformers.utils.logging.disable_progress_bar()  # the run's own summary is enough
            save_policy(model, tok, tmp / "checkpoint")
            replace_dir(tmp, self.out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return TrainResult(self.out_dir, trace, metrics, summary, step_metrics)

    def _milestone(self, what: str, t_begin: float) -> None:
        self.startup_s[what] = time.monotonic() - t_begin
        self.log(f"{what} after {self.startup_s[what]:.1f} s")

    def _summary(self, trace: Trace, metrics: dict, warm_losses: list[float]) -> dict:
        steps = trace.steps
        fifth = max(1, len(steps) // 5)
        loads = [ld.seconds for ld in self.learner.loads]
        det = self.learner.instability
        return {
            "metrics": metrics,
            "staleness_histogram": {str(k): v for k, v in staleness_histogram(trace.samples).items()},
            "reward": {"first_fifth": float(steps["reward_mean"].iloc[:fifth].mean()),
                       "last_fifth": float(steps["reward_mean"].iloc[-fifth:].mean())},
            "collapse_step": det.step, "collapse_reason": det.reason,
            "accounting": accounting(trace, self.cfg.workload.group_size),
            "weight_load_s": {"mean": float(np.mean(loads)) if loads else None, "count": len(loads)},
            "warm_start": {"steps": len(warm_losses), "first_loss": warm_losses[0] if warm_losses else None,
                           "last_loss": warm_losses[-1] if warm_losses else None},
            "startup_s": self.startup_s,
            "mode": self.cfg.pipeline.mode,
            **provenance("real"),
        }


def _install_sigterm():
    """SIGTERM ends the run like Ctrl-C (the workers are stopped, nothing half-written)."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return signal.getsignal(signal.SIGTERM)


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.jsonl holds the same numbers
        return None
    return SummaryWriter(str(folder))


# --------------------------------------------------------------------------- the trace
def build_trace(cfg, records: dict[int, GroupRecord], steps_rows: list[dict], n_admitted: int) -> Trace:
    """One row per admitted sample (in flight: t_end NaN, version_end -1), one row per learner step."""
    G = cfg.workload.group_size
    cols: dict[str, list] = {c: [] for c in SAMPLE_COLUMNS}
    for gid in range(n_admitted):
        rec = records.get(gid)  # None only if the worker was killed before its message left
        done = rec.done if rec is not None else None
        for i in range(G):
            toks = done.tokens[i] if done else []
            vers = done.versions[i] if done else []
            row = {
                "sample_id": gid * G + i, "group_id": gid, "worker_id": rec.worker_id if rec else -1,
                "prompt_len": rec.prompt_len if rec else -1, "response_len": len(toks),
                "t_admit": rec.t_admit if rec else math.nan, "t_start": done.t_start if done else math.nan,
                "t_end": done.t_end[i] if done else math.nan,
                "t_consumed": rec.t_consumed if rec else math.nan,
                "version_start": rec.version_start if rec else -1, "version_end": vers[-1] if vers else -1,
                "version_mean": float(np.mean(vers)) if vers else math.nan,
                "version_consumed": rec.version_consumed if rec else -1, "learner_step": rec.step if rec else -1,
                "dropped": rec.dropped if rec else False,
                "reward": rec.rewards[i] if rec is not None and rec.rewards is not None else math.nan,
            }
            for c in SAMPLE_COLUMNS:
                cols[c].append(row[c])
    samples = pd.DataFrame({c: pd.Series(v, dtype=SAMPLE_COLUMNS[c]) for c, v in cols.items()})
    steps = pd.DataFrame(steps_rows, columns=list(STEP_COLUMNS)).astype(STEP_COLUMNS)
    header = {"schema": "stalecast.trace/1", **provenance("real"), "config": cfg.model_dump(mode="json"),
              "rollout_workers": cfg.cluster.rollout_workers}
    return Trace(samples, steps, header)


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
