"""Batched sampling with a KV cache: tokens, behavior log-probs and the policy version of every token.

Prompts are left-padded and prefilled once; then a decode loop of our own feeds one token per sequence
through the model with a `DynamicCache`. Sampling stays on the model's device (Gumbel-max with an
exponential draw, no host sync); the host looks at the EOS flags every `sync_every` steps and drops
finished sequences from the batch and the cache, so a decode step costs what its *active* sequences
cost, as the simulator's cost model assumes.

Interruptible workers pass `between_steps`: it runs between two decode steps; when it returns an int it
has just loaded new weights into `model` in place, and the tokens sampled afterwards carry that version
while the KV cache of the earlier tokens is kept (PipelineRL-style in-flight weight updates).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache


@dataclass
class Rollout:
    tokens: list[list[int]]      # generated ids per sequence, the EOS included when emitted
    logprobs: list[list[float]]  # log-prob of each token under the sampling policy, at the sampling temperature
    versions: list[list[int]]    # policy version that sampled each token


def _cache_kw(model) -> str:
    """transformers >= 5.2x names the KV-cache argument `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float, eos_id: int,
             pad_id: int, version: int, generator: torch.Generator | None = None,
             between_steps: Callable[[], int | None] | None = None) -> Rollout:
    if max_new_tokens < 1 or not prompts:
        raise ValueError("generate needs at least one prompt and max_new_tokens >= 1")
    device = next(model.parameters()).device
    sync_every = 1 if device.type == "cpu" else 8  # host syncs are free on CPU, costly between GPU launches
    n, width = len(prompts), max(map(len, prompts))

    ids = torch.full((n, width), pad_id, dtype=torch.long)                   # [n, width], left-padded
    mask = torch.zeros((n, width), dtype=torch.long)                         # [n, width], 1 on prompt tokens
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)                                 # [n, width], RoPE positions

    cache, kw = DynamicCache(config=model.config), _cache_kw(model)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                   **{kw: cache}).logits[:, -1]                              # [a, V], a = active sequences

    tokens = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)  # [n, max_new]
    logps = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)       # [n, max_new]
    active = torch.arange(n, device=device)                                  # [a], rows still in the batch
    running = torch.ones(n, dtype=torch.bool, device=device)                 # [a], no EOS yet
    step_version: list[int] = []                                             # version of the step's tokens
    for step in range(max_new_tokens):
        logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)   # [a, V]
        noise = torch.empty_like(logp_all).exponential_(generator=generator)
        tok = (logp_all - noise.log()).argmax(-1)                            # [a], a sample of softmax(logits/T)
        tokens[active, step] = tok
        logps[active, step] = logp_all.gather(-1, tok[:, None])[:, 0]
        step_version.append(version)
        running &= tok != eos_id
        if step == max_new_tokens - 1:
            break
        if (step + 1) % sync_every == 0 and not bool(running.all()):
            if not bool(running.any()):
                break
            keep = running.nonzero()[:, 0]                                   # [a'] drop finished sequences
            cache.batch_select_indices(keep)
            active, running, tok, mask = active[keep], running[keep], tok[keep], mask[keep]
        if between_steps is not None and (new := between_steps()) is not None:
            version = new
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)       # [a, width + step + 1]
        pos = mask.sum(-1, keepdim=True) - 1                                 # [a, 1]
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                       **{kw: cache}).logits[:, -1]

    out = Rollout([], [], [])
    for toks, lps in zip(tokens.tolist(), logps.tolist()):
        end = toks.index(eos_id) + 1 if eos_id in toks else len(toks)       # cut after the first EOS
        out.tokens.append(toks[:end])
        out.logprobs.append(lps[:end])
        out.versions.append(step_version[:end])
    return out
