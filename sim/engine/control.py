"""The mode and staleness-control rules, one implementation for the simulator and the real trainer.

The rules are plain functions of integers (`admission_rule`, `load_rule`, `drop_rule`, `oldest_unconsumed`) so
that the compiled engine (`fast.py`) compiles these very functions; `Control` wraps them for Python callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

BLOCKED = "blocked"  # gate, buffer capacity or the sync dispatcher: wait for the learner
DRAIN = "drain"      # non-interruptible and newer weights exist: finish in-flight sequences, then load

# admission_rule's answers. FULL, GATED and WAIT_VERSION are all BLOCKED; GATED alone is the staleness bound.
ADMIT, FULL, GATED, WAIT_VERSION, MUST_DRAIN = range(5)


def admission_rule(batch_prompts, max_staleness, lag, gating, interruptible, capacity,
                   version, latest, n_admitted, live, buffered, oldest):
    """ADMIT if a worker at `version` may admit the next group (id n_admitted) now, else why not.
    lag: -1 in async mode; capacity: -1 for none; see Control.admission_block for the counters."""
    if capacity >= 0 and buffered >= capacity:
        return FULL
    if lag >= 0:
        required = max(n_admitted // batch_prompts - lag, 0)  # batch j is generated with version j - lag
        if version == required:
            return ADMIT
        return MUST_DRAIN if latest >= required else WAIT_VERSION
    if not interruptible and latest > version:
        return MUST_DRAIN
    # The oldest unconsumed group's version (not the learner's) keeps the bound even when groups finish
    # out of order: while a group of version v is outstanding at most (S+v+1)*B groups exist.
    if gating and live >= (max_staleness + min(version, oldest) + 1) * batch_prompts:
        return GATED
    return ADMIT


def load_rule(batch_prompts, lag, version, latest, n_admitted):
    """The version an idle worker (nothing in flight) should load now, or -1."""
    if lag >= 0:
        required = max(n_admitted // batch_prompts - lag, 0)
        return required if version < required <= latest else -1
    return latest if latest > version else -1


def drop_rule(dropping, max_staleness, learner_version, version_start):
    """At consumption: discard a group staler than the bound (drop / both)."""
    return dropping and learner_version - version_start > max_staleness


def oldest_unconsumed(unconsumed, start, latest):
    """Lowest version >= start (a version known to have none below it) and < latest with an admitted, not yet
    consumed or dropped group; `latest` if none."""
    v = start
    while v < latest and unconsumed[v] == 0:
        v += 1
    return v


@dataclass(frozen=True)
class Control:
    """Staleness control and mode rules shared by workers (admission, loading) and the learner (drop)."""
    batch_prompts: int
    max_staleness: int
    lag: int | None          # sync: 0, one_step_off: 1, fixed_lag: S (batch j uses version j - lag exactly); async: None
    gating: bool
    dropping: bool
    interruptible: bool
    capacity: int | None

    @classmethod
    def from_config(cls, cfg) -> "Control":
        pl = cfg.pipeline
        is_async = pl.mode == "async"
        lag = {"sync": 0, "one_step_off": 1, "fixed_lag": pl.max_staleness}.get(pl.mode)
        return cls(cfg.workload.batch_prompts, pl.max_staleness, lag,
                   is_async and pl.staleness_control in ("gating", "both"),
                   is_async and pl.staleness_control in ("drop", "both"), pl.interruptible, pl.queue_capacity)

    @cached_property
    def rule_args(self) -> tuple:
        """The leading arguments of admission_rule for this control (None -> -1)."""
        return (self.batch_prompts, self.max_staleness, -1 if self.lag is None else self.lag, self.gating,
                self.interruptible, -1 if self.capacity is None else self.capacity)

    def admission_code(self, *, version: int, latest: int, n_admitted: int, live: int, buffered: int,
                       oldest: int) -> int:
        """admission_rule's answer (ADMIT, FULL, GATED, WAIT_VERSION or MUST_DRAIN)."""
        return admission_rule(*self.rule_args, version, latest, n_admitted, live, buffered, oldest)

    def admission_block(self, *, version: int, latest: int, n_admitted: int, live: int, buffered: int,
                        oldest: int) -> str | None:
        """None if a worker at `version` may admit the next group now, else BLOCKED or DRAIN.
        live = admitted - dropped groups; buffered = completed groups not yet consumed or dropped;
        oldest = oldest_unconsumed(...)."""
        code = self.admission_code(version=version, latest=latest, n_admitted=n_admitted, live=live,
                                   buffered=buffered, oldest=oldest)
        return None if code == ADMIT else DRAIN if code == MUST_DRAIN else BLOCKED

    def load_target(self, *, version: int, latest: int, n_admitted: int) -> int | None:
        """The version an idle worker (nothing in flight) should load now, or None."""
        lag = -1 if self.lag is None else self.lag
        target = load_rule(self.batch_prompts, lag, version, latest, n_admitted)
        return None if target < 0 else target

    def drop(self, learner_version: int, version_start: int) -> bool:
        """At consumption: discard a group staler than the bound (drop / both)."""
        return drop_rule(self.dropping, self.max_staleness, learner_version, version_start)
