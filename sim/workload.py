"""Prompt and response length distributions, and the seeded stream of groups a run draws from.

Group n's lengths depend only on (seed, n): the sync baseline and the async configuration of one seed see
the same workload, which keeps speedups free of sampling noise.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sim.config import ConstantLen, EmpiricalLen, ExponentialLen, LengthDist, LognormalLen, RunConfig

if TYPE_CHECKING:
    from sim.hardware.memory import Lengths

Z99 = 2.3263478740408408  # standard normal 99th percentile


def lognormal_sigma(dist: LognormalLen) -> float:
    return dist.sigma if dist.sigma is not None else math.log(dist.p99 / dist.median) / Z99


def _empirical_values(dist: EmpiricalLen) -> np.ndarray:
    """The lengths an empirical distribution resamples (read-only). A trace is read once per version of its files:
    a run's stream, its memory model and its KV budget, and every run of a study, ask for the same column."""
    if dist.values is not None:
        return np.asarray(dist.values, dtype=np.int64)
    folder = Path(dist.trace)
    try:
        stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.iterdir()))
    except OSError:  # no such folder: read_trace says so
        stamp = None
    return _trace_lengths(str(folder), dist.column, stamp)


@functools.lru_cache(maxsize=8)
def _trace_lengths(folder: str, column: str, stamp) -> np.ndarray:
    from sim.trace import read_trace
    samples = read_trace(folder).samples
    values = samples[column].to_numpy(np.int64)
    values = values[values >= 1]
    if len(values) == 0:
        raise ValueError(f"{folder}: column {column} has no positive lengths to resample")
    values.setflags(write=False)
    return values


class LengthSampler:
    """Draws integer lengths >= 1 (capped at `cap`) from one of the configured distributions."""

    def __init__(self, dist: LengthDist, cap: int | None = None):
        self.dist = dist
        self.cap = cap
        self._values = _empirical_values(dist) if isinstance(dist, EmpiricalLen) else None

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        d = self.dist
        if isinstance(d, ConstantLen):
            x = np.full(n, d.value, dtype=np.int64)
        elif isinstance(d, ExponentialLen):
            x = np.ceil(rng.exponential(d.mean, n)).astype(np.int64)
        elif isinstance(d, LognormalLen):
            x = np.ceil(rng.lognormal(math.log(d.median), lognormal_sigma(d), n)).astype(np.int64)
        else:
            x = self._values[rng.integers(0, len(self._values), n)]
        x = np.maximum(x, 1)
        return np.minimum(x, self.cap) if self.cap is not None else x


def draw_env_seconds(turns, rng: np.random.Generator, n: int) -> np.ndarray:
    """n environment-call durations of a multi-turn workload (config.Turns): env_s each, or lognormal with median
    env_s and 99th percentile env_s_p99."""
    if turns.env_s_p99 is None:
        return np.full(n, turns.env_s)
    return rng.lognormal(math.log(turns.env_s), math.log(turns.env_s_p99 / turns.env_s) / Z99, n)


class GroupStream:
    """Lengths of group n (its prompt and its group_size responses), drawn in blocks from two seeded streams.
    A multi-turn workload (workload.turns) draws each turn's length from the response stream, and the environment
    calls' tool tokens and seconds from two more."""

    BLOCK = 4096

    def __init__(self, cfg: RunConfig, seed_seq: np.random.SeedSequence):
        wl = cfg.workload
        self.group_size, self.cap = wl.group_size, wl.max_new_tokens
        self._groups = None if wl.groups is None else np.asarray(wl.groups, dtype=np.int64)  # [n, 1 + group_size]
        self._in_order = wl.groups_in_order
        if self._groups is None:
            self._prompt = LengthSampler(wl.prompt_len)
            self._response = LengthSampler(wl.response_len, cap=wl.max_new_tokens)
        self.turns = wl.turns
        self.n_turns = wl.n_turns
        prompt_seed, response_seed, tool_seed, env_seed = seed_seq.spawn(4)  # children 0, 1 as with two streams
        self._prompt_rng = np.random.default_rng(prompt_seed)
        self._response_rng = np.random.default_rng(response_seed)
        self._tool_rng = np.random.default_rng(tool_seed)
        self._env_rng = np.random.default_rng(env_seed)
        self._tool = None if self.turns is None or self.turns.tool_tokens is None else LengthSampler(
            self.turns.tool_tokens)
        self._blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._turn_blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def _draw(self) -> tuple[np.ndarray, np.ndarray]:
        """The next block's prompt lengths [BLOCK] and response lengths [BLOCK, group_size]."""
        if self._groups is not None:  # whole groups, their lengths together
            if self._in_order:
                n = len(self._blocks) * self.BLOCK + np.arange(self.BLOCK)
                rows = self._groups[n % len(self._groups)]
            else:
                rows = self._groups[self._prompt_rng.integers(0, len(self._groups), self.BLOCK)]
            return rows[:, 0], np.minimum(rows[:, 1:], self.cap)
        prompts = self._prompt.draw(self._prompt_rng, self.BLOCK)
        n, T = self.BLOCK * self.group_size, self.n_turns
        responses = self._response.draw(self._response_rng, n * T)
        if T == 1:
            return prompts, responses.reshape(self.BLOCK, self.group_size)
        # Turn j of every sample, and the environment call after it (none after the last turn).
        turn_len = responses.reshape(n, T)
        tool = np.zeros((n, T), np.int64)
        env = np.zeros((n, T))
        if self._tool is not None:
            tool[:, :-1] = self._tool.draw(self._tool_rng, n * (T - 1)).reshape(n, T - 1)
        env[:, :-1] = draw_env_seconds(self.turns, self._env_rng, n * (T - 1)).reshape(n, T - 1)
        self._turn_blocks.append((turn_len.ravel(), tool.ravel(), env.ravel()))
        return prompts, turn_len.sum(axis=1).reshape(self.BLOCK, self.group_size)

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Groups b*BLOCK .. (b+1)*BLOCK-1: their prompt lengths, response lengths (BLOCK x group_size; a
        multi-turn sample's over all its turns) and total tokens (prompt counted once per sample, tool tokens
        included: the learner trains over the whole context)."""
        while b >= len(self._blocks):
            prompts, responses = self._draw()
            tokens = self.group_size * prompts + responses.sum(axis=1)
            if self.n_turns > 1:
                tokens = tokens + self._turn_blocks[-1][1].reshape(self.BLOCK, -1).sum(axis=1)
            self._blocks.append((prompts, responses, tokens))
        return self._blocks[b]

    def turn_block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A multi-turn workload's block b, per sample and turn (flat, sample-major: entry sid*turns + j): each
        turn's length, the tool tokens of the environment call after it, and that call's seconds (0 after the
        last turn)."""
        self.block(b)
        return self._turn_blocks[b]

    def group(self, n: int) -> tuple[int, np.ndarray, int]:
        """Group n's prompt length, response lengths and total tokens (prompt counted once per sample)."""
        prompts, responses, tokens = self.block(n // self.BLOCK)
        i = n % self.BLOCK
        return int(prompts[i]), responses[i], int(tokens[i])


def _capped_mean(dist: LengthDist, cap: int | None, values: np.ndarray | None) -> float:
    """Mean of min(length, cap): exact for constant, exponential (of ceil(Exp)) and lists; lognormal by its
    continuous closed form (the ceil adds under one token)."""
    big = cap if cap is not None else math.inf
    if values is not None:
        return float(np.minimum(values, big).mean())
    if isinstance(dist, ConstantLen):
        return float(min(dist.value, big))
    if isinstance(dist, ExponentialLen):  # P(ceil(X) > k) = exp(-k/mean): sum over k < cap
        q = math.exp(-1.0 / dist.mean)
        return (1 - q ** big) / (1 - q) if cap is not None else 1 / (1 - q)
    mu, sigma = math.log(dist.median), lognormal_sigma(dist)
    mean = math.exp(mu + sigma ** 2 / 2)
    if cap is None:
        return mean
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    z = (math.log(cap) - mu) / sigma
    return mean * phi(z - sigma) + cap * (1 - phi(z))


def _long(dist: LengthDist, values: np.ndarray | None) -> int:
    """The 99th percentile of a length distribution (the largest value of a finite list)."""
    if values is not None:
        return int(values.max())
    if isinstance(dist, ConstantLen):
        return dist.value
    if isinstance(dist, ExponentialLen):
        return max(1, math.ceil(dist.mean * math.log(100) - 1e-9))
    return max(1, math.ceil(dist.median * math.exp(Z99 * lognormal_sigma(dist)) - 1e-9))


def _mean_and_long(dist: LengthDist, cap: int | None) -> tuple[float, int]:
    """A length distribution's mean after the cap, and its 99th percentile (reading an empirical trace once)."""
    values = _empirical_values(dist) if isinstance(dist, EmpiricalLen) else None
    return _capped_mean(dist, cap, values), _long(dist, values)


def workload_lengths(wl) -> "Lengths":
    """The lengths GPU memory depends on (sim.hardware.memory.Lengths): mean and long prompt, mean response after
    the cap. Reads an empirical trace's column when the workload resamples one. A multi-turn sample's "response" is
    its context beyond the prompt: its turns and tool outputs (the longest: every turn at the cap, every tool output
    at its 99th percentile)."""
    from sim.hardware.memory import Lengths

    cap = wl.max_new_tokens
    if wl.groups is not None:
        rows = np.asarray(wl.groups, dtype=np.int64)
        prompts, responses = rows[:, 0], np.minimum(rows[:, 1:], cap)
        return Lengths(float(prompts.mean()), int(prompts.max()), float(responses.mean()), cap, wl.group_size,
                       wl.batch_prompts)
    prompt_mean, prompt_long = _mean_and_long(wl.prompt_len, None)
    response_mean, _ = _mean_and_long(wl.response_len, cap)
    T = wl.n_turns
    if T > 1:  # a sample's context beyond its prompt: every turn and every tool output (at most each turn's cap)
        tool = wl.turns.tool_tokens
        tool_mean, tool_long = (0.0, 0) if tool is None else _mean_and_long(tool, None)
        response_mean, cap = T * response_mean + (T - 1) * tool_mean, T * cap + (T - 1) * tool_long
    return Lengths(prompt_mean, prompt_long, response_mean, cap, wl.group_size, wl.batch_prompts, T)
