"""Named GPU specs and model shapes for the analytic cost model. Plain data, no I/O.

GPU FLOP/s are dense bf16 tensor-core peaks (datasheets headline the 2:4-sparse figure, twice these).
Bandwidths are in GB/s (1e9 bytes/s); link bandwidths are per GPU and one direction (datasheets quote
NVLink bidirectional, twice these). Inter-node bandwidth assumes one NIC per GPU, as in the DGX/HGX
reference designs.

All-reduce latency (the fixed part of a tensor-parallel all-reduce, `allreduce_latency_us`): 8 us on the NVLink
parts, from measured small-message all-reduces on 8x H100 SXM: vLLM's custom all-reduce takes 8.5-11.8 us for
0.5-32 KB at TP 2/4/8 (without CUDA graphs; sgl-project/sglang#2904), NCCL's NVLS 6 us at 2 GPUs with CUDA graphs
(NVIDIA/nccl#1259), MSCCL++'s NVLS 5.5-8 us for 1-64 KB on 8 GPUs (microsoft/mscclpp#507). No measurement was found
for A100, H800 or H20: they take the same 8 us (an assumption, stated here). The cpu placeholder's 50 us is a guess.

Engine reserve (`engine_reserve_gb`, the default of hardware.memory.rollout_reserve_gb): what an inference engine
holds per GPU beyond weights and KV cache. vLLM's memory profile of Llama-3-8B on one H100 logs a PyTorch activation
peak of 1.26 GiB and 1.79 GiB of non-torch memory (CUDA context, NCCL and cuBLAS buffers), 3.05 GiB in all
(vllm-project/vllm#10511): 3 GB on every NVIDIA part (at TP 2 the same log shows 3.58 GiB of non-torch memory per
GPU: more with tensor parallelism, which this does not model). The cpu placeholder's 0.25 GB is a guess at a torch
process's own overhead.

Host link (`host_gbps`, what preempt_swap copies KV over): PCIe per GPU and direction, half the datasheets'
bidirectional figure: A100 SXM PCIe Gen4 64 GB/s -> 32; H100 SXM, H200, H800 and H20 PCIe Gen5 128 GB/s -> 64. The
cpu placeholder's 10 GB/s is its "intra-node" in-memory copy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPUSpec:
    name: str
    bf16_tflops: float      # dense bf16 tensor-core peak, TFLOP/s
    hbm_gbps: float         # device memory bandwidth, GB/s
    memory_gb: float        # device memory, GB
    intra_node_gbps: float  # NVLink per GPU, one direction, GB/s
    inter_node_gbps: float  # network per GPU, one direction, GB/s
    allreduce_latency_us: float = 8.0  # one small intra-node all-reduce (tensor parallelism), microseconds
    engine_reserve_gb: float = 3.0     # memory an inference engine holds per device beyond weights and KV, GB
    host_gbps: float = 64.0            # host link (PCIe) per GPU, one direction, GB/s: what a KV swap copies over


GPUS: dict[str, GPUSpec] = {g.name: g for g in (
    # NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM: 312 TFLOPS bf16 dense (624 sparse), 2,039 GB/s
    # HBM2e, 80 GB; NVLink 3: 600 GB/s bidirectional -> 300 per direction. Network: DGX A100 user guide,
    # one ConnectX-6 HDR 200 Gb/s InfiniBand NIC per GPU -> 25 GB/s.
    GPUSpec("A100-80GB", 312, 2039, 80, 300, 25, 8.0, host_gbps=32),
    # NVIDIA H100 Tensor Core GPU datasheet, SXM5: 989 TFLOPS bf16 dense (1,979 sparse), 3.35 TB/s HBM3,
    # 80 GB; NVLink 4: 900 GB/s bidirectional -> 450. Network: DGX H100 user guide, one ConnectX-7
    # NDR 400 Gb/s NIC per GPU -> 50 GB/s.
    GPUSpec("H100-SXM", 989, 3350, 80, 450, 50, 8.0, host_gbps=64),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM: 989 TFLOPS bf16 dense (1,979 sparse), 4.8 TB/s HBM3e,
    # 141 GB; NVLink 900 GB/s bidirectional -> 450. Network: HGX H200, one NDR 400 Gb/s NIC per GPU -> 50.
    GPUSpec("H200", 989, 4800, 141, 450, 50, 8.0, host_gbps=64),
    # NVIDIA H800 SXM5 product brief (China-market H100): same compute and memory as H100 SXM, 989 TFLOPS
    # bf16 dense, 3.35 TB/s, 80 GB; NVLink cut to 400 GB/s bidirectional -> 200. Network: one NDR
    # 400 Gb/s NIC per GPU -> 50 GB/s.
    GPUSpec("H800", 989, 3350, 80, 200, 50, 8.0, host_gbps=64),
    # NVIDIA HGX H20 spec sheet (China-market Hopper): 148 TFLOPS bf16 dense, 4.0 TB/s HBM3, 96 GB;
    # NVLink 900 GB/s bidirectional -> 450. Network: one NDR 400 Gb/s NIC per GPU -> 50 GB/s.
    GPUSpec("H20", 148, 4000, 96, 450, 50, 8.0, host_gbps=64),
    # ROUGH PLACEHOLDER, not a datasheet: a generic 2-core x86 CPU for the tiny CPU example. 0.2 TFLOP/s
    # = 2 cores x 3 GHz x 32 fp32 FLOP/cycle (two AVX2 FMA units; bf16 runs no faster without AMX);
    # 20 GB/s = what 2 cores typically draw from dual-channel DDR4; 8 GB RAM; "intra-node" 10 GB/s is an
    # in-memory weight copy, "inter-node" 1.25 GB/s is 10 GbE. Replace it with a measured profile
    # (`stalecast profile`) before trusting any CPU timing.
    GPUSpec("cpu", 0.2, 20, 8, 10, 1.25, 50.0, 0.25, host_gbps=10),
)}


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape; `params` counts every weight (embeddings included)."""
    name: str
    params: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None  # defaults to hidden // heads
    intermediate: int | None = None  # MLP width, for building a random-init model of this shape (real/)

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V cache bytes one context token occupies (and each decode step reads)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def weight_bytes(self, dtype_bytes: int = 2) -> float:
        return self.params * dtype_bytes

    @property
    def attn_flops_per_ctx_token(self) -> int:
        """FLOPs of QK^T and AV for one query token against one context token (2 matmuls x 2 FLOP/MAC)."""
        return 4 * self.layers * self.heads * self.head_dim


MODELS: dict[str, ModelShape] = {m.name: m for m in (
    # Each from the model's config.json on its Hugging Face model card (num_hidden_layers, hidden_size,
    # num_attention_heads, num_key_value_heads, vocab_size, intermediate_size); params as on the model card.
    ModelShape("qwen2.5-0.5b", 0.494e9, 24, 896, 14, 2, 151936, intermediate=4864),    # Qwen/Qwen2.5-0.5B
    ModelShape("qwen2.5-1.5b", 1.54e9, 28, 1536, 12, 2, 151936, intermediate=8960),    # Qwen/Qwen2.5-1.5B
    ModelShape("qwen2.5-3b", 3.09e9, 36, 2048, 16, 2, 151936, intermediate=11008),     # Qwen/Qwen2.5-3B
    ModelShape("qwen2.5-7b", 7.62e9, 28, 3584, 28, 4, 152064, intermediate=18944),     # Qwen/Qwen2.5-7B
    ModelShape("llama3.1-8b", 8.03e9, 32, 4096, 32, 8, 128256, intermediate=14336),    # meta-llama/Llama-3.1-8B
    ModelShape("qwen2.5-14b", 14.7e9, 48, 5120, 40, 8, 152064, intermediate=13824),    # Qwen/Qwen2.5-14B
    ModelShape("qwen2.5-32b", 32.8e9, 64, 5120, 40, 8, 152064, intermediate=27648),    # Qwen/Qwen2.5-32B
    ModelShape("llama3.1-70b", 70.6e9, 80, 8192, 64, 8, 128256, intermediate=28672),   # meta-llama/Llama-3.1-70B
    # Random-init Qwen2-style CPU model (no model card; shape chosen here). params assumes
    # intermediate_size 512 and tied embeddings: per layer q 128*128+128, k and v 128*64+64 each,
    # o 128*128, MLP 3*128*512, two norms 2*128 = 246,272; x4 layers + embeddings 64*128 + final norm 128.
    ModelShape("tiny", 993_408, 4, 128, 4, 2, 64, intermediate=512),
)}

_SHAPE_KEYS = ("params", "layers", "hidden", "heads", "kv_heads", "vocab")


def resolve_model(spec: str | dict) -> ModelShape:
    """A preset name from MODELS, or an inline dict with params, layers, hidden, heads, kv_heads, vocab
    (optional head_dim, name)."""
    if isinstance(spec, str):
        if spec not in MODELS:
            raise ValueError(f"unknown model preset '{spec}' (known: {', '.join(MODELS)})")
        return MODELS[spec]
    for key in _SHAPE_KEYS:
        if key not in spec:
            raise ValueError(f"missing key '{key}'")
    for key in spec:
        if key not in (*_SHAPE_KEYS, "head_dim", "name"):
            raise ValueError(f"unknown key '{key}' (expected {', '.join(_SHAPE_KEYS)}, head_dim, name)")
    for key in (*_SHAPE_KEYS, "head_dim"):
        value = spec.get(key)
        if value is None and key == "head_dim":
            continue
        integral = key != "params"
        if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)) or value <= 0:
            raise ValueError(f"{key}: must be a positive {'integer' if integral else 'number'} (got {value!r})")
    return ModelShape(name=str(spec.get("name", "custom")), params=float(spec["params"]),
                      **{k: spec[k] for k in _SHAPE_KEYS[1:]}, head_dim=spec.get("head_dim"))


def check_hardware(hw) -> None:
    """Check the names in a `Hardware` config section resolve; raises ValueError `hardware.<field>: reason`.
    Does no file I/O: the profile file is checked where the config is loaded."""
    if hw.gpu is None and hw.constant is None and hw.profile is None:
        raise ValueError("hardware.gpu: required unless hardware.constant is given")
    if hw.gpu is not None and hw.gpu not in GPUS:
        raise ValueError(f"hardware.gpu: unknown GPU '{hw.gpu}' (known: {', '.join(GPUS)})")
    try:
        resolve_model(hw.model)
    except ValueError as exc:
        raise ValueError(f"hardware.model: {exc}") from None
