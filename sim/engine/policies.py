"""Staleness control as a table of named policies: how each system the project models decides when a rollout
worker may admit a new group, which groups the learner drops when it takes them, and when workers load new weights.

Every rule is a pure function of integers, so that the compiled engine (fast.py) compiles these very functions, the
SimPy engine (pipeline.py) calls them, and the real trainer's workers (real/worker.py) call them through `Control`.
A rule reads the counters of `sim.engine.state` and the run's parameters `p` (an int64 array, indices P_* below; the
float knobs are turned into integer group counts when the parameters are built, `Control.params`).

The table (`POLICIES`): each policy with its knobs (the names its system uses, its defaults), the guarantee it gives
and where its semantics come from (docs/policies-sources.md has the details, file by file). To add a policy: a
`_admit_NAME` rule (and a drop rule if it drops), its id and a branch in `admission` / `dropped`, an entry in
`POLICIES` with the function that turns its knobs into the rules' parameters, its knob section in `sim.config`
(`POLICY_KNOBS`), and its tests (tests/test_policies.py, tests/conftest.py: async_pipelines).

Counters (B = batch_prompts, groups per learner step; v = a version):
  version     the admitting worker's weights        latest      the newest published version
  n_admitted  group ids handed out so far            live        admitted and not dropped ("accepted + running")
  running     admitted, not yet generated            buffered    generated, waiting in the buffer
  trained     trained on by a finished learner step, or dropped
  oldest      the oldest version with a group admitted and not taken (under the gate's bound)
  since_sync  groups admitted since the last weight sync (verl), as verl resets it: the groups outstanding then
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sim.engine.kernel import njit

rule = njit(cache=True, _nrt=False)  # compiled (fast.py calls them in its loop; Python callers too), no allocation

# admission's answers. FULL, GATED and WAIT_VERSION all block; GATED alone is a staleness bound.
ADMIT, FULL, GATED, WAIT_VERSION, MUST_DRAIN = range(5)

# Policy ids (p[P_POLICY])
OLDEST_UNCONSUMED, AREAL, VERL_FULLY_ASYNC, PRIME_RL, TINKER, DROP, QUEUE_DROP, NONE = range(8)

# Parameters (int64 array p)
(P_POLICY, P_B, P_S, P_LAG, P_INTERRUPTIBLE, P_CAPACITY, P_DROP_S, P_MAX_RUNNING, P_MAX_OUTSTANDING,
 P_SYNC_EVERY, P_EVICT_AT) = range(11)
P_LEN = 11
NO_LIMIT = -1


# --------------------------------------------------------------------------- admission rules, one per policy
@rule
def _admit_oldest_unconsumed(p, version, latest, live, oldest):
    """stalecast's gate: live < (S + v + 1)·B with v the oldest unconsumed group's version (or the worker's, if
    older). While a group of version v is outstanding at most (S+v+1)·B groups exist, so the learner cannot pass
    version v + S without it: no consumed group is staler than S, even when groups finish out of order."""
    return GATED if live >= (p[P_S] + min(version, oldest) + 1) * p[P_B] else ADMIT


@rule
def _admit_areal(p, latest, live, running):
    """AReaL's StalenessManager.get_capacity (areal/infra/staleness_manager.py): a group may start while
    accepted + running < (max_head_offpolicyness + v + 1)·consumer_batch_size, v the learner's newest version, and
    running < max_concurrent_rollouts. A group that finishes late (a long response) is consumed when the learner
    has moved on: its staleness is not bounded by max_head_offpolicyness."""
    if p[P_MAX_RUNNING] >= 0 and running >= p[P_MAX_RUNNING]:
        return FULL
    return GATED if live >= (p[P_S] + latest + 1) * p[P_B] else ADMIT


@rule
def _admit_verl(p, since_sync, buffered):
    """verl fully-async's rollouter (verl/experimental/fully_async_policy/fully_async_rollouter.py): it generates
    while staleness_samples < M and its queue holds fewer than M, M = ppo_mini_batch_size x require_batches x
    (1 + staleness_threshold) x trigger_parameter_sync_step groups (p[P_MAX_OUTSTANDING]); staleness_samples counts
    the groups admitted since the last weight sync, reset at each sync to the groups then outstanding."""
    if buffered >= p[P_MAX_OUTSTANDING]:
        return FULL
    return GATED if since_sync >= p[P_MAX_OUTSTANDING] else ADMIT


@rule
def _admit_prime_rl(p, live, latest, running):
    """prime-rl's orchestrator (src/prime_rl/orchestrator/scheduler.py): the batch it collects may be at most
    max_async_level ahead of the trainer's newest checkpoint; a sample it drops as too stale
    (max_off_policy_steps) is replaced within the same batch, so the batch index counts the groups not dropped
    (live // B). And at most max_inflight groups generate at once (p[P_MAX_RUNNING], -1 = no cap)."""
    if p[P_MAX_RUNNING] >= 0 and running >= p[P_MAX_RUNNING]:
        return FULL
    return GATED if live // p[P_B] - latest > p[P_S] else ADMIT


@rule
def _admit_tinker(p, n_admitted, trained):
    """Tinker cookbook's async RL (sampling_steps_ahead K): at most groups_per_step x (K + 1) groups started and
    not yet trained (generating, waiting, or in the batch being trained): K = 0 is synchronous."""
    return GATED if n_admitted - trained >= p[P_MAX_OUTSTANDING] else ADMIT


@rule
def _admit_drop(p, running):
    """TRL async GRPO (trl/experimental/async_grpo/async_grpo_trainer.py): no version gate; at most
    max_inflight_tasks generations in flight (auto: max_staleness x the groups of a step), and groups staler than
    max_staleness are dropped when the learner takes them (`dropped`)."""
    return FULL if p[P_MAX_RUNNING] >= 0 and running >= p[P_MAX_RUNNING] else ADMIT


@rule
def admission(p, version, latest, n_admitted, live, running, buffered, trained, oldest, since_sync):
    """ADMIT if a worker at `version` may admit the next group (id n_admitted) now, else why not."""
    if p[P_CAPACITY] >= 0 and buffered >= p[P_CAPACITY]:
        return FULL
    lag = p[P_LAG]
    if lag >= 0:  # sync, one_step_off, fixed_lag: batch j is generated with version j - lag, exactly
        required = max(n_admitted // p[P_B] - lag, 0)
        if version == required:
            return ADMIT
        return MUST_DRAIN if latest >= required else WAIT_VERSION
    if not p[P_INTERRUPTIBLE] and latest > version:
        return MUST_DRAIN
    policy = p[P_POLICY]
    if policy == OLDEST_UNCONSUMED:
        return _admit_oldest_unconsumed(p, version, latest, live, oldest)
    if policy == AREAL:
        return _admit_areal(p, latest, live, running)
    if policy == VERL_FULLY_ASYNC:
        return _admit_verl(p, since_sync, buffered)
    if policy == PRIME_RL:
        return _admit_prime_rl(p, live, latest, running)
    if policy == TINKER:
        return _admit_tinker(p, n_admitted, trained)
    if policy == DROP:
        return _admit_drop(p, running)
    return ADMIT  # QUEUE_DROP and NONE admit whenever a worker has room


# --------------------------------------------------------------------------- consumption and weights
@rule
def dropped(p, learner_version, version_start):
    """At consumption: discard a group staler than the policy's drop bound (p[P_DROP_S], -1 = never)."""
    return p[P_DROP_S] >= 0 and learner_version - version_start > p[P_DROP_S]


@rule
def drop_may_admit(p):
    """Whether a group the learner drops can turn a worker's answer to ADMIT, so that the workers must be woken: it
    frees buffer room (a capacity), and it leaves `live`, moves `oldest` and counts as `trained`, which the gates
    of oldest_unconsumed, areal, prime_rl and tinker read. The rules of drop, queue_drop and none, and the fixed
    schedules of the lag modes, read none of these: waking every worker at each drop would change nothing."""
    if p[P_CAPACITY] >= 0:
        return True
    policy = p[P_POLICY]
    return p[P_LAG] < 0 and policy != DROP and policy != QUEUE_DROP and policy != NONE


@rule
def load_target(p, version, latest, n_admitted):
    """The version an idle worker (nothing in flight) should load now, or -1."""
    lag = p[P_LAG]
    if lag >= 0:
        required = max(n_admitted // p[P_B] - lag, 0)
        return required if version < required <= latest else -1
    return latest if latest > version else -1


def oldest_unconsumed(unconsumed, start, latest):
    """Lowest version >= start (a version known to have none below it) and < latest with an admitted, not yet
    consumed or dropped group; `latest` if none. Plain Python: its callers pass a list, a shared-memory ring or (the
    compiled engine, which compiles it itself) an array."""
    v = start
    while v < latest and unconsumed[v] == 0:
        v += 1
    return v


@rule
def evicts_oldest(p, buffered):
    """queue_drop: a group completing into a buffer holding p[P_EVICT_AT] pushes the oldest waiting one out (it
    is dropped)."""
    return p[P_EVICT_AT] >= 0 and buffered >= p[P_EVICT_AT]


# --------------------------------------------------------------------------- the table
def _limit(value) -> int:
    return NO_LIMIT if value is None else value


# How each policy's knobs (its config section, sim.config.POLICY_KNOBS) set the parameters its rules read:
# fill(p, pipeline, knobs, B), p already holding B, S = max_staleness and no limits.
def _fill_oldest_unconsumed(p, pipeline, knobs, B):
    if pipeline.drop_stale:
        p[P_DROP_S] = pipeline.max_staleness


def _fill_areal(p, pipeline, knobs, B):
    p[P_S] = knobs.max_head_offpolicyness
    p[P_MAX_RUNNING] = _limit(knobs.max_concurrent_rollouts)


def _fill_verl(p, pipeline, knobs, B):
    k = knobs.trigger_parameter_sync_step
    p[P_SYNC_EVERY] = k
    p[P_MAX_OUTSTANDING] = int(B * knobs.require_batches * (1 + knobs.staleness_threshold) * k + 1e-9)


def _fill_prime_rl(p, pipeline, knobs, B):
    p[P_S] = knobs.max_async_level
    p[P_DROP_S] = knobs.max_off_policy_steps
    p[P_MAX_RUNNING] = _limit(knobs.max_inflight)


def _fill_tinker(p, pipeline, knobs, B):
    p[P_MAX_OUTSTANDING] = B * (knobs.sampling_steps_ahead + 1)


def _fill_drop(p, pipeline, knobs, B):
    p[P_DROP_S] = pipeline.max_staleness
    p[P_MAX_RUNNING] = knobs.max_inflight_tasks or max(pipeline.max_staleness, 1) * B


def _fill_queue_drop(p, pipeline, knobs, B):
    p[P_EVICT_AT] = knobs.capacity


def _fill_nothing(p, pipeline, knobs, B):
    return None


@dataclass(frozen=True)
class PolicySpec:
    """A named policy: its id, its knobs (config section pipeline.NAME, with its system's names and defaults), the
    guarantee it gives, whether its workers take new weights in flight by default, its source, and how its knobs set
    the parameters its rules read (`fill`)."""
    name: str
    id: int
    knobs: dict = field(default_factory=dict)
    guarantee: str = ""
    interrupts: bool = False
    source: str = ""
    fill: object = _fill_nothing
    uses_max_staleness: bool = False  # whether pipeline.max_staleness sets its bound (else its own knobs do)


POLICIES: dict[str, PolicySpec] = {spec.name: spec for spec in (
    PolicySpec("oldest_unconsumed", OLDEST_UNCONSUMED, {}, "no consumed group is staler than max_staleness, even "
               "when groups finish out of order (gate on the oldest unconsumed group's version)", False,
               "stalecast", _fill_oldest_unconsumed, uses_max_staleness=True),
    PolicySpec("areal", AREAL, {"max_head_offpolicyness": 0, "max_concurrent_rollouts": None},
               "admissions are bounded by the learner's version; a group that finishes late can be consumed "
               "staler than max_head_offpolicyness (no bound on the maximum)", True,
               "inclusionAI/AReaL areal/infra/staleness_manager.py (StalenessManager.get_capacity); in-flight "
               "requests are aborted and resumed at a weight update (areal/infra/workflow_executor.py)", _fill_areal),
    PolicySpec("verl_fully_async", VERL_FULLY_ASYNC, {"staleness_threshold": 0.1, "trigger_parameter_sync_step": 4,
                                                      "require_batches": 1, "partial_rollout": True},
               "at most M groups admitted per weight sync beyond those outstanding at the sync; no bound on the "
               "maximum staleness", True,
               "volcengine/verl verl/experimental/fully_async_policy/fully_async_rollouter.py (staleness_samples, "
               "max_required_samples), fully_async_trainer.py (a weight sync every trigger_parameter_sync_step "
               "updates)", _fill_verl),
    PolicySpec("prime_rl", PRIME_RL, {"max_async_level": 1, "max_off_policy_steps": 8, "max_inflight": None},
               "a batch is generated at most max_async_level versions ahead; groups staler than "
               "max_off_policy_steps are dropped, so none consumed is staler", True,
               "PrimeIntellect-ai/prime-rl src/prime_rl/orchestrator/scheduler.py (max_async_level), "
               "orchestrator.py (max_off_policy_steps); weight updates pause and keep in-flight requests",
               _fill_prime_rl),
    PolicySpec("tinker", TINKER, {"sampling_steps_ahead": 1},
               "at most groups_per_step x (K + 1) groups started and not yet trained; no bound on the maximum "
               "staleness", True, "thinking-machines-lab/tinker-cookbook docs, rl/async (AsyncConfig)", _fill_tinker),
    PolicySpec("drop", DROP, {"max_inflight_tasks": None},
               "no consumed group is staler than max_staleness (staler ones are dropped and counted)", True,
               "huggingface/trl trl/experimental/async_grpo/async_grpo_trainer.py (max_staleness, "
               "max_inflight_tasks)", _fill_drop, uses_max_staleness=True),
    PolicySpec("queue_drop", QUEUE_DROP, {"capacity": None},
               "none on staleness: a bounded buffer that discards its oldest group when full (the assumption of "
               "Applied Compute's closed-form staleness model; PipelineRL's default ring buffer)", False,
               "ServiceNow/PipelineRL (bounded buffers, oldest dropped)", _fill_queue_drop),
    PolicySpec("none", NONE, {}, "none", False, "stalecast"),
)}


def describe(pipeline) -> str:
    """The staleness control a config's pipeline runs, with the values of the knobs that set it (max_staleness only
    where the policy reads it): "oldest_unconsumed S=2", or "areal max_head_offpolicyness=0,
    max_concurrent_rollouts=None"."""
    spec, knobs = POLICIES[pipeline.staleness_control], pipeline.knobs()
    values = ([f"S={pipeline.max_staleness}"] if spec.uses_max_staleness else []) + [
        f"{name}={getattr(knobs, name)}" for name in spec.knobs]
    return f"{spec.name} {', '.join(values)}" if values else spec.name
