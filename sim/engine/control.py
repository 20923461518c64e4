"""The mode and staleness-control rules of a run, one implementation for the simulator and the real trainer.

The rules themselves are the table of named policies in `policies.py` (pure functions of integers, compiled by the
fast engine); `Control` builds a run's parameter array from its config and wraps the rules for Python callers (the
SimPy engine and the real trainer's workers and learner).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.engine import policies as P
from sim.engine.policies import ADMIT, FULL, GATED, MUST_DRAIN, WAIT_VERSION, oldest_unconsumed  # noqa: F401

BLOCKED = "blocked"  # a bound, buffer capacity or the fixed lag: wait for the learner
DRAIN = "drain"      # non-interruptible and newer weights exist: finish in-flight sequences, then load

LAGS = {"sync": 0, "one_step_off": 1}  # fixed_lag: max_staleness; async: none


def block_reason(code: int) -> str | None:
    """What an admission code means to a worker: None (admit), DRAIN or BLOCKED."""
    return None if code == ADMIT else DRAIN if code == MUST_DRAIN else BLOCKED


def params(cfg) -> np.ndarray:
    """The int64 parameter array the rules read (policies.P_*) for `cfg`."""
    pl, B = cfg.pipeline, cfg.workload.batch_prompts
    p = np.full(P.P_LEN, P.NO_LIMIT, np.int64)
    p[P.P_B], p[P.P_S], p[P.P_SYNC_EVERY] = B, pl.max_staleness, 1
    p[P.P_INTERRUPTIBLE] = pl.in_flight_updates
    p[P.P_CAPACITY] = P.NO_LIMIT if pl.queue_capacity is None else pl.queue_capacity
    if pl.mode != "async":
        p[P.P_LAG] = LAGS.get(pl.mode, pl.max_staleness)
        p[P.P_POLICY] = P.NONE
        return p
    spec = P.POLICIES[pl.staleness_control]
    p[P.P_POLICY] = spec.id
    spec.fill(p, pl, pl.knobs(), B)
    return p


@dataclass(frozen=True)
class Control:
    """A run's rules: admission (workers), loading (idle workers), dropping at consumption (learner)."""
    p: np.ndarray            # policies.P_* parameters

    @classmethod
    def from_config(cls, cfg) -> "Control":
        return cls(params(cfg))

    def __hash__(self):  # frozen with an array field: hash by value
        return hash(self.p.tobytes())

    def __eq__(self, other):
        return isinstance(other, Control) and np.array_equal(self.p, other.p)

    @property
    def lag(self) -> int | None:
        """sync: 0, one_step_off: 1, fixed_lag: S (batch j uses version j - lag exactly); async: None."""
        return None if self.p[P.P_LAG] < 0 else int(self.p[P.P_LAG])

    @property
    def interruptible(self) -> bool:
        return bool(self.p[P.P_INTERRUPTIBLE])

    @property
    def gating(self) -> bool:
        """Whether the oldest unconsumed version is read (stalecast's gate)."""
        return self.lag is None and self.p[P.P_POLICY] == P.OLDEST_UNCONSUMED

    @property
    def caps_running(self) -> bool:
        """Whether admission counts groups admitted and not yet generated (a max_concurrent_rollouts-style cap)."""
        return bool(self.p[P.P_MAX_RUNNING] >= 0)

    @property
    def sync_every(self) -> int:
        """Learner steps per published version (verl's trigger_parameter_sync_step; 1 otherwise)."""
        return int(self.p[P.P_SYNC_EVERY])

    def admission_code(self, *, version: int, latest: int, n_admitted: int, live: int, running: int = 0,
                       buffered: int, trained: int = 0, oldest: int, since_sync: int = 0) -> int:
        """policies.admission's answer (ADMIT, FULL, GATED, WAIT_VERSION or MUST_DRAIN)."""
        return P.admission(self.p, version, latest, n_admitted, live, running, buffered, trained, oldest, since_sync)

    def admission_block(self, **counters) -> str | None:
        """None if a worker may admit the next group now, else BLOCKED or DRAIN (counters as admission_code)."""
        return block_reason(self.admission_code(**counters))

    def load_target(self, *, version: int, latest: int, n_admitted: int) -> int | None:
        """The version an idle worker (nothing in flight) should load now, or None."""
        target = P.load_target(self.p, version, latest, n_admitted)
        return None if target < 0 else target

    def drop(self, learner_version: int, version_start: int) -> bool:
        """At consumption: discard a group staler than the policy's drop bound."""
        return bool(P.dropped(self.p, learner_version, version_start))

    @property
    def drops(self) -> bool:
        """Whether generated groups may go untrained (dropped at consumption, or pushed out of a full buffer)."""
        return bool(self.p[P.P_DROP_S] >= 0 or self.p[P.P_EVICT_AT] >= 0)

    @property
    def drop_may_admit(self) -> bool:
        """Whether a dropped group can let a waiting worker admit (the learner then wakes the workers)."""
        return bool(P.drop_may_admit(self.p))

    def evicts(self, buffered: int) -> bool:
        """queue_drop: a completing group pushes the oldest waiting one out of a full buffer."""
        return bool(P.evicts_oldest(self.p, buffered))
