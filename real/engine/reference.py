"""The reference rollout engine: the transformers model's own forward with a `DynamicCache`.

Sequences admitted together form a cohort: their prompts are left-padded and prefilled in one call, and the cohort
keeps one cache, from which finished and evicted rows are dropped (so a decode step costs what its active sequences
cost). Sequences resumed together form a cohort too, prefilling their prompts and tokens so far. A step runs one
forward per cohort, so continuous batching works, but every admission adds a cohort and its launches: this engine
is the readable yardstick that `fast.FastEngine` is tested against, not a fast one.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache

from real.engine import Finished, Generation, Sampling, check_admission, check_resumption, sample


def _cache_kw(model) -> str:
    """transformers >= 5.2x names the KV-cache argument `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class _Cohort:
    seq_ids: list[int]                    # [a] rows still in the cohort
    prefill: list[list[int]] | None       # until prefilled: each row's context (prompt, tokens so far)
    cache: DynamicCache
    mask: torch.Tensor | None = None      # [a, width + tokens so far], 1 on real tokens
    last: torch.Tensor | None = None      # [a] each row's last sampled token (the next forward's input)


class ReferenceEngine:
    def __init__(self, model, slots: int, sampling: Sampling, version: int, generator: torch.Generator | None = None):
        self.model, self.slots, self.sampling, self.version, self.generator = model, slots, sampling, version, generator
        self.device = next(model.parameters()).device
        self.kw = _cache_kw(model)
        self.cohorts: list[_Cohort] = []
        self.records: dict[int, Generation] = {}

    def active(self) -> int:
        return len(self.records)

    def free_slots(self) -> int:
        return self.slots - len(self.records)

    def weights_loaded(self, version: int) -> None:
        self.version = version

    def admit(self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> None:
        check_admission(seq_ids, prompts, self.free_slots(), set(self.records))
        self._take([Generation(sid, p) for sid, p in zip(seq_ids, prompts)])

    def resume(self, generations: Sequence[Generation]) -> None:
        check_resumption(generations, self.free_slots(), set(self.records), self.sampling)
        self._take(generations)

    def _take(self, generations: Sequence[Generation]) -> None:
        """One new cohort, prefilled at the next step."""
        if not generations:
            return
        self.records.update((g.seq_id, g) for g in generations)
        self.cohorts.append(_Cohort([g.seq_id for g in generations], [g.context() for g in generations],
                                    DynamicCache(config=self.model.config)))

    def evict(self, seq_id: int) -> Generation:
        if seq_id not in self.records:
            raise ValueError(f"evict: sequence {seq_id} is not in the engine")
        c = next(c for c in self.cohorts if seq_id in c.seq_ids)
        self._keep_rows(c, [row for row, sid in enumerate(c.seq_ids) if sid != seq_id])
        if not c.seq_ids:
            self.cohorts.remove(c)
        return self.records.pop(seq_id)

    def _keep_rows(self, c: _Cohort, keep: list[int]) -> None:
        """Cohort c keeps only rows `keep` (indices in c.seq_ids): their contexts, or their cache, mask, last token."""
        c.seq_ids = [c.seq_ids[r] for r in keep]
        if c.prefill is not None:
            c.prefill = [c.prefill[r] for r in keep]
        elif keep:
            rows = torch.as_tensor(keep, device=self.device)                      # [kept]
            c.cache.batch_select_indices(rows)
            c.mask, c.last = c.mask[rows], c.last[rows]

    @torch.inference_mode()
    def _logits(self, c: _Cohort) -> torch.Tensor:
        """The next token's logits [a, V] of every row of cohort c: its prefill, or one decode forward."""
        if c.prefill is not None:
            n, width = len(c.prefill), max(map(len, c.prefill))
            ids = torch.full((n, width), 0, dtype=torch.long)                    # [a, width], left-padded
            mask = torch.zeros((n, width), dtype=torch.long)                     # [a, width]
            for row, p in enumerate(c.prefill):
                ids[row, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
                mask[row, width - len(p):] = 1
            ids, c.mask, c.prefill = ids.to(self.device), mask.to(self.device), None
            pos = (c.mask.cumsum(-1) - 1).clamp(min=0)                           # [a, width], RoPE positions
            return self.model(input_ids=ids, attention_mask=c.mask, position_ids=pos, use_cache=True,
                              logits_to_keep=1, **{self.kw: c.cache}).logits[:, -1]
        c.mask = torch.cat([c.mask, c.mask.new_ones(len(c.seq_ids), 1)], dim=1)  # [a, width + t]
        pos = c.mask.sum(-1, keepdim=True) - 1                                    # [a, 1]
        return self.model(input_ids=c.last[:, None], attention_mask=c.mask, position_ids=pos, use_cache=True,
                          **{self.kw: c.cache}).logits[:, -1]

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        s, finished = self.sampling, []
        for c in self.cohorts:
            tok, logp = sample(self._logits(c), s, self.generator)              # [a], [a]
            c.last = tok
            keep = []
            for row, (sid, t, lp) in enumerate(zip(c.seq_ids, tok.tolist(), logp.tolist())):
                if (done := self.records[sid].add(t, lp, self.version, s)) is not None:
                    del self.records[sid]
                    finished.append(done)
                else:
                    keep.append(row)
            if len(keep) < len(c.seq_ids):
                self._keep_rows(c, keep)
        self.cohorts = [c for c in self.cohorts if c.seq_ids]
        return finished
