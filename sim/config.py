"""Run configuration shared by the simulator (`sim/`) and the real trainer (`real/`).

Every field carries its help text; `stalecast simulate --help-config` prints them all. Config objects
are plain data: building one does no I/O. `load_config` reads YAML and turns any validation failure
into one `ConfigError` naming the file, the field and the reason.

Types are strict where pydantic's lax mode would guess: a boolean is not a number (`rollout_workers: true` is an
error, not 1), a number is not a boolean, and no float field takes inf or NaN. Files a config names (profile,
empirical traces, stability fit, a checkpoint folder as real.model) are checked when it loads, the profile read.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Annotated, Literal, Union, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from sim.errors import StalecastError


class ConfigError(StalecastError, ValueError):
    """A configuration problem, worded for the user: `file: field: reason`."""


def _is_bool(value) -> bool:
    """A Python or NumPy boolean (pandas hands out NumPy ones)."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def _number(value):
    """Numeric fields take numbers (YAML ints for floats too, and numeric strings such as PyYAML's `1e-3`), never
    true/false: pydantic would read `rollout_workers: true` as 1."""
    if _is_bool(value):
        raise ValueError("expected a number, not a boolean")
    return value


def _boolean(value):
    """Switches take true or false only, not 1, 0 or strings such as 'no' (YAML's own yes/no are booleans)."""
    if not _is_bool(value):
        raise ValueError("expected true or false")
    return bool(value)


# Field types of every section: no bool read as a number, no number read as a bool; `allow_inf_nan=False` on the
# sections rejects inf and NaN in every float field.
Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number)]
Bool = Annotated[bool, BeforeValidator(_boolean)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- length distributions
class ConstantLen(_Section):
    kind: Literal["constant"]
    value: Int = Field(ge=1, description="Every sample has exactly this many tokens.")


class ExponentialLen(_Section):
    kind: Literal["exponential"]
    mean: Float = Field(gt=0, description="Mean tokens; lengths are ceil(Exp(mean)), so at least 1.")


class LognormalLen(_Section):
    kind: Literal["lognormal"]
    median: Float = Field(gt=0, description="Median tokens (exp of the underlying normal's mean).")
    sigma: Float | None = Field(None, gt=0, description="Std of the underlying normal. Give sigma or p99.")
    p99: Float | None = Field(None, gt=0, description="99th percentile in tokens; sets sigma = ln(p99/median)/2.326.")

    @model_validator(mode="after")
    def _one_spread(self):
        if (self.sigma is None) == (self.p99 is None):
            raise ValueError("give exactly one of sigma or p99")
        if self.p99 is not None and self.p99 <= self.median:
            raise ValueError(f"p99 ({self.p99}) must exceed median ({self.median})")
        return self


class EmpiricalLen(_Section):
    kind: Literal["empirical"]
    values: list[Annotated[Int, Field(ge=1)]] | None = Field(
        None, description="Lengths to resample uniformly with replacement.")
    trace: str | None = Field(
        None, description="Trace file (Parquet/CSV, stalecast schema) whose column is resampled; "
                          "a relative path is taken from the config file's folder.")
    column: Literal["response_len", "prompt_len"] = Field(
        "response_len", description="Trace column to resample.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.values is None) == (self.trace is None):
            raise ValueError("give exactly one of values or trace")
        if self.values is not None and not self.values:
            raise ValueError("values must not be empty")
        return self


LengthDist = Annotated[Union[ConstantLen, ExponentialLen, LognormalLen, EmpiricalLen],
                       Field(discriminator="kind")]


# --------------------------------------------------------------------------- sections
class Turns(_Section):
    """Multi-turn (agentic) samples: a sample is `count` generation turns, each but the last followed by an
    environment call (a tool, a code run, a user simulator) whose output joins the context (docs/design.md
    "Multi-turn samples")."""
    count: Int = Field(ge=1, description="Generation turns per sample. Each turn's length is drawn from "
                                         "workload.response_len and capped at max_new_tokens (an engine's max_tokens "
                                         "is per request, and each turn is one request).")
    env_s: Float = Field(ge=0, description="Seconds an environment call takes (its median when env_s_p99 is given).")
    env_s_p99: Float | None = Field(None, gt=0, description="99th percentile of an environment call's seconds: calls "
                                                            "are then lognormal with median env_s; null: every call "
                                                            "takes env_s.")
    tool_tokens: LengthDist | None = Field(None, description="Tokens an environment call returns, appended to the "
                                                             "context and prefilled when the sample resumes; null: "
                                                             "none.")
    kv: Literal["keep", "release"] = Field(
        "keep", description="While the environment runs: keep, the sample keeps its KV cache (it counts against the "
                            "KV budget, and gives way before any running sequence is evicted) and prefills only the "
                            "tool tokens on return; release, it frees its KV cache and re-prefills its whole context "
                            "on return. Either way it keeps its slot: max_concurrency counts samples in flight, "
                            "environment calls included, as AReaL's max_concurrent_rollouts does.")

    @model_validator(mode="after")
    def _spread(self):
        if self.env_s_p99 is not None and self.env_s == 0:
            raise ValueError("env_s_p99 makes calls lognormal with median env_s, which must then be above 0")
        if self.env_s_p99 is not None and self.env_s_p99 <= self.env_s:
            raise ValueError(f"env_s_p99 ({self.env_s_p99}) must exceed env_s ({self.env_s}), the median")
        return self


class Workload(_Section):
    batch_prompts: Int = Field(ge=1, description="Prompts (GRPO groups) the learner consumes per step.")
    group_size: Int = Field(ge=1, description="Samples generated per prompt (the GRPO group).")
    prompt_len: LengthDist | None = Field(None, description="Prompt length distribution, tokens.")
    response_len: LengthDist | None = Field(None, description="Response length distribution, tokens (before the "
                                                                "cap).")
    groups: list[list[Annotated[Int, Field(ge=1)]]] | None = Field(
        None, description="Instead of prompt_len and response_len: whole groups to resample uniformly with "
                          "replacement, each [prompt length, its group_size response lengths], so lengths that "
                          "occur together stay together (longer prompts, longer answers). `stalecast validate` "
                          "takes them from its pilot run.")
    groups_in_order: Bool = Field(False, description="With groups: group n takes groups[n] (cycling), so lengths that "
                                                     "change as training goes on change in the simulation too; "
                                                     "false: resample uniformly.")
    max_new_tokens: Int = Field(ge=1, description="Cap on response length; longer draws are truncated to it.")
    turns: Turns | None = Field(None, description="Multi-turn (agentic) samples: generation turns separated by "
                                                  "environment calls; null: one turn.")

    @model_validator(mode="after")
    def _one_length_source(self):
        separate = (self.prompt_len is not None, self.response_len is not None)
        if self.groups is None and not all(separate):
            raise ValueError("give prompt_len and response_len, or groups")
        if self.groups is not None:
            if any(separate):
                raise ValueError("give groups or prompt_len / response_len, not both")
            if not self.groups:
                raise ValueError("groups must not be empty")
            bad = next((g for g in self.groups if len(g) != 1 + self.group_size), None)
            if bad is not None:
                raise ValueError(f"each of groups is [prompt length, {self.group_size} response lengths] "
                                 f"(group_size {self.group_size}); found {len(bad)} numbers")
            if self.turns is not None:
                raise ValueError("turns draws each turn's length from response_len; give prompt_len and "
                                 "response_len, not groups")
        return self

    @property
    def n_turns(self) -> int:
        return 1 if self.turns is None else self.turns.count


class Cluster(_Section):
    rollout_workers: Int = Field(ge=1, description="Inference engines generating rollouts (R).")
    gpus_per_worker: Int = Field(1, ge=1, description="GPUs per rollout worker (its tensor-parallel degree).")
    max_concurrency: Int = Field(ge=1, description="Sequences a worker decodes at once (continuous batching slots).")
    batching: Literal["continuous", "static"] = Field(
        "continuous", description="continuous: a freed slot takes a new group at the next decode step (vLLM, "
                                  "SGLang). static: a worker admits a batch only when its last one has ended, and "
                                  "the batch's groups reach the learner together at its end, with one prefill "
                                  "call for the batch (stalecast train's workers).")
    admission: Literal["per_group", "per_sample"] = Field(
        "per_group", description="What a worker admits at once (continuous batching). per_group: a group starts only "
                                 "when group_size slots are free, all its samples together. per_sample: as vLLM "
                                 "and SGLang expand a request of n samples into n sequences (verl, AReaL, prime-rl, "
                                 "TRL): a group is admitted with one free slot, and its other samples start as slots "
                                 "free, ahead of any new group. stalecast train's workers run both "
                                 "(real/engine/batching.py).")
    group_prefill: Literal["auto", "shared", "per_sample"] = Field(
        "auto", description="What a group's admission prefills. shared: its prompt once (vLLM V1 fans a request of n "
                            "samples out into n requests, vllm/v1/engine/parallel_sampling.py, and its prefix cache "
                            "computes a prompt repeated within a batch once, vllm-project/vllm#10980); per_sample: "
                            "every sample's copy, group_size x the prompt (stalecast train's engines, an engine "
                            "without prefix caching); auto: per_sample under static batching, shared under "
                            "continuous. stalecast validate predicts with per_sample.")
    router: Literal["least_loaded", "round_robin", "fill_first"] = Field(
        "least_loaded", description="Which worker the next group goes to, among those that could take it now "
                                    "(sim/engine/routers.py): least_loaded, the most free slots (SGLang's and vLLM's "
                                    "routers); round_robin; fill_first, the lowest id (one engine filled before the "
                                    "next). stalecast train's workers take groups first come, first served, as "
                                    "fill_first models, whatever this says (stalecast validate predicts with "
                                    "fill_first).")
    learner_gpus: Int = Field(1, ge=1, description="GPUs the learner trains on (L).")
    colocated: Bool = Field(False, description="Workers and learner share the same GPUs (e.g. one GPU): "
                                               "the hardware colocation slowdowns apply while both run.")

    @model_validator(mode="after")
    def _per_sample_batches_continuously(self):
        if self.admission == "per_sample" and self.batching == "static":
            raise ValueError("admission per_sample needs batching continuous: a static batch is admitted whole")
        return self

    @property
    def prefills_every_copy(self) -> bool:
        """Whether a group prefills every sample's copy of its prompt (group_prefill, auto resolved)."""
        if self.group_prefill == "auto":
            return self.batching == "static"
        return self.group_prefill == "per_sample"

    @property
    def total_gpus(self) -> int:
        return self.learner_gpus if self.colocated else self.rollout_workers * self.gpus_per_worker + self.learner_gpus


class AReaLKnobs(_Section):
    """AReaL's staleness manager (areal/infra/staleness_manager.py), its names and defaults."""
    max_head_offpolicyness: Int = Field(0, ge=0, description="Versions the admitted groups may run ahead of the "
                                                             "learner's: admit while accepted + running < (this + v + "
                                                             "1) x batch_prompts, v the learner's version.")
    max_concurrent_rollouts: Int | None = Field(None, ge=1, description="Groups generating at once, at most; null: "
                                                                        "no cap but the workers' slots.")


class VerlKnobs(_Section):
    """verl fully-async (verl/experimental/fully_async_policy), its names and defaults. batch_prompts is the groups of
    one optimizer update (ppo_mini_batch_size x require_batches)."""
    staleness_threshold: Float = Field(0.1, ge=0, description="Extra groups admitted per weight sync, as a fraction: "
                                                              "at most (1 + this) x trigger_parameter_sync_step x "
                                                              "batch_prompts groups admitted between two syncs.")
    trigger_parameter_sync_step: Int = Field(4, ge=1, description="Optimizer updates (learner steps) per weight "
                                                                  "sync: the version counts syncs.")
    require_batches: Int = Field(1, ge=1, description="Mini-batches the trainer waits for per update (counts toward "
                                                      "the admission limit).")
    partial_rollout: Bool = Field(True, description="At a weight sync in-flight samples are interrupted and resumed "
                                                    "with the new weights (interruptible workers).")


class PrimeRLKnobs(_Section):
    """prime-rl's orchestrator (src/prime_rl/orchestrator), its names and defaults."""
    max_async_level: Int = Field(1, ge=0, description="Batches the orchestrator may collect ahead of the trainer's "
                                                      "newest checkpoint.")
    max_off_policy_steps: Int = Field(8, ge=0, description="Groups staler than this are dropped when taken.")
    max_inflight: Int | None = Field(None, ge=1, description="Groups generating at once, at most; null: no cap but "
                                                             "the workers' slots.")


class TinkerKnobs(_Section):
    """Tinker cookbook's async RL (AsyncConfig), its names and defaults."""
    sampling_steps_ahead: Int = Field(1, ge=0, description="K: at most batch_prompts x (K + 1) groups started and "
                                                           "not yet trained.")


class DropKnobs(_Section):
    """TRL async GRPO (trl/experimental/async_grpo): drop at consumption beyond pipeline.max_staleness."""
    max_inflight_tasks: Int | None = Field(None, ge=1, description="Groups generating at once, at most; null: TRL's "
                                                                   "auto value, max_staleness x batch_prompts.")


class QueueDropKnobs(_Section):
    """A bounded buffer that discards its oldest group when a new one completes into it full."""
    capacity: Int = Field(ge=1, description="Completed groups the buffer holds; a group completing into a full "
                                            "buffer pushes the oldest waiting one out (counted as dropped).")


class WeightSync(_Section):
    """A weight sync in three phases (docs/design.md): the rollout side pauses, the weights transfer, the rollout
    side resumes. Waiting for in-flight requests to finish (a draining worker) is simulated, not part of pause_s."""
    pause_s: Float = Field(0.0, ge=0, description="Seconds the rollout side takes to pause for a sync (abort in-flight "
                                                  "requests and keep their state, or stop the engine after a drain; "
                                                  "free its cache): the learner waits for it before the transfer, "
                                                  "and each worker is busy with it. Not charged in sync mode, where "
                                                  "generation has ended when the learner publishes.")
    transfer_s: Float | None = Field(None, ge=0, description="Seconds of the transfer (NCCL broadcast, or through "
                                                             "host memory), on both sides; null: the cost model's "
                                                             "(weight bytes / link bandwidth + latency, or a "
                                                             "profile's sync_s).")
    resume_s: Float = Field(0.0, ge=0, description="Seconds a worker takes after the transfer before it decodes "
                                                   "again (load into the engine, rebuild caches and CUDA graphs); "
                                                   "the learner does not wait for it.")


POLICY_KNOBS = {"areal": AReaLKnobs, "verl_fully_async": VerlKnobs, "prime_rl": PrimeRLKnobs, "tinker": TinkerKnobs,
                "drop": DropKnobs, "queue_drop": QueueDropKnobs}
_RENAMED_CONTROLS = {"gating": "oldest_unconsumed", "both": "oldest_unconsumed with drop_stale: true"}


class Pipeline(_Section):
    mode: Literal["sync", "one_step_off", "fixed_lag", "async"] = Field(
        "async", description="sync: generate, train, sync, repeat. one_step_off: batch k+1 is generated "
                             "with version k while step k trains. fixed_lag: batch k is generated with version "
                             "k - S exactly (S = max_staleness; versions 0 for the first S batches), so every batch "
                             "after the first S is S versions stale whatever the timing: staleness as a controlled "
                             "variable (one_step_off is fixed_lag with S = 1). async: fully asynchronous.")
    max_staleness: Int = Field(1, ge=0, description="Staleness bound S (learner version at consumption minus "
                                                    "version at generation start) of the oldest_unconsumed and drop "
                                                    "policies; the lag of fixed_lag mode.")
    staleness_control: Literal["oldest_unconsumed", "areal", "verl_fully_async", "prime_rl", "tinker", "drop",
                               "queue_drop", "none"] = Field(
        "oldest_unconsumed", description="async only: the named policy that decides when a worker may admit a group, "
                                         "which groups the learner drops and when weights load "
                                         "(sim/engine/policies.py; its knobs in the section of its name). "
                                         "oldest_unconsumed: admit while accepted + running < (S + v + 1) x "
                                         "batch_prompts, v the oldest unconsumed group's version (no consumed group "
                                         "staler than S). areal: the same count on the learner's version. "
                                         "verl_fully_async, prime_rl, tinker: those systems' rules. drop: TRL's, "
                                         "drop groups staler than S when taken. queue_drop: a buffer that discards "
                                         "its oldest group when full. none.")
    drop_stale: Bool = Field(False, description="oldest_unconsumed only: also drop groups staler than S when the "
                                                "learner takes them.")
    interruptible: Bool | None = Field(None, description="Workers pause in-flight sequences to load new weights "
                                                         "(tokens then carry several versions); otherwise they stop "
                                                         "admitting, drain in-flight sequences, then load. null: "
                                                         "what the policy's system does (areal, verl with "
                                                         "partial_rollout, prime_rl, tinker, drop: in flight; the "
                                                         "others, and every mode but async: drain).")
    queue_capacity: Int | None = Field(None, ge=1, description="Completed groups the buffer holds before workers "
                                                               "stop admitting new groups; null = unbounded.")
    queue_order: Literal["fifo", "freshest"] = Field("fifo", description="fifo: oldest completed group first; "
                                                                         "freshest: newest policy version first.")
    areal: AReaLKnobs | None = Field(None, description="Knobs of staleness_control: areal.")
    verl_fully_async: VerlKnobs | None = Field(None, description="Knobs of staleness_control: verl_fully_async.")
    prime_rl: PrimeRLKnobs | None = Field(None, description="Knobs of staleness_control: prime_rl.")
    tinker: TinkerKnobs | None = Field(None, description="Knobs of staleness_control: tinker.")
    drop: DropKnobs | None = Field(None, description="Knobs of staleness_control: drop.")
    queue_drop: QueueDropKnobs | None = Field(None, description="Knobs of staleness_control: queue_drop (capacity "
                                                                "is required).")
    weight_sync: WeightSync = Field(default_factory=WeightSync, description="A weight sync's phases: pause, "
                                                                            "transfer, resume.")

    @model_validator(mode="before")
    @classmethod
    def _renamed_controls(cls, data):
        if isinstance(data, dict) and data.get("staleness_control") in _RENAMED_CONTROLS:
            old = data["staleness_control"]
            raise ValueError(f"staleness_control: '{old}' is now called '{_RENAMED_CONTROLS[old]}'")
        return data

    @model_validator(mode="after")
    def _interruptible_async(self):
        if self.interruptible and self.mode != "async":
            raise ValueError("interruptible workers only apply to mode: async")
        return self

    @model_validator(mode="after")
    def _knobs_of_the_policy(self):
        for name in POLICY_KNOBS:
            if getattr(self, name) is not None and name != self.staleness_control:
                raise ValueError(f"{name}: these knobs are of staleness_control: {name} (it is "
                                 f"{self.staleness_control})")
        if self.staleness_control == "queue_drop":
            if self.queue_drop is None:
                raise ValueError("queue_drop: give its capacity (groups the buffer holds)")
            if self.queue_order != "fifo" or self.queue_capacity is not None:
                raise ValueError("queue_drop: its buffer discards the oldest group (queue_order: fifo) instead of "
                                 "blocking workers (no queue_capacity)")
        if self.drop_stale and self.staleness_control != "oldest_unconsumed":
            raise ValueError("drop_stale: only with staleness_control: oldest_unconsumed (drop and prime_rl drop by "
                             "their own knobs)")
        return self

    def knobs(self):
        """The staleness_control policy's knobs (its section, or its defaults); None for a policy without any."""
        name = self.staleness_control
        return getattr(self, name, None) or (POLICY_KNOBS[name]() if name in POLICY_KNOBS else None)

    @property
    def in_flight_updates(self) -> bool:
        """Whether workers take new weights in flight: interruptible if given, else what the policy's system does."""
        if self.mode != "async":
            return False
        if self.interruptible is not None:
            return self.interruptible
        if self.staleness_control == "verl_fully_async":
            return self.knobs().partial_rollout
        return self.staleness_control in ("areal", "prime_rl", "tinker", "drop")


class Efficiency(_Section):
    """Calibration factors of the analytic cost model: explicit, never hidden constants."""
    decode_mem: Float = Field(0.80, gt=0, le=1, description="Fraction of HBM bandwidth decode reaches.")
    decode_compute: Float = Field(0.50, gt=0, le=1, description="Fraction of peak FLOP/s decode reaches.")
    prefill_mfu: Float = Field(0.50, gt=0, le=1, description="Model FLOPs utilisation of prefill.")
    train_mfu: Float = Field(0.40, gt=0, le=1, description="Model FLOPs utilisation of training (6·N·tokens).")
    network: Float = Field(0.80, gt=0, le=1, description="Fraction of link bandwidth a weight sync reaches.")
    decode_step_overhead_s: Float = Field(0.004, ge=0, description="Fixed host/scheduler time per decode step.")
    train_step_overhead_s: Float = Field(1.0, ge=0, description="Fixed time per learner step (optimizer, logging).")
    sync_latency_s: Float = Field(0.5, ge=0, description="Fixed time per weight sync on top of bytes/bandwidth.")
    learner_bookkeeping_s: Float = Field(0.0, ge=0, description="The learner's own work per step after it "
                                                                "publishes and before it takes its next batch "
                                                                "(metrics, logging, checkpoints). It overlaps "
                                                                "generation, so a learner-bound run pays it every "
                                                                "step and a sync run only where it outlasts "
                                                                "generation. A profile's learner_bookkeeping_s "
                                                                "(`stalecast calibrate` times it) overrides it. 0: "
                                                                "none.")
    colocation_gen_slowdown: Float = Field(1.15, ge=1, description="Generation slowdown while sharing GPUs "
                                                                   "with training (measured on one H200: 1.15).")
    colocation_train_slowdown: Float = Field(1.11, ge=1, description="Training slowdown while sharing GPUs with "
                                                                     "generation (measured on one H200: 1.11).")
    tp_allreduce: Float = Field(0.13, gt=0, le=1, description="Fraction of the intra-node link bandwidth a "
                                                              "tensor-parallel all-reduce reaches (bus bandwidth), "
                                                              "on top of the GPU's all-reduce latency. 0.13: vLLM's "
                                                              "custom all-reduce on H100 at decode-sized messages "
                                                              "(32 KB-1 MB); NCCL reaches ~0.8 at hundreds of MB.")
    micro_batch_overhead_s: Float = Field(0.0, ge=0, description="Time a learner step spends per micro-batch "
                                                                 "beyond the first (launches, FSDP gathers not "
                                                                 "hidden behind compute); the micro-batches a step "
                                                                 "needs come from hardware.memory. 0: micro-batching "
                                                                 "costs nothing beyond train_mfu.")


class ConstantCosts(_Section):
    """Fixed times, for textbook cases: each decode step, prefill token and training token costs the same."""
    decode_step_s: Float = Field(ge=0, description="Seconds per decode step, whatever the batch.")
    prefill_s_per_token: Float = Field(0.0, ge=0, description="Seconds per prompt token of prefill.")
    train_step_s: Float = Field(0.0, ge=0, description="Fixed seconds per learner step.")
    train_s_per_token: Float = Field(0.0, ge=0, description="Seconds per trained token (prompt + response).")
    sync_s: Float = Field(0.0, ge=0, description="Seconds per weight sync.")


class Memory(_Section):
    """GPU memory (sim/hardware/memory.py, docs/design.md): a rollout worker's KV-cache budget and whether the policy
    fits its GPUs, and the learner's states and micro-batches."""
    check: Bool = Field(True, description="Refuse a configuration that does not fit in GPU memory: `stalecast "
                                          "simulate` stops with the reason (unless --allow-infeasible), `stalecast "
                                          "plan` leaves it out and lists why. false: only report it.")
    gpu_memory_utilization: Float = Field(0.9, gt=0, le=1, description="Fraction of each rollout GPU's memory the "
                                                                       "inference engine takes, for weights, "
                                                                       "reserve and KV cache (vLLM's option, "
                                                                       "default 0.9). Co-located: the fraction "
                                                                       "workers and learner share.")
    rollout_reserve_gb: Float | None = Field(None, ge=0, description="GB per rollout GPU that are neither weights "
                                                                    "nor KV: a forward's activation peak, CUDA "
                                                                    "graphs, NCCL and cuBLAS buffers. null: the "
                                                                    "GPU spec's (3 GB on the NVIDIA parts: vLLM logs "
                                                                    "3.05 GiB for Llama-3-8B on one H100; 0.25 on "
                                                                    "cpu).")
    kv_policy: Literal["preempt_recompute", "preempt_swap", "admit_reserve", "unlimited"] = Field(
        "preempt_recompute", description="How a rollout worker lives within its KV budget (docs/design.md): "
                                         "preempt_recompute admits a group when its prompts fit and, when decoding "
                                         "outgrows the budget, evicts the newest sequences and re-prefills them later "
                                         "(vLLM's default); preempt_swap evicts them to host memory and copies them "
                                         "back; admit_reserve reserves prompt + max_new_tokens per sequence up front "
                                         "and never evicts; unlimited ignores the budget (only max_concurrency "
                                         "limits a batch).")
    kv_budget_tokens: Int | None = Field(None, ge=1, description="KV-cache tokens one rollout worker holds. null: "
                                                                 "the memory model's budget when hardware.gpu is "
                                                                 "set and hardware.constant is not, else no limit. "
                                                                 "It must hold one group at its longest.")
    swap_gbps: Float | None = Field(None, gt=0, description="Host link per rollout GPU, one direction, GB/s, that "
                                                            "preempt_swap copies KV over. null: the GPU spec's "
                                                            "(PCIe).")
    kv_block_tokens: Int = Field(16, ge=1, description="Tokens per KV-cache block (paged allocation; vLLM's "
                                                       "block_size, 16): a sequence takes whole blocks.")
    kv_dtype: Literal["bf16", "fp8"] = Field("bf16", description="KV-cache element type (vLLM's kv_cache_dtype: "
                                                                 "auto is the model's bf16): its bytes per token set "
                                                                 "the budget in tokens and the KV read per decode "
                                                                 "step.")
    learner_memory_utilization: Float = Field(0.9, gt=0, le=1, description="Fraction of each learner GPU's memory "
                                                                           "training may use (the rest: CUDA "
                                                                           "context, NCCL buffers, FSDP's gathered "
                                                                           "layers, fragmentation).")
    precision: Literal["bf16_mixed", "bf16", "fp32"] = Field(
        "bf16_mixed", description="Learner precision, for its state bytes per parameter: bf16_mixed (bf16 weights and "
                                  "gradients, fp32 master weights and optimizer states), bf16 (everything bf16, no "
                                  "master copy), fp32.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Learner optimizer: adamw (two states per "
                                                                    "parameter) or sgd with momentum (one). With "
                                                                    "bf16_mixed: 16 or 12 bytes per parameter, "
                                                                    "sharded over the learner GPUs (FSDP / ZeRO-3).")
    activation_checkpointing: Bool = Field(True, description="The learner recomputes each layer in the backward pass, "
                                                             "keeping only layer inputs (2·hidden bytes per token "
                                                             "and layer instead of 34·hidden).")
    micro_batch_tokens: Int | None = Field(None, ge=1, description="Tokens per learner GPU per micro-batch (verl's "
                                                                   "ppo_max_token_len_per_gpu); null: the most that "
                                                                   "fit. It must hold the longest sequence.")


class Hardware(_Section):
    gpu: str | None = Field("H100-SXM", description="Named GPU spec (see `sim.hardware.specs.GPUS`).")
    model: str | dict = Field("qwen2.5-0.5b", description="Model-shape preset name, or an inline shape with "
                                                          "params, layers, hidden, heads, kv_heads, vocab.")
    profile: str | None = Field(None, description="Measured profile YAML (from `stalecast profile`); its tables "
                                                  "override the costs they cover. It needs at least one table, and "
                                                  "all of decode, prefill, train and sync_s when hardware.gpu is null "
                                                  "and hardware.constant is not given. A relative path is taken from "
                                                  "the config file's folder (given with --set: the current folder).")
    efficiency: Efficiency = Field(default_factory=Efficiency, description="Analytic cost-model calibration.")
    constant: ConstantCosts | None = Field(None, description="Use fixed times instead of the GPU/model costs.")
    memory: Memory = Field(default_factory=Memory, description="GPU memory: KV-cache budget, learner states, "
                                                               "feasibility (checked when hardware.gpu is set and "
                                                               "hardware.constant is not).")
    train_tokens: Literal["packed", "padded"] = Field(
        "packed", description="Tokens a learner step is charged for. packed: the batch's prompt + response tokens "
                              "(trainers that pack sequences). padded: every sample at the batch's longest sequence "
                              "(stalecast train's learner pads the batch to its longest row).")

    @field_validator("model", mode="before")
    @classmethod
    def _model_shape(cls, value):
        if not isinstance(value, (str, dict)):
            raise ValueError("expected a model preset name or a mapping of shape fields (params, layers, hidden, "
                             "heads, kv_heads, vocab)")
        if isinstance(value, dict):
            for key, number in value.items():
                if isinstance(number, float) and not math.isfinite(number):
                    raise ValueError(f"{key}: must be a finite number (got {number})")
        return value


class Optim(_Section):
    lr: Float = Field(1e-6, gt=0, description="Base learning rate.")
    schedule: Literal["constant", "ess_coupled", "staleness_aware"] = Field(
        "constant", description="constant: lr. ess_coupled: lr*min(1, ess/ess_base)^ess_power. "
                                "staleness_aware: lr/(1 + staleness_alpha * mean staleness).")
    ess_base: Float = Field(0.9, gt=0, le=1, description="ESS ratio at and above which ess_coupled keeps lr.")
    ess_power: Float = Field(0.5, gt=0, description="Exponent of the ESS-coupled schedule (VCPO: 1/2 for AdamW, "
                                                    "whose update does not scale with the gradient).")
    ess_level: Literal["sequence", "token"] = Field(
        "sequence", description="ESS the ess_coupled schedule reads: of the batch being trained (its importance "
                                "weights of the step's starting policy over the behavior policy), per sequence "
                                "(VCPO) or per token.")
    staleness_alpha: Float = Field(0.5, ge=0, description="Strength of the staleness-aware schedule.")


class Instability(_Section):
    """When a run has collapsed (docs/design.md): the first step, after warm-up, where its reward has fallen for good,
    its loss is not finite, or its KL to the behavior policy passes a threshold (`sim.stability.InstabilityDetector`).
    A spike of grad norm alone is not a collapse: it is reported, not labelled."""
    warmup_steps: Int = Field(5, ge=0, description="Steps before the reward and KL checks apply.")
    reward_window: Int = Field(10, ge=1, description="Steps the reward is averaged over: the fall is of this moving "
                                                     "average (one step's reward of a few prompts is noise).")
    reward_drop: Float = Field(0.5, gt=0, le=1, description="A fall: the moving average below (1 - reward_drop) x "
                                                            "its best so far.")
    recover_window: Int = Field(10, ge=1, description="Steps the moving average must stay fallen to be a collapse "
                                                      "(the collapse step is where the fall began); a run that ends "
                                                      "sooner has not collapsed by its reward.")
    kl_max: Float = Field(0.5, gt=0, description="KL(behavior || current) per token, k3 estimator, above this is a "
                                                 "collapse; `stalecast study stability` calibrates it on its stable "
                                                 "runs.")


class Real(_Section):
    """How `stalecast train` runs the configuration for real (ignored by the simulator)."""
    model: str = Field("tiny", description="A model-shape preset ('tiny', 'qwen2.5-0.5b', ...: a random-init "
                                           "Qwen2-style model of that shape with the project's tokenizer) or a "
                                           "local checkpoint folder (checked when the config loads; a relative "
                                           "path is taken from the config file's folder); nothing is downloaded.")
    task: Literal["reverse", "sort", "add"] = Field("reverse", description="Synthetic verifiable task: reverse or "
                                                                           "sort a digit string, or add two numbers.")
    min_digits: Int = Field(2, ge=1, description="Shortest digit string of a prompt.")
    max_digits: Int = Field(8, ge=1, description="Longest digit string of a prompt (answers vary in length).")
    digits: LengthDist | None = Field(
        None, description="How many digits a prompt's string has, drawn from this length distribution and clipped to "
                          "min_digits..max_digits (e.g. lognormal for long-tailed answers); null = uniform.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where workers and learner run; auto picks "
                                                                       "cuda when available.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Parameter dtype of the policy.")
    engine: Literal["fast", "reference"] = Field(
        "fast", description="The rollout engine workers generate with (real/engine/): fast, a preallocated KV cache "
                            "with a decode step written for the Qwen2/Llama family (CUDA graphs on GPU); reference, "
                            "the transformers model's own forward with a DynamicCache.")
    temperature: Float = Field(1.0, gt=0, description="Sampling temperature of rollouts.")
    loss: Literal["coupled", "decoupled"] = Field("decoupled", description="coupled: PPO ratio to the behavior "
                                                  "policy, clipped. decoupled: ratio to the proximal policy (the policy "
                                                  "at the step's start) times a capped behavior importance weight.")
    ratio_level: Literal["token", "sequence", "gspo"] = Field(
        "token", description="Importance ratios per token; per sequence (exp of the summed log-ratio); or gspo, per "
                             "sequence as a geometric mean per token (exp of the mean log-ratio, GSPO).")
    clip_eps: Float = Field(0.2, gt=0, description="PPO clipping radius of the ratio.")
    behav_cap: Float = Field(5.0, gt=1, description="Cap on the behavior importance weight (decoupled loss).")
    behav_cap_mode: Literal["clamp", "drop"] = Field(
        "clamp", description="clamp: a weight above behav_cap counts as behav_cap. drop: its token is left out of the "
                             "loss (weight 0, as AReaL does).")
    ppo_epochs: Int = Field(1, ge=1, description="Passes over each batch; with several (or several mini_batches) "
                                                 "the policy moves away from the step's starting (proximal) policy "
                                                 "within a step, so the clip acts. The version still counts "
                                                 "published weights: once per batch.")
    mini_batches: Int = Field(1, ge=1, description="Optimizer updates per pass: the batch's groups split into this "
                                                   "many mini-batches.")
    micro_batch: Int = Field(64, ge=1, description="Sequences per forward/backward pass of the learner.")
    init_seed: Int | None = Field(
        None, ge=0, description="Seed of the policy a run starts from: the preset's random weights and the warm "
                                "start's examples; null = the run's seed. Fixed, runs of different seeds (validate's "
                                "pilots and measured runs) start from one policy, as runs from one checkpoint do; the "
                                "run's seed still draws its prompts and samples.")
    warm_start_steps: Int = Field(0, ge=0, description="Supervised steps on correct answers before GRPO starts.")
    warm_start_lr: Float | None = Field(None, gt=0, description="Learning rate of the supervised warm start; "
                                                                "null = optim.lr.")
    checkpoint_every: Int = Field(20, ge=0, description="Learner steps between checkpoints of `stalecast train` (the "
                                                        "run also checkpoints when it ends, however it ends); "
                                                        "`--resume` continues from the last one. 0: only at the end.")
    instability: Instability = Field(default_factory=Instability, description="When a run counts as collapsed.")

    @model_validator(mode="after")
    def _digits(self):
        if self.max_digits < self.min_digits:
            raise ValueError(f"max_digits ({self.max_digits}) must be at least min_digits ({self.min_digits})")
        return self


class Run(_Section):
    steps: Int = Field(ge=1, description="Learner steps to run.")


class Stability(_Section):
    """The seed paper's stability rule (docs/design.md), for `stalecast simulate` and `stalecast plan --lr`: either
    a fit file of `stalecast study stability` (a logistic fit of collapse on log lr, log S and log T), or given
    constants (stable while lr < scale x min(r_batch / (S x g_upd), r_crit / (T x g_upd))). Null = not known."""
    r_batch: Float | None = Field(None, gt=0, description="Batch-level clipping radius R_batch: the parameter drift "
                                                          "at which the importance ratios' spread reaches the PPO "
                                                          "clip (parameter L2 norm, like g_upd x lr).")
    g_upd: Float | None = Field(None, gt=0, description="G_upd: bound on the update norm per unit learning rate, "
                                                        "||delta theta|| / lr.")
    r_crit: Float | None = Field(None, gt=0, description="R_crit: critical cumulative parameter drift over the "
                                                         "horizon (parameter L2 norm).")
    scale: Float | None = Field(None, gt=0, description="The rule's 'much less than' as a factor: stable while "
                                                       "lr < scale x min(...); null = 1 (the bound itself).")
    fit: str | None = Field(None, description="fit.json written by `stalecast study stability`: the fitted rule "
                                              "(instead of the constants above). A relative path is taken from the "
                                              "config file's folder.")
    collapse_probability: Float | None = Field(
        None, gt=0, lt=1, description="With a fit file: the largest stable lr is where the fitted collapse "
                                      "probability reaches this; null = the fit file's (0.5).")
    staleness_statistic: Literal["max", "p99"] = Field(
        "max", description="Which statistic of the consumed staleness distribution is S: max (the paper's maximum "
                           "rollout lag; with gating it is the bound once the bound binds) or p99 (one straggler "
                           "group does not set it). A fit file's own statistic takes precedence.")
    horizon: Int | None = Field(None, ge=1, description="Horizon T of the rule, learner steps; null = run.steps.")

    @model_validator(mode="after")
    def _all_or_none(self):
        given = [name for name in ("r_batch", "g_upd", "r_crit") if getattr(self, name) is not None]
        if 0 < len(given) < 3:
            raise ValueError(f"give all of r_batch, g_upd and r_crit (only {', '.join(given)} given), or none "
                             f"of them")
        if self.fit is not None and (given or self.scale is not None):
            raise ValueError("give either a fit file (fit) or the constants (r_batch, g_upd, r_crit, scale), not "
                             "both: they are two different rules")
        if self.collapse_probability is not None and self.fit is None:
            raise ValueError("collapse_probability applies to a fit file (fit), and none is given")
        return self


class RunConfig(_Section):
    name: str = Field("run", description="Short name used in output folders and reports.")
    seed: Int = Field(0, ge=0, description="Seed of every random stream (one SeedSequence per run).")
    workload: Workload
    cluster: Cluster
    pipeline: Pipeline = Field(default_factory=Pipeline)
    hardware: Hardware = Field(default_factory=Hardware)
    optim: Optim = Field(default_factory=Optim)
    real: Real = Field(default_factory=Real, description="Settings of the real trainer (`stalecast train`).")
    stability: Stability = Field(default_factory=Stability, description="The stability rule's constants, where known.")
    run: Run

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value.strip() or any(c in value for c in "/\\\0") or value in (".", ".."):
            raise ValueError("must be a plain name (it names output folders): not empty, no / or \\")
        return value

    @model_validator(mode="after")
    def _buffer_fits_batch(self):
        cap = self.pipeline.queue_capacity
        if cap is not None and cap < self.workload.batch_prompts:
            raise ValueError(f"pipeline.queue_capacity ({cap}) must be at least workload.batch_prompts "
                             f"({self.workload.batch_prompts}), or the learner can never fill a batch")
        return self

    @model_validator(mode="after")
    def _groups_fit(self):
        if self.cluster.max_concurrency < self.workload.group_size:
            raise ValueError(f"cluster.max_concurrency ({self.cluster.max_concurrency}) must be at least "
                             f"workload.group_size ({self.workload.group_size}): a group is admitted whole")
        return self

    @model_validator(mode="after")
    def _turns_reserve(self):
        if self.workload.n_turns > 1 and self.hardware.memory.kv_policy == "admit_reserve":
            raise ValueError("hardware.memory.kv_policy admit_reserve reserves prompt + max_new_tokens per sequence, "
                             "which a multi-turn sample (workload.turns) outgrows: use preempt_recompute, "
                             "preempt_swap or unlimited")
        return self

    @model_validator(mode="after")
    def _mini_batches_fit(self):
        if self.real.mini_batches > self.workload.batch_prompts:
            raise ValueError(f"real.mini_batches ({self.real.mini_batches}) must be at most workload.batch_prompts "
                             f"({self.workload.batch_prompts}): a mini-batch holds whole groups")
        return self

    def with_overrides(self, overrides: dict) -> "RunConfig":
        """A copy with dotted-key overrides applied, e.g. {"pipeline.mode": "sync"}; validated again."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        return RunConfig.model_validate(data)


# --------------------------------------------------------------------------- validation messages
_DIST_KINDS: dict[str, type[BaseModel]] = {"constant": ConstantLen, "exponential": ExponentialLen,
                                            "lognormal": LognormalLen, "empirical": EmpiricalLen}


def _is_tag(loc: tuple, i: int) -> bool:
    """A discriminator tag ("lognormal") that pydantic inserts after a length-distribution field; only there,
    so a real field of the same name (`hardware.constant`) stays in the path."""
    return i > 0 and loc[i] in _DIST_KINDS and loc[i - 1] in ("prompt_len", "response_len", "tool_tokens")


def _field_path(loc: tuple) -> str:
    parts = [str(p) for i, p in enumerate(loc) if not _is_tag(loc, i)]
    return ".".join(parts)


def _section_model(ann) -> type[BaseModel] | None:
    """The section model a field holds, unwrapping `Section | None`."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    models = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def _known_fields(loc: tuple) -> list[str]:
    model: type[BaseModel] | None = RunConfig
    for i, part in enumerate(loc[:-1]):
        if _is_tag(loc, i):
            model = _DIST_KINDS[part]
            continue
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        model = _section_model(model.model_fields[part].annotation)
    return list(model.model_fields) if model is not None else []


_KINDS = ", ".join(_DIST_KINDS)


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        known, name = _known_fields(loc), str(loc[-1])
        hint = difflib.get_close_matches(name, known, n=1) or [k for k in known if len(name) > 1 and (
            k.startswith(name) or name.startswith(k))][:1]
        return f"{_field_path(loc)}: unknown field" + (f" (did you mean '{hint[0]}'?)" if hint else "")
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    if kind == "missing":
        msg = "required field is missing"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        msg = f"expected a mapping of fields, not {_yaml_type(got)}"
    elif kind == "union_tag_not_found":
        msg, got = f"needs kind: one of {_KINDS}", None
    elif kind == "union_tag_invalid":
        msg, got = f"kind {err['ctx']['tag']!r} is not one of {_KINDS}", None
    shown = ""
    if got is not None and not isinstance(got, (dict, list)):
        shown = f" (got {str(got).lower() if isinstance(got, bool) else repr(got)})"
    # Whole-config rules (loc empty) name their fields in the message itself.
    return f"{_field_path(loc)}: {msg}{shown}" if loc else f"{msg}{shown}"


def _yaml_type(value) -> str:
    """A parsed YAML value's kind, in YAML's words."""
    if value is None:
        return "null (an empty section)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else type(value).__name__


def parse_config(data: object, source: str = "<config>") -> RunConfig:
    """Validate already-parsed data; errors name `source`."""
    if data is None:
        raise ConfigError(f"{source}: the file is empty; a config needs at least workload, cluster and run "
                          f"(see examples/)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the file must hold a mapping of sections, not {type(data).__name__}")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: {_describe(e)}" for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    from sim.hardware.specs import check_hardware  # resolves names; no I/O
    try:
        check_hardware(cfg.hardware)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


# --------------------------------------------------------------------------- YAML files
class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last one
    silently, so `steps: 10` above a forgotten `steps: 1000` would lose)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice in one mapping",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (line, column)."""
    if isinstance(exc, yaml.reader.ReaderError):  # a control character, e.g. NUL
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f"{exc.reason}: character #x{char:04x} at offset {exc.position}"
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if not problem:
        return " ".join(str(exc).split())
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    context = getattr(exc, "context", None)
    if "'\\t'" in problem:  # PyYAML shows a tab as '\t'
        problem = problem.replace("'\\t'", "a tab") + " (YAML indents with spaces)"
    return (f"{' '.join(context.split())}: " if context else "") + f"{' '.join(problem.split())}{where}"


def read_yaml(path: str | Path, what: str = "config file") -> object:
    """Parse a YAML file; a missing, unreadable, non-UTF-8 or malformed file is one ConfigError naming it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a {what}")
    if not path.exists():
        raise ConfigError(f"{path}: no such {what}")
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file; give a {what} (YAML)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save the "
                          f"{what} as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None


# --------------------------------------------------------------------------- loading
def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read a YAML run config. Relative file paths inside it are resolved against its folder; relative paths given
    as overrides (`--set`) against the current folder."""
    path = Path(path)
    cfg = parse_config(read_yaml(path), str(path))
    if overrides:
        try:
            cfg = cfg.with_overrides(overrides)
        except (KeyError, TypeError):
            raise ConfigError(f"{path} (override): {_override_problem(cfg, overrides)}") from None
        except ValidationError as exc:
            raise ConfigError("\n".join(f"{path} (override): {_describe(e)}" for e in exc.errors())) from None
        try:
            from sim.hardware.specs import check_hardware
            check_hardware(cfg.hardware)
        except ValueError as exc:
            raise ConfigError(f"{path} (override): {exc}") from None
    return _resolve_paths(cfg, path, set(overrides or ()))


def _override_problem(cfg: RunConfig, overrides: dict) -> str:
    """Why a dotted override key names no field: the first part that does not exist, or that is not a section."""
    for dotted in overrides:
        node, done = cfg.model_dump(), []
        *parents, _ = dotted.split(".")
        for key in [*parents, None]:
            if not isinstance(node, dict):
                where = ".".join(done)
                if _known_fields((*done, "")):  # an unset optional section, e.g. hardware.constant: null
                    return (f"{dotted}: {where} is not set; give the whole section, e.g. --set '{where}={{"
                            f"{_known_fields((*done, ''))[0]}: ...}}'")
                return f"{dotted}: {where} is a value ({_yaml_value(node)}), not a section with fields"
            if key is None:
                break
            if key not in node:
                hint = difflib.get_close_matches(key, [str(k) for k in node], n=1)
                return (f"{dotted}: field '{'.'.join([*done, key])}' does not exist"
                        + (f" (did you mean '{'.'.join([*done, hint[0]])}'?)" if hint else ""))
            node, done = node[key], [*done, key]
    return f"an override names a field that does not exist: {', '.join(overrides)}"


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _resolve_paths(cfg: RunConfig, path: Path, overridden: set[str] = frozenset()) -> RunConfig:
    """Make file references absolute and check they exist, so errors point at the config that named them: a path
    from the file is taken from the file's folder, one given as an override from the current folder. A measured
    profile is read and checked here too (structure, and that it has the tables the config needs), and
    `real.model`, when it is not a preset name, must be a checkpoint folder."""
    from sim.hardware.specs import MODELS

    folder = path.resolve().parent

    def origin(dotted: str) -> tuple[Path, str]:
        given = any(dotted == k or dotted.startswith(k + ".") for k in overridden)
        return (Path.cwd(), f"{path} (override)") if given else (folder, str(path))

    updates: dict = {}
    for dotted, value in (("hardware.profile", cfg.hardware.profile),
                          ("workload.prompt_len.trace", getattr(cfg.workload.prompt_len, "trace", None)),
                          ("workload.response_len.trace", getattr(cfg.workload.response_len, "trace", None)),
                          ("workload.turns.tool_tokens.trace", getattr(getattr(cfg.workload.turns, "tool_tokens", None),
                                                                      "trace", None)),
                          ("real.digits.trace", getattr(cfg.real.digits, "trace", None)),
                          ("stability.fit", cfg.stability.fit)):
        if value is None:
            continue
        base, where = origin(dotted)
        resolved = (base / value).resolve()
        if not resolved.is_file():
            what = "is a folder, not a file" if resolved.is_dir() else "file not found"
            raise ConfigError(f"{where}: {dotted}: {what}: {value}" + (f" (looked for {resolved})"
                                                                        if str(resolved) != value else ""))
        updates[dotted] = str(resolved)
    if cfg.real.model not in MODELS:
        base, where = origin("real.model")
        resolved = (base / cfg.real.model).resolve()
        if not resolved.is_dir():
            raise ConfigError(f"{where}: real.model: '{cfg.real.model}' is neither a model preset "
                              f"({', '.join(MODELS)}) nor a checkpoint folder (no folder {resolved})")
        if not (resolved / "config.json").is_file():
            raise ConfigError(f"{where}: real.model: {resolved} has no config.json, so it is not a checkpoint "
                              f"folder (`stalecast train` writes one to OUT/checkpoint/)")
        updates["real.model"] = str(resolved)
    cfg = cfg.with_overrides(updates) if updates else cfg
    if cfg.hardware.profile is not None:
        _check_profile(cfg, origin("hardware.profile")[1])
    return cfg


def _check_profile(cfg: RunConfig, where: str) -> None:
    """The profile parses and, with the config's other hardware settings, gives every cost (see
    `sim.hardware.measured` for which tables a profile needs)."""
    from sim.hardware.cost import build_cost_model
    from sim.hardware.measured import load_profile

    try:
        build_cost_model(cfg, load_profile(cfg.hardware.profile))
    except ValueError as exc:
        raise ConfigError(f"{where}: hardware.profile: {exc}") from None


def config_help() -> str:
    """Every field with its type and help text, indented by section."""
    lines: list[str] = []

    def walk(model: type[BaseModel], indent: str) -> None:
        for name, field in model.model_fields.items():
            lines.append(f"{indent}{name}: {field.description or ''}")
            section = _section_model(field.annotation)  # a section, or an optional one (a policy's knobs)
            if section is not None and section not in _DIST_KINDS.values():
                walk(section, indent + "  ")

    walk(RunConfig, "")
    lines.append("length distributions (workload.prompt_len / response_len / turns.tool_tokens), by kind:")
    for model in (ConstantLen, ExponentialLen, LognormalLen, EmpiricalLen):
        walk(model, "  ")
    return "\n".join(lines)
