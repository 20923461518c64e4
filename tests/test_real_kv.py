"""The real rollout engines held to a KV budget in tokens (real/engine/kv.py): the simulator's admission and eviction
rule (sim/engine/kernel.py), evicted sequences recomputed to exactly what they would have generated, and the
evictions counted into the trainer's samples table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_batching import run_by_sample
from test_rollout_engine import _engine, _qwen

from real.engine import Finished, Generation, Sampling, check_engine
from real.engine.batching import GroupBatcher
from real.engine.kv import POLICIES, KVBudgetedEngine, kv_budgeted
from sim.config import ConfigError, load_config, parse_config
from sim.engine.pipeline import Simulation

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny_cpu.yaml"


def _generations(engine) -> list:
    """The Generations an engine holds (fast: by slot; reference: by id)."""
    held = engine.seqs if hasattr(engine, "seqs") else list(engine.records.values())
    return [g for g in held if g is not None]


def _watch(kv: KVBudgetedEngine) -> list[tuple[int, int]]:
    """Check before every step of the engine under `kv` that the layer's contexts are the engine's (prompt + tokens
    of every sequence it holds); record (running sequences, tokens the step holds) of each step."""
    steps, inner_step = [], kv.engine.step

    def step():
        assert kv.ctx == {g.seq_id: len(g.prompt) + len(g.tokens) for g in _generations(kv.engine)}
        steps.append((len(kv.ctx), kv.step_tokens))
        return inner_step()

    kv.engine.step = step
    return steps


def _run(engine, groups: list[list[int]], group_size: int) -> tuple[dict, dict, dict]:
    """Admit groups (each `group_size` samples of one prompt, ids g * group_size + i) in order whenever slots are free
    and (with a budget) the budget takes the next one, as a worker does; step until all finished. Returns (Finished
    by id, the step each finished in, the step each group was admitted before)."""
    out, ended, admitted, step, nxt = {}, {}, {}, 0, 0
    while nxt < len(groups) or engine.active():
        while (nxt < len(groups) and engine.free_slots() >= group_size
               and (not isinstance(engine, KVBudgetedEngine) or engine.fits(group_size, [len(groups[nxt])]))):
            engine.admit([nxt * group_size + i for i in range(group_size)], [groups[nxt]] * group_size)
            admitted[nxt], nxt = step, nxt + 1
        step += 1
        for f in engine.step():
            out[f.seq_id], ended[f.seq_id] = f, step
    return out, ended, admitted


def _prompts(n: int, lengths, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 64, size=int(length)).tolist() for length, _ in zip(lengths, range(n))]


def _assert_same_generation(got, want):
    assert got.tokens == want.tokens and got.versions == want.versions
    assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs)) < 1e-4


# --------------------------------------------------------------------------- the rule, on the engines
@pytest.mark.parametrize("kind", ["fast", "reference"])
def test_the_newer_sequence_is_evicted_then_recomputed_to_what_it_would_have_generated(kind):
    """docs/design.md's worked example: two sequences of a 10-token prompt and 20 tokens, a 40-token budget. Step
    boundary k holds 2 × (10 + k) and the step writes 2: at boundary 10 the newer one is evicted with 20 tokens of
    context; the other ends after step 20, then the evicted one re-prefills its 20 tokens and ends after step 30.
    Greedy: its tokens are the ones it generates without a budget."""
    model, s = _qwen(), Sampling(1.0, -1, 20, greedy=True)
    prompts = _prompts(2, [10, 10], seed=0)
    free, _, _ = _run(_engine(kind, model, 2, s), prompts, 1)
    kv = KVBudgetedEngine(_engine(kind, model, 2, s), 40, "preempt_recompute")
    steps = _watch(kv)
    evicted, resumed = [], []   # (steps done, what): the sequence evicted, the contexts resumed
    evict, resume = kv.engine.evict, kv.engine.resume

    def logged_evict(seq_id):
        evicted.append((len(steps), seq_id))
        return evict(seq_id)

    def logged_resume(generations):
        resumed.append((len(steps), [len(g.context()) for g in generations]))
        resume(generations)

    kv.engine.evict, kv.engine.resume = logged_evict, logged_resume
    out, ended, _ = _run(kv, prompts, 1)
    assert evicted == [(10, 1)] and resumed == [(20, [20])]
    assert ended == {0: 20, 1: 30} and kv.evictions == 1
    assert [out[i].preemptions for i in (0, 1)] == [0, 1]
    assert all(len(out[i].tokens) == 20 for i in (0, 1))
    for i in (0, 1):
        _assert_same_generation(out[i], free[i])
    assert max(tokens for n, tokens in steps if n > 1) == 40


@pytest.mark.parametrize("kind", ["fast", "reference"])
def test_a_group_over_the_budget_runs_one_sequence_at_a_time(kind):
    """A group of 2 admitted into an empty engine (always allowed) whose first step needs 2 × (5 + 1) = 12 of a
    10-token budget: the newer sequence is evicted before its prefill, and resumes (its prompt alone) when the
    other has finished."""
    model, s = _qwen(), Sampling(1.0, -1, 4, greedy=True)
    prompts = _prompts(1, [5], seed=2)
    free, _, _ = _run(_engine(kind, model, 2, s), prompts, 2)
    kv = KVBudgetedEngine(_engine(kind, model, 2, s), 10, "preempt_recompute")
    out, ended, _ = _run(kv, prompts, 2)
    assert ended == {0: 4, 1: 8} and [out[i].preemptions for i in (0, 1)] == [0, 1]
    for i in (0, 1):
        _assert_same_generation(out[i], free[i])


def test_admit_reserve_holds_the_next_group_until_a_reservation_ends():
    """admit_reserve: a group of 2 reserves 2 × (10 + 20) = 60, the whole budget; the second group is admitted only
    after the first has finished, and nothing is evicted (preempt_recompute would admit it at once: 22 fit beside
    the first group's 22)."""
    model, s = _qwen(), Sampling(1.0, -1, 20, greedy=True)
    prompts = _prompts(2, [10, 10], seed=1)
    kv = KVBudgetedEngine(_engine("fast", model, 4, s), 60, "admit_reserve")
    out, ended, admitted = _run(kv, prompts, 2)
    assert admitted == {0: 0, 1: 20} and ended == {0: 20, 1: 20, 2: 40, 3: 40}
    assert kv.evictions == 0 and all(f.preemptions == 0 and len(f.tokens) == 20 for f in out.values())
    recompute = KVBudgetedEngine(_engine("fast", model, 4, s), 60, "preempt_recompute")
    assert recompute.fits(2, [10, 10]) and not recompute.fits(2, [10, 10, 10])


@pytest.mark.parametrize("kind, policy", [("fast", "preempt_recompute"), ("reference", "preempt_recompute"),
                                          ("fast", "admit_reserve")])
def test_random_schedules_keep_the_budget_and_generate_what_they_would_without_it(kind, policy):
    """Random prompt lengths, group sizes and budgets (some below one group's need): no step of several sequences
    holds more than the budget, every sequence finishes with the tokens it generates without a budget (greedy; EOS a
    token some of them emit), and the per-sequence eviction counts add up to the layer's."""
    model = _qwen()
    rng = np.random.default_rng(7)
    total = 0
    for case in range(4):
        G, n_groups, max_new = int(rng.integers(1, 4)), int(rng.integers(3, 6)), int(rng.integers(6, 12))
        prompts = _prompts(n_groups, rng.integers(1, 13, size=n_groups), seed=case)
        s = Sampling(1.0, -1, max_new, greedy=True)
        free, _, _ = _run(_engine(kind, model, 6, s), prompts, G)
        if case % 2:  # some sequences end early on a token the first one emits
            s = Sampling(1.0, free[0].tokens[max_new // 2], max_new, greedy=True)
            free, _, _ = _run(_engine(kind, model, 6, s), prompts, G)
        longest = G * (max(map(len, prompts)) + max_new)   # a group's reservation at most
        # below it only where a group can be cut down to one sequence (admit_reserve runs a group whole)
        budget = int(rng.integers(longest // 2 if policy == "preempt_recompute" else longest, 2 * longest))
        kv = KVBudgetedEngine(_engine(kind, model, 6, s), budget, policy)
        steps = _watch(kv)
        out, _, _ = _run(kv, prompts, G)
        assert out.keys() == free.keys() == set(range(n_groups * G))
        for sid, f in out.items():
            _assert_same_generation(f, free[sid])
        assert all(tokens <= budget for n, tokens in steps if n > 1), (case, budget, steps)
        assert sum(f.preemptions for f in out.values()) == kv.evictions
        assert not kv.ctx and not kv.evicted and not kv.reserved
        total += kv.evictions
    assert (total > 0) == (policy == "preempt_recompute")


class ScriptedEngine:
    """A rollout engine whose sequences end after a scripted number of tokens: the budget's bookkeeping alone."""

    def __init__(self, slots: int, length_of: dict[int, int], max_new_tokens: int):
        self.slots, self.length_of = slots, length_of
        self.sampling = Sampling(1.0, -1, max_new_tokens)
        self.held: dict[int, Generation] = {}

    def free_slots(self) -> int:
        return self.slots - len(self.held)

    def active(self) -> int:
        return len(self.held)

    def admit(self, seq_ids, prompts) -> None:
        self.resume([Generation(sid, p) for sid, p in zip(seq_ids, prompts)])

    def resume(self, generations) -> None:
        assert len(generations) <= self.free_slots()
        self.held.update((g.seq_id, g) for g in generations)

    def evict(self, seq_id: int) -> Generation:
        return self.held.pop(seq_id)

    def step(self) -> list[Finished]:
        done = [g.add(0, 0.0, 0, Sampling(1.0, -1, self.length_of[sid])) for sid, g in self.held.items()]
        done = [f for f in done if f is not None]
        for f in done:
            del self.held[f.seq_id]
        return done


def _simulated_cases(admission: str, n: int = 12):
    """Random schedules for one continuous worker, the first learner step's groups (sync mode: admitted in id order
    as slots and the budget allow), with no prefill cost, so the kernel's time is its step count: per case (its
    number, group size, slots, budget, policy, the simulator's samples of those groups)."""
    rng = np.random.default_rng(0)
    for case in range(n):
        policy = POLICIES[case % 2]
        G, B = int(rng.integers(1, 4)), int(rng.integers(4, 10))
        slots, budget = int(rng.integers(3 * G, 10)), int(rng.integers(G * 40, G * 70))
        cfg = parse_config({
            "seed": case,
            "workload": {"batch_prompts": B, "group_size": G, "max_new_tokens": 20,
                         "prompt_len": {"kind": "lognormal", "median": 8, "p99": 20},
                         "response_len": {"kind": "lognormal", "median": 15, "p99": 20}},
            "cluster": {"rollout_workers": 1, "max_concurrency": slots, "batching": "continuous",
                        "admission": admission},
            "pipeline": {"mode": "sync"},
            "hardware": {"constant": {"decode_step_s": 1.0, "prefill_s_per_token": 0.0, "train_step_s": 1.0},
                         "memory": {"kv_policy": policy, "kv_budget_tokens": budget}},
            "run": {"steps": 1}})
        sim = Simulation(cfg).run().samples
        yield case, G, slots, budget, policy, sim[sim["group_id"] < B].sort_values("sample_id")


def test_admissions_evictions_and_completions_are_the_simulators():
    """The simulator's kernel and this layer on the same schedules (`_simulated_cases`). Each group starts, and each
    sample ends and is evicted, at the same step."""
    evicting = 0
    for case, G, slots, budget, policy, sim in _simulated_cases("per_group"):
        lengths = dict(zip(sim["sample_id"], sim["response_len"]))
        prompts = [[3] * int(n) for n in sim.groupby("group_id")["prompt_len"].first()]
        kv = KVBudgetedEngine(ScriptedEngine(slots, lengths, 20), budget, policy)
        out, ended, admitted = _run(kv, prompts, G)
        assert admitted == {int(g): round(t) for g, t in sim.groupby("group_id")["t_start"].first().items()}, case
        assert ended == {int(i): round(t) for i, t in zip(sim["sample_id"], sim["t_end"])}, case
        assert {i: f.preemptions for i, f in out.items()} == dict(zip(sim["sample_id"], sim["preemptions"])), case
        evicting += kv.evictions > 0
    assert evicting >= 3


def test_admission_by_sample_under_a_budget_is_the_simulators():
    """The same with `cluster.admission: per_sample`, through the workers' batcher (real/engine/batching.py) as a
    worker drives it: at each step boundary the waiting samples first, then new groups while one more sequence
    fits (real/worker.py `kv_takes`). Each group starts, and each sample ends and is evicted, at the same step."""
    evicting = waited = 0
    for case, G, slots, budget, policy, sim in _simulated_cases("per_sample", 16):
        lengths = dict(zip(sim["sample_id"], sim["response_len"]))
        prompts = [[3] * int(n) for n in sim.groupby("group_id")["prompt_len"].first()]
        kv = KVBudgetedEngine(ScriptedEngine(slots, lengths, 20), budget, policy)
        batcher = GroupBatcher(kv, G, static=False, per_sample=True)
        handed = run_by_sample(batcher, prompts)
        assert {g.gid: min(g.t_start) for g in handed} == {
            int(g): t for g, t in sim.groupby("group_id")["t_start"].first().items()}, case
        ended = {g.gid * G + i: t for g in handed for i, t in enumerate(g.t_end)}
        assert ended == dict(zip(sim["sample_id"], sim["t_end"])), case
        evictions = {g.gid * G + i: f.preemptions for g in handed for i, f in enumerate(g.samples)}
        assert evictions == dict(zip(sim["sample_id"], sim["preemptions"])), case
        evicting += kv.evictions > 0
        waited += sum(t > min(g.t_start) for g in handed for t in g.t_start)
    assert evicting >= 3 and waited >= 10


def test_bad_input_and_no_budget():
    model, s = _qwen(), Sampling(1.0, -1, 4, greedy=True)
    kv = KVBudgetedEngine(_engine("fast", model, 4, s), 12, "preempt_recompute")
    kv.admit([0], [[3] * 5])
    with pytest.raises(ValueError, match="need 7 KV tokens; 6 of the budget's 12 are free"):
        kv.admit([1], [[3] * 6])
    with pytest.raises(ValueError, match="sequence 9 is not in the engine"):
        kv.engine.evict(9)
    with pytest.raises(ValueError, match="resume: sequence 0 is already in the engine"):
        kv.engine.resume([kv.engine.seqs[0]])
    while kv.active():
        done = kv.step()
    ended = Generation(0, [3] * 5, done[0].tokens, done[0].logprobs, done[0].versions)
    with pytest.raises(ValueError, match="has ended"):
        kv.engine.resume([ended])
    with pytest.raises(ValueError, match="preempt_swap"):
        KVBudgetedEngine(_engine("fast", model, 4, s), 12, "preempt_swap")
    memory = load_config(TINY).hardware.memory
    assert memory.kv_budget_tokens is None and kv_budgeted(kv.engine, memory) is None
    assert kv_budgeted(kv.engine, memory.model_copy(update={"kv_budget_tokens": 100,
                                                            "kv_policy": "unlimited"})) is None


def test_what_the_real_workers_do_not_implement_is_refused():
    with pytest.raises(ConfigError, match="hardware.memory.kv_policy.*recompute"):
        check_engine(load_config(TINY, {"hardware.memory.kv_policy": "preempt_swap"}))
    with pytest.raises(ConfigError, match="kv_budget_tokens: 100 tokens cannot hold one group at its longest"):
        check_engine(load_config(TINY, {"hardware.memory.kv_budget_tokens": 100}))
    check_engine(load_config(TINY, {"cluster.admission": "per_sample", "cluster.batching": "continuous",
                                    "hardware.memory.kv_budget_tokens": 1000}))  # runs, with or without a budget


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("admission", ["per_group", "per_sample"])
def test_a_training_run_under_a_small_budget_records_its_evictions(tmp_path, admission):
    """examples/tiny_cpu.yaml in sync mode with continuous batching, no warm start (so responses run long), and a
    160-token budget, a third more than one group at its longest (4 × (14 + 16) = 120): groups admitted beside each
    other outgrow it, and the samples table counts each sample's evictions; admitted by group or by sample."""
    from real.trainer import Trainer

    cfg = load_config(TINY, {"pipeline.mode": "sync", "cluster.batching": "continuous", "run.steps": 2,
                             "real.warm_start_steps": 0, "hardware.memory.kv_budget_tokens": 160,
                             "cluster.admission": admission})
    result = Trainer(cfg, tmp_path / "run", timeout_s=300).run()
    samples = result.trace.samples
    assert result.summary["status"] == "complete"
    assert (samples["preemptions"] >= 0).all() and (samples["preemptions"] > 0).any()
