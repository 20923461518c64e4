"""What a rollout worker admits in the simulator (sim/engine/kernel.py): KV-cache capacity (hardware.memory.kv_policy:
admission against a budget, eviction and resumption) and admission by group or by sample (cluster.admission), on
schedules worked out by hand, and the invariants of random runs, on both engines."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sim.config import ConfigError, parse_config
from sim.engine import kernel as K
from sim.engine.pipeline import ENGINES, Simulation
from sim.hardware.memory import kv_bytes_per_token, memory_report
from sim.hardware.specs import resolve_model
from sim.metrics import compute_metrics
from sim.trace import Trace
from sim.workload import workload_lengths
from test_engine import run_both
from validate.compare import compare

DECODE, PREFILL = 0.01, 0.001  # seconds per decode step, per prompt token


def kv_cfg(policy, budget, *, mode="sync", batch=2, group=1, concurrency=2, prompt=10, response=20, max_new=20,
           steps=1, workers=1, gpu="H100-SXM", admission="per_group", **memory):
    return parse_config({
        "workload": {"batch_prompts": batch, "group_size": group, "prompt_len": {"kind": "constant", "value": prompt},
                     "response_len": response if isinstance(response, dict) else {"kind": "constant",
                                                                                  "value": response},
                     "max_new_tokens": max_new},
        "cluster": {"rollout_workers": workers, "max_concurrency": concurrency, "admission": admission},
        "pipeline": {"mode": mode},
        "hardware": {"gpu": gpu, "constant": {"decode_step_s": DECODE, "prefill_s_per_token": PREFILL, "train_step_s": 1.0},
                     "memory": {"kv_policy": policy, "kv_budget_tokens": budget, **memory}},
        "run": {"steps": steps},
    })


def first_two(trace):
    """The first step's two samples (sync: the next step's are admitted once it is trained)."""
    return trace.samples.sort_values("sample_id").iloc[:2]


def t_end(trace) -> list[float]:
    return first_two(trace)["t_end"].tolist()


# --------------------------------------------------------------------------- schedules worked out by hand
# Two sequences of a 10-token prompt and 20 tokens, one worker, 0.01 s a decode step, 0.001 s a prompt token.
# Both are admitted at t = 0 (prefills end at 0.01 and 0.02). Decode step k holds 2 x (10 + k) tokens and writes
# 2 more: with a budget of 40 tokens step 10 would need 42, so at step 10 (t = 0.02 + 10 x 0.01 = 0.12) the newer
# sequence is evicted with 20 tokens of context. The other ends at step 20 (t = 0.22), and the evicted one resumes
# there: recompute re-prefills its 20 tokens (0.02 s) and decodes its last 10 (0.10 s), ending at 0.34.
@pytest.mark.parametrize("engine", ENGINES)
def test_an_eviction_and_its_recompute_cost_by_hand(engine):
    trace = Simulation(kv_cfg("preempt_recompute", 40), engine=engine).run()
    assert t_end(trace) == pytest.approx([0.22, 0.34], abs=1e-12)
    assert first_two(trace)["preemptions"].tolist() == [0, 1]
    kv = trace.header["kv"]
    assert kv["peak_tokens"] == 40  # step 9: 2 x 19 + 2


@pytest.mark.parametrize("engine", ENGINES)
def test_a_swap_costs_the_copy_out_and_back(engine):
    # The same schedule with the KV copied out at step 10 and back at step 20, 0.001 s a token each way (20
    # tokens: 0.02 s each): the copy-out delays the survivor too, 0.22 -> 0.24; the evicted one ends at 0.36.
    per_token = kv_bytes_per_token(resolve_model("qwen2.5-0.5b"))
    trace = Simulation(kv_cfg("preempt_swap", 40, swap_gbps=per_token / (0.001 * 1e9)), engine=engine).run()
    assert t_end(trace) == pytest.approx([0.24, 0.36], abs=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_admit_reserve_never_evicts_and_waits_for_room(engine):
    # Each sequence reserves 10 + 20 = 30 tokens: a budget of 40 holds one. The second is admitted when the first
    # ends (t = 0.01 + 0.20 = 0.21) and ends 0.01 (prefill) + 0.20 later.
    trace = Simulation(kv_cfg("admit_reserve", 40), engine=engine).run()
    assert t_end(trace) == pytest.approx([0.21, 0.42], abs=1e-12)
    assert trace.samples["preemptions"].sum() == 0


def test_without_a_budget_both_decode_together():
    trace = Simulation(kv_cfg("unlimited", 40)).run()
    assert t_end(trace) == pytest.approx([0.22, 0.22], abs=1e-12)
    assert trace.header["kv"] == {"policy": "unlimited", "budget_tokens": None}


@pytest.mark.parametrize(("policy", "budget", "admitted"), [
    # admit_reserve: 2 x (10 + 20) = 60 tokens a group; 239 holds 3 groups, not 4.
    ("admit_reserve", 3 * 60 + 59, 3),
    # preempt_recompute: a group needs 2 x (10 + 1) = 22 tokens beside the 11 per sequence already admitted at
    # step 0; 131 = 5 x 22 + 21 admits 5 groups (110 tokens), not 6.
    ("preempt_recompute", 5 * 22 + 21, 5)])
def test_the_budget_admits_exactly_k_groups_at_once(policy, budget, admitted):
    cfg = kv_cfg(policy, budget, mode="async", batch=8, group=2, concurrency=64, steps=2)
    fast, trace = run_both(cfg)
    first = trace.samples.groupby("group_id")["t_admit"].first()
    assert (first == 0).sum() == admitted
    if policy == "preempt_recompute":  # 10 sequences at step 0 hold 110 and outgrow 131 at step 2
        assert trace.header["kv"]["preemptions"] > 0


# One worker of 3 slots, groups of 2 samples of a 10-token prompt and 20 tokens. Per group, group 1 waits for 2 free
# slots: it starts when group 0 ends (step 20, t = 0.01 + 0.20 = 0.21) and ends 0.01 + 0.20 later. Per sample, it is
# admitted at once with the one free slot (its prefill ends at 0.02): sample 2 decodes beside group 0 and ends at
# step 20 (0.22); sample 3 waits, starts at step 20 without a prefill of its own (the prompt is cached), ends 0.20
# later.
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("admission", "ends"), [("per_group", [0.21, 0.21, 0.42, 0.42]),
                                                 ("per_sample", [0.22, 0.22, 0.22, 0.42])])
def test_admission_by_group_or_by_sample_by_hand(engine, admission, ends):
    cfg = kv_cfg("unlimited", None, group=2, concurrency=3, admission=admission)
    trace = Simulation(cfg, engine=engine).run()
    assert trace.samples.sort_values("sample_id")["t_end"].iloc[:4].tolist() == pytest.approx(ends, abs=1e-12)


def test_per_sample_needs_continuous_batching():
    with pytest.raises(ConfigError, match="admission per_sample needs batching continuous"):
        parse_config({"workload": {"batch_prompts": 1, "group_size": 2, "prompt_len": {"kind": "constant", "value": 4},
                                   "response_len": {"kind": "constant", "value": 4}},
                      "cluster": {"rollout_workers": 1, "max_concurrency": 2, "batching": "static",
                                  "admission": "per_sample"}, "run": {"steps": 1}})


# --------------------------------------------------------------------------- invariants of random runs
@st.composite
def budgeted_configs(draw):
    group = draw(st.integers(1, 4))
    prompt, max_new = draw(st.integers(1, 30)), draw(st.sampled_from([8, 40, 120]))
    need = group * (prompt + max_new)
    return kv_cfg(draw(st.sampled_from(["preempt_recompute", "preempt_swap", "admit_reserve"])),
                  int(need * draw(st.floats(1.0, 4.0))), mode=draw(st.sampled_from(["async", "sync"])),
                  batch=draw(st.integers(1, 6)), group=group, concurrency=group * draw(st.integers(1, 8)),
                  prompt=prompt, max_new=max_new, steps=draw(st.integers(1, 12)), workers=draw(st.integers(1, 3)),
                  response={"kind": "lognormal", "median": max_new / 3, "sigma": 1.0}, swap_gbps=0.01,
                  admission=draw(st.sampled_from(["per_group", "per_sample"])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=budgeted_configs())
# One worker blocked by the gate while it evicts: the compiled loop once skipped the wake at the eviction that the
# SimPy worker takes (one gate refusal fewer).
@example(cfg=kv_cfg("preempt_recompute", 82, mode="async", batch=2, group=2, concurrency=6, prompt=1, max_new=40,
                    steps=5, response={"kind": "lognormal", "median": 40 / 3, "sigma": 1.0}, swap_gbps=0.01))
def test_no_step_outgrows_the_budget_and_every_token_is_accounted(cfg):
    fast, trace = run_both(cfg)
    mem, si = cfg.hardware.memory, fast.worker_state[0]
    budget = mem.kv_budget_tokens
    # Every group fits the budget alone, so no decode step ever held more than the budget.
    assert si[:, K.KV_PEAK].max() <= budget
    s = trace.samples
    if mem.kv_policy == "admit_reserve":
        assert s["preemptions"].sum() == 0
    assert (s["preemptions"] >= 0).all() and s["preemptions"].sum() == si[:, K.N_PREEMPT].sum()
    # An evicted sequence resumes with the tokens it had: its tokens' mean version lies between its first and
    # last token's versions, and it ends after the steps it decoded.
    done = s[s["t_end"].notna()]
    assert ((done["version_mean"] >= done["version_start"] - 1e-9)
            & (done["version_mean"] <= done["version_end"] + 1e-9)).all()
    assert (done["t_end"] >= done["t_start"] + done["response_len"] * DECODE - 1e-9).all()
    # Nothing still waits evicted on a worker whose batch is empty.
    assert not ((si[:, K.N_WAIT] > 0) & (si[:, K.N_ACTIVE] == 0)).any()
    metrics = compute_metrics(trace)
    assert 0 < metrics["kv/peak_occupancy"] <= 1 and 0 <= metrics["kv/mean_occupancy"] <= 1


# --------------------------------------------------------------------------- configuration
def test_a_budget_below_one_group_is_refused_with_the_numbers():
    with pytest.raises(ConfigError, match=r"hardware.memory.kv_budget_tokens: 50 tokens cannot hold one group at its "
                                          r"longest: 2 sequences of 30 tokens .* = 60"):
        Simulation(kv_cfg("preempt_recompute", 50, group=2))


def test_swap_without_a_host_link_is_refused():
    with pytest.raises(ConfigError, match="hardware.memory.swap_gbps: preempt_swap copies KV to host memory"):
        Simulation(kv_cfg("preempt_swap", 100, gpu=None))


def test_the_memory_model_sets_the_budget_where_a_gpu_is_modelled():
    cfg = parse_config({"workload": {"batch_prompts": 2, "group_size": 2, "max_new_tokens": 64,
                                     "prompt_len": {"kind": "constant", "value": 10},
                                     "response_len": {"kind": "constant", "value": 30}},
                        "cluster": {"rollout_workers": 1, "max_concurrency": 4},
                        "hardware": {"gpu": "H100-SXM", "model": "qwen2.5-0.5b"}, "run": {"steps": 2}})
    sim = Simulation(cfg)
    assert sim.kv.policy == "preempt_recompute" and sim.kv.source == "the memory model's KV budget"
    assert sim.kv.budget_tokens == memory_report(cfg, workload_lengths(cfg.workload)).rollout.kv_tokens > 0
    trace = sim.run()
    assert trace.header["kv"]["budget_tokens"] == sim.kv.budget_tokens and trace.header["kv"]["preemptions"] == 0


def test_metrics_of_a_trace_without_the_column_say_unknown(tiny_trace):
    trace = type(tiny_trace)(tiny_trace.samples.assign(preemptions=np.int32(-1)), tiny_trace.steps, {})
    metrics = compute_metrics(trace)
    assert metrics["kv/preemptions"] is None and metrics["kv/peak_occupancy"] is None


# --------------------------------------------------------------------------- validate
def test_validate_judges_the_share_of_evicted_samples():
    predicted = Simulation(kv_cfg("preempt_recompute", 131, mode="async", batch=8, group=2, concurrency=64,
                                  steps=3)).run()
    share = compute_metrics(predicted)["kv/preempted_share"]
    assert share > 0.2
    rows = {r.metric: r for r in compare(predicted, predicted)}
    assert rows["kv/preempted_share"].ok is True and rows["kv/preemptions"].kind == "reported"
    never = Trace(predicted.samples.assign(preemptions=np.int32(0)), predicted.steps, predicted.header)
    row = next(r for r in compare(predicted, never) if r.metric == "kv/preempted_share")
    assert row.ok is False and row.error == pytest.approx(share)
    unbudgeted = Simulation(kv_cfg("unlimited", 131, mode="async", batch=8, group=2, concurrency=64)).run()
    assert not [r for r in compare(unbudgeted, predicted) if r.metric.startswith("kv/")]
