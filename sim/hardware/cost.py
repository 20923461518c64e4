"""The cost model the simulator calls: decode step, prefill, learner step and weight-sync times.

Three sources, per table: a measured profile's table if it has one, else fixed times
(`hardware.constant`), else the analytic roofline of `hardware.gpu` running `hardware.model`:

- decode step(n, x) = overhead + max(mem, comp) + allreduce(n), n active sequences with x context tokens in total;
  mem  = (weight bytes + KV bytes/token * x) / (TP * HBM * decode_mem)
  comp = (2 * params * n + attention FLOPs/context token * x) / (TP * peak * decode_compute)
  TP = cluster.gpus_per_worker splits the weight and KV reads (KV bytes/token are the worker's, summed over its GPUs:
  more than the model's when TP exceeds its kv heads, which are then replicated) and the FLOPs;
  allreduce(n) = 2 * layers * (latency + 2(TP-1)/TP * n * hidden * 2 bytes / (link * tp_allreduce)), 0 at TP 1.
- prefill(p) = (2 * params * p + attention FLOPs/context token * p(p+1)/2) / (TP * peak * prefill_mfu)
  + 2 * layers * 2(TP-1)/TP * p * hidden * 2 bytes / (link * tp_allreduce):
  the causal attention term counts each prompt token against the tokens before it (and itself); the all-reduce
  latency is charged in the decode steps whose forward passes carry the prefill (vLLM's chunked prefill).
- train(t) = 6 * params * t / (learner GPUs * peak * train_mfu) + train_step_overhead_s
  + (micro-batches(t) - 1) * micro_batch_overhead_s, micro-batches from the learner's memory (sim/hardware/memory.py)
- sync = weight bytes / (link * network) + sync_latency_s; NVLink when the whole cluster fits one
  8-GPU node (or is colocated), else the per-GPU network.
- the learner's bookkeeping after each publish (`bookkeeping_s`): a profile's learner_bookkeeping_s, else the
  efficiency section's, whatever the source of the other costs.

All weights are bf16 (2 bytes), the KV cache `hardware.memory.kv_dtype` (bf16 by default). When workers and learner
share GPUs in a mode that overlaps them (not sync), generation times are multiplied by the generation colocation
slowdown, whatever the source, and the engine slows each learner step by the training one while workers generate
(`train_slowdown`; `train_s` is the step alone). A profile's factors override the efficiency ones. In sync mode
only a profile's `sync_gen_slowdown` applies (workers generating beside each other, the learner idle). A profile
may give a generation factor against the workers' idle fraction (`IdleCurve`); the cost model takes it at the
fraction it is built for. In sync mode a profile may also give the factor against how many other workers generate
at once (`sync_gen_beside`), back to back: a run's workers are often not all generating (a long tail drains on one
worker), so the sync factor is then `crowding`, the mean of that curve over the run's generating time, times the
idle curve's rhythm effect (`crowded`). The factor per run is one number (the engines charge no factor that changes
within a run): `sim.engine.pipeline.settled_cost_model` finds the idle fraction and crowd a run settles at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from sim.engine import kernel as K
from sim.hardware.measured import DecodeGrid, IdleCurve, MeasuredProfile, interp_linear, load_profile, slowdown_at
from sim.hardware.memory import ACT_BYTES, NODE_GPUS, kv_bytes_per_token, memory_report
from sim.hardware.specs import GPUS, resolve_model


@dataclass(frozen=True)
class PrefillCurve:
    """Prefill seconds against prompt tokens p: (linear·p + quadratic·p(p+1)/2) / rate, or, when `tokens` is
    given, the measured curve through (tokens, seconds). Plain numbers, evaluated by one compiled function
    (kernel.prefill_time) for both engines."""
    linear: float = 0.0
    quadratic: float = 0.0
    rate: float = 1.0
    tokens: tuple[float, ...] = ()
    seconds: tuple[float, ...] = ()


class CostModel:
    """Costs of one run's workers and learner. Built by `build_cost_model`; no I/O."""

    def __init__(self, max_n: int, decode_x: np.ndarray, decode_y: np.ndarray,
                 prefill: PrefillCurve, train: Callable[[float], float], sync_s: float,
                 gen_slowdown: float = 1.0, train_slowdown: float = 1.0, sources: dict[str, str] | None = None,
                 worker_idle: float | None = None, bookkeeping_s: float = 0.0, beside: float | None = None):
        self.max_n = max_n
        self.bookkeeping_s = bookkeeping_s  # the learner's work per step after publishing, beside generation
        self.worker_idle = worker_idle  # the idle fraction gen_slowdown was taken at (None: not asked, no curve)
        self.beside = beside  # the mean number of other workers generating it was taken at (None: not asked)
        self.gen_slowdown, self.train_slowdown = gen_slowdown, train_slowdown
        self.sources = sources or {}  # table -> "measured" | "constant" | "analytic", for summaries
        self._x = np.ascontiguousarray(decode_x, dtype=np.float64)
        self._y = np.ascontiguousarray(decode_y * gen_slowdown, dtype=np.float64)
        self._x.flags.writeable = self._y.flags.writeable = False  # shared by every caller
        self._pf = np.array([prefill.linear, prefill.quadratic, prefill.rate, gen_slowdown], np.float64)
        self._pxs, self._pys = (np.ascontiguousarray(a, dtype=np.float64) for a in (prefill.tokens, prefill.seconds))
        self._train, self._sync = train, sync_s

    def decode_table(self) -> tuple[np.ndarray, np.ndarray]:
        """X, Y of shape (max_n + 1, M): row n gives one decode step's seconds (Y) against the total
        context tokens (X) of n active sequences, piecewise-linear, extended linearly beyond the last two
        points. Row 0 repeats row 1. Tables built here have X[n, 0] = 0 and strictly increasing X."""
        return self._x, self._y

    def decode_step_s(self, n: int, x: float) -> float:
        """One decode step with n active sequences holding x context tokens in total (same function as
        decode_table)."""
        xs, ys = self._x[n], self._y[n]
        if x <= xs[-1]:
            return float(np.interp(x, xs, ys))
        return float(ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))

    def prefill_s(self, prompt_tokens: int) -> float:
        """Prefill of one group's prompt, shared by the group's samples (or of a static batch's prompts)."""
        return float(K.prefill_time(self._pf, self._pxs, self._pys, prompt_tokens))

    def prefill_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(parameters, curve tokens, curve seconds) of kernel.prefill_time: prefill_s for compiled code."""
        return self._pf, self._pxs, self._pys

    def train_s(self, tokens: int) -> float:
        """One learner step over `tokens` (hardware.train_tokens: packed or padded), with no worker generating
        beside it (the engine applies `train_slowdown` while they do)."""
        return self._train(tokens)

    def sync_s(self) -> float:
        """One weight sync (publish and load)."""
        return self._sync


def build_cost_model(cfg, profile: MeasuredProfile | None = None, worker_idle: float | None = None,
                     beside: np.ndarray | None = None, gen_factor: float | None = None) -> CostModel:
    """The cost model of a `RunConfig`, with an already-loaded profile's tables overriding; no I/O. worker_idle:
    the fraction of time the workers idle, where a profile's generation slowdown depends on it (None: back to
    back, 0); beside: the shares of generating time beside k other workers generating (`sim.metrics.
    generating_beside`), where it depends on those (None: all generating); gen_factor: charge this generation
    factor instead (settled_cost_model's search)."""
    hw, cl = cfg.hardware, cfg.cluster
    max_n = cl.max_concurrency
    if hw.constant is not None:
        parts, base = _constant_parts(hw.constant, max_n), "constant"
    elif hw.gpu is not None:
        parts, base = _analytic_parts(cfg), "analytic"
    else:
        parts, base = {}, None
    sources = dict.fromkeys(parts, base)
    if profile is not None:
        measured = _measured_parts(profile, max_n)
        parts.update(measured)
        sources.update(dict.fromkeys(measured, "measured"))
    missing = [k for k in ("decode", "prefill", "train", "sync") if k not in parts]
    if missing:
        names = ", ".join("sync_s" if k == "sync" else k for k in missing)
        where = f"{hw.profile}: " if hw.profile else ""
        raise ValueError(f"{where}the profile lacks {names}, and with hardware.gpu null and no hardware.constant "
                         f"nothing else gives those costs: profile them (`stalecast profile`) or set hardware.gpu")

    factor, curve, mean_beside = generation_slowdown(cfg, profile), crowd_curve(cfg, profile), None
    gen, train = slowdown_at(factor, worker_idle or 0.0), 1.0
    if curve is not None and beside is not None:
        gen = crowded(factor, crowding(curve, beside), worker_idle or 0.0)
        mean_beside = float(np.dot(np.arange(len(beside)), beside))
    if cl.colocated and cfg.pipeline.mode != "sync":
        measured = profile.colocation if profile is not None else None
        train = measured.train_slowdown if measured is not None else hw.efficiency.colocation_train_slowdown
    x, y = parts["decode"]
    measured_bk = profile.learner_bookkeeping_s if profile is not None else None
    bookkeeping = measured_bk if measured_bk is not None else hw.efficiency.learner_bookkeeping_s
    return CostModel(max_n, x, y, parts["prefill"], parts["train"], parts["sync"],
                     gen if gen_factor is None else gen_factor, train, sources, worker_idle, bookkeeping, mean_beside)


def generation_slowdown(cfg, profile: MeasuredProfile | None) -> "float | IdleCurve":
    """The factor on a worker's generation in the configured mode: a number, or a profile's curve against the
    fraction of time the workers idle (`settled_cost_model` finds the fraction a run settles at)."""
    measured = profile.colocation if profile is not None else None
    if not cfg.cluster.colocated:
        return 1.0
    if cfg.pipeline.mode == "sync":  # the learner idles while workers generate, beside each other
        return measured.sync_gen_slowdown if measured is not None else 1.0
    return measured.gen_slowdown if measured is not None else cfg.hardware.efficiency.colocation_gen_slowdown


def crowd_curve(cfg, profile: MeasuredProfile | None) -> tuple[float, ...] | None:
    """The profile's sync generation factor against the number of other workers generating, where the configured
    run charges it (sync mode, co-located, several workers); else None."""
    measured = profile.colocation if profile is not None else None
    if (measured is None or measured.sync_gen_beside is None or not cfg.cluster.colocated
            or cfg.pipeline.mode != "sync" or cfg.cluster.rollout_workers < 2):
        return None
    return measured.sync_gen_beside


def crowding(curve: tuple[float, ...], beside: np.ndarray) -> float:
    """The generation factor back to back of a run whose generating time is spent beside k other workers in shares
    beside[k]: sum_k beside[k] curve[k], k beyond the curve's end charged at its end (a profile of fewer workers than
    the run's); the full crowd's curve[-1] where nothing generated."""
    k = np.minimum(np.arange(len(beside)), len(curve) - 1)
    return float(np.dot(beside, np.asarray(curve)[k])) if np.sum(beside) > 0 else float(curve[-1])


def crowded(factor: "float | IdleCurve", crowd: float, idle: float) -> float:
    """The sync generation factor of a run whose crowd (`crowding`) charges `crowd` back to back: that, times the
    idle curve's rhythm effect, its value at the run's idle fraction over its value back to back."""
    return crowd * slowdown_at(factor, idle) / slowdown_at(factor, 0.0)


def cost_model_for(cfg, worker_idle: float | None = None, beside: np.ndarray | None = None) -> CostModel:
    """Load `hardware.profile` (if any) and build the cost model at a workers' idle fraction (and, in sync mode,
    the shares of generating time beside k other workers, `sim.metrics.generating_beside`)."""
    profile = load_profile(cfg.hardware.profile) if cfg.hardware.profile else None
    return build_cost_model(cfg, profile, worker_idle, beside)


# --------------------------------------------------------------------------- sources
def _constant_parts(c, max_n: int) -> dict:
    x = np.tile([0.0, 1.0, 2.0], (max_n + 1, 1))
    return {"decode": (x, np.full_like(x, c.decode_step_s)),
            "prefill": PrefillCurve(linear=c.prefill_s_per_token),
            "train": lambda t: c.train_step_s + c.train_s_per_token * t,
            "sync": c.sync_s}


def _analytic_parts(cfg) -> dict:
    hw, cl, eff = cfg.hardware, cfg.cluster, cfg.hardware.efficiency
    gpu, m = GPUS[hw.gpu], resolve_model(hw.model)
    tp, peak = cl.gpus_per_worker, gpu.bf16_tflops * 1e12

    # Decode: for fixed n both mem and comp are lines in x, so the row is exact with three points:
    # 0, their crossover xc (where the steeper line takes over) and 2*xc on the steeper line. The KV read per
    # context token is the worker's KV bytes per token (more than the model's when TP exceeds its kv heads).
    mem_bw = tp * gpu.hbm_gbps * 1e9 * eff.decode_mem
    flops = tp * peak * eff.decode_compute
    n = np.maximum(np.arange(cl.max_concurrency + 1), 1).astype(np.float64)  # row 0 = row 1
    a_mem, b_mem = m.weight_bytes() / mem_bw, kv_bytes_per_token(m, tp, hw.memory.kv_dtype) / mem_bw
    a_comp, b_comp = 2 * m.params * n / flops, m.attn_flops_per_ctx_token / flops
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = (a_comp - a_mem) / (b_mem - b_comp)
    xc = np.where(np.isfinite(xc) & (xc > 0), xc, 1.0)  # no crossover at x > 0: any positive point
    x = np.column_stack([np.zeros_like(xc), xc, 2 * xc])
    y = eff.decode_step_overhead_s + np.maximum(a_mem + b_mem * x, a_comp[:, None] + b_comp * x)

    prefill_linear = 2.0 * m.params
    prefill_rate = tp * peak * eff.prefill_mfu
    if tp > 1:  # the all-reduces of tensor parallelism, the same in every row's points (they do not depend on x)
        latency, per_token = tp_allreduce_parts(cfg)
        y = y + (latency + per_token * n)[:, None]
        # Prefill pays the bytes; its all-reduce calls (and their latency) are the decode step's, as vLLM schedules
        # prefill chunks into the same forward passes.
        prefill_linear += per_token * prefill_rate
    train_rate = cl.learner_gpus * peak * eff.train_mfu
    link = gpu.intra_node_gbps if cl.colocated or cl.total_gpus <= 8 else gpu.inter_node_gbps
    return {"decode": (x, y),
            "prefill": PrefillCurve(prefill_linear, float(m.attn_flops_per_ctx_token), prefill_rate),
            "train": _train_time(cfg, m.params, train_rate),
            "sync": m.weight_bytes() / (link * 1e9 * eff.network) + eff.sync_latency_s}


def tp_allreduce_parts(cfg) -> tuple[float, float]:
    """Seconds of a decode step's tensor-parallel all-reduces: (fixed part, part per token in the step). Megatron-style
    TP all-reduces the activations twice per layer (after attention and after the MLP): each one costs the GPU's
    all-reduce latency plus a ring's 2(TP-1)/TP x bytes over the link, tokens x hidden x 2 bytes (bf16), at
    `efficiency.tp_allreduce` of the link (NVLink within a node of 8, the network beyond). (0, 0) at TP 1."""
    hw, tp = cfg.hardware, cfg.cluster.gpus_per_worker
    if tp <= 1:
        return 0.0, 0.0
    gpu, m = GPUS[hw.gpu], resolve_model(hw.model)
    link = (gpu.intra_node_gbps if tp <= NODE_GPUS else gpu.inter_node_gbps) * 1e9 * hw.efficiency.tp_allreduce
    calls = 2 * m.layers
    return calls * gpu.allreduce_latency_us * 1e-6, calls * 2 * (tp - 1) / tp * m.hidden * ACT_BYTES / link


def _train_time(cfg, params: float, train_rate: float) -> Callable[[float], float]:
    """6·N·tokens / rate + step overhead, plus micro_batch_overhead_s per micro-batch beyond the first (the count from
    the learner's memory, `sim.hardware.memory`)."""
    eff = cfg.hardware.efficiency
    base, per_micro = eff.train_step_overhead_s, eff.micro_batch_overhead_s
    if per_micro == 0:
        return lambda t: 6 * params * t / train_rate + base
    from sim.workload import workload_lengths  # reads an empirical trace, when the workload resamples one

    learner = memory_report(cfg, workload_lengths(cfg.workload)).learner
    return lambda t: 6 * params * t / train_rate + base + (learner.micro_batches_for(t) - 1) * per_micro


def _measured_parts(profile: MeasuredProfile, max_n: int) -> dict:
    parts = {}
    if profile.decode is not None:
        parts["decode"] = _measured_decode(profile.decode, max_n)
    if profile.prefill is not None:
        parts["prefill"] = PrefillCurve(tokens=profile.prefill.tokens, seconds=profile.prefill.seconds)
    if profile.train is not None:
        parts["train"] = profile.train
    if profile.sync_s is not None:
        parts["sync"] = profile.sync_s
    return parts


def _measured_decode(d: DecodeGrid, max_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows over total context x = n * mean context: interpolate (or extend) linearly between the
    measured active counts, then add x = 0 by extending the first context segment and a tail point at
    twice the last context that keeps the last slope but never lets it go negative (the simulator
    extends the last segment to infinity)."""
    n = np.maximum(np.arange(max_n + 1), 1).astype(np.float64)  # row 0 = row 1
    s = np.maximum(interp_linear(d.active, d.seconds, n), 0.0)  # (max_n + 1, len(context))
    c = np.asarray(d.context, dtype=np.float64)
    first_slope = (s[:, 1] - s[:, 0]) / (c[1] - c[0])
    last_slope = np.maximum((s[:, -1] - s[:, -2]) / (c[-1] - c[-2]), 0.0)
    y = np.column_stack([np.maximum(s[:, 0] - c[0] * first_slope, 0.0), s, s[:, -1] + c[-1] * last_slope])
    x = n[:, None] * np.concatenate([[0.0], c, [2 * c[-1]]])
    return x, y
