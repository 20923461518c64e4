"""Rollout engines side by side: seconds per decode step of the fast engine, the reference engine and transformers'
`model.generate()`, at a few batch sizes (not part of the default test run):

    pytest benchmarks/test_bench_engine.py --benchmark-only -s

On CPU: the tiny preset (float32) at 16 and 64 sequences. On CUDA: the qwen2.5-0.5b preset's shape (bfloat16,
random init, the project's 64-id vocabulary) at 64, 256 and 512 sequences. A round generates `STEPS` tokens for
every sequence (prompts of `PROMPT` ids, EOS off: every sequence runs all steps), so its time over `STEPS` is the
time per decode step, the prefill included (amortized). The benchmark table shows seconds per round, grouped by
batch size; the per-step milliseconds are printed (-s) and stored in extra_info["ms_per_step"].
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from real.engine import Sampling, make_engine
from real.model import build_policy
from sim.config import load_config

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny_cpu.yaml"
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SIZES = [64, 256, 512] if CUDA else [16, 64]
STEPS = 128 if CUDA else 32
PROMPT = 12
ROUNDS = 5 if CUDA else 3


@pytest.fixture(scope="module")
def model():
    over = {"real.model": "qwen2.5-0.5b", "real.dtype": "bfloat16"} if CUDA else {}
    return build_policy(load_config(TINY, over), DEVICE)[0].eval()


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 40, (n, PROMPT), generator=g).tolist()


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _engine_round(kind: str, model, n: int):
    engine = make_engine(kind, model, n, Sampling(1.0, -1, STEPS), 0, torch.Generator(DEVICE).manual_seed(0),
                         max_prompt_len=PROMPT)
    prompts = _prompts(n)

    def one_round():
        engine.admit(range(n), prompts)
        done = 0
        while engine.active():
            done += len(engine.step())
        _sync()
        assert done == n
    return one_round


def _generate_round(model, n: int):
    ids = torch.tensor(_prompts(n), device=DEVICE)   # [n, PROMPT], all one length: no padding

    @torch.inference_mode()
    def one_round():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS,
                             min_new_tokens=STEPS, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             pad_token_id=0)
        _sync()
        assert out.shape == (n, PROMPT + STEPS)
    return one_round


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["fast", "reference", "generate"])
def test_decode_step(benchmark, model, kind, n):
    one_round = _generate_round(model, n) if kind == "generate" else _engine_round(kind, model, n)
    benchmark.group = f"decode step, {n} sequences, {DEVICE.type}"
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1, iterations=1)   # the warm-up captures CUDA graphs
    ms = benchmark.stats.stats.median / STEPS * 1e3
    benchmark.extra_info["ms_per_step"] = ms
    print(f"\n{kind:>9} n={n:<4} {ms:.3f} ms per decode step ({DEVICE.type})")
