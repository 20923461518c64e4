"""The mode and staleness-control rules, one implementation for the simulator and the real trainer."""

from __future__ import annotations

from dataclasses import dataclass

BLOCKED = "blocked"  # gate, buffer capacity or the sync dispatcher: wait for the learner
DRAIN = "drain"      # non-interruptible and newer weights exist: finish in-flight sequences, then load


@dataclass(frozen=True)
class Control:
    """Staleness control and mode rules shared by workers (admission, loading) and the learner (drop)."""
    batch_prompts: int
    max_staleness: int
    lag: int | None          # sync: 0, one_step_off: 1 (batch j uses version j - lag exactly); async: None
    gating: bool
    dropping: bool
    interruptible: bool
    capacity: int | None

    @classmethod
    def from_config(cls, cfg) -> "Control":
        pl = cfg.pipeline
        is_async = pl.mode == "async"
        return cls(cfg.workload.batch_prompts, pl.max_staleness, {"sync": 0, "one_step_off": 1}.get(pl.mode),
                   is_async and pl.staleness_control in ("gating", "both"),
                   is_async and pl.staleness_control in ("drop", "both"), pl.interruptible, pl.queue_capacity)

    def required_version(self, n_admitted: int) -> int:
        """sync / one_step_off: the version the next group (id n_admitted) must be generated with."""
        return max(n_admitted // self.batch_prompts - self.lag, 0)

    def admission_block(self, *, version: int, latest: int, n_admitted: int, live: int, buffered: int,
                        oldest: int) -> str | None:
        """None if a worker at `version` may admit the next group now, else BLOCKED or DRAIN.
        live = admitted - dropped groups; buffered = completed groups not yet consumed or dropped;
        oldest = oldest_unconsumed(...)."""
        if self.capacity is not None and buffered >= self.capacity:
            return BLOCKED
        if self.lag is not None:
            required = self.required_version(n_admitted)
            if version == required:
                return None
            return DRAIN if latest >= required else BLOCKED
        if not self.interruptible and latest > version:
            return DRAIN
        if self.gating:
            # The oldest unconsumed group's version (not the learner's) keeps the bound even when groups
            # finish out of order: while a group of version v is outstanding at most (S+v+1)*B groups exist.
            v_ref = min(version, oldest)
            if live >= (self.max_staleness + v_ref + 1) * self.batch_prompts:
                return BLOCKED
        return None

    def load_target(self, *, version: int, latest: int, n_admitted: int) -> int | None:
        """The version an idle worker (nothing in flight) should load now, or None."""
        if self.lag is not None:
            required = self.required_version(n_admitted)
            return required if version < required <= latest else None
        return latest if latest > version else None

    def drop(self, learner_version: int, version_start: int) -> bool:
        """At consumption: discard a group staler than the bound (drop / both)."""
        return self.dropping and learner_version - version_start > self.max_staleness
