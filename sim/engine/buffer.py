"""The buffer between rollout workers and the learner, shared by the simulator and the real trainer."""

from __future__ import annotations

import heapq
from collections import deque


class Buffer:
    """Completed groups waiting for the learner: fifo, freshest (highest version_start first), or by batch
    (sync / one_step_off: step j takes exactly the groups admitted as batch j), as the simulator's."""

    def __init__(self, order: str, batch_prompts: int | None = None):
        self.order = "batch" if batch_prompts else order
        self.batch_prompts = batch_prompts
        self._fifo: deque[int] = deque()
        self._heap: list[tuple[int, int]] = []
        self._batches: dict[int, list[int]] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def put(self, gid: int, version_start: int) -> None:
        self._len += 1
        if self.order == "freshest":
            heapq.heappush(self._heap, (-version_start, gid))
        elif self.order == "batch":
            self._batches.setdefault(gid // self.batch_prompts, []).append(gid)
        else:
            self._fifo.append(gid)

    def pop(self, step: int) -> int | None:
        if self.order == "freshest":
            gid = heapq.heappop(self._heap)[1] if self._heap else None
        elif self.order == "batch":
            waiting = self._batches.get(step)
            gid = waiting.pop() if waiting else None
        else:
            gid = self._fifo.popleft() if self._fifo else None
        self._len -= gid is not None
        return gid

    def gids(self) -> list[int]:
        return [*self._fifo, *(g for _, g in self._heap), *(g for b in self._batches.values() for g in b)]
