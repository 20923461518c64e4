"""A rollout engine held to a KV budget in tokens: the simulator's admission and eviction rule, for real.

`hardware.memory.kv_budget_tokens` (per worker) under `hardware.memory.kv_policy`, token for token as the simulator's
kernel applies it (sim/engine/kernel.py: `kv_need`, `_free_kv`, `can_admit`, and the eviction and resumption in
`advance`), so that `validate` compares predicted evictions with measured ones:

- A running sequence holds its context, ctx = prompt + tokens sampled so far; a step over n running sequences
  writes one more token each, so it needs Σ ctx + n <= budget.
- A group of G sequences is admitted when no evicted sequence waits and either nothing runs or its need is free:
  preempt_recompute needs G × (prompt + 1) of budget - (Σ ctx + n); admit_reserve needs G × (prompt +
  max_new_tokens) of budget - Σ reservations, each sequence reserving prompt + max_new_tokens until it finishes.
- preempt_recompute, at a step boundary where sequences finished: the evicted resume, the last evicted first, while
  nothing runs or Σ ctx + n + ctx + 1 <= budget; a resumed sequence prefills its prompt and tokens again (recompute)
  and counts as the newest. Before every step: while n > 1 and Σ ctx + n > budget, the newest running sequence (the
  last admitted or resumed) is evicted: its KV cache is dropped, its tokens kept, and it waits on a stack. The last
  running sequence is never evicted. admit_reserve never evicts.

This is vLLM V1's scheduler under FCFS (vllm/v1/core/sched/scheduler.py): when a request cannot get KV blocks it
preempts `self.running.pop()`, the newest running request, resets its computed tokens and prepends it to the
waiting queue, which is served before any new request. Tokens here, not blocks (docs/design.md, "KV-cache admission
and preemption").

The engine's own work is `evict` and `resume` (real/engine/fast.py, real/engine/reference.py); the bookkeeping is
here, engine-agnostic. Resumption runs at the end of `step` (the boundary that the worker admits at next, as the
kernel resumes before the worker admits), eviction at the start of the next `step`: between the two only an
admission may happen, and an admission is refused whenever an eviction is due (the budget is then exceeded, or an
evicted sequence waits), so this is the kernel's order. An eviction at the start also covers a group admitted into
an empty engine whose need exceeds the budget, which the kernel evicts from before its first step too.
"""

from __future__ import annotations

from typing import Sequence

from real.engine import Finished, Generation, RolloutEngine

POLICIES = ("preempt_recompute", "admit_reserve")   # the policies with a budget the real engines implement


class KVBudgetedEngine:
    """`engine` within `budget` KV tokens under `policy`; a `RolloutEngine` itself, plus `fits` for admission."""

    def __init__(self, engine: RolloutEngine, budget: int, policy: str):
        if policy not in POLICIES:
            raise ValueError(f"hardware.memory.kv_policy: '{policy}' is not one the real engines hold a budget with "
                             f"({', '.join(POLICIES)})")
        if budget < 1:
            raise ValueError(f"hardware.memory.kv_budget_tokens: {budget} tokens; it must be 1 or more")
        self.engine, self.budget, self.policy = engine, budget, policy
        self.max_new_tokens = engine.sampling.max_new_tokens
        self.ctx: dict[int, int] = {}            # running sequence -> its context; oldest (re)admission first
        self.reserved: dict[int, int] = {}       # admit_reserve: running sequence -> the tokens it reserved
        self.evicted: list[Generation] = []      # waiting to resume, the last evicted on top
        self.evictions = 0                       # evictions so far, every sequence's together

    # ------------------------------------------------------------------ RolloutEngine, passed through
    @property
    def model(self):
        return self.engine.model

    @property
    def slots(self) -> int:
        return self.engine.slots

    @property
    def sampling(self):
        return self.engine.sampling

    def weights_loaded(self, version: int) -> None:
        self.engine.weights_loaded(version)

    def active(self) -> int:
        """Sequences admitted and not finished, the evicted included."""
        return self.engine.active() + len(self.evicted)

    def free_slots(self) -> int:
        """An evicted sequence keeps its claim on a slot (as in the kernel): nothing is admitted while it waits."""
        return self.engine.free_slots() - len(self.evicted)

    # ------------------------------------------------------------------ the budget
    @property
    def step_tokens(self) -> int:
        """KV tokens the next step holds: every running context plus the token each writes (Σ ctx + n)."""
        return sum(self.ctx.values()) + len(self.ctx)

    def _in_use(self) -> int:
        """What admission measures against the budget (kernel._free_kv): reservations, or the next step's tokens."""
        return sum(self.reserved.values()) if self.policy == "admit_reserve" else self.step_tokens

    def _need(self, prompt_len: int) -> int:
        """One sequence's admission need (kernel.kv_need): its prompt and first token, or prompt + max_new_tokens."""
        return prompt_len + (self.max_new_tokens if self.policy == "admit_reserve" else 1)

    def fits(self, group_size: int, prompt_lens: Sequence[int]) -> bool:
        """Whether groups of `group_size` sequences with these prompt lengths, admitted one after another now, each
        pass kernel.can_admit given those before it: no evicted sequence waits, and the engine is empty or the
        group's need is free."""
        if self.evicted:
            return False
        in_use, running = self._in_use(), bool(self.ctx)
        for prompt_len in prompt_lens:
            need = group_size * self._need(prompt_len)
            if running and self.budget - in_use < need:
                return False
            in_use, running = in_use + need, True
        return True

    def admit(self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> None:
        """One group (or any sequences admitted as one): ValueError, before anything changes, when `fits` refuses."""
        need = sum(self._need(len(p)) for p in prompts)
        if self.evicted or (self.ctx and self.budget - self._in_use() < need):
            raise ValueError(f"admit: {len(seq_ids)} sequences need {need} KV tokens; {self.budget - self._in_use()} "
                             f"of the budget's {self.budget} are free and {len(self.evicted)} evicted sequences wait")
        self.engine.admit(seq_ids, prompts)
        for sid, p in zip(seq_ids, prompts):
            self.ctx[sid] = len(p)
            if self.policy == "admit_reserve":
                self.reserved[sid] = len(p) + self.max_new_tokens

    def step(self) -> list[Finished]:
        if self.policy == "preempt_recompute":
            self._evict_overflow()
        finished = self.engine.step()
        for sid in self.ctx:   # every running sequence sampled one token (a just-admitted one after its prefill)
            self.ctx[sid] += 1
        for f in finished:
            del self.ctx[f.seq_id]
            self.reserved.pop(f.seq_id, None)
        if finished and self.evicted:
            self._resume()
        return finished

    def _evict_overflow(self) -> None:
        """Evict the newest running sequence while the next step would outgrow the budget; the last one stays."""
        while len(self.ctx) > 1 and self.step_tokens > self.budget:
            newest = next(reversed(self.ctx))
            del self.ctx[newest]
            gen = self.engine.evict(newest)
            gen.preemptions += 1
            self.evicted.append(gen)
            self.evictions += 1

    def _resume(self) -> None:
        """Take back the evicted, the last evicted first, while nothing runs or each one's context and next token
        fit beside the next step's; they prefill together at the next step."""
        resumed, tokens, running = [], self.step_tokens, bool(self.ctx)
        while self.evicted:
            top = self.evicted[-1]
            ctx = len(top.prompt) + len(top.tokens)
            if running and tokens + ctx + 1 > self.budget:
                break
            resumed.append(self.evicted.pop())
            tokens, running = tokens + ctx + 1, True
        if resumed:
            self.engine.resume(resumed)
        for gen in resumed:   # each the newest running sequence, in turn
            self.ctx[gen.seq_id] = len(gen.prompt) + len(gen.tokens)


def kv_budgeted(engine: RolloutEngine, memory) -> KVBudgetedEngine | None:
    """`engine` held to `memory`'s budget (cfg.hardware.memory: kv_budget_tokens, kv_policy); None when it sets
    none (no kv_budget_tokens, or kv_policy unlimited): the engine then runs as it is."""
    if memory.kv_budget_tokens is None or memory.kv_policy == "unlimited":
        return None
    return KVBudgetedEngine(engine, memory.kv_budget_tokens, memory.kv_policy)
