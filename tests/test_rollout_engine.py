"""The fast rollout engine (real/engine/fast.py) against the reference engine and the transformers forward.

Random-init tiny models have nearly flat logits (greedy ties, and the same token over and over); the models here have
their matrices scaled up (`_sharpen`) so that greedy generations vary and ties are far apart.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config

from real.engine import Sampling
from real.engine import fast as fast_module
from real.engine.fast import FastEngine, buckets
from real.engine.reference import ReferenceEngine
from real.model import build_policy
from sim.config import parse_config

MAX_PROMPT = 12


def _sharpen(model, factor: float = 8.0):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(factor)
    return model.eval()


def _qwen(dtype: str = "float32"):
    """The project's tiny Qwen2 preset (4 layers, 4 heads over 2 KV heads, tied embeddings, q/k/v biases)."""
    cfg = parse_config({
        "workload": {"batch_prompts": 1, "group_size": 1, "prompt_len": {"kind": "constant", "value": 12},
                     "response_len": {"kind": "constant", "value": 8}, "max_new_tokens": 16},
        "cluster": {"rollout_workers": 1, "max_concurrency": 1}, "run": {"steps": 1}, "real": {"dtype": dtype}})
    return _sharpen(build_policy(cfg)[0])


def _llama():
    """A tiny Llama: 6 query heads over 2 KV heads, no biases, untied lm_head, a non-default rope_theta."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, attention_bias=False, tie_word_embeddings=False,
                      max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    return _sharpen(model)


MODELS = {"qwen2": _qwen, "llama": _llama}


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of lengths cycling through 1..MAX_PROMPT, ids from 3 up (0-2: pad, BOS, EOS)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (1 + (5 * i) % MAX_PROMPT,), generator=g).tolist() for i in range(n)]


def _engine(kind: str, model, slots: int, sampling: Sampling, generator=None):
    if kind == "fast":
        return FastEngine(model, slots, sampling, 0, generator, max_prompt_len=MAX_PROMPT)
    return ReferenceEngine(model, slots, sampling, 0, generator)


def _run(engine, prompts, first: int, every: int = 3, per_admit: int = 2, on_step=None) -> dict:
    """Generate every prompt: `first` admitted at step 0, then up to `per_admit` every `every` steps into whatever
    slots are free (a schedule that depends only on when sequences finish). Returns Finished by sequence id."""
    queue, out, t = list(enumerate(prompts)), {}, 0
    take = first
    while queue or engine.active():
        if on_step is not None:
            on_step(t, engine)
        if t % every == 0:
            k = min(take, engine.free_slots(), len(queue))
            batch, queue = queue[:k], queue[k:]
            engine.admit([i for i, _ in batch], [p for _, p in batch])
            take = per_admit
        for f in engine.step():
            out[f.seq_id] = f
        t += 1
    return out


def _assert_same(fast: dict, ref: dict):
    assert fast.keys() == ref.keys()
    for sid in ref:
        assert fast[sid].tokens == ref[sid].tokens, f"sequence {sid}"
        assert fast[sid].versions == ref[sid].versions, f"sequence {sid}"
        assert max(abs(a - b) for a, b in zip(fast[sid].logprobs, ref[sid].logprobs)) < 1e-4


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(8) == [1, 2, 4, 8]


@pytest.mark.parametrize("family", MODELS)
def test_greedy_static_batch_matches_reference(family):
    model, prompts = MODELS[family](), _prompts(6)
    s = Sampling(1.0, -1, 10, greedy=True)
    ref = _run(_engine("reference", model, 6, s), prompts, first=6)
    fast = _run(_engine("fast", model, 6, s), prompts, first=6)
    _assert_same(fast, ref)
    assert len({tuple(f.tokens) for f in ref.values()}) == 6   # the sharpened model's generations differ


@pytest.mark.parametrize("eos", [False, True], ids=["no-eos", "eos"])
@pytest.mark.parametrize("family", MODELS)
def test_greedy_continuous_admission_matches_reference(family, eos):
    model, prompts = MODELS[family](), _prompts(11, seed=1)
    s = Sampling(1.0, -1, 8, greedy=True)
    if eos:   # a token that some greedy generation emits early: those sequences end there, freeing slots sooner
        free_run = _run(_engine("reference", model, 5, s), prompts, first=3)
        s = Sampling(1.0, free_run[0].tokens[2], 8, greedy=True)
    ref = _run(_engine("reference", model, 5, s), prompts, first=3)
    fast = _run(_engine("fast", model, 5, s), prompts, first=3)
    _assert_same(fast, ref)
    assert len(ref) == len(prompts)
    if eos:
        assert any(len(f.tokens) < s.max_new_tokens and f.tokens[-1] == s.eos_id for f in ref.values())


@pytest.mark.parametrize("family", MODELS)
def test_sampled_logprobs_match_full_forward(family):
    model, prompts, temp = MODELS[family](), _prompts(9, seed=2), 0.7
    s = Sampling(temp, -1, 10)
    out = _run(_engine("fast", model, 4, s, torch.Generator().manual_seed(3)), prompts, first=4, every=2)
    for sid, f in out.items():
        ids = torch.tensor([prompts[sid] + f.tokens])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompts[sid]) - 1:-1]              # [tokens, V]
        want = torch.log_softmax(logits.float() / temp, -1).gather(-1, torch.tensor(f.tokens)[:, None])[:, 0]
        assert (torch.tensor(f.logprobs) - want).abs().max().item() <= 1e-4
    assert len({t for f in out.values() for t in f.tokens}) > 10   # sampled, not one repeated token


def test_versions_through_an_in_place_weight_load():
    """Both engines on the same model, step for step; after step 4 the weights change in place (version 1)."""
    model, prompts = _qwen(), _prompts(6, seed=4)
    s = Sampling(1.0, -1, 8, greedy=True)
    engines = {k: _engine(k, model, 4, s) for k in ("reference", "fast")}
    queues = {k: list(enumerate(prompts)) for k in engines}
    out = {k: {} for k in engines}
    for t in range(40):
        if t == 4:
            with torch.no_grad():
                g = torch.Generator().manual_seed(5)
                for p in model.parameters():
                    p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
            for e in engines.values():
                e.weights_loaded(1)
        for k, e in engines.items():
            n = min(e.free_slots(), len(queues[k]), 2)
            batch, queues[k] = queues[k][:n], queues[k][n:]
            e.admit([i for i, _ in batch], [p for _, p in batch])
            out[k].update((f.seq_id, f) for f in e.step())
    _assert_same(out["fast"], out["reference"])
    versions = [f.versions for f in out["fast"].values()]
    assert len(out["fast"]) == len(prompts)
    assert [0] * 4 + [1] * 4 in versions            # admitted at step 0: straddles the load
    assert all(v == sorted(v) for v in versions)
    assert any(v == [1] * 8 for v in versions)      # admitted after the load


def test_full_width_decode_matches(monkeypatch):
    """Attention over every cache position, masked (the static shapes a CUDA graph captures), changes nothing."""
    model, prompts, s = _qwen(), _prompts(7, seed=9), Sampling(1.0, -1, 8, greedy=True)
    cut = _run(_engine("fast", model, 4, s), prompts, first=3)
    monkeypatch.setattr(fast_module, "SPAN_ROUND", 10_000)   # span = min(rounded, max_len) = max_len
    _assert_same(_run(_engine("fast", model, 4, s), prompts, first=3), cut)


def test_decode_covers_the_active_sequences_not_the_highest_slot():
    """Sequences ending early leave holes below the ones still decoding: those move down (`_pack`), so each decode
    on CPU runs exactly the sequences decoding (those with a cached context; on CUDA the smallest graph bucket that
    holds them), as the simulator charges a step for its active sequences; and the tokens are still the reference's
    (greedy, with an EOS that some generations emit early, so neighbours finish at different times)."""
    model, prompts = _qwen(), _prompts(11, seed=1)
    s = Sampling(1.0, -1, 8, greedy=True)
    s = Sampling(1.0, _run(_engine("reference", model, 8, s), prompts, first=8)[0].tokens[2], 8, greedy=True)
    engine, decoded = _engine("fast", model, 8, s), []
    inner = engine._decode_logits

    def recorded(b):
        decoded.append((b, sum(c > 0 for c in engine.ctx)))
        return inner(b)

    engine._decode_logits = recorded
    ref = _run(_engine("reference", model, 8, s), prompts, first=8, every=4)
    _assert_same(_run(engine, prompts, first=8, every=4), ref)
    assert all(b == n for b, n in decoded)
    assert any(n not in buckets(8) for _, n in decoded)   # some steps decoded a count between two buckets
    assert any(n <= 4 for _, n in decoded)   # the schedule did leave few sequences decoding


def test_slot_reuse_leaves_no_stale_cache():
    model, s = _qwen(), Sampling(1.0, -1, 6, greedy=True)
    long, short = _prompts(4, seed=6), [p[:2] for p in _prompts(4, seed=7)]
    long = [p + [5] * (MAX_PROMPT - len(p)) for p in long]   # fill the slots' caches far past the short prompts
    used = _engine("fast", model, 4, s)
    _run(used, long, first=4)
    again = _run(used, short, first=4)
    fresh = _run(_engine("fast", model, 4, s), short, first=4)
    _assert_same(again, fresh)


def test_bfloat16_generates_max_new_tokens():
    s = Sampling(0.7, -1, 6)
    out = _run(_engine("fast", _qwen("bfloat16"), 4, s, torch.Generator().manual_seed(8)), _prompts(6), first=4)
    assert len(out) == 6 and all(len(f.tokens) == 6 and len(f.logprobs) == 6 for f in out.values())
    assert all(torch.isfinite(torch.tensor(f.logprobs)).all() for f in out.values())


def _load_noise_at(step: int):
    """An on_step hook: at `step`, perturb the engine's model's weights in place (seeded) and load version 1."""
    def on_step(t, engine):
        if t == step:
            with torch.no_grad():
                g = torch.Generator(engine.model.device).manual_seed(5)
                for p in engine.model.parameters():
                    p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g, device=p.device))
            engine.weights_loaded(1)
    return on_step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_cuda_matches_reference_through_a_weight_load(graphs):
    """On CUDA, with the decode captured as CUDA graphs (or not), continuous admission and an in-place weight load
    at step 4: the reference engine's tokens, on a copy of the same model given the same load."""
    model, prompts, s = _qwen().cuda(), _prompts(11, seed=1), Sampling(1.0, -1, 8, greedy=True)
    ref = _run(ReferenceEngine(copy.deepcopy(model), 5, s, 0), prompts, first=3, on_step=_load_noise_at(4))
    engine = FastEngine(model, 5, s, 0, max_prompt_len=MAX_PROMPT, cuda_graphs=graphs)
    _assert_same(_run(engine, prompts, first=3, on_step=_load_noise_at(4)), ref)
    assert bool(engine._captured) == graphs


@pytest.mark.parametrize("kind", ["fast", "reference"])
def test_a_refused_admission_changes_nothing(kind):
    """Too many sequences, an id held already or twice in one call, an empty prompt: refused before any is taken."""
    model, s = _qwen(), Sampling(1.0, -1, 4)
    e = _engine(kind, model, 3, s)
    e.admit([0], [[3, 4]])
    for ids, prompts, words in (([1, 2, 3], [[3]] * 3, "free slots"), ([1, 0], [[3], [4]], "already"),
                                ([1, 1], [[3], [4]], "already"), ([1, 2], [[3], []], "prompt has 0 tokens")):
        with pytest.raises(ValueError, match=words):
            e.admit(ids, prompts)
        assert e.active() == 1 and e.free_slots() == 2
    e.admit([1, 2], [[5], [6, 7]])
    finished = []
    while e.active():
        finished += e.step()
    assert sorted(f.seq_id for f in finished) == [0, 1, 2] and all(len(f.tokens) == 4 for f in finished)


def test_errors():
    model, s = _qwen(), Sampling(1.0, -1, 4)
    e = _engine("fast", model, 2, s)
    with pytest.raises(ValueError, match="free slots"):
        e.admit([0, 1, 2], [[3], [4], [5]])
    with pytest.raises(ValueError, match="max_prompt_len"):
        e.admit([0], [[3] * (MAX_PROMPT + 1)])
    e.admit([0], [[3]])
    with pytest.raises(ValueError, match="already"):
        e.admit([0], [[3]])
    with pytest.raises(ValueError, match="max_prompt_len"):
        FastEngine(model, 2, s, 0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="'gpt2'"):
        FastEngine(gpt2, 2, s, 0, max_prompt_len=MAX_PROMPT)
    sliding = Qwen2Config(use_sliding_window=True, sliding_window=8, num_hidden_layers=1)
    with pytest.raises(ValueError, match="sliding"):
        FastEngine(SimpleNamespace(config=sliding), 2, s, 0, max_prompt_len=MAX_PROMPT)
    linear = LlamaConfig(num_hidden_layers=1, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="'linear'"):
        FastEngine(SimpleNamespace(config=linear), 2, s, 0, max_prompt_len=MAX_PROMPT)
