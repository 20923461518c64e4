"""Rollout workers: separate processes that admit GRPO groups under the pipeline's rules and generate them.

The rules are the simulator's (`sim.engine.pipeline.Simulation.admission_block` / `load_target`), written
as the pure `Control` class so they can be tested without processes. The counters they read (groups
admitted and dropped, completed groups waiting for the learner, unconsumed groups per version) live in
shared memory (`Ledger`) under one lock, so an admission decision and its bookkeeping are one atomic act.

One difference from the simulator, by design: a real worker batches per `generate()` call (it admits as
many whole groups as its `max_concurrency` slots hold, generates them to the end, then admits again),
while the simulator batches continuously (a freed slot is refilled at the next decode step). Finished
sequences do leave the decode batch early, so a step costs what its active sequences cost.

Messages to the learner (one `mp.Queue`, per-worker order preserved): `Admitted` when a group is admitted
(so in-flight groups appear in the trace), `GroupDone` when it is generated, `Loaded` per weight load,
`WorkerFailed` with a traceback when the worker crashes.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from sim.engine.control import Control, oldest_unconsumed

WAKE_CHECK_S = 0.1   # how often a blocked worker, woken by nothing, checks that it should go on
LOCK_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- shared state
class _Ring:
    """A version-indexed view of the ledger's ring of counts."""

    def __init__(self, counts):
        self.counts = counts

    def __getitem__(self, version: int) -> int:
        return self.counts[version % len(self.counts)]



# What a worker is doing, for the error a stalled run ends with (Ledger.phase).
PHASES = ("starting", "ready", "loading weights", "waiting for admission", "generating")
STARTING, READY, LOADING, WAITING, GENERATING = range(len(PHASES))


class Ledger:
    """Counters shared by all processes, guarded by one lock (picklable: travels to spawned workers)."""

    def __init__(self, ctx, max_staleness: int, n_workers: int, n_admitted: int = 0, n_dropped: int = 0,
                 redo: list[int] = ()):
        """A resumed run starts with the counts its checkpoint left (`n_admitted` ids handed out, `n_dropped` of them
        dropped) and `redo`: ids admitted before the checkpoint whose groups were not taken by then, admitted again
        first (their generation was lost with the process that held them).

        Unconsumed groups are counted per version in a ring of max_staleness + 2 versions (`count`, `oldest`): only
        the gate reads them, and under the gate every outstanding group's version lies in [latest - S, latest]
        (see sim.engine.control.admission_rule), so no two outstanding versions share a slot, and the memory and
        the scan for the oldest do not grow with the run's length."""
        self.lock = ctx.Lock()
        self.n_admitted = ctx.Value("q", n_admitted, lock=False)
        self.n_dropped = ctx.Value("q", n_dropped, lock=False)
        self.redo = ctx.Array("q", list(redo) or [0], lock=False)
        self.n_redo = len(redo)
        self.redo_next = ctx.Value("q", 0, lock=False)     # redo[:redo_next] are admitted again
        self.buffered = ctx.Value("q", 0, lock=False)       # completed, not consumed or dropped (queue + buffer)
        self.running = ctx.Value("q", 0, lock=False)        # admitted, not yet generated
        self.since_sync = ctx.Value("q", 0, lock=False)     # admitted since the last weight publication (verl)
        # trained on by a finished step, or dropped (tinker); a resumed run's retired groups count
        self.trained = ctx.Value("q", n_admitted - len(redo), lock=False)
        self.unconsumed = ctx.Array("q", max_staleness + 2, lock=False)  # per version_start % window: not retired
        self.ready = ctx.Value("q", 0, lock=False)          # workers that built their model
        self.t0 = ctx.Value("d", 0.0, lock=False)           # time.monotonic() of the pipeline start
        # Per worker, written by that worker only (no lock): phase, batch size and decode step, batches done.
        self.phase = ctx.Array("q", n_workers, lock=False)
        self.batch_seqs = ctx.Array("q", n_workers, lock=False)
        self.decode_step = ctx.Array("q", n_workers, lock=False)
        self.batches = ctx.Array("q", n_workers, lock=False)
        # Released by the learner whenever it changes what a blocked worker waits on (new weights, a batch taken),
        # so a blocked worker sleeps until then instead of polling: wake-ups every few milliseconds on the
        # learner's core slowed its steps. Semaphores, not Events: an Event's set() waits for every sleeper to
        # acknowledge, forever if one was killed. One per worker: a worker draining its own cannot swallow
        # another's.
        self.wake = [ctx.Semaphore(0) for _ in range(n_workers)]

    def count(self, version: int, delta: int) -> None:
        """Groups of `version_start` admitted (+1) or retired (-1); under the lock."""
        self.unconsumed[version % len(self.unconsumed)] += delta

    def oldest(self, latest: int) -> int:
        """Lowest version <= latest with an admitted, not yet retired group; `latest` if none (gating only)."""
        window = len(self.unconsumed)
        return oldest_unconsumed(_Ring(self.unconsumed), max(latest - window + 1, 0), latest)

    def not_outstanding(self) -> int:
        """Groups trained on or dropped, and ids waiting to be redone (not admitted again yet): what n_admitted less
        this leaves is what a resumed run has started and not trained."""
        return self.trained.value + (self.n_redo - self.redo_next.value)

    def live(self) -> int:
        """Groups admitted and not dropped (the gate's "accepted + running"); ids waiting to be redone are not."""
        return self.n_admitted.value - self.n_dropped.value - (self.n_redo - self.redo_next.value)

    def take_id(self) -> int:
        """The next group id to admit (under the lock): one to redo, else a new one."""
        if self.redo_next.value < self.n_redo:
            self.redo_next.value += 1
            return int(self.redo[self.redo_next.value - 1])
        self.n_admitted.value += 1
        return self.n_admitted.value - 1

    def wake_workers(self) -> None:
        for wake in self.wake:
            wake.release()

    def drain_wake(self, worker_id: int) -> None:
        """Forget earlier wake-ups of `worker_id`: it is about to look at the state they announced."""
        while self.wake[worker_id].acquire(False):
            pass

    def describe(self, worker_id: int, max_new_tokens: int) -> str:
        phase = self.phase[worker_id]
        text = f"rollout worker {worker_id}: {PHASES[phase]}"
        if phase == GENERATING:
            text += (f" {self.batch_seqs[worker_id]} sequences, decode step {self.decode_step[worker_id]} "
                     f"of at most {max_new_tokens}")
        return text + f" ({self.batches[worker_id]} batches done)"

    @contextmanager
    def locked(self, check=None, timeout: float = LOCK_TIMEOUT_S):
        """The lock, acquired in slices so `check()` (e.g. "are the workers alive?") runs while waiting: a
        process killed while holding it must not hang the others."""
        deadline = time.monotonic() + timeout
        while not self.lock.acquire(timeout=0.25):
            if check is not None:
                check()
            if time.monotonic() > deadline:
                raise TimeoutError("the shared ledger lock was held too long (a process died holding it?)")
        try:
            yield self
        finally:
            self.lock.release()


# --------------------------------------------------------------------------- messages
@dataclass
class Admitted:
    gid: int
    worker_id: int
    prompt_len: int
    t_admit: float
    version_start: int


@dataclass
class GroupDone:
    gid: int
    worker_id: int
    t_start: float                # generate() began (prefill)
    t_end: list[float]            # per sample: when its last token was sampled
    tokens: list[list[int]]       # per sample, EOS included when emitted
    logprobs: list[list[float]]   # behavior log-probs per token
    versions: list[list[int]]     # policy version per token


@dataclass
class Loaded:
    worker_id: int
    version: int
    t: float
    seconds: float


@dataclass
class WorkerFailed:
    worker_id: int
    message: str


def prompt_for(task, seed: int, gid: int):
    """A group's prompt depends on (seed, group id) only: any worker, any mode, the same prompt."""
    return task.sample(np.random.default_rng([seed, gid]), 1)[0]


class Stopped(Exception):
    """The stop event is set (or the parent died): leave generation now; the batch stays in flight."""


# --------------------------------------------------------------------------- the worker process
class RolloutWorker:
    def __init__(self, worker_id: int, cfg, channel, ledger: Ledger, queue, stop, segment: int = 0):
        from real.model import build_policy, resolve_device
        from real.task import DigitTask

        self.id, self.cfg, self.channel, self.ledger, self.queue, self.stop = (
            worker_id, cfg, channel, ledger, queue, stop)
        self.control = Control.from_config(cfg)
        self.device = resolve_device(cfg)
        self.model, self.tok = build_policy(cfg, self.device)
        self.model.eval()
        self.task = DigitTask(cfg.real, self.tok)
        self.version = -1
        self.group_size = cfg.workload.group_size
        self.max_groups = cfg.cluster.max_concurrency // self.group_size
        # A resumed run's segment draws a stream of its own: the same seed, not a replay of the killed segment's.
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed * 1000 + worker_id + 1 + 7919 * segment)
        self.parent = None
        import multiprocessing as mp
        self.parent = mp.parent_process()

    def now(self) -> float:
        return time.monotonic() - self.ledger.t0.value

    def check(self) -> None:
        if self.stop.is_set() or (self.parent is not None and not self.parent.is_alive()):
            raise Stopped

    def set_phase(self, phase: int) -> None:
        self.ledger.phase[self.id] = phase

    def load(self, version: int | None = None) -> None:
        self.version, seconds = self.channel.load_into(self.model, version)
        self.queue.put(Loaded(self.id, self.version, self.now(), seconds))

    def admit(self) -> list[int]:
        """Admit whole groups while the rules and this worker's slots allow; one atomic decision."""
        gids: list[int] = []
        L = self.ledger
        with L.locked(self.check):
            while len(gids) < self.max_groups:
                latest = self.channel.latest_version()
                block = self.control.admission_block(
                    version=self.version, latest=latest, n_admitted=L.n_admitted.value, live=L.live(),
                    running=L.running.value, buffered=L.buffered.value, trained=L.not_outstanding(),
                    oldest=L.oldest(latest),
                    since_sync=L.since_sync.value)
                if block is not None:
                    break
                L.count(self.version, +1)
                L.running.value += 1
                L.since_sync.value += 1
                gids.append(L.take_id())
        return gids

    def run(self) -> None:
        while True:
            self.check()
            self.ledger.drain_wake(self.id)  # before looking: a change made after this wakes it again
            with self.ledger.locked(self.check):
                n_admitted = self.ledger.n_admitted.value
            target = self.control.load_target(version=self.version, latest=self.channel.latest_version(),
                                              n_admitted=n_admitted)
            if target is not None:
                self.set_phase(LOADING)
                self.load(target)
                continue
            gids = self.admit()
            if not gids:
                self.set_phase(WAITING)
                self.ledger.wake[self.id].acquire(timeout=WAKE_CHECK_S)
                continue
            self.ledger.batch_seqs[self.id] = len(gids) * self.group_size
            self.ledger.decode_step[self.id] = 0
            self.set_phase(GENERATING)
            self.generate(gids)
            self.ledger.batches[self.id] += 1

    def generate(self, gids: list[int]) -> None:
        from real.generate import generate

        t_admit = self.now()
        prompts = [prompt_for(self.task, self.cfg.seed, gid) for gid in gids]
        for gid, p in zip(gids, prompts):
            self.queue.put(Admitted(gid, self.id, len(p.ids), t_admit, self.version))
        G = self.group_size
        token_times: list[float] = []  # token_times[s]: when decode step s's tokens were sampled

        def between_steps() -> int | None:
            token_times.append(self.now())
            self.ledger.decode_step[self.id] = len(token_times)
            self.check()
            if self.control.interruptible and self.channel.latest_version() > self.version:
                self.load()  # in place, KV cache kept: later tokens carry the new version
                return self.version
            return None

        t_start = self.now()
        out = generate(self.model, [p.ids for p in prompts for _ in range(G)], self.cfg.workload.max_new_tokens,
                       temperature=self.cfg.real.temperature, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id,
                       version=self.version, generator=self.generator, between_steps=between_steps)
        t_return = self.now()
        ends = [token_times[len(t) - 1] if len(t) - 1 < len(token_times) else t_return for t in out.tokens]
        for k, gid in enumerate(gids):
            rows = slice(k * G, (k + 1) * G)
            with self.ledger.locked(self.check):
                self.ledger.buffered.value += 1  # before the put: the learner never retires it first
                self.ledger.running.value -= 1
            self.queue.put(GroupDone(gid, self.id, t_start, ends[rows], out.tokens[rows], out.logprobs[rows],
                                     out.versions[rows]))


def worker_main(worker_id: int, cfg_data: dict, channel, ledger: Ledger, queue, stop, start, segment: int = 0) -> None:
    """Process entry point. Ctrl-C is the parent's to handle: it sets `stop`, which every wait here checks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = 0
    try:
        from sim.config import RunConfig

        cfg = RunConfig.model_validate(cfg_data)
        from real.model import keep_to_core

        keep_to_core(worker_id, cfg)
        worker = RolloutWorker(worker_id, cfg, channel, ledger, queue, stop, segment)
        worker.set_phase(READY)
        with ledger.locked(worker.check):
            ledger.ready.value += 1
        while not start.wait(0.1):
            worker.check()
        worker.run()
    except Stopped:
        pass
    except BaseException:  # noqa: BLE001 - report everything, then exit non-zero
        queue.put(WorkerFailed(worker_id, traceback.format_exc()))
        code = 1
    finally:
        queue.close()
        queue.join_thread()  # flush what we sent; the learner keeps reading until we exit
    sys.stdout.flush()
    os._exit(code)
