"""A rollout worker: one SimPy generator around the compiled continuous batch of `kernel.py`.

The worker wakes only at events that matter to others: a group completes (it goes to the buffer), enough
slots free up to admit a group, or, while it is listening, the learner changes something it waits on
(new weights, gate or buffer space). Per-sample work happens inside the kernel.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import simpy

from sim.engine import kernel as K
from sim.engine.control import BLOCKED, DRAIN

if TYPE_CHECKING:
    from sim.engine.pipeline import Simulation

# Why a worker cannot admit a group right now: SLOTS, or the control's BLOCKED / DRAIN.
SLOTS = "slots"        # fewer than group_size free slots, or no KV room for the group: wait for completions


class Worker:
    def __init__(self, sim: "Simulation", worker_id: int):
        self.sim = sim
        self.env = sim.env
        self.worker_id = worker_id
        self.state = sim.worker_state  # every worker's kernel state; this one's is index worker_id
        self.si, self.sf, self.done = (sim.worker_state[i][worker_id] for i in (0, 1, 6))  # this one's rows
        self.listening = False
        self.coming = True  # not started yet, or loading weights: it tries to admit when it comes
        self.fresh: list[int] = []  # groups admitted at the current step boundary, no token generated yet
        self.fresh_step = -1
        # Static batching (`cluster.batching`): a batch is admitted only when the last one has ended, and its
        # groups reach the buffer together at its end, as the real trainer's static batches do.
        self.static = sim.cfg.cluster.batching == "static"
        self.held: list[int] = []  # static: completed groups of the running batch
        self.generating = False
        self.proc = self.env.process(self.run())

    # ------------------------------------------------------------------ helpers
    @property
    def version(self) -> int:
        return int(self.si[K.VER])

    @property
    def n_active(self) -> int:
        """Sequences decoding now."""
        return int(self.si[K.N_ACTIVE])

    @property
    def in_flight(self) -> int:
        """Samples admitted and not complete: decoding, evicted, waiting for a slot or in an environment call."""
        return int(K.in_flight(self.state[0], self.worker_id))

    def poke(self) -> None:
        """Called by the learner when something this worker may be waiting on has changed."""
        if self.listening:
            self.listening = False
            self.proc.interrupt()

    def _until(self, t: float) -> simpy.Timeout:
        """A timeout that ends no earlier than t: now + (t - now) can fall one rounding step short."""
        delay = max(0.0, t - self.env.now)
        if self.env.now + delay < t:
            delay = math.nextafter(delay, math.inf)
        return self.env.timeout(delay)

    def _advance(self, until: float, want_free: int, dry: bool) -> int:
        sim = self.sim
        return K.advance(*self.state, self.worker_id, sim.decode_x, sim.decode_y, sim.response_len, sim.turn_len,
                         sim.turn_tool, sim.turn_env, sim.t_end, sim.v_end, sim.v_mean, sim.n_preempt,
                         sim.prefill_table, until, want_free, dry)

    def _commit(self, until: float, want_free: int) -> None:
        """Advance for real up to `until`, handing every completed group to the buffer."""
        while True:
            flags = self._advance(until, want_free, False)
            if flags & K.GROUPS_DONE:
                self._completed(float(self.sf[K.EVT_T]))
            if flags == 0 or flags & K.SLOTS_FREE:
                return

    def _completed(self, t: float) -> None:
        """Hand the groups the kernel just completed to the buffer (static: once their whole batch has ended)."""
        gids = [int(gid) for gid in self.done[: self.si[K.N_DONE]]]
        if self.in_flight == 0:
            self._set_generating(False)
        if self.static:
            self.held += gids
            if self.in_flight > 0:
                return
            gids, self.held = self.held, []
        for gid in gids:
            self.sim.group_done(gid, t)

    def _set_generating(self, on: bool) -> None:
        """Whether sequences are in this worker's batch, as of now (the kernel's state may already be ahead)."""
        if on != self.generating:
            self.generating = on
            self.sim.activity_changed()

    def _admit(self) -> str:
        """Admit the groups the router sends here; then, if the next group may start on another worker, wake the
        router's choice for it (a worker waiting its turn listens: no one else would wake it)."""
        reason = self._admit_groups()
        chosen = self.sim.route(self, asking_may=False)
        if chosen is not None:
            chosen.poke()
        return reason

    def _admit_groups(self) -> str:
        sim, g = self.sim, self.sim.group_size
        if self.static and self.in_flight > 0:
            return SLOTS  # the running batch goes on to its end
        batch_tokens = 0  # static: prompt tokens prefilled so far in this batch (cluster.group_prefill's copies)
        while True:
            prompt = sim.next_prompt()
            if not K.can_admit(self.state[0], self.worker_id, g, prompt):
                self.si[K.WANT_ROOM] = K.kv_need(self.state[0], self.worker_id, g, prompt)
                return SLOTS
            blocked = sim.admission_block(self)
            if blocked:
                return blocked
            if sim.route(self, asking_may=True) is not self:  # another worker's turn: listen for ours
                return BLOCKED
            gid = sim.next_group()
            sim.world.routed_to = self.worker_id
            if self.fresh_step != self.si[K.K_STEP]:
                self.fresh, self.fresh_step = [], int(self.si[K.K_STEP])
            self.fresh.append(gid)
            prefill = float(sim.g_prefill[gid])
            if self.static:  # one prefill call for the batch: each group adds its share of the call's time
                before, batch_tokens = batch_tokens, batch_tokens + sim.prefill_copies * int(sim.g_prompt[gid])
                prefill = sim.cost.prefill_s(batch_tokens) - (sim.cost.prefill_s(before) if before else 0.0)
            t_start = K.admit(*self.state[:6], self.worker_id, gid, g, sim.response_len, sim.turn_len, prompt,
                              self.env.now, prefill)
            sim.group_admitted(gid, self, t_start)
            self._set_generating(True)

    def _on_new_weights(self) -> None:
        """Interruptible: pause at the next step boundary and continue in-flight sequences with new weights."""
        latest = self.sim.world.latest
        if latest <= self.version:
            return
        if self.n_active == 0 or self.sf[K.T] >= self.env.now:
            K.load_now(*self.state[:2], self.worker_id, latest, self.sim.load_s, self.env.now)
            self.si[K.PAUSE_STEP] = -1
            if self.fresh_step == self.si[K.K_STEP]:
                for gid in self.fresh:
                    self.sim.restamp(gid, latest)
        else:
            self.si[K.PAUSE_STEP] = self.si[K.K_STEP] + 1
            self.si[K.PAUSE_VER] = latest
            self.sf[K.PAUSE_S] = self.sim.load_s

    # ------------------------------------------------------------------ the actor
    def run(self):
        env, sim = self.env, self.sim
        interruptible = sim.interruptible
        while True:
            self.coming = False
            # Drained and due for new weights: load them (the worker is busy meanwhile).
            target = sim.load_target(self) if self.in_flight == 0 else None
            if target is not None:
                K.load_now(*self.state[:2], self.worker_id, target, sim.load_s, env.now)
                self.coming = True
                yield self._until(float(self.sf[K.T]))
                continue
            reason = self._admit()
            want_free = 0 if reason != SLOTS else sim.cfg.cluster.max_concurrency if self.static else sim.admit_slots
            listen = reason == BLOCKED or interruptible
            # Listening, the world may change before the next event: peek, then commit on waking.
            flags = self._advance(math.inf, want_free, listen)
            t_event = float(self.sf[K.EVT_T])
            if not listen and flags & K.GROUPS_DONE:
                yield self._until(t_event)
                self._completed(t_event)
                continue
            if not listen:
                if flags:  # slots freed: admit at that time
                    yield self._until(t_event)
                    continue
                # Batch empty and nothing to wait for but a drain that just finished: loop to load.
                if reason == DRAIN:
                    continue
                raise RuntimeError(f"worker {self.worker_id} has nothing to wait for (reason {reason})")
            self.listening = True
            try:
                yield self._until(t_event) if math.isfinite(t_event) else env.event()
            except simpy.Interrupt:
                self._commit(env.now, 0)
                K.catch_up(*self.state[:4], self.worker_id, sim.decode_x, sim.decode_y, env.now)
                if interruptible:
                    self._on_new_weights()
                continue
            self.listening = False
            self._commit(t_event, want_free)
