"""GPU memory of a run: what a rollout worker's KV cache holds, what the learner needs per GPU, and whether the
configuration fits at all (`hardware.memory`). Plain functions and frozen dataclasses; no I/O.

Units: bytes, and GB = 1e9 bytes, as the specs' `memory_gb` (the "80 GB" parts hold 80 GiB, so this is
conservative by ~7 %). Weights and activations are bf16 (2 bytes), as in the cost model.

**Rollout worker** (an inference engine on TP = `cluster.gpus_per_worker` GPUs, as vLLM allots memory):
  usable     = gpu_memory_utilization x memory x TP                     (vLLM's default utilisation 0.9)
  weights    = 2 bytes x params                   (split over the TP GPUs: params / TP per GPU)
  reserve    = rollout_reserve_gb x TP            (activation peak of a forward, CUDA graphs, NCCL and cuBLAS
                                                   buffers: vLLM logs 1.26 GiB + 1.79 GiB for Llama-3-8B on one
                                                   H100, vllm-project/vllm#10511; default the GPU spec's
                                                   engine_reserve_gb, 3 GB on the NVIDIA parts)
  KV budget  = usable - weights - reserve, in blocks of kv_block_tokens (vLLM's block_size, 16)
  KV bytes per token = 2 (K, V) x layers x kv heads x head_dim x bytes of kv_dtype, summed over the worker's GPUs:
               each holds ceil(kv_heads / TP) heads (vLLM replicates KV heads when TP > kv heads).
  Feasible when the budget holds one group at its longest: group_size sequences of (prompt_long + max_new_tokens)
  tokens, each in its own blocks (no prefix sharing counted), and TP divides the attention heads (and TP divides the
  kv heads or they divide TP), as vLLM requires.

**Learner** (FSDP / ZeRO-3 over L = `cluster.learner_gpus` GPUs):
  per GPU    = state bytes per parameter x params / L + activations per token x tokens of a micro-batch
  state bytes per parameter (weights + gradients + fp32 master + optimizer states, ZeRO paper, Rajbhandari et al.
  2020, sec. 3.1 "16 bytes per parameter" for mixed-precision Adam):

      precision   weights grads master per state | adamw (2 states)  sgd (momentum, 1 state)
      bf16_mixed     2      2     4       4      |       16                 12
      fp32           4      4     0       4      |       16                 12
      bf16           2      2     0       2      |        8                  6

  activations per token (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  arXiv 2205.05198, sec. 4, no tensor or sequence parallelism): a layer stores 34·s·b·h + 5·a·s²·b bytes; the
  a·s² term (attention scores) is never stored by a fused attention kernel (FlashAttention), as every current
  trainer uses, which is the paper's selective recomputation: 34·h bytes per token per layer. Output layers add
  4·h (final norm and LM-head inputs) + 4·v (fp32 logits of the loss, sec. 4.3). With full activation checkpointing
  a layer keeps only its input, 2·h, and the layer being recomputed in the backward pass needs its 34·h:
      without checkpointing: layers x 34·h + 4·h + 4·v
      with checkpointing:    layers x 2·h + 34·h + 4·h + 4·v
  usable per GPU = learner_memory_utilization x memory (the rest: CUDA context, NCCL buffers, FSDP's gathered
  layers, allocator fragmentation). Micro-batch tokens per GPU that fit = (usable - states / L) / activations per
  token (or micro_batch_tokens when given); feasible when that holds one whole sequence at its longest. A step
  needs ceil(step tokens / (L x micro-batch tokens)) micro-batches (packed).

**Co-located** (`cluster.colocated`): workers and learner share the L GPUs and their gpu_memory_utilization x
memory. Each side is given what the other leaves at its minimum (the learner at one longest sequence per micro-batch,
or micro_batch_tokens; the workers at one group each), and the configuration is feasible when both minimums fit.

Lengths (`Lengths`, from `sim.workload.workload_lengths`): prompt_long is the prompt's 99th percentile (the largest
value of an empirical list or of whole groups); a response's longest is max_new_tokens (multi-turn, workload.turns:
every turn at max_new_tokens and every tool output at its 99th percentile).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from sim.hardware.specs import GPUS, GPUSpec, ModelShape, resolve_model

GB = 1e9
NODE_GPUS = 8       # GPUs one NVLink domain (node) holds, as the cost model assumes
ACT_BYTES = 2       # bf16 activations

KV_DTYPE_BYTES = {"bf16": 2, "fp8": 1}
# precision -> bytes per parameter of (weights, gradients, fp32 master weights, one optimizer state)
PRECISION_BYTES = {"bf16_mixed": (2, 2, 4, 4), "fp32": (4, 4, 0, 4), "bf16": (2, 2, 0, 2)}
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}  # Adam: first and second moments; SGD: momentum


# --------------------------------------------------------------------------- per-token and per-parameter sizes
def state_bytes_per_param(precision: str = "bf16_mixed", optimizer: str = "adamw") -> int:
    """Bytes of training state per parameter: weights + gradients + master weights + optimizer states."""
    weights, grads, master, state = PRECISION_BYTES[precision]
    return weights + grads + master + OPTIMIZER_STATES[optimizer] * state


def kv_heads_per_gpu(model: ModelShape, tp: int = 1) -> int:
    """KV heads each of a TP group's GPUs holds: split when TP <= kv heads, else one, replicated (vLLM)."""
    return -(-model.kv_heads // tp)


def kv_bytes_per_token(model: ModelShape, tp: int = 1, kv_dtype: str = "bf16") -> int:
    """KV-cache bytes one context token occupies on a worker of TP GPUs, summed over them (GQA-aware): 2 x layers x
    kv heads x head_dim x dtype bytes at TP 1; more when TP exceeds the kv heads and they are replicated."""
    return tp * 2 * model.layers * kv_heads_per_gpu(model, tp) * model.head_dim * KV_DTYPE_BYTES[kv_dtype]


def activation_bytes_per_token(model: ModelShape, checkpointing: bool = True) -> int:
    """Learner activation bytes per micro-batch token (module docstring: Korthikanti et al. 2022 with fused
    attention, plus the output layer's inputs and fp32 logits)."""
    h, out = model.hidden, 4 * model.hidden + 4 * model.vocab
    if checkpointing:
        return model.layers * 2 * h + 34 * h + out
    return model.layers * 34 * h + out


def paged(tokens: float, block_tokens: int) -> int:
    """Tokens rounded up to whole KV blocks."""
    return -(-math.ceil(tokens) // block_tokens) * block_tokens


def tp_problem(model: ModelShape, tp: int) -> str | None:
    """Why vLLM cannot shard this model over tp GPUs (None if it can): the attention heads must divide evenly, and
    the kv heads must divide evenly or be replicated a whole number of times."""
    if model.heads % tp:
        return f"its {model.heads} attention heads do not divide over TP {tp}"
    if (model.kv_heads % tp) if tp <= model.kv_heads else (tp % model.kv_heads):
        return f"its {model.kv_heads} KV heads neither divide over TP {tp} nor replicate evenly across it"
    return None


@dataclass(frozen=True)
class Lengths:
    """The workload's lengths that memory depends on (tokens)."""
    prompt_mean: float
    prompt_long: int          # 99th percentile (largest of a finite list)
    response_mean: float      # after the max_new_tokens cap (multi-turn: every turn and tool output)
    max_new_tokens: int       # a response's longest (multi-turn: every turn at the cap, every tool output long)
    group_size: int
    batch_prompts: int
    turns: int = 1

    @property
    def seq_mean(self) -> float:
        return self.prompt_mean + self.response_mean

    @property
    def seq_long(self) -> int:
        return self.prompt_long + self.max_new_tokens

    @property
    def response_long_label(self) -> str:
        """How an error message names max_new_tokens: the field, or (multi-turn) what it adds up."""
        return "max_new_tokens" if self.turns == 1 else f"{self.turns} turns and their tool outputs at the longest"

    @property
    def step_tokens(self) -> float:
        """Expected (packed) tokens of one learner step."""
        return self.batch_prompts * self.group_size * self.seq_mean


# --------------------------------------------------------------------------- rollout worker
@dataclass(frozen=True)
class RolloutMemory:
    gpu: str
    tp: int
    usable_gb: float          # the worker's share, summed over its GPUs
    usable_note: str          # how usable was obtained, for messages
    weights_gb: float
    reserve_gb: float
    kv_budget_gb: float       # usable - weights - reserve (negative when they do not fit)
    kv_bytes_per_token: int
    kv_block_tokens: int
    kv_blocks: int
    kv_tokens: int            # kv_blocks x kv_block_tokens
    min_kv_tokens: int        # one group at its longest, in blocks
    min_kv_gb: float
    seqs_mean: int            # sequences of mean final length (prompt + response) the budget holds at once
    seqs_long: int            # ... of the longest length
    problem: str | None       # why the worker cannot run, or None

    @property
    def feasible(self) -> bool:
        return self.problem is None


def rollout_memory(gpu: GPUSpec, model: ModelShape, tp: int, mem, lengths: Lengths,
                   usable_bytes: float | None = None, usable_note: str | None = None) -> RolloutMemory:
    """One rollout worker on tp GPUs. `mem`: a `hardware.memory` section. usable_bytes: the worker's memory when
    something else claims part of its GPUs (co-location); default gpu_memory_utilization x memory x tp."""
    if usable_bytes is None:
        usable_bytes = mem.gpu_memory_utilization * gpu.memory_gb * GB * tp
        scale = f"{tp} x {gpu.memory_gb:g} GB" if tp > 1 else f"{gpu.memory_gb:g} GB"
        usable_note = f"gpu_memory_utilization {mem.gpu_memory_utilization:g} x {scale}"
    where = f"{tp} x {gpu.name}" if tp > 1 else gpu.name
    reserve_gb = gpu.engine_reserve_gb if mem.rollout_reserve_gb is None else mem.rollout_reserve_gb
    weights, reserve = model.weight_bytes(), reserve_gb * GB * tp
    per_token, block = kv_bytes_per_token(model, tp, mem.kv_dtype), mem.kv_block_tokens
    budget = usable_bytes - weights - reserve
    blocks = max(0, int(budget // (block * per_token)))
    tokens = blocks * block
    long_seq = paged(lengths.seq_long, block)
    min_tokens = lengths.group_size * long_seq
    min_kv = min_tokens * per_token
    problem = tp_problem(model, tp)
    if problem is not None:
        problem = f"rollout worker of TP {tp}: vLLM cannot shard {model.name}: {problem}"
    elif tokens < min_tokens:
        problem = (f"rollout worker: weights {weights / GB:.1f} GB + reserve {reserve / GB:.1f} GB + minimum KV "
                   f"{min_kv / GB:.1f} GB (one group: {lengths.group_size} sequences of {lengths.seq_long:,} tokens "
                   f"at {per_token:,} B/token) > {usable_bytes / GB:.1f} GB usable on {where} ({usable_note})")
    return RolloutMemory(gpu.name, tp, usable_bytes / GB, usable_note or "", weights / GB, reserve / GB, budget / GB,
                         per_token, block, blocks, tokens, min_tokens, min_kv / GB,
                         tokens // paged(lengths.seq_mean, block), tokens // long_seq, problem)


# --------------------------------------------------------------------------- learner
@dataclass(frozen=True)
class LearnerMemory:
    gpu: str
    gpus: int
    usable_gb: float            # per GPU
    usable_note: str
    state_bytes_per_param: int
    states_gb: float            # total, before sharding
    states_per_gpu_gb: float
    activation_bytes_per_token: int
    checkpointing: bool
    max_micro_tokens: int       # tokens per GPU per micro-batch that fit (0 when the states alone do not)
    micro_tokens: int           # micro_batch_tokens when given, else max_micro_tokens
    step_tokens: float          # expected packed tokens per learner step
    micro_batches: int | None   # per step at step_tokens (None when no micro-batch fits)
    problem: str | None

    @property
    def feasible(self) -> bool:
        return self.problem is None

    def micro_batches_for(self, tokens: float) -> int:
        """Micro-batches a step of `tokens` (packed, over all learner GPUs) needs; 1 when none fits (an infeasible
        learner is charged as one)."""
        if self.micro_tokens < 1:
            return 1
        return max(1, math.ceil(tokens / (self.gpus * self.micro_tokens)))


def learner_memory(gpu: GPUSpec, model: ModelShape, gpus: int, mem, lengths: Lengths,
                   usable_bytes: float | None = None, usable_note: str | None = None) -> LearnerMemory:
    """The learner sharded over `gpus` GPUs. usable_bytes: per GPU (default learner_memory_utilization x memory)."""
    if usable_bytes is None:
        usable_bytes = mem.learner_memory_utilization * gpu.memory_gb * GB
        usable_note = f"learner_memory_utilization {mem.learner_memory_utilization:g} x {gpu.memory_gb:g} GB"
    per_param = state_bytes_per_param(mem.precision, mem.optimizer)
    states = per_param * model.params
    per_gpu = states / gpus
    act = activation_bytes_per_token(model, mem.activation_checkpointing)
    room = usable_bytes - per_gpu
    max_tokens = max(0, int(room // act))
    given = mem.micro_batch_tokens
    micro = given if given is not None else max_tokens
    long_seq = lengths.seq_long
    states_text = (f"states {per_gpu / GB:.1f} GB per GPU ({per_param} B/param, {mem.precision} {mem.optimizer}, "
                   f"{states / GB:.1f} GB over {gpus} GPU{'s' if gpus > 1 else ''})")
    usable_text = f"{usable_bytes / GB:.1f} GB usable per GPU on {gpu.name} ({usable_note})"
    problem = None
    if given is not None and given < long_seq:
        problem = (f"learner: micro_batch_tokens {given:,} cannot hold the longest sequence, {long_seq:,} tokens "
                   f"(prompt {lengths.prompt_long:,} + {lengths.response_long_label} {lengths.max_new_tokens:,})")
    elif max(given or 0, long_seq) > max_tokens:
        need = max(given or 0, long_seq)
        what = (f"a {need:,}-token micro-batch (micro_batch_tokens)" if given is not None
                else f"one {need:,}-token sequence")
        problem = (f"learner: {states_text} + activations of {what} {need * act / GB:.1f} GB > {usable_text}")
    n = math.ceil(lengths.step_tokens / (gpus * micro)) if micro >= 1 else None
    return LearnerMemory(gpu.name, gpus, usable_bytes / GB, usable_note or "", per_param, states / GB, per_gpu / GB,
                         act, mem.activation_checkpointing, max_tokens, micro, lengths.step_tokens, n, problem)


# --------------------------------------------------------------------------- a whole configuration
@dataclass(frozen=True)
class MemoryReport:
    rollout: RolloutMemory
    learner: LearnerMemory
    colocated: bool

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(p for p in (self.rollout.problem, self.learner.problem) if p is not None)

    @property
    def feasible(self) -> bool:
        return not self.problems

    @property
    def reason(self) -> str | None:
        """Why the configuration does not fit, on one line (None when it does)."""
        return "; ".join(self.problems) or None

    def summary(self) -> str:
        """One line: a worker's weights, KV budget and the sequences it holds; the learner's states and
        micro-batches."""
        r, lm = self.rollout, self.learner
        where = f"TP {r.tp} on {r.gpu}" + (", co-located" if self.colocated else "")
        micro = (f"micro-batches of up to {lm.micro_tokens:,} tokens per GPU, {lm.micro_batches} per step"
                 if lm.micro_batches is not None else "no micro-batch fits")
        return (f"rollout worker ({where}): weights {r.weights_gb:.1f} GB, KV budget "
                f"{max(r.kv_budget_gb, 0):.1f} GB = {r.kv_tokens:,} tokens ({r.seqs_mean:,} sequences of mean length, "
                f"{r.seqs_long:,} of the longest); "
                f"learner: {lm.states_per_gpu_gb:.1f} GB of states per GPU, {micro}")

    def concurrency_note(self, concurrency: int) -> str | None:
        """A caveat when a worker decodes more sequences at once than its KV budget holds at mean length."""
        if concurrency <= self.rollout.seqs_mean:
            return None
        return (f"concurrency {concurrency} is above the {self.rollout.seqs_mean:,} sequences of mean length the KV "
                f"budget holds: an engine would hold the rest back or preempt them")

    def as_dict(self) -> dict:
        return {"feasible": self.feasible, "reason": self.reason, "colocated": self.colocated,
                "rollout": asdict(self.rollout), "learner": asdict(self.learner)}

    def columns(self) -> dict:
        """A few numbers for a table row (plan)."""
        return {"memory/kv_tokens": self.rollout.kv_tokens, "memory/kv_seqs_mean": self.rollout.seqs_mean,
                "memory/kv_seqs_long": self.rollout.seqs_long, "memory/micro_tokens": self.learner.micro_tokens,
                "memory/micro_batches": self.learner.micro_batches}


def memory_report(cfg, lengths: Lengths, tp: int | None = None, rollout_workers: int | None = None,
                  learner_gpus: int | None = None) -> MemoryReport | None:
    """Memory of a `RunConfig` (optionally at another split); None when it names no GPU or gives fixed times
    (`hardware.constant`: no hardware is modelled)."""
    hw, cl = cfg.hardware, cfg.cluster
    if hw.gpu is None or hw.constant is not None:
        return None
    gpu, model, mem = GPUS[hw.gpu], resolve_model(hw.model), hw.memory
    tp = cl.gpus_per_worker if tp is None else tp
    workers = cl.rollout_workers if rollout_workers is None else rollout_workers
    gpus = cl.learner_gpus if learner_gpus is None else learner_gpus
    if not cl.colocated:
        return MemoryReport(rollout_memory(gpu, model, tp, mem, lengths),
                            learner_memory(gpu, model, gpus, mem, lengths), False)
    # Co-located: R workers of tp GPUs and the learner share the L GPUs' pool; each side gets what the other's
    # minimum leaves.
    pool = mem.gpu_memory_utilization * gpu.memory_gb * GB
    alone = learner_memory(gpu, model, gpus, mem, lengths, usable_bytes=pool, usable_note="")
    learner_min = alone.states_per_gpu_gb * GB + max(mem.micro_batch_tokens or 0, lengths.seq_long) * \
        alone.activation_bytes_per_token
    worker_share = (pool - learner_min) * gpus / workers
    rollout = rollout_memory(gpu, model, tp, mem, lengths, usable_bytes=worker_share,
                             usable_note=f"co-located: gpu_memory_utilization {mem.gpu_memory_utilization:g} x "
                                         f"{gpu.memory_gb:g} GB x {gpus} GPU(s) less the learner's minimum "
                                         f"{learner_min * gpus / GB:.1f} GB, over {workers} worker(s)")
    rollout_min = workers * (rollout.weights_gb + rollout.reserve_gb + rollout.min_kv_gb) * GB / gpus
    learner = learner_memory(gpu, model, gpus, mem, lengths, usable_bytes=pool - rollout_min,
                             usable_note=f"co-located: gpu_memory_utilization {mem.gpu_memory_utilization:g} x "
                                         f"{gpu.memory_gb:g} GB less the workers' minimum {rollout_min / GB:.1f} GB")
    return MemoryReport(rollout, learner, True)


def infeasible_message(report: MemoryReport) -> str:
    """The one-line refusal `stalecast simulate` prints."""
    return f"the configuration does not fit in GPU memory: {report.reason}"


# --------------------------------------------------------------------------- KV capacity of the simulation
@dataclass(frozen=True)
class KVCapacity:
    """What the simulator's rollout workers admit and evict against (sim/engine/kernel.py)."""
    policy: str                 # hardware.memory.kv_policy; "unlimited" when there is no budget
    budget_tokens: int | None   # per worker; None: no limit
    source: str                 # where the budget comes from, for reports
    swap_s_per_token: float     # seconds to copy one token's KV between a worker's GPUs and host memory, one way


def kv_capacity(cfg, lengths: Lengths | None = None) -> KVCapacity:
    """The KV budget a run's workers hold: hardware.memory.kv_budget_tokens, else the memory model's (a GPU
    modelled and the worker fits), else none. Raises ValueError when a given budget cannot hold one group at its longest (the memory
    model's own budget is checked by its feasibility) or preempt_swap has no host link to copy over. lengths:
    the workload's (default: worked out here, only when a budget applies)."""
    hw, mem = cfg.hardware, cfg.hardware.memory
    budget, source = mem.kv_budget_tokens, "hardware.memory.kv_budget_tokens"
    modelled = hw.gpu is not None and hw.constant is None
    if mem.kv_policy == "unlimited" or (budget is None and not modelled):
        return KVCapacity("unlimited", None, "", 0.0)
    if lengths is None:
        from sim.workload import workload_lengths
        lengths = workload_lengths(cfg.workload)
    if budget is None:
        rollout = memory_report(cfg, lengths).rollout
        if not rollout.feasible:  # simulated anyway (--allow-infeasible, memory.check false): as if KV were ample
            return KVCapacity("unlimited", None, "none: the rollout worker does not fit in memory", 0.0)
        budget, source = rollout.kv_tokens, "the memory model's KV budget"
    else:
        need = lengths.group_size * lengths.seq_long
        if budget < need:
            raise ValueError(f"hardware.memory.kv_budget_tokens: {budget:,} tokens cannot hold one group at its "
                             f"longest: {lengths.group_size} sequences of {lengths.seq_long:,} tokens (prompt "
                             f"{lengths.prompt_long:,} at its 99th percentile + {lengths.response_long_label} "
                             f"{lengths.max_new_tokens:,}) = {need:,}")
    swap_s = 0.0
    if mem.kv_policy == "preempt_swap":
        gbps = mem.swap_gbps if mem.swap_gbps is not None else (GPUS[hw.gpu].host_gbps if hw.gpu else None)
        if gbps is None:
            raise ValueError("hardware.memory.swap_gbps: preempt_swap copies KV to host memory and needs the link's "
                             "bandwidth: give swap_gbps, or hardware.gpu for its spec's")
        tp = cfg.cluster.gpus_per_worker
        swap_s = kv_bytes_per_token(resolve_model(hw.model), tp, mem.kv_dtype) / (tp * gbps * GB)
    return KVCapacity(mem.kv_policy, int(budget), source, swap_s)
