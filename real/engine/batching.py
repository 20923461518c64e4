"""GRPO groups over a rollout engine: a group's G samples are admitted together and leave together.

`cluster.batching` decides when groups may join (the simulator's two models, sim/engine/worker.py):
- continuous: whenever G slots are free, at the next decode step (vLLM, SGLang);
- static: only when the engine is empty; the batch's groups are handed over together when its last sequence ends
  (one `generate()` call per batch).
A group is complete when all its samples have finished; `step` returns the groups completed (or, static, released)
in that decode step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from real.engine import Finished, RolloutEngine


@dataclass
class Group:
    gid: int
    t_start: float                                     # when the step that prefilled it began
    samples: list[Finished | None]                     # by sample index, None until finished
    t_end: list[float]                                 # per sample, when its last token was sampled


class GroupBatcher:
    def __init__(self, engine: RolloutEngine, group_size: int, static: bool):
        self.engine, self.G, self.static = engine, group_size, static
        self.groups: dict[int, Group] = {}   # admitted, not yet handed over
        self.held: list[Group] = []          # static: completed, waiting for the batch's end

    @property
    def empty(self) -> bool:
        """Nothing admitted that has not been handed over."""
        return not self.groups and not self.held

    def room(self) -> int:
        """Groups that may be admitted now."""
        if self.static and not self.empty:
            return 0
        return self.engine.free_slots() // self.G

    def admit(self, gid: int, prompt: Sequence[int], t: float) -> None:
        """Group `gid`'s G samples of `prompt`; `t`: when the step that will prefill it begins (or about)."""
        G = self.G
        self.engine.admit([gid * G + i for i in range(G)], [prompt] * G)
        self.groups[gid] = Group(gid, t, [None] * G, [0.0] * G)

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
