"""The policy: a random-init Qwen2 of a preset's shape ("tiny", or any of `sim.hardware.specs.MODELS`) or a local checkpoint.

Nothing is downloaded: the tiny model is built from a config, a checkpoint folder is read with
`local_files_only=True` and must hold the project's tokenizer file (written by `save_policy`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from real.tokenizer import FILENAME as TOKENIZER_FILE, CharTokenizer

transformers.utils.logging.disable_progress_bar()  # loading and saving checkpoints: a run shows its own progress
from sim.config import ConfigError, RunConfig
from sim.hardware.specs import MODELS

ATTN = "sdpa"  # works on CPU and GPU, and with left padding (fully masked pad rows stay finite)


LEARNER = -1  # the learner's role in `cpu_cores`; rollout workers are 0..R-1


def cpu_cores(role: int, mode: str, workers: int) -> set[int] | None:
    """The core a CPU run's process keeps to; None with fewer than two cores. The learner has the first core and
    rollout worker i the others in turn, except in sync mode with as many workers as cores or more: there worker i
    takes core i (cycling), the learner's too, as generation then has every core. (A sync learner is not idle
    while workers generate: after publishing it writes the step's metrics, rows and checkpoints. On a shared core
    that work slowed worker 0 and took twice its time alone: 0.055 s against 0.023 s a step on the tiny example.)
    A fixed placement makes co-location what `stalecast profile` measured rather than the OS scheduler's choice of
    the moment (left to it, the learner sometimes shared a core with a worker and sometimes kept one to itself).
    Call it before the process pins itself: it reads the allowed set."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    if role == LEARNER:
        return {cores[0]}
    return {cores[role % len(cores)]} if mode == "sync" and workers >= len(cores) else {
        cores[1 + role % (len(cores) - 1)]}


def keep_to_core(role: int, cfg: RunConfig) -> None:
    """For the rest of a spawned process of a CPU run: one thread (several processes share few cores) on its
    role's core."""
    if resolve_device(cfg).type != "cpu":
        return
    torch.set_num_threads(1)
    cores = cpu_cores(role, cfg.pipeline.mode, cfg.cluster.rollout_workers)
    if cores is not None:
        os.sched_setaffinity(0, cores)


@contextmanager
def pinned(role: int, device: torch.device, cfg: RunConfig):
    """Keep this process to its role's core (CPU runs) while inside; restores the previous set after."""
    cores = cpu_cores(role, cfg.pipeline.mode, cfg.cluster.rollout_workers) if device.type == "cpu" else None
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def resolve_device(cfg: RunConfig) -> torch.device:
    """The torch device of `real.device`; a ConfigError (bad input, not a crash) when it asks for CUDA and torch
    sees none. Called before any process starts or any output is written."""
    want = cfg.real.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("real.device: 'cuda', but torch sees no CUDA device on this machine (torch "
                          f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); set real.device to "
                          "'auto' or 'cpu'")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def _preset_config(name: str, tokenizer: CharTokenizer) -> Qwen2Config:
    """A Qwen2 config of a preset's shape; the vocabulary is the project's tokenizer (padded to 64), since
    no checkpoint is loaded: only the shape, hence the cost, of the preset is reproduced."""
    shape = MODELS[name]
    vocab = max(64, tokenizer.vocab_size) if name != "tiny" else shape.vocab
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the {name} preset's vocabulary only {vocab}")
    return Qwen2Config(
        vocab_size=vocab,  # embedding padded beyond the tokenizer's ids; they are never targets
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        tie_word_embeddings=True,
        max_position_embeddings=4096,  # prompts + responses of the digit tasks are far shorter
        pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
    )


def init_seed(cfg: RunConfig) -> int:
    """The seed of the policy the run starts from (`real.init_seed`, else the run's)."""
    return cfg.seed if cfg.real.init_seed is None else cfg.real.init_seed


def build_policy(cfg: RunConfig, device: torch.device | str = "cpu") -> tuple[transformers.PreTrainedModel,
                                                                              CharTokenizer]:
    """The policy and its tokenizer; a preset's weights depend on `init_seed(cfg)` only (built on CPU)."""
    dtype = getattr(torch, cfg.real.dtype)
    if cfg.real.model in MODELS:
        tokenizer = CharTokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed(cfg))
            model = Qwen2ForCausalLM._from_config(_preset_config(cfg.real.model, tokenizer), attn_implementation=ATTN)
        return model.to(device=device, dtype=dtype), tokenizer
    folder = Path(cfg.real.model)  # load_config made it absolute and checked it holds config.json
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"real.model: '{folder}' is neither a preset ({', '.join(MODELS)}) nor a checkpoint "
                                f"folder with config.json")
    if not (folder / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"real.model: '{folder}' lacks {TOKENIZER_FILE}, the project's tokenizer "
                                f"(checkpoints written by `stalecast train` have it)")
    tokenizer = CharTokenizer.load(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype, attn_implementation=ATTN)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"real.model: '{folder}' has vocabulary {model.config.vocab_size}, "
                         f"its tokenizer {tokenizer.vocab_size} ids")
    return model.to(device), tokenizer


def save_policy(model: transformers.PreTrainedModel, tokenizer: CharTokenizer, folder) -> None:
    """A checkpoint folder that `build_policy` loads with `real.model: FOLDER`."""
    model.save_pretrained(folder)
    tokenizer.save(folder)
