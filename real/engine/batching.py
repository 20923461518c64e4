"""GRPO groups over a rollout engine: a group's G samples are admitted together and handed over together.

`cluster.batching` decides when groups may join (the simulator's two models, sim/engine/worker.py):
- continuous: at the next decode step, into slots freed by the last one (vLLM, SGLang);
- static: only when the engine is empty; the batch's groups are handed over together when its last sequence ends
  (one `generate()` call per batch).
`cluster.admission` decides how many free slots a group needs (continuous batching only):
- per_group: G; the group's samples all start at the same step;
- per_sample: one; as many of its samples start as there are free slots (and, under a KV budget, KV room), and the
  rest wait and start one per freed slot at later steps, before any new group (the simulator's kernel,
  sim/engine/kernel.py `admit` and `advance`; vLLM V1 fans a request of n samples out into n requests its
  scheduler admits one by one).
A group is complete when all its samples have finished; `step` returns the groups completed (or, static, released)
in that decode step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from real.engine import Finished, RolloutEngine


@dataclass
class Group:
    gid: int
    prompt: Sequence[int]
    t_start: list[float]                               # per sample, when the step that prefilled it began (NaN:
                                                       # waiting for a slot)
    samples: list[Finished | None]                     # by sample index, None until finished
    t_end: list[float]                                 # per sample, when its last token was sampled


class GroupBatcher:
    def __init__(self, engine: RolloutEngine, group_size: int, static: bool, per_sample: bool = False):
        if static and per_sample:
            raise ValueError("admission per_sample needs continuous batching: a static batch is admitted whole")
        self.engine, self.G, self.static, self.per_sample = engine, group_size, static, per_sample
        # a KV-budgeted engine (real/engine/kv.py) says whether sequences fit its budget; others always have room
        self.fits = getattr(engine, "fits", None)
        self.groups: dict[int, Group] = {}   # admitted, not yet handed over
        self.held: list[Group] = []          # static: completed, waiting for the batch's end
        self.waiting: list[int] = []         # per_sample: sample ids admitted without a slot yet, in order

    @property
    def empty(self) -> bool:
        """Nothing admitted that has not been handed over."""
        return not self.groups and not self.held

    def room(self) -> int:
        """Groups that may be admitted now: per_sample, one per G free slots and one more for any left over, and
        none while a group's samples wait for slots."""
        if self.static and not self.empty:
            return 0
        free = self.engine.free_slots()
        if self.per_sample:
            return 0 if self.waiting else math.ceil(free / self.G)
        return free // self.G

    def starts(self, prompt_lens: Sequence[int]) -> list[int]:
        """per_sample: how many samples of each of these groups (prompt lengths), admitted one after another now,
        would start at once: one per free slot while the KV budget takes one more sequence; none after a group
        whose samples wait. A first entry of 0: the first group cannot be admitted now."""
        free, started, out = self.engine.free_slots(), [], []
        for length in prompt_lens:
            k = 0
            while k < self.G and free > 0 and (self.fits is None or self.fits(1, [*started, length])):
                started.append(length)
                free, k = free - 1, k + 1
            out.append(k)
            if k < self.G:
                break
        return out

    def admit(self, gid: int, prompt: Sequence[int], t: float) -> None:
        """Group `gid` of G samples of `prompt`, ids gid * G + i; `t`: when the step that will prefill it begins (or
        about). per_sample: the samples that find no free slot or KV room wait (`start_waiting`)."""
        G = self.G
        self.groups[gid] = Group(gid, prompt, [math.nan] * G, [None] * G, [0.0] * G)
        ids = [gid * G + i for i in range(G)]
        now = self.starts([len(prompt)])[0] if self.per_sample else G
        self.waiting += ids[now:]
        self._start(ids[:now], t)

    def start_waiting(self, t: float) -> None:
        """Start waiting samples (per_sample, all of one group) in the slots free now while KV room lasts, in
        admission order; `t` as for `admit`."""
        if not self.waiting:
            return
        prompt = self.groups[self.waiting[0] // self.G].prompt
        n = min(len(self.waiting), self.starts([len(prompt)])[0])
        if n:
            ids, self.waiting = self.waiting[:n], self.waiting[n:]
            self._start(ids, t)

    def _start(self, seq_ids: list[int], t: float) -> None:
        if not seq_ids:
            return
        G = self.G
        self.engine.admit(seq_ids, [self.groups[sid // G].prompt for sid in seq_ids])
        for sid in seq_ids:
            self.groups[sid // G].t_start[sid % G] = t

    def step(self, t_now) -> list[Group]:
        """One decode step of the engine; `t_now()` is read once the step's tokens are on the host."""
        finished = self.engine.step()
        if not finished:
            return []
        t, G, completed = t_now(), self.G, []
        for f in finished:
            group = self.groups[f.seq_id // G]
            group.samples[f.seq_id % G], group.t_end[f.seq_id % G] = f, t
            if all(s is not None for s in group.samples):
                completed.append(self.groups.pop(group.gid))
        if not self.static:
            return completed
        self.held += completed
        if self.groups:
            return []
        released, self.held = self.held, []
        return released
