"""Memory a run needs, checked against what the machine has before anything large is allocated.

The simulator's ledger and the real trainer's shared memory are sized from the config (run.steps, the batch, the
workers' slots, the model). A slip such as `run.steps: 1e12` would otherwise ask the system for petabytes and fail
later with a MemoryError, or swap. The estimates count the arrays that grow with the config (bytes per sample,
group, learner step, decode slot or parameter), not the interpreter and its libraries, which are already loaded
when a check runs. A refusal is a ConfigError naming the field that drives the size.
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim.config import ConfigError, RunConfig
from sim.trace import SAMPLE_COLUMNS

# A GroupStream caches every block it draws, int64: a prompt length and a token total per group, a response length
# per sample (sim/workload.py, GroupStream.block).
WORKLOAD_BYTES_PER_GROUP, WORKLOAD_BYTES_PER_SAMPLE = 16, 8
ENGINE_BYTES_PER_GROUP = 8          # the compiled loop's buffer queue: one int64 group id (sim/engine/fast.py)
ENGINE_BYTES_PER_SLOT = 22 * 8      # a worker's kernel state per decode slot (sim/engine/kernel.py, new_state)
# A multi-turn workload's stream also caches, per sample and turn, a length, tool tokens (int64) and seconds.
WORKLOAD_BYTES_PER_TURN = 24
ENGINE_BYTES_PER_WORKER = 2 * 1024 * 8  # a worker's completion calendar (at most 1024 buckets of two int64)
# A learner step: the loop's step arrays (56 B), the Simulation's list of step tuples (~330 B), the steps table.
BYTES_PER_STEP = 512
# What compute_metrics, staleness_histogram and the staleness figure allocate while they run, at their peak: an
# int64 staleness and an int32 column of the consumed samples (13-14 bytes a sample measured at 41 M samples).
METRICS_BYTES_PER_SAMPLE = 16

SHM = Path("/dev/shm")
WEIGHT_SLOTS = 3  # real/weights.py: SharedMemoryChannel's n_slots
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:,.0f} EiB"


def available_memory() -> int:
    """Bytes a new allocation can get without swapping: MemAvailable from /proc/meminfo (Linux), else the free
    physical pages (os.sysconf)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def shm_free(path: str | Path = SHM) -> int:
    """Free bytes of the shared-memory file system (where torch's shared tensors and multiprocessing's shared arrays
    live)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def release_freed_memory() -> None:
    """Free what is unreachable and hand freed memory back to the system. Objects in reference cycles (a Simulation
    and its workers) wait for the cyclic collector; and glibc keeps freed heap pages (such as a workload stream's
    half-megabyte blocks, 144 bytes a group) in the process, where no large array can reuse them, until
    malloc_trim returns them."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def ledger_groups(cfg: RunConfig) -> int:
    """Groups a run usually admits: those the learner consumes, those of the versions the staleness bound keeps in
    flight or waiting, and a full batch on every worker. The simulator's ledger starts with room for this many."""
    wl, cl = cfg.workload, cfg.cluster
    return ((cfg.run.steps + cfg.pipeline.max_staleness + 2) * wl.batch_prompts
            + cl.rollout_workers * (cl.max_concurrency // wl.group_size))


@dataclass(frozen=True)
class SimulationFootprint:
    """Bytes a simulation of cfg needs: its ledger, its workload stream, its engine state, the trace columns it
    holds in memory and the metrics' working memory."""
    groups: int
    samples: int
    group_bytes: int   # per group: ledger, workload stream, buffer queue
    sample_bytes: int  # per sample: ledger, workload stream, held trace columns, metrics' working memory
    step_bytes: int
    slot_bytes: int    # the workers' decode slots and calendars

    @property
    def total(self) -> int:
        return self.groups * self.group_bytes + self.samples * self.sample_bytes + self.step_bytes + self.slot_bytes


def simulation_footprint(cfg: RunConfig, trace_columns: Iterable[str] = SAMPLE_COLUMNS) -> SimulationFootprint:
    """The memory a Simulation of cfg needs, with the trace holding `trace_columns` in memory (per-sample ledger
    columns are views: they cost nothing more)."""
    from sim.engine.pipeline import LEDGER, PER_SAMPLE_COLUMNS, TURN_LEDGER

    g, cl = cfg.workload.group_size, cfg.cluster
    groups = ledger_groups(cfg)
    ledger_group = sum(np.dtype(dtype).itemsize for _, dtype, per_sample, _ in LEDGER if not per_sample)
    ledger_sample = sum(np.dtype(dtype).itemsize for _, dtype, per_sample, _ in LEDGER if per_sample)
    if cfg.workload.n_turns > 1:
        ledger_sample += cfg.workload.n_turns * (sum(np.dtype(dtype).itemsize for _, dtype in TURN_LEDGER)
                                                 + WORKLOAD_BYTES_PER_TURN)
    held = sum(np.dtype(SAMPLE_COLUMNS[c]).itemsize for c in set(trace_columns) if c not in PER_SAMPLE_COLUMNS)
    return SimulationFootprint(
        groups=groups, samples=groups * g,
        group_bytes=ledger_group + WORKLOAD_BYTES_PER_GROUP + ENGINE_BYTES_PER_GROUP,
        sample_bytes=ledger_sample + WORKLOAD_BYTES_PER_SAMPLE + held + METRICS_BYTES_PER_SAMPLE,
        step_bytes=cfg.run.steps * BYTES_PER_STEP,
        slot_bytes=cl.rollout_workers * (cl.max_concurrency * ENGINE_BYTES_PER_SLOT + ENGINE_BYTES_PER_WORKER))


def check_simulation_memory(cfg: RunConfig, trace_columns: Iterable[str] = SAMPLE_COLUMNS,
                            available: int | None = None) -> SimulationFootprint:
    """The footprint of a simulation of cfg; a ConfigError naming the field that drives it if it exceeds the
    memory available (default: `available_memory()`)."""
    need = simulation_footprint(cfg, trace_columns)
    available = available_memory() if available is None else available
    if need.total <= available:
        return need
    wl, cl, pl = cfg.workload, cfg.cluster, cfg.pipeline
    B, g = wl.batch_prompts, wl.group_size
    per_step = B * (need.group_bytes + g * need.sample_bytes) + BYTES_PER_STEP
    fixed = need.total - cfg.run.steps * per_step  # what a run of no learner steps would still need
    have = f"this machine has {format_bytes(available)} available"
    if fixed + per_step <= available:
        fit = (available - fixed) // per_step
        raise ConfigError(
            f"run.steps: {cfg.run.steps} learner steps x {B} prompts x {g} samples would need about "
            f"{format_bytes(need.total)} for the simulation (ledger, workload, trace); {have}, enough for about "
            f"{fit:,} steps (lower run.steps: the staleness distribution settles within a few hundred)")
    # Even one learner step does not fit: the batches the staleness bound keeps in flight, or the workers' slots.
    batches = (pl.max_staleness + 2) * B * g
    slots = cl.rollout_workers * cl.max_concurrency
    if batches >= slots:
        field, _ = max((("workload.batch_prompts", B), ("workload.group_size", g),
                        ("pipeline.max_staleness", pl.max_staleness)), key=lambda item: item[1])
        what = (f"{B} prompts x {g} samples per learner step, pipeline.max_staleness {pl.max_staleness} "
                f"(steps in flight besides the learner's)")
    else:
        field, _ = max((("cluster.rollout_workers", cl.rollout_workers),
                        ("cluster.max_concurrency", cl.max_concurrency)), key=lambda item: item[1])
        what = f"{cl.rollout_workers} rollout workers x {cl.max_concurrency} sequences in flight"
    raise ConfigError(f"{field}: {what} would need about {format_bytes(fixed + per_step)} for the simulation even "
                      f"for one learner step; {have} (lower {field})")


@dataclass(frozen=True)
class SharedMemoryFootprint:
    """Bytes the real trainer puts in shared memory: the weight slots and the ledger's per-version counters."""
    weights: int
    ledger: int

    @property
    def total(self) -> int:
        return self.weights + self.ledger


def shared_memory_footprint(cfg: RunConfig, n_params: int, n_slots: int = WEIGHT_SLOTS) -> SharedMemoryFootprint:
    """Shared memory of `stalecast train` on cfg with a policy of n_params parameters: n_slots flat copies of the
    weights (real/weights.py SharedMemoryChannel) and the Ledger's int64 arrays (real/worker.py: `unconsumed`, a ring
    of max_staleness + 2 versions, and four per worker)."""
    weights = n_slots * n_params * DTYPE_BYTES[cfg.real.dtype]
    ledger = 8 * (cfg.pipeline.max_staleness + 2 + 4 * cfg.cluster.rollout_workers)
    return SharedMemoryFootprint(weights, ledger)


def check_shared_memory(cfg: RunConfig, n_params: int, n_slots: int = WEIGHT_SLOTS,
                        shm: str | Path = SHM) -> SharedMemoryFootprint:
    """Refuse, with a ConfigError naming the field, a training run whose shared memory exceeds the free space of
    `shm`; returns the footprint.

    Call it in `stalecast train` before anything goes to shared memory: in real/trainer.py, after `build_policy`
    and before `SharedMemoryChannel(model, ctx)` and `self._ledger(ctx, start)`, with
    n_params = sum(p.numel() for p in model.parameters()) (what SharedMemoryChannel copies; tied weights once)."""
    need = shared_memory_footprint(cfg, n_params, n_slots)
    free = shm_free(shm)
    if need.total <= free:
        return need
    # The ledger is a few hundred bytes whatever the run's length: the weights are what does not fit.
    raise ConfigError(
        f"real.model: {n_slots} weight slots of {n_params:,} {cfg.real.dtype} parameters would need "
        f"{format_bytes(need.total)} of shared memory; {shm} has {format_bytes(free)} free (a smaller real.model, "
        f"real.dtype bfloat16, or a larger {shm}: docker run --shm-size)")
