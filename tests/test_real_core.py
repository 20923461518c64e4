"""The real trainer's single-process parts: tokenizer, task, policy, generation, GRPO loss, lr schedules."""

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from real.engine import Sampling, make_engine
from real.loss import LossConfig, group_advantages, grpo_loss, scheduled_lr, token_logprobs
from real.model import build_policy, save_policy
from real.task import DigitTask
from real.tokenizer import CharTokenizer
from sim.config import Optim, Real, load_config, parse_config
from sim.hardware.specs import MODELS
from sim.metrics import ess, kl_estimates


@pytest.fixture
def cfg(config_data):
    return parse_config(config_data)


@pytest.fixture(scope="module")
def policy():
    """The tiny random-init policy and its tokenizer, shared by the tests that only read it."""
    return build_policy(parse_config({
        "workload": {"batch_prompts": 1, "group_size": 1, "prompt_len": {"kind": "constant", "value": 12},
                     "response_len": {"kind": "constant", "value": 8}, "max_new_tokens": 16},
        "cluster": {"rollout_workers": 1, "max_concurrency": 1}, "run": {"steps": 1}}))


# --------------------------------------------------------------------------- tokenizer and task
def test_tokenizer_round_trip(tmp_path):
    tok = CharTokenizer()
    assert tok.vocab_size <= 64 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = "add:0123+98=abc xyz"
    ids = tok.encode(text)
    assert len(ids) == len(text) and min(ids) > tok.eos_id
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    tok.save(tmp_path)
    assert CharTokenizer.load(tmp_path).encode(text) == ids
    with pytest.raises(ValueError, match="not in the tokenizer"):
        tok.encode("A")


@pytest.mark.parametrize("kind", ["reverse", "sort", "add"])
def test_task_answers_are_correct_and_vary_in_length(kind):
    tok = CharTokenizer()
    task = DigitTask(Real(task=kind, min_digits=2, max_digits=8), tok)
    prompts = task.sample(np.random.default_rng(0), 200)
    for p in prompts:
        assert p.ids[0] == tok.bos_id and tok.decode(p.ids) == p.text
        digits = p.text.split(":")[1].rstrip("=")
        expected = {"reverse": digits[::-1], "sort": "".join(sorted(digits)),
                    "add": str(sum(map(int, digits.split("+"))))}[kind]
        assert tok.decode(p.answer) == expected
        assert task.sft_example(p) == [*p.answer, tok.eos_id]
    lengths = {len(p.answer) for p in prompts}
    assert min(lengths) <= 3 and max(lengths) >= 8


def test_task_reward_partial_credit():
    tok = CharTokenizer()
    task = DigitTask(Real(task="reverse"), tok)
    p = next(q for q in task.sample(np.random.default_rng(1), 50) if len(q.answer) == 4)
    a, eos = list(p.answer), tok.eos_id
    wrong = tok.encode("9") if a[0] != tok.encode("9")[0] else tok.encode("8")
    assert task.reward(p, a + [eos]) == 1.0
    assert task.reward(p, a + [eos, 5, 6]) == 1.0           # nothing after the EOS counts
    assert task.reward(p, []) == 0.0 and task.reward(p, [eos]) == 0.0
    assert task.reward(p, a) == pytest.approx(4 / 5)         # no EOS: no stop credit
    assert task.reward(p, a + a) == pytest.approx(4 / 9)     # too long
    assert task.reward(p, a[:2] + [eos]) == pytest.approx(2 / 5)
    assert task.reward(p, wrong + a[1:] + [eos]) == pytest.approx(4 / 5)
    for r in (task.reward(p, a), task.reward(p, a[:2] + [eos]), task.reward(p, wrong + a[1:] + [eos])):
        assert 0.0 < r < 1.0


# --------------------------------------------------------------------------- policy
def test_build_policy_tiny_is_the_sim_shape_and_deterministic(cfg, tmp_path):
    model, tok = build_policy(cfg)
    assert sum(p.numel() for p in model.parameters()) == MODELS["tiny"].params == 993_408
    assert model.config.vocab_size == 64 >= tok.vocab_size
    same, _ = build_policy(cfg)
    other, _ = build_policy(cfg.with_overrides({"seed": 1}))
    sd, sd_same, sd_other = model.state_dict(), same.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd_same[k]) for k in sd)
    assert not all(torch.equal(sd[k], sd_other[k]) for k in sd)
    # real.init_seed: runs of other seeds start from the policy of that seed
    shared = build_policy(cfg.with_overrides({"seed": 7, "real.init_seed": 1}))[0].state_dict()
    assert all(torch.equal(sd_other[k], shared[k]) for k in sd)

    save_policy(model, tok, tmp_path / "ckpt")
    loaded, loaded_tok = build_policy(cfg.with_overrides({"real.model": str(tmp_path / "ckpt")}))
    ids = torch.tensor([[1, 5, 6, 7]])
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    assert loaded_tok.chars == tok.chars
    with pytest.raises(FileNotFoundError, match="checkpoint folder"):
        build_policy(cfg.with_overrides({"real.model": str(tmp_path / "nowhere")}))
    assert build_policy(cfg.with_overrides({"real.dtype": "bfloat16"}))[0].dtype == torch.bfloat16


# --------------------------------------------------------------------------- generation
def _prompts(tok, n=6):
    return [p.ids for p in DigitTask(Real(), tok).sample(np.random.default_rng(2), n)]


ENGINES = ("reference", "fast")


def generate(model, prompts, max_new_tokens, *, temperature, eos_id, version, generator, engine="reference",
             pad_id=None, between_steps=None):
    """Every prompt admitted at once into a rollout engine, stepped until all finish; `between_steps()` runs
    between two steps and, returning an int, says it has loaded that version's weights into `model`."""
    eng = make_engine(engine, model, len(prompts), Sampling(temperature, eos_id, max_new_tokens), version, generator,
                      max_prompt_len=max(map(len, prompts)))
    eng.admit(list(range(len(prompts))), prompts)
    done = {}
    while True:
        done.update((f.seq_id, f) for f in eng.step())
        if not eng.active():
            break
        if between_steps is not None and (new := between_steps()) is not None:
            eng.weights_loaded(new)
    rows = [done[i] for i in range(len(prompts))]
    return SimpleNamespace(tokens=[f.tokens for f in rows], logprobs=[f.logprobs for f in rows],
                           versions=[f.versions for f in rows])


def _recompute(model, prompts, rollout, temperature, pad_id):
    """token_logprobs of the generated tokens by one full, right-padded forward pass."""
    seqs = [list(p) + t for p, t in zip(prompts, rollout.tokens)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    resp = torch.tensor([[0] * len(p) + [1] * len(t) + [0] * (width - len(p) - len(t))
                         for p, t in zip(prompts, rollout.tokens)])
    with torch.no_grad():
        logp = token_logprobs(model, ids, attn, resp, temperature)
    return [logp[i, len(p):len(p) + len(t)].tolist() for i, (p, t) in enumerate(zip(prompts, rollout.tokens))]


@pytest.mark.parametrize("engine", ENGINES)
def test_generate_shapes_versions_and_behavior_logprobs(policy, engine):
    model, tok = policy
    prompts = _prompts(tok)
    kw = dict(temperature=0.7, eos_id=tok.eos_id, pad_id=tok.pad_id, version=3, engine=engine)
    out = generate(model, prompts, 12, generator=torch.Generator().manual_seed(0), **kw)
    again = generate(model, prompts, 12, generator=torch.Generator().manual_seed(0), **kw)
    assert out.tokens == again.tokens
    assert len(out.tokens) == len(out.logprobs) == len(out.versions) == len(prompts)
    for t, lp, v in zip(out.tokens, out.logprobs, out.versions):
        assert 1 <= len(t) <= 12 and len(lp) == len(v) == len(t)
        assert set(v) == {3} and all(x <= 0 for x in lp)
    for got, want in zip(out.logprobs, _recompute(model, prompts, out, 0.7, tok.pad_id)):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_generate_stops_each_sequence_at_eos(policy, engine):
    model, tok = policy
    prompts = _prompts(tok)
    kw = dict(temperature=1.5, pad_id=tok.pad_id, version=0, engine=engine)
    free = generate(model, prompts, 16, eos_id=-1, generator=torch.Generator().manual_seed(5), **kw)
    eos = free.tokens[0][2]  # a token row 0 samples at step 2: used as EOS, row 0 ends by step 2
    out = generate(model, prompts, 16, eos_id=eos, generator=torch.Generator().manual_seed(5), **kw)
    assert out.tokens[0][-1] == eos and len(out.tokens[0]) <= 3
    for t in out.tokens:
        assert eos not in t[:-1]
        assert len(t) == 16 or t[-1] == eos
    assert any(len(t) < 16 for t in out.tokens)
    for got, want in zip(out.logprobs, _recompute(model, prompts, out, 1.5, tok.pad_id)):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_generate_between_steps_switches_version_and_weights(cfg, engine):
    model, tok = build_policy(cfg)
    new_weights = build_policy(cfg.with_overrides({"seed": 1}))[0].state_dict()
    prompts = _prompts(tok)
    kw = dict(temperature=1.0, eos_id=-1, pad_id=tok.pad_id, generator=torch.Generator().manual_seed(0),
              engine=engine)
    base = generate(model, prompts, 8, version=4, **kw)
    calls = []

    def hook():  # an interruptible worker: loads new weights in place after the 3rd token
        calls.append(1)
        if len(calls) == 3:
            model.load_state_dict(new_weights)
            return 7
        return None

    kw["generator"] = torch.Generator().manual_seed(0)
    out = generate(model, prompts, 8, version=4, between_steps=hook, **kw)
    assert len(calls) == 7  # between every two of the 8 decode steps
    assert all(v == [4, 4, 4, 7, 7, 7, 7, 7] for v in out.versions)
    assert [t[:3] for t in out.tokens] == [t[:3] for t in base.tokens]
    assert [lp[:3] for lp in out.logprobs] == [lp[:3] for lp in base.logprobs]
    assert all(a[3] != b[3] for a, b in zip(out.logprobs, base.logprobs))  # the 4th token saw the new weights


# --------------------------------------------------------------------------- advantages and loss
def test_group_advantages_hand_computed():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.2]]))
    s = math.sqrt(0.5 / 3)  # population std of (1, 0, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.5 / s, -0.5 / s, 0.0], [0.0, 0.0, 0.0]]), atol=1e-5, rtol=0)


# Two sequences; the 3rd token of sequence 1 is padding (its made-up ratio 3 and weight 10 must not count).
RATIO = torch.tensor([[1.5, 1.0, 0.9], [0.7, 1.1, 3.0]])     # π_θ / π_ref, ref = behav (coupled) or prox
BEHAV_W = torch.tensor([[2.0, 1.0, 10.0], [0.5, 1.0, 10.0]])  # π_prox / π_behav (decoupled)
ADV = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def _tensors(form):
    behav = torch.full((2, 3), math.log(0.05))
    prox = behav + BEHAV_W.log() if form == "decoupled" else behav
    logp = (prox + RATIO.log()).requires_grad_()
    return logp, behav, prox


GSPO_R = (1.35 ** (1 / 3), 0.77 ** 0.5)  # geometric means per token of the ratios: 1.1052, 0.8775


@pytest.mark.parametrize("form, level, mode, eps, loss, clip_frac, grad", [
    # token: per-token -min(rA, clip(r)A): seq 0 (A=1) 1.2 (clipped), 1.0, 0.9; seq 1 (A=-2) -1.6 (clipped), -2.2
    ("coupled", "token", "clamp", 0.2, -(3.1 - 3.8) / 5, 2 / 5, [[0, -1.0, -0.9], [0, 2.2, 0]]),
    # decoupled: the same times w = [2, 1, min(10, 5)], [0.5, 1]: 2.4 + 1 + 4.5 and -0.8 - 2.2
    ("decoupled", "token", "clamp", 0.2, -(7.9 - 3.0) / 5, 2 / 5, [[0, -1.0, -4.5], [0, 2.2, 0]]),
    # AReaL's cap: the token whose weight 10 is over the cap leaves the loss (w = 0), the mean still counts it:
    # 2.4 + 1 + 0 and -0.8 - 2.2
    ("decoupled", "token", "drop", 0.2, -(3.4 - 3.0) / 5, 2 / 5, [[0, -1.0, 0], [0, 2.2, 0]]),
    # sequence: r = 1.5·1·0.9 = 1.35 (clipped to 1.3, A=1), 0.77 (A=-2, inside 0.7): 3·1.3 - 2·1.54
    ("coupled", "sequence", "clamp", 0.3, -(3.9 - 3.08) / 5, 3 / 5, [[0, 0, 0], [1.54, 1.54, 0]]),
    # decoupled sequence: w = min(2·1·10, 5) = 5 and 0.5: 5·3·1.3 - 0.5·2·1.54
    ("decoupled", "sequence", "clamp", 0.3, -(19.5 - 1.54) / 5, 3 / 5, [[0, 0, 0], [0.77, 0.77, 0]]),
    # gspo: r = 1.35^(1/3) = 1.1052 and 0.77^(1/2) = 0.8775, both inside 1 ± 0.3: 3·1.1052 - 2·2·0.8775
    ("coupled", "gspo", "clamp", 0.3, -(3 * GSPO_R[0] - 4 * GSPO_R[1]) / 5, 0.0,
     [[-GSPO_R[0]] * 3, [2 * GSPO_R[1]] * 2 + [0]]),
    # gspo with a tighter clip: 1.1052 > 1.05 is clipped (A=1), 0.8775 < 0.95 too (A=-2): 3·1.05 - 2·2·0.95
    ("coupled", "gspo", "clamp", 0.05, -(3 * 1.05 - 4 * 0.95) / 5, 1.0, [[0, 0, 0], [0, 0, 0]]),
])
def test_grpo_loss_hand_computed(form, level, mode, eps, loss, clip_frac, grad):
    logp, behav, prox = _tensors(form)
    cfg = LossConfig(form=form, ratio_level=level, clip_eps=eps, behav_cap=5.0, behav_cap_mode=mode)
    value, stats = grpo_loss(logp, behav, prox if form == "decoupled" else None, ADV, MASK, cfg)
    value.backward()
    assert value.item() == pytest.approx(loss, abs=1e-5) and stats["loss"] == pytest.approx(loss, abs=1e-5)
    assert stats["clip_frac"] == pytest.approx(clip_frac)
    # d loss / d logp = -w·A·r / n_tokens where unclipped (r, w of the token or of its sequence), 0 where clipped
    # or padded
    torch.testing.assert_close(logp.grad, torch.tensor(grad) / 5, atol=1e-5, rtol=1e-5)
    # ESS and KL: current over behavior, by sim.metrics on the same numbers
    w_tok = (RATIO * (BEHAV_W if form == "decoupled" else 1.0))[MASK.bool()].numpy().astype(np.float64)
    w_seq = np.array([w_tok[:3].prod(), w_tok[3:].prod()])
    assert stats["ess_token"] == pytest.approx(ess(w_tok), rel=1e-5)
    assert stats["ess_seq"] == pytest.approx(ess(w_seq), rel=1e-5)
    kl = kl_estimates(np.log(w_tok))  # log π_θ/π_behav of each token
    assert all(stats[f"kl_{k}"] == pytest.approx(kl[k], rel=1e-5) for k in ("k1", "k2", "k3"))
    # over the cap 5: the token of weight 10; at sequence level, all of sequence 0 (weight 2·1·10 = 20)
    capped = {"coupled": 0.0, "decoupled": 1 / 5 if level == "token" else 3 / 5}[form]
    assert stats["behav_capped_frac"] == pytest.approx(capped)
    per_seq = {"token": None, "sequence": (1.35, 0.77), "gspo": GSPO_R}[level]
    r_used = RATIO[MASK.bool()] if per_seq is None else torch.tensor([per_seq[0]] * 3 + [per_seq[1]] * 2)
    assert stats["ratio_mean"] == pytest.approx(float(r_used.mean()), rel=1e-5)


@pytest.mark.parametrize("form", ["coupled", "decoupled"])
@pytest.mark.parametrize("level", ["token", "sequence", "gspo"])
def test_grpo_loss_on_policy_equals_plain_grpo(form, level):
    gen = torch.Generator().manual_seed(0)
    logp = (-torch.rand(4, 6, generator=gen) * 3).requires_grad_()
    adv = torch.randn(4, generator=gen)
    mask = torch.tensor([[1.0] * 6, [1.0] * 3 + [0.0] * 3, [1.0] * 5 + [0.0], [1.0] + [0.0] * 5])
    same = logp.detach()  # behavior = proximal = current
    loss, stats = grpo_loss(logp, same, same, adv, mask, LossConfig(form=form, ratio_level=level))
    loss.backward()
    plain_logp = logp.detach().clone().requires_grad_()
    plain = -(adv[:, None] * plain_logp * mask).sum() / mask.sum()  # REINFORCE with group advantages
    plain.backward()
    assert loss.item() == pytest.approx(float(-(adv[:, None] * mask).sum() / mask.sum()), abs=1e-6)
    torch.testing.assert_close(logp.grad, plain_logp.grad)
    assert stats["clip_frac"] == 0 and stats["kl_k3"] == pytest.approx(0, abs=1e-7)
    assert stats["ess_token"] == pytest.approx(1) and stats["ess_seq"] == pytest.approx(1)
    assert stats["ratio_mean"] == pytest.approx(1)


def test_grpo_loss_through_the_model_on_policy(policy):
    """token_logprobs gives the gradient of plain GRPO when behavior = current (the learner's first micro-batch)."""
    model, tok = policy
    ids = torch.tensor([[1, 20, 21, 5, 6, 2], [1, 22, 7, 8, 0, 0]])
    attn = (ids != tok.pad_id).long()
    resp = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    logp = token_logprobs(model, ids, attn, resp)
    assert logp.shape == (2, 6) and torch.all(logp[resp == 0] == 0) and torch.all(logp[resp == 1] < 0)
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([0.5, -1.0]), resp.float(), LossConfig())
    grads = torch.autograd.grad(loss, list(model.parameters()))
    plain = -(torch.tensor([0.5, -1.0])[:, None] * token_logprobs(model, ids, attn, resp) * resp).sum() / resp.sum()
    for g, h in zip(grads, torch.autograd.grad(plain, list(model.parameters()))):
        torch.testing.assert_close(g, h)


def test_loss_config_from_real():
    assert LossConfig.from_real(Real(loss="coupled", ratio_level="gspo", clip_eps=0.1, behav_cap=3.0,
                                     behav_cap_mode="drop")) == LossConfig("coupled", "gspo", 0.1, 3.0, "drop")
    with pytest.raises(ValueError, match="prox_logp"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.zeros(1), torch.ones(1, 1), LossConfig())


def test_scheduled_lr():
    assert scheduled_lr(Optim(lr=1e-3), 0.1, 5.0) == 1e-3
    ess_cfg = Optim(lr=1e-3, schedule="ess_coupled", ess_base=0.8, ess_power=2.0)
    assert scheduled_lr(ess_cfg, 0.4, 0.0) == pytest.approx(1e-3 * 0.25)
    assert scheduled_lr(ess_cfg, 0.95, 0.0) == pytest.approx(1e-3)
    stale_cfg = Optim(lr=1e-3, schedule="staleness_aware", staleness_alpha=0.5)
    assert scheduled_lr(stale_cfg, 1.0, 2.0) == pytest.approx(1e-3 / 2)
    assert scheduled_lr(stale_cfg, 1.0, 0.0) == pytest.approx(1e-3)


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_cpu_placement_gives_the_learner_a_core_of_its_own_while_workers_run_beside_it(monkeypatch):
    import os

    from real import model as M

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6})
    assert M.cpu_cores(M.LEARNER, "async", 4) == {4}
    assert [M.cpu_cores(i, "async", 4) for i in range(4)] == [{5}, {6}, {5}, {6}]
    # Sync mode: generation takes every core once the workers fill them (the learner's bookkeeping beside them) ...
    assert [M.cpu_cores(i, "sync", 4) for i in range(4)] == [{4}, {5}, {6}, {4}]
    assert [M.cpu_cores(i, "sync", 3) for i in range(3)] == [{4}, {5}, {6}]
    # ... and leaves the learner's core to it while fewer workers than cores run
    assert [M.cpu_cores(i, "sync", 2) for i in range(2)] == [{5}, {6}] and M.cpu_cores(M.LEARNER, "sync", 2) == {4}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert M.cpu_cores(0, "async", 1) is None and M.cpu_cores(M.LEARNER, "sync", 1) is None


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_pinned_restores_the_cores_it_found():
    import os

    from real.model import LEARNER, pinned

    before = os.sched_getaffinity(0)
    with pinned(LEARNER, torch.device("cpu"), load_config(Path(__file__).parents[1] / "examples" / "tiny_cpu.yaml")):
        inside = os.sched_getaffinity(0)
    assert os.sched_getaffinity(0) == before
    assert inside == (before if len(before) < 2 else {min(before)})


# --------------------------------------------------------------------------- a learner step with several updates
def _scored_groups(learner, cfg, seed: int = 0):
    """A batch as the learner receives it: per group, the correct answer and G - 1 random responses (so rewards,
    hence advantages, differ within every group), with behavior log-probs a little off the current policy's."""
    from real.learner import GroupRecord
    from real.worker import GroupDone, prompt_for

    rng = np.random.default_rng(seed)
    G, groups = cfg.workload.group_size, []
    for gid in range(cfg.workload.batch_prompts):
        prompt = prompt_for(learner.task, cfg.seed, gid)
        tokens = [learner.task.sft_example(prompt)]
        tokens += [rng.integers(4, learner.tok.vocab_size, size=len(tokens[0])).tolist() for _ in range(G - 1)]
        logprobs = [(-2.0 + rng.normal(0, 0.3, len(t))).tolist() for t in tokens]
        done = GroupDone(gid, 0, 0.0, [0.0] * G, tokens, logprobs, [[0] * len(t) for t in tokens])
        groups.append(GroupRecord(gid, 0, len(prompt.ids), 0.0, 0, done=done))
    return groups


@pytest.mark.parametrize("epochs, mini_batches", [(1, 1), (4, 1), (2, 2)])
def test_several_updates_per_batch_move_away_from_the_proximal_policy(config_data, epochs, mini_batches):
    """One update: the ratio to the step's starting (proximal) policy is 1 everywhere, nothing can clip. Several
    (epochs x mini-batches), at a large lr: the policy moves within the step and the clip acts on some tokens. The
    version (published weights) goes up by one either way, and the stats describe the batch at the step's start."""
    from real.profile import _standalone_learner

    config_data["workload"] |= {"batch_prompts": 4, "group_size": 4, "max_new_tokens": 16}
    config_data["cluster"]["max_concurrency"] = 16
    config_data["optim"] = {"lr": 3e-2}
    config_data["real"] = {"ppo_epochs": epochs, "mini_batches": mini_batches, "micro_batch": 4}
    cfg = parse_config(config_data)
    learner, _ = _standalone_learner(cfg, torch.device("cpu"))
    res = learner.train_on(0, _scored_groups(learner, cfg), t_wait=0.0)
    m = res.metrics
    assert learner.version == 1 and m["updates"] == epochs * mini_batches
    if epochs * mini_batches == 1:
        assert m["clip_frac"] == 0 and m["ratio_mean"] == pytest.approx(1.0)
    else:
        assert 0 < m["clip_frac"] < 1
    assert m["update_norm"] > 0 and math.isfinite(m["grad_norm"]) and m["kl/k3"] >= 0
