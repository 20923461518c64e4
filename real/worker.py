"""Rollout workers: separate processes that admit GRPO groups under the pipeline's rules and generate them.

The rules are the simulator's (`sim.engine.pipeline.Simulation.admission_block` / `load_target`), written
as the pure `Control` class so they can be tested without processes. The counters they read (groups
admitted and dropped, completed groups waiting for the learner, unconsumed groups per version) live in
shared memory (`Ledger`) under one lock, so an admission decision and its bookkeeping are one atomic act.

A worker generates with a rollout engine (`real.engine`, real/engine/) of `cluster.max_concurrency` slots, one
decode step at a time, and batches as the simulator does (`cluster.batching`, real/engine/batching.py): continuous,
a group is admitted at the next decode step once G slots are free; static, only into an empty engine. Finished
sequences leave the decode batch at once, so a step costs what its active sequences cost. With
`hardware.memory.kv_budget_tokens` the engine is held to that KV budget under `hardware.memory.kv_policy`
(real/engine/kv.py, the simulator's rule): a group is admitted only when it fits, and sequences may be evicted and
resumed; each sample reports its evictions.

Messages to the learner (one `mp.Queue`, per-worker order preserved): `Admitted` when a group is admitted
(so in-flight groups appear in the trace), `GroupDone` when it is generated, `Loaded` per weight load,
`EngineSteps` with the timing of its engine steps (every `STEP_LOG_EVERY` steps and when it stops), and
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
from typing import TYPE_CHECKING

import numpy as np
import torch

from real.engine.batching import GroupBatcher
from real.engine.kv import kv_budgeted
from sim.engine.control import Control, oldest_unconsumed

if TYPE_CHECKING:
    from real.task import Prompt

WAKE_CHECK_S = 0.1   # how often a blocked worker, woken by nothing, checks that it should go on
CHECK_EVERY_S = 0.02  # how often a generating worker checks that it should go on
LOCK_TIMEOUT_S = 30.0
STEP_LOG_EVERY = 1024  # engine steps a worker times before it sends them to the learner


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
        # Per worker, written by that worker only (no lock): phase, active sequences, decode steps and groups done.
        self.phase = ctx.Array("q", n_workers, lock=False)
        self.batch_seqs = ctx.Array("q", n_workers, lock=False)
        self.decode_step = ctx.Array("q", n_workers, lock=False)
        self.groups_done = ctx.Array("q", n_workers, lock=False)
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

    def next_id(self) -> int:
        """The group id `take_id` hands out next (under the lock): one to redo, else a new one."""
        if self.redo_next.value < self.n_redo:
            return int(self.redo[self.redo_next.value])
        return self.n_admitted.value

    def take_id(self) -> int:
        """Hand out `next_id` (under the lock)."""
        gid = self.next_id()
        if self.redo_next.value < self.n_redo:
            self.redo_next.value += 1
        else:
            self.n_admitted.value += 1
        return gid

    def wake_workers(self) -> None:
        for wake in self.wake:
            wake.release()

    def drain_wake(self, worker_id: int) -> bool:
        """Forget earlier wake-ups of `worker_id`: it is about to look at the state they announced. Whether there
        was any."""
        woken = False
        while self.wake[worker_id].acquire(False):
            woken = True
        return woken

    def describe(self, worker_id: int) -> str:
        phase = self.phase[worker_id]
        text = f"rollout worker {worker_id}: {PHASES[phase]}"
        if phase == GENERATING:
            text += f" {self.batch_seqs[worker_id]} sequences"
        return text + f" ({self.decode_step[worker_id]} decode steps, {self.groups_done[worker_id]} groups done)"

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
    t_start: float                # the decode step that prefilled its first sample began (the trace's t_start)
    t_end: list[float]            # per sample: when its last token was sampled
    tokens: list[list[int]]       # per sample, EOS included when emitted
    logprobs: list[list[float]]   # behavior log-probs per token
    versions: list[list[int]]     # policy version per token
    preemptions: list[int] | None = None   # per sample: times its KV cache was evicted (None: not measured)


@dataclass
class Loaded:
    worker_id: int
    version: int
    t: float
    seconds: float


@dataclass
class EngineSteps:
    """A worker's engine steps (each a prefill of what was admitted since the last, then one decode step of every
    active sequence), for the run folder's engine_steps.parquet: where a worker's time went, step by step."""
    worker_id: int
    t_start: list[float]          # when the step began (the run's clock)
    seconds: list[float]          # how long it took, sampled tokens on the host
    active: list[int]             # sequences it advanced by one token each


@dataclass
class WorkerFailed:
    worker_id: int
    message: str


def engine_for(cfg, model, tok, task, version: int, generator: torch.Generator | None):
    """The rollout engine `real.engine` names, with a worker's slots (`cluster.max_concurrency`) and sampling."""
    from real.engine import Sampling, make_engine

    sampling = Sampling(cfg.real.temperature, tok.eos_id, cfg.workload.max_new_tokens)
    return make_engine(cfg.real.engine, model, cfg.cluster.max_concurrency, sampling, version, generator,
                       max_prompt_len=task.max_prompt_len)


def prompt_for(task, seed: int, gid: int) -> Prompt:
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
        # A resumed run's segment draws a stream of its own: the same seed, not a replay of the killed segment's.
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed * 1000 + worker_id + 1 + 7919 * segment)
        engine = engine_for(cfg, self.model, self.tok, self.task, self.version, self.generator)
        self.kv = kv_budgeted(engine, cfg.hardware.memory)   # None without a KV budget
        self.engine = self.kv or engine
        self.kv_refused: int | None = None   # prompt length of the group the KV budget refused last
        self.batcher = GroupBatcher(self.engine, cfg.workload.group_size, cfg.cluster.batching == "static",
                                    cfg.cluster.admission == "per_sample")
        import multiprocessing as mp
        self.parent = mp.parent_process()
        self.next_check = 0.0
        self.step_log = EngineSteps(worker_id, [], [], [])

    def now(self) -> float:
        return time.monotonic() - self.ledger.t0.value

    def check(self) -> None:
        if self.stop.is_set() or (self.parent is not None and not self.parent.is_alive()):
            raise Stopped

    def check_now_and_then(self) -> None:
        """`check`, at most every CHECK_EVERY_S between decode steps: the stop event is a lock all processes share."""
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check = now + CHECK_EVERY_S
            self.check()

    def set_phase(self, phase: int) -> None:
        self.ledger.phase[self.id] = phase

    def load(self, version: int | None = None) -> None:
        self.version, seconds = self.channel.load_into(self.model, version)
        self.engine.weights_loaded(self.version)
        self.queue.put(Loaded(self.id, self.version, self.now(), seconds))

    def admit(self, room: int) -> tuple[list[tuple[int, Prompt]], bool]:
        """Admit up to `room` groups while the KV budget and the rules allow; one atomic decision. Returns the
        groups with their prompts, and whether the rules stopped it (rather than the room or the KV budget). As the
        simulator's worker (sim/engine/worker.py `_admit_groups`), the budget is asked first, with the next group's
        prompt: a refusal is remembered in `kv_refused`."""
        groups: list[tuple[int, Prompt]] = []
        L = self.ledger
        self.kv_refused = None
        with L.locked(self.check):
            while len(groups) < room:
                prompt = prompt_for(self.task, self.cfg.seed, L.next_id())
                if self.kv is not None and not self.kv_takes([*(len(p.ids) for _, p in groups), len(prompt.ids)]):
                    self.kv_refused = len(prompt.ids)
                    return groups, False
                latest = self.channel.latest_version()
                block = self.control.admission_block(
                    version=self.version, latest=latest, n_admitted=L.n_admitted.value, live=L.live(),
                    running=L.running.value, buffered=L.buffered.value, trained=L.not_outstanding(),
                    oldest=L.oldest(latest),
                    since_sync=L.since_sync.value)
                if block is not None:
                    return groups, True
                L.count(self.version, +1)
                L.running.value += 1
                L.since_sync.value += 1
                groups.append((L.take_id(), prompt))   # the id next_id named: the lock is held
        return groups, False

    def kv_takes(self, prompt_lens: list[int]) -> bool:
        """Whether the KV budget takes groups of these prompt lengths, admitted one after another now: each whole
        (per_group), or the last one's first sample after the earlier ones' samples (per_sample, as the kernel's
        `can_admit` asks room for one sequence)."""
        if not self.batcher.per_sample:
            return self.kv.fits(self.batcher.G, prompt_lens)
        starts = self.batcher.starts(prompt_lens)
        return len(starts) == len(prompt_lens) and starts[-1] > 0

    def kv_may_admit(self) -> bool:
        """Whether the KV budget takes the group it refused last, if any. Its room only grows when sequences finish:
        asking again before (at every decode step) would take the ledger's lock for nothing."""
        return self.kv_refused is None or self.kv_takes([self.kv_refused])

    def run(self) -> None:
        """Decode step after decode step while sequences are in flight, admitting groups into free slots between
        steps (static batching: only into an empty engine); idle, load due weights or sleep until woken."""
        batcher = self.batcher
        # The rules refused the last admission: ask again only once woken (the learner, or a worker freeing a capped
        # running slot), after new weights, or WAKE_CHECK_S later. Asking takes the ledger's lock, which every
        # process shares: asked at every decode step, it queued the workers behind each other on a shared core.
        ask_after = 0.0  # time.monotonic() from which to ask the rules again
        while True:
            self.check_now_and_then()
            # Before looking: a change made after this wakes it again.
            if self.ledger.drain_wake(self.id):
                ask_after = 0.0
            if batcher.empty:
                with self.ledger.locked(self.check):
                    n_admitted = self.ledger.n_admitted.value
                target = self.control.load_target(version=self.version, latest=self.channel.latest_version(),
                                                  n_admitted=n_admitted)
                if target is not None:
                    self.set_phase(LOADING)
                    self.load(target)
                    ask_after = 0.0
                    continue
            if batcher.waiting:  # a group's samples waiting for slots (per_sample) start before any new group
                batcher.start_waiting(self.now())
            room = batcher.room()
            groups = []
            if room and time.monotonic() >= ask_after and self.kv_may_admit():
                groups, refused = self.admit(room)
                ask_after = time.monotonic() + WAKE_CHECK_S if refused else 0.0
            if groups:
                t_admit = self.now()
                for gid, prompt in groups:
                    self.queue.put(Admitted(gid, self.id, len(prompt.ids), t_admit, self.version))
                    batcher.admit(gid, prompt.ids, t_admit)
            if batcher.empty:
                self.set_phase(WAITING)
                self.ledger.wake[self.id].acquire(timeout=WAKE_CHECK_S)
                ask_after = 0.0  # woken, or a periodic look
                self.check()
                continue
            self.set_phase(GENERATING)
            active, t_step = self.engine.active(), self.now()
            self.ledger.batch_seqs[self.id] = active
            completed = batcher.step(self.now)
            self.log_step(t_step, active)
            for group in completed:
                self.hand_over(group)
            self.ledger.decode_step[self.id] += 1
            if self.control.interruptible and not batcher.empty and self.channel.latest_version() > self.version:
                self.load()  # in place, between two decode steps, KV cache kept: later tokens carry the new version
                ask_after = 0.0

    def log_step(self, t_start: float, active: int) -> None:
        log = self.step_log
        log.t_start.append(t_start)
        log.seconds.append(self.now() - t_start)
        log.active.append(active)
        if len(log.t_start) >= STEP_LOG_EVERY:
            self.send_step_log()

    def send_step_log(self) -> None:
        if self.step_log.t_start:
            self.queue.put(self.step_log)
            self.step_log = EngineSteps(self.id, [], [], [])

    def hand_over(self, group) -> None:
        with self.ledger.locked(self.check):
            self.ledger.buffered.value += 1  # before the put: the learner never retires it first
            self.ledger.running.value -= 1
        if self.control.caps_running:
            self.ledger.wake_workers()  # a worker refused for the running cap may admit now
        samples = group.samples
        self.queue.put(GroupDone(group.gid, self.id, min(group.t_start), group.t_end, [s.tokens for s in samples],
                                 [s.logprobs for s in samples], [s.versions for s in samples],
                                 [s.preemptions for s in samples]))
        self.ledger.groups_done[self.id] += 1


def worker_main(worker_id: int, cfg_data: dict, channel, ledger: Ledger, queue, stop, start, segment: int = 0) -> None:
    """Process entry point. Ctrl-C is the parent's to handle: it sets `stop`, which every wait here checks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code, worker = 0, None
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
        if worker is not None:
            worker.send_step_log()
        queue.close()
        queue.join_thread()  # flush what we sent; the learner keeps reading until we exit
    sys.stdout.flush()
    os._exit(code)
