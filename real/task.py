"""Synthetic verifiable task: reverse or sort a digit string, or add two numbers.

A prompt reads `reverse:40213=`, `sort:40213=` or `add:52+917=`; the answer is the digit string that
follows (`31204`, `01234`, `969`), then EOS. Digit strings have `min_digits..max_digits` digits (uniform, or drawn
from `real.digits`), so answers vary in length across samples, as response lengths do in real RLHF.

Reward, in [0, 1], with partial credit: with `body` the response up to its first EOS,

    reward = (matches + stop) / (max(len(answer), len(body)) + 1)

`matches` counts positions where body and answer agree; `stop` is 1 when an EOS follows a body of exactly
the answer's length. So the exact answer then EOS scores 1, an empty response 0, a correct prefix or a
right-length answer with wrong digits something in between, and extra or missing digits cost credit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from real.tokenizer import CharTokenizer
from sim.workload import LengthSampler


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: tuple[int, ...]     # BOS + the text's ids
    answer: tuple[int, ...]  # the correct response, without EOS


class DigitTask:
    def __init__(self, real_cfg, tokenizer: CharTokenizer):
        self.kind = real_cfg.task
        self.min_digits, self.max_digits = real_cfg.min_digits, real_cfg.max_digits
        self.digits = None if real_cfg.digits is None else LengthSampler(real_cfg.digits)
        self.tok = tokenizer

    def _number(self, rng: np.random.Generator) -> str:
        """A digit string of min..max digits; for `add` a number without leading zeros."""
        if self.digits is None:
            n = int(rng.integers(self.min_digits, self.max_digits + 1))
        else:
            n = int(np.clip(self.digits.draw(rng, 1)[0], self.min_digits, self.max_digits))
        digits = rng.integers(0, 10, size=n)
        if self.kind == "add" and n > 1:
            digits[0] = rng.integers(1, 10)
        return "".join(map(str, digits))

    def _make(self, rng: np.random.Generator) -> Prompt:
        if self.kind == "add":
            a, b = self._number(rng), self._number(rng)
            text, answer = f"add:{a}+{b}=", str(int(a) + int(b))
        else:
            s = self._number(rng)
            text, answer = f"{self.kind}:{s}=", s[::-1] if self.kind == "reverse" else "".join(sorted(s))
        return Prompt(text, (self.tok.bos_id, *self.tok.encode(text)), tuple(self.tok.encode(answer)))

    @property
    def max_prompt_len(self) -> int:
        """The longest prompt's ids: BOS, `kind:`, the digits (`a+b` for add), `=`."""
        digits = 2 * self.max_digits + 1 if self.kind == "add" else self.max_digits
        return 1 + len(self.kind) + 1 + digits + 1

    def sample(self, rng: np.random.Generator, n: int) -> list[Prompt]:
        return [self._make(rng) for _ in range(n)]

    def reward(self, prompt: Prompt, response: Sequence[int]) -> float:
        response = list(response)
        stopped = self.tok.eos_id in response
        body = response[:response.index(self.tok.eos_id)] if stopped else response
        answer = prompt.answer
        matches = sum(a == b for a, b in zip(body, answer))
        stop = stopped and len(body) == len(answer)
        return (matches + stop) / (max(len(answer), len(body)) + 1)

    def sft_example(self, prompt: Prompt) -> list[int]:
        """The target response for a supervised warm start: answer + EOS."""
        return [*prompt.answer, self.tok.eos_id]
