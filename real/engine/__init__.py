"""Rollout engines: what a worker generates with, one decode step at a time.

A `RolloutEngine` holds up to `slots` sequences. A worker admits sequences into free slots between two decode
steps (`admit`), advances every active sequence by one token (`step`), gets back the sequences that finished in
that step (EOS sampled or `max_new_tokens` reached), and may load new weights between two steps
(`weights_loaded`, after the weight channel has written them into `engine.model` in place). A token's version is
the version of the weights that computed its logits: a sequence that straddles a load keeps the KV cache of its
earlier tokens (PipelineRL-style in-flight updates) and records per token which version sampled it. Between two
steps a sequence may also be evicted (`evict`: its KV cache is dropped, its `Generation` handed back) and resumed
later (`resume`: its prompt and tokens are prefilled again, and it goes on); `kv.KVBudgetedEngine` does that to
keep an engine within a KV budget in tokens (`hardware.memory.kv_budget_tokens`).

Two implementations, chosen by `real.engine`:
- `reference.ReferenceEngine`: the transformers model's own forward with a `DynamicCache`, one cache per admission
  (a cohort of sequences admitted together); the readable reference.
- `fast.FastEngine`: a preallocated KV cache with one slot per sequence (static shapes) and a decode step written
  for the Qwen2/Llama family, captured as CUDA graphs per batch-size bucket on GPU.

Both sample on the model's device with `sample` below, so that for the same logits and generator state they draw
the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch


@dataclass
class Finished:
    """A sequence that left the engine: what the learner needs of it."""
    seq_id: int                  # the id it was admitted with
    tokens: list[int]            # generated ids, the EOS included when emitted
    logprobs: list[float]        # log-prob of each token under the sampling policy, at the sampling temperature
    versions: list[int]          # version of the weights that computed each token's logits
    preemptions: int = 0         # times its KV cache was evicted (and recomputed) before it finished


@dataclass
class Generation:
    """A sequence in an engine: its prompt and what it has sampled so far."""
    seq_id: int
    prompt: Sequence[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    preemptions: int = 0         # times it was evicted so far

    def context(self) -> list[int]:
        """What a prefill feeds: the prompt, then the tokens sampled so far (a resumed sequence recomputes them)."""
        return [*self.prompt, *self.tokens]

    def ended(self, sampling: "Sampling") -> bool:
        """Its last token is EOS, or it has max_new_tokens tokens."""
        return bool(self.tokens) and (self.tokens[-1] == sampling.eos_id
                                      or len(self.tokens) >= sampling.max_new_tokens)

    def add(self, token: int, logprob: float, version: int, sampling: "Sampling") -> Finished | None:
        """Record one sampled token; the sequence's `Finished` when that token ends it (EOS or max_new_tokens)."""
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.versions.append(version)
        if self.ended(sampling):
            return Finished(self.seq_id, self.tokens, self.logprobs, self.versions, self.preemptions)
        return None


class RolloutEngine(Protocol):
    model: torch.nn.Module       # the transformers model the weight channel loads into, in place
    slots: int                   # sequences held at most
    sampling: "Sampling"

    def free_slots(self) -> int:
        """Slots that a sequence admitted now would take."""

    def active(self) -> int:
        """Sequences admitted and not finished."""

    def admit(self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> None:
        """Take sequences into free slots; their prompts are prefilled at the next `step`."""

    def step(self) -> list[Finished]:
        """Prefill what was admitted or resumed since the last step, then one decode step for every active sequence:
        each samples one token. Returns the sequences that finished in this step."""

    def evict(self, seq_id: int) -> Generation:
        """Drop an active sequence's KV cache and free its slot; its `Generation` (tokens so far) to `resume`."""

    def resume(self, generations: Sequence[Generation]) -> None:
        """Take evicted sequences back into free slots: each prefills its prompt and tokens again at the next `step`
        (recompute), and the tokens it samples after extend its lists (max_new_tokens counts all of them)."""

    def weights_loaded(self, version: int) -> None:
        """`model`'s weights were replaced in place by `version`'s: later logits use them."""


@dataclass(frozen=True)
class Sampling:
    temperature: float           # logits are divided by it; log-probs are reported at it
    eos_id: int                  # a sequence ends when it samples this id (-1: never)
    max_new_tokens: int          # ... or when it has this many tokens
    greedy: bool = False         # argmax instead of a sample (tests compare engines with it)


def sample(logits: torch.Tensor, cfg: Sampling, generator: torch.Generator | None) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """tokens [a] and their log-probs [a] from logits [a, V]: Gumbel-max with an exponential draw, on device."""
    logp_all = torch.log_softmax(logits.float() / cfg.temperature, dim=-1)            # [a, V]
    if cfg.greedy:
        tok = logp_all.argmax(-1)
    else:
        noise = torch.empty_like(logp_all).exponential_(generator=generator)
        tok = (logp_all - noise.log()).argmax(-1)                                      # [a], a sample of softmax
    return tok, logp_all.gather(-1, tok[:, None])[:, 0]


def check_admission(seq_ids: Sequence[int], prompts: Sequence[Sequence[int]], free: int, held: set[int],
                    max_prompt_len: int | None = None, action: str = "admit") -> None:
    """ValueError, before an engine changes anything, unless it can take every sequence: one prompt each, room for
    all, ids not held already (nor twice in the call), prompts of 1 (..max_prompt_len) tokens. `action` names the
    call in the message."""
    if len(seq_ids) != len(prompts) or len(seq_ids) > free:
        raise ValueError(f"{action}: {len(seq_ids)} sequences for {len(prompts)} prompts and {free} free slots")
    seen = set(held)
    for sid, p in zip(seq_ids, prompts):
        if sid in seen:
            raise ValueError(f"{action}: sequence {sid} is already in the engine")
        seen.add(sid)
        if len(p) < 1 or (max_prompt_len is not None and len(p) > max_prompt_len):
            limit = (f"1..{max_prompt_len} (max_prompt_len: the KV cache was sized for it)" if max_prompt_len
                     else "1 or more")
            raise ValueError(f"{action}: sequence {sid}'s prompt has {len(p)} tokens; it must have {limit}")


def check_resumption(generations: Sequence[Generation], free: int, held: set[int], sampling: Sampling,
                     max_prompt_len: int | None = None) -> None:
    """ValueError, before an engine changes anything, unless it can take every generation back: what
    `check_admission` asks of their prompts, and none has ended already."""
    check_admission([g.seq_id for g in generations], [g.prompt for g in generations], free, held, max_prompt_len,
                    action="resume")
    for g in generations:
        if g.ended(sampling):
            raise ValueError(f"resume: sequence {g.seq_id} has ended ({len(g.tokens)} tokens, the last "
                             f"{g.tokens[-1]}); only an evicted, unfinished sequence resumes")


def check_engine(cfg) -> None:
    """A ConfigError, before any process starts or any output is written, when `real.engine` cannot run
    `real.model` (the fast engine's forward is written for the Qwen2 and Llama families; the presets are Qwen2), or
    asks for what the real workers do not implement: multi-turn samples (`workload.turns`) or eviction by swapping
    to host memory (`hardware.memory.kv_policy`; they recompute), or gives a KV budget below one group at its
    longest."""
    from sim.config import ConfigError
    from sim.hardware.specs import MODELS

    if cfg.workload.turns is not None:
        raise ConfigError("workload.turns: multi-turn samples are simulated only: stalecast train's task is one turn "
                          "(no environment to call)")
    memory = cfg.hardware.memory
    if memory.kv_budget_tokens is not None and memory.kv_policy in ("preempt_recompute", "admit_reserve"):
        from sim.hardware.memory import kv_capacity
        try:  # one group at its longest must fit, as `simulate` asks
            kv_capacity(cfg)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if memory.kv_policy == "preempt_swap":
        raise ConfigError("hardware.memory.kv_policy: 'preempt_swap' cannot run for real: the real rollout engines "
                          "recompute an evicted sequence's KV cache rather than swap it to host memory; use "
                          "preempt_recompute (or admit_reserve, unlimited)")
    if cfg.real.engine != "fast" or cfg.real.model in MODELS:
        return
    from transformers import AutoConfig

    from real.engine.fast import check_model

    try:
        check_model(AutoConfig.from_pretrained(cfg.real.model, local_files_only=True))
    except ValueError as exc:
        raise ConfigError(f"real.engine: 'fast' cannot run real.model {cfg.real.model}: {exc}") from None


def make_engine(kind: str, model, slots: int, sampling: Sampling, version: int,
                generator: torch.Generator | None = None, max_prompt_len: int | None = None) -> RolloutEngine:
    """The engine `real.engine` names, around `model`. `max_prompt_len` sizes the fast engine's KV cache."""
    if kind == "reference":
        from real.engine.reference import ReferenceEngine
        return ReferenceEngine(model, slots, sampling, version, generator)
    if kind == "fast":
        from real.engine.fast import FastEngine
        return FastEngine(model, slots, sampling, version, generator, max_prompt_len=max_prompt_len)
    raise ValueError(f"real.engine: '{kind}' is not one of fast, reference")
