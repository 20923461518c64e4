"""Weight publication: the learner publishes its parameters with a version number, rollout workers load them.

`WeightChannel` is the contract; `SharedMemoryChannel` implements it for processes on one host (CPU, or
GPU processes that stage weights through host memory). A GPU-native channel (CUDA IPC handles, NCCL
broadcast) can implement the same three methods and drop in.

Layout: `n_slots` flat tensors in shared memory, version v goes to slot v % n_slots, each slot guarded by
its own lock and tagged with the version it holds. A reader copies under the slot's lock, so it never
sees a torn copy; the writer of version v+1 only waits for readers of the slot it overwrites. Several
slots matter in sync / one_step_off modes: a worker may need version `latest - 1` exactly (batch j is
generated with version j - 1) after the learner has already published `latest`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Protocol

import torch


class WeightChannel(Protocol):
    def publish(self, model: torch.nn.Module, version: int) -> float:
        """Make `model`'s parameters available as `version`; returns the seconds it took."""

    def latest_version(self) -> int:
        """The newest published version (-1 before the first publish)."""

    def load_into(self, model: torch.nn.Module, version: int | None = None) -> tuple[int, float]:
        """Copy `version` (default: the latest) into `model` in place; returns (version, seconds)."""


class StaleVersionError(RuntimeError):
    """The wanted version was already overwritten: the pipeline asked for weights older than it keeps."""


LOCK_TIMEOUT_S = 30.0  # a copy takes milliseconds; longer means a process died holding the slot


@contextmanager
def _holding(lock, what: str):
    if not lock.acquire(timeout=LOCK_TIMEOUT_S):
        raise TimeoutError(f"weight slot lock not free after {LOCK_TIMEOUT_S:.0f} s ({what}): "
                           f"a process died while copying weights?")
    try:
        yield
    finally:
        lock.release()


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    # parameters() yields tied weights once and in a fixed order: the same layout in every process.
    return [p for p in model.parameters()]


class SharedMemoryChannel:
    """Flat parameter copies in shared memory; picklable, so it travels to spawned processes."""

    def __init__(self, model: torch.nn.Module, ctx, n_slots: int = 3):
        params = _params(model)
        dtype = params[0].dtype
        if any(p.dtype != dtype for p in params):
            raise ValueError("SharedMemoryChannel needs every parameter in one dtype")
        numel = sum(p.numel() for p in params)
        self.slots = [torch.zeros(numel, dtype=dtype).share_memory_() for _ in range(n_slots)]  # [numel] each
        self.tags = ctx.Array("q", [-1] * n_slots, lock=False)  # version held by each slot, -1 = empty
        self.locks = [ctx.Lock() for _ in range(n_slots)]
        self._latest = ctx.Value("q", -1)

    def publish(self, model: torch.nn.Module, version: int) -> float:
        def fill(slot: torch.Tensor) -> None:
            off = 0
            for p in _params(model):
                n = p.numel()
                slot[off:off + n].copy_(p.detach().reshape(-1))  # device -> host on GPU
                off += n
        return self._publish(fill, version)

    def publish_flat(self, flat: torch.Tensor, version: int) -> float:
        """Publish weights saved with `snapshot` (a resumed run's older versions)."""
        return self._publish(lambda slot: slot.copy_(flat), version)

    def _publish(self, fill, version: int) -> float:
        t0 = time.perf_counter()
        k = version % len(self.slots)
        with _holding(self.locks[k], f"publish version {version}"):
            self.tags[k] = -1  # a reader that races us sees "not here" rather than half of two versions
            with torch.no_grad():
                fill(self.slots[k])
            self.tags[k] = version
        with self._latest.get_lock():
            self._latest.value = max(self._latest.value, version)
        return time.perf_counter() - t0

    def snapshot(self, version: int) -> torch.Tensor:
        """A copy of the flat weights of `version`, which must still be published."""
        k = version % len(self.slots)
        with _holding(self.locks[k], f"copy version {version}"):
            if self.tags[k] != version:
                raise StaleVersionError(f"weights of version {version} are no longer published "
                                        f"(slot holds {self.tags[k]})")
            return self.slots[k].clone()

    def latest_version(self) -> int:
        return int(self._latest.value)

    def load_into(self, model: torch.nn.Module, version: int | None = None) -> tuple[int, float]:
        t0 = time.perf_counter()
        want_latest = version is None
        while True:
            version = self.latest_version() if want_latest else version
            if version < 0:
                raise RuntimeError("no weights published yet")
            k = version % len(self.slots)
            with _holding(self.locks[k], f"load version {version}"):
                if self.tags[k] == version:
                    self._copy_out(k, model)
                    return version, time.perf_counter() - t0
            # Overwritten while we waited. For "the latest" that only means newer weights exist: try again.
            if not want_latest:
                raise StaleVersionError(f"weights of version {version} are no longer published "
                                        f"(slot holds {self.tags[k]}, latest is {self.latest_version()})")

    def _copy_out(self, k: int, model: torch.nn.Module) -> None:
        off = 0
        with torch.no_grad():
            for p in _params(model):
                n = p.numel()
                p.copy_(self.slots[k][off:off + n].view_as(p))  # host -> device on GPU
                off += n
