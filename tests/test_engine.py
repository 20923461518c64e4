"""The pipeline model against closed forms, a step-by-step reference and its invariants, on both engines
(SimPy, the reference, and the compiled loop of fast.py), and the two engines against each other."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import async_pipelines
from sim.config import load_config, parse_config
from sim.engine.kernel import span_time, span_time_area
from sim.engine.policies import P_CAPACITY
from sim.engine.routers import ROUTERS
from sim.engine.pipeline import ENGINES, Simulation, settled_cost_model, simulate
from sim.hardware.cost import build_cost_model, cost_model_for
from sim.hardware.measured import Colocation, IdleCurve, MeasuredProfile, save_profile
from sim.metrics import compute_metrics, generating_beside, sample_staleness
from sim.workload import workload_lengths


CLUSTER = Path(__file__).resolve().parents[1] / "examples" / "cluster_7b_64xh100.yaml"


def make_cfg(mode="async", steps=5, batch=4, group=2, workers=2, concurrency=4, prompt=10, response=None,
             decode=0.01, prefill=0.0, train=1.0, train_tok=0.0, sync=0.0, bookkeeping=0.0, **pipeline):
    return parse_config({
        "workload": {"batch_prompts": batch, "group_size": group, "prompt_len": {"kind": "constant", "value": prompt},
                     "response_len": response or {"kind": "constant", "value": 100}, "max_new_tokens": 10**6},
        "cluster": {"rollout_workers": workers, "max_concurrency": concurrency},
        "pipeline": {"mode": mode, **pipeline},
        "hardware": {"constant": {"decode_step_s": decode, "prefill_s_per_token": prefill, "train_step_s": train,
                                  "train_s_per_token": train_tok, "sync_s": sync},
                     "efficiency": {"learner_bookkeeping_s": bookkeeping}},
        "run": {"steps": steps},
    })


def step_periods(trace) -> np.ndarray:
    return np.diff(trace.steps["t_start"].to_numpy())


# --------------------------------------------------------------------------- closed forms
def test_span_time_and_kv_area_match_step_by_step_sums():
    rng = np.random.default_rng(1)
    for _ in range(200):
        m = rng.integers(2, 6)
        xs = np.r_[0.0, np.cumsum(rng.uniform(1, 500, m - 1))]
        ys = rng.uniform(0.001, 0.05, m)
        n, ksum = int(rng.integers(1, 40)), int(rng.integers(-200, 2000))
        k1 = int(rng.integers(max(0, -ksum // n + 1), 300))
        k2 = k1 + int(rng.integers(0, 400))

        def h(x):
            if x <= xs[-1]:
                return np.interp(x, xs, ys)
            return ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])

        brute = sum(h(n * k + ksum) for k in range(k1, k2))
        assert span_time(xs[None], ys[None], 0, n, ksum, k1, k2) == pytest.approx(brute, rel=1e-9, abs=1e-12)
        # ... and the KV tokens each step holds (context n*k + ksum and one written token per sequence) x seconds
        area = sum((n * k + ksum + n) * h(n * k + ksum) for k in range(k1, k2))
        assert span_time_area(xs[None], ys[None], 0, n, ksum, k1, k2, True) == pytest.approx(
            (brute, area), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("prefill", [0.0, 0.001])
def test_sync_step_is_generate_plus_train_plus_sync(prefill, engine):
    # 4 groups x 2 samples over 2 workers of 4 slots: each worker runs 2 groups at once.
    L, d, P, train, per_tok, sync = 100, 0.01, 10, 1.0, 1e-4, 0.5
    trace = simulate(make_cfg("sync", decode=d, prefill=prefill, train=train, train_tok=per_tok, sync=sync, prompt=P),
                     engine=engine)
    generate = 2 * P * prefill + L * d            # two prefills on a worker, then L decode steps
    train_s = train + per_tok * 4 * 2 * (P + L)   # every prompt and response token of the batch
    assert trace.steps["t_start"].iloc[0] == pytest.approx(generate)
    np.testing.assert_allclose(step_periods(trace), generate + train_s + sync, rtol=1e-12)
    assert (sample_staleness(trace.samples) == 0).all()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bookkeeping", [0.4, 1.5])  # hidden behind generation (1 s), then outlasting it
def test_sync_bookkeeping_overlaps_generation(bookkeeping, engine):
    # The learner's bookkeeping starts as it publishes, when the workers start generating: a step is
    # max(generation, bookkeeping) + train + sync; the first step has no bookkeeping before it, the last none after.
    L, d, train, sync = 100, 0.01, 1.0, 0.5
    trace = simulate(make_cfg("sync", decode=d, train=train, sync=sync, bookkeeping=bookkeeping), engine=engine)
    assert trace.steps["t_start"].iloc[0] == pytest.approx(L * d)
    np.testing.assert_allclose(step_periods(trace), max(L * d, bookkeeping) + train + sync, rtol=1e-12)
    assert trace.steps["t_end"].iloc[-1] + sync == pytest.approx(L * d + 4 * max(L * d, bookkeeping) + 5 * (train + sync))


@pytest.mark.parametrize("engine", ENGINES)
def test_async_learner_bound_step_pays_the_bookkeeping(engine):
    # Generation (1 s a batch) outpaces training: the learner's cycle is train + sync + bookkeeping, back to back.
    train, sync, bookkeeping = 1.5, 0.2, 0.3
    trace = simulate(make_cfg("async", steps=10, train=train, sync=sync, bookkeeping=bookkeeping,
                              staleness_control="none"), engine=engine)
    np.testing.assert_allclose(step_periods(trace)[2:], train + sync + bookkeeping, rtol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("train", [0.5, 3.0])  # generation-bound, then training-bound
def test_one_step_off_period_is_max_of_sides_plus_sync(train, engine):
    L, d, sync = 100, 0.01, 0.25
    trace = simulate(make_cfg("one_step_off", steps=8, decode=d, train=train, sync=sync), engine=engine)
    np.testing.assert_allclose(step_periods(trace)[3:], max(L * d, train) + sync, rtol=1e-12)
    s = trace.samples[trace.samples.learner_step >= 0]
    stale = (s.version_consumed - s.version_start).groupby(s.learner_step).unique()
    assert list(stale.iloc[0]) == [0] and all(list(v) == [1] for v in stale.iloc[1:])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("train", [0.5, 3.0])
def test_async_steady_state_period_is_max_of_sides(train, engine):
    # One batch fills every slot; without staleness control the workers never wait for the learner.
    L, d = 100, 0.01
    trace = simulate(make_cfg("async", steps=10, decode=d, train=train, staleness_control="none"), engine=engine)
    np.testing.assert_allclose(step_periods(trace)[4:], max(L * d, train), rtol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_exponential_generation_gives_geometric_staleness(engine):
    """R workers, one sequence each, batch of one, near-instant training. A worker starts its next sample
    as soon as it hands in the last one, before the learner has trained on that one: the update from its own
    previous sample always lands during the new generation. Every other completion during the generation is
    one more version, and by memorylessness each next completion is another worker's with probability
    1 - p, p = 1/R. So staleness = 1 + K with K ~ Geometric(p): P(S = k) = p (1 - p)^(k - 1) for k >= 1,
    mean R."""
    R, n = 4, 20_000
    cfg = make_cfg("async", steps=n, batch=1, group=1, workers=R, concurrency=1, prompt=1, decode=1e-4,
                   train=1e-9, response={"kind": "exponential", "mean": 10_000}, staleness_control="none")
    stale = sample_staleness(simulate(cfg, engine=engine).samples)[200:]  # after warm-up
    p = 1 / R
    assert stale.min() == 1
    assert stale.mean() == pytest.approx(1 / p, abs=0.1)  # sd sqrt(1-p)/p = 3.5: 0.1 is > 4 standard errors
    k = np.arange(1, 9)
    pmf = np.bincount(stale, minlength=9)[1:9] / len(stale)
    np.testing.assert_allclose(pmf, p * (1 - p) ** (k - 1), atol=0.012)


@pytest.mark.parametrize("workers,batch,rho", [(32, 8, 0.1), (32, 8, 0.3), (32, 8, 0.6), (16, 4, 0.3),
                                               (64, 16, 0.2)])
def test_mean_staleness_of_a_rollout_bound_pipeline_is_c_over_b_plus_rho(workers, batch, rho):
    """No bound, one sample per group, C slots always generating (one per worker, so a weight load never waits
    for a drain), learner steps of tau seconds, rollout-bound (rho = lambda * tau / B < 1, lambda = C / E[life]
    by Little's law, life = a sample's admission to its end). Derived here (the published closed form of Applied
    Compute (2026) names the same regime, but its formula could not be read: docs/policies-sources.md, section 7).

    A consumed sample's staleness k - v(t_start) splits at its end t_end: (a) v(t_end) - v(t_start), the versions
    published during its life, plus (b) k - v(t_end), its batch's predecessor steps not yet published at t_end.
    (a): at each publish exactly C samples are in flight, and each counts it once, so over the run (a) sums to
    C per step, i.e. C / B per consumed sample, for any length distribution. (b): step k - 1 starts at the
    completion that fills its batch and trains tau; the samples that complete meanwhile are the next batch's
    ones with (b) = 1. With exponential lengths completions are Poisson at rate lambda even right after that
    completion (memoryless), so each step sees lambda * tau of them on average: (b) is rho per sample.
    Hence E[staleness] = C / B + rho. Not exact: when B samples complete inside one tau the learner queues and
    (b) can reach 2 (P(Poisson(rho B) >= B): 11 % of steps at rho 0.6, B 8; 3 % at rho 0.3, B 4; under 0.4 %
    in the others), and completions land on the decode-step grid (the prefills keep the workers' grids apart).
    Measured, simulated minus the formula: -0.010, -0.008, +0.014, -0.004, -0.009 versions, in the order of the
    cases."""
    decode, per_token, prompt, mean = 0.01, 0.000737, 20, 100
    tokens = 1 / (1 - math.exp(-1 / mean))  # E[ceil(Exp(mean))]
    lam = workers / (tokens * decode + prompt * per_token)
    cfg = make_cfg("async", steps=2000, batch=batch, group=1, workers=workers, concurrency=1, prompt=prompt,
                   decode=decode, prefill=per_token, train=rho * batch / lam,
                   response={"kind": "exponential", "mean": mean}, staleness_control="none")
    stale = sample_staleness(simulate(cfg, engine="fast").samples)
    assert stale.mean() == pytest.approx(workers / batch + rho, abs=0.05)

@pytest.mark.parametrize("engine", ENGINES)
def test_generation_slowdown_settles_at_the_idle_fraction_it_produces(tmp_path, engine):
    """Sync mode, one worker: a step generates for G0 * F(u) then trains for T while the worker idles, so the idle
    fraction is u = T / (G0 F(u) + T). With G0 = T = 1 s and F(u) = 1 + u (a profile's curve) that is
    u^2 + 2u - 1 = 0: u = sqrt(2) - 1."""
    save_profile(MeasuredProfile(colocation=Colocation(1.0, 1.0, IdleCurve((0.0, 0.6), (1.0, 1.6)))),
                 tmp_path / "p.yaml")
    cfg = make_cfg("sync", steps=20, workers=1, concurrency=8, decode=0.01, train=1.0).with_overrides(
        {"hardware.profile": str(tmp_path / "p.yaml"), "cluster.colocated": True})
    cost = settled_cost_model(cfg, engine)
    assert cost.worker_idle == pytest.approx(np.sqrt(2) - 1, abs=0.01)
    assert cost.gen_slowdown == pytest.approx(1 + cost.worker_idle)
    # The simulation that charges it idles as much, and Simulation settles by itself when given no cost model.
    trace = Simulation(cfg, engine=engine).run()
    assert compute_metrics(trace)["idle/rollout"] == pytest.approx(cost.worker_idle, abs=0.01)
    assert trace.header["worker_idle_charged"] == cost.worker_idle


@pytest.mark.parametrize("engine", ENGINES)
def test_sync_generation_factor_follows_how_many_workers_generate(tmp_path, engine):
    """Sync, two workers of one slot, groups of one replayed in order: each step worker 0 decodes 30 tokens and
    worker 1 10. Of the 40 token-steps of generating worker-time, 10 + 10 are spent beside the other worker and the
    20 of worker 0's tail beside nobody: shares 0.5 and 0.5.
    The profile's sync factor is x2 with both generating, x1 beside nobody (`sync_gen_beside` = 1, 2): charged
    x(0.5 * 1 + 0.5 * 2) = x1.5, whatever factor the search starts from (the shares do not depend on it), and a step
    is 30 decode steps at that factor plus training."""
    save_profile(MeasuredProfile(colocation=Colocation(1.0, 1.0, 2.0, sync_gen_beside=(1.0, 2.0))),
                 tmp_path / "p.yaml")
    d, train = 0.01, 1.0
    data = make_cfg("sync", steps=6, batch=2, group=1, workers=2, concurrency=1, decode=d, train=train).model_dump()
    data["workload"].update(prompt_len=None, response_len=None, groups=[[1, 30], [1, 10]], groups_in_order=True)
    data["hardware"]["profile"], data["cluster"]["colocated"] = str(tmp_path / "p.yaml"), True
    cfg = parse_config(data)
    cost = settled_cost_model(cfg, engine)
    assert cost.gen_slowdown == pytest.approx(1.5, rel=1e-9) and cost.beside == pytest.approx(0.5, rel=1e-9)
    trace = Simulation(cfg, engine=engine).run()
    np.testing.assert_allclose(step_periods(trace), 30 * d * 1.5 + train, rtol=1e-9)
    assert trace.header["beside_charged"] == cost.beside
    # validate's in-run costs charge a measured sync run at its own crowd: the trace's shares give the same factor.
    assert cost_model_for(cfg, 0.0, generating_beside(trace)).gen_slowdown == pytest.approx(1.5, rel=1e-9)
    assert cost_model_for(cfg, 0.0).gen_slowdown == 2.0  # without the shares: every worker generating
    # One worker has no others to be beside, and async mode charges its own factor: neither takes the curve.
    for other in ({"cluster.rollout_workers": 1}, {"pipeline.mode": "async"}):
        assert settled_cost_model(cfg.with_overrides(other), engine).beside is None


# --------------------------------------------------------------------------- exactness of continuous batching
def reference_worker(cfg, n_groups):
    """Step-by-step reference for one worker and one sync batch: decode one step at a time."""
    cost = build_cost_model(cfg)
    sim = Simulation(cfg)
    G, C = cfg.workload.group_size, cfg.cluster.max_concurrency
    pending = [sim.stream.group(g) for g in range(n_groups)]
    active, ends, t, nxt = [], {}, 0.0, 0   # active: [group, sample, prompt, generated, length]
    while nxt < n_groups or active:
        while nxt < n_groups and C - len(active) >= G:
            prompt, lens, _ = pending[nxt]
            t += cost.prefill_s(prompt)
            active += [[nxt, j, prompt, 0, int(lens[j])] for j in range(G)]
            nxt += 1
        x = sum(a[2] + a[3] for a in active)
        t += cost.decode_step_s(len(active), x)
        for a in active:
            a[3] += 1
        for a in [a for a in active if a[3] == a[4]]:
            ends[(a[0], a[1])] = t
            active.remove(a)
    return ends


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("gpu,model", [("H100-SXM", "qwen2.5-7b"), ("A100-80GB", "llama3.1-8b")])
def test_closed_form_batch_equals_step_by_step_decoding(gpu, model, engine):
    batch, group = 12, 3
    cfg = parse_config({
        "workload": {"batch_prompts": batch, "group_size": group,
                     "prompt_len": {"kind": "lognormal", "median": 200, "sigma": 0.5},
                     "response_len": {"kind": "lognormal", "median": 60, "p99": 400}, "max_new_tokens": 500},
        "cluster": {"rollout_workers": 1, "max_concurrency": 7},
        "pipeline": {"mode": "sync"}, "hardware": {"gpu": gpu, "model": model}, "run": {"steps": 1}})
    expected = reference_worker(cfg, batch)
    samples = simulate(cfg, engine=engine).samples
    first_batch = samples[samples.group_id < batch]
    got = {(int(r.group_id), int(r.sample_id) % group): r.t_end for r in first_batch.itertuples()}
    assert got.keys() == expected.keys()
    for key, t in expected.items():
        assert got[key] == pytest.approx(t, rel=1e-9)


# --------------------------------------------------------------------------- invariants
lengths = st.one_of(
    st.builds(lambda v: {"kind": "constant", "value": v}, st.integers(1, 40)),
    st.builds(lambda m: {"kind": "exponential", "mean": m}, st.floats(2, 60)),
    st.builds(lambda m, s: {"kind": "lognormal", "median": m, "sigma": s}, st.floats(2, 40), st.floats(0.1, 1.5)),
)


routers = st.sampled_from(sorted(ROUTERS))


@st.composite
def configs(draw):
    mode = draw(st.sampled_from(["sync", "one_step_off", "fixed_lag", "async", "async"]))
    group = draw(st.integers(1, 3))
    batch = draw(st.integers(1, 4))
    pipeline = {"mode": mode}
    if mode == "fixed_lag":
        pipeline["max_staleness"] = draw(st.integers(0, 4))
    if mode == "async":
        pipeline = draw(async_pipelines(batch))
    return parse_config({
        "seed": draw(st.integers(0, 2**16)),
        "workload": {"batch_prompts": batch, "group_size": group,
                     "prompt_len": draw(lengths), "response_len": draw(lengths), "max_new_tokens": 50},
        "cluster": {"rollout_workers": draw(st.integers(1, 3)), "router": draw(routers),
                    "max_concurrency": group * draw(st.integers(1, 4)) + draw(st.integers(0, 2))},
        "pipeline": pipeline,
        "hardware": {"constant": {"decode_step_s": draw(st.floats(0.001, 0.02)),
                                  "prefill_s_per_token": draw(st.sampled_from([0.0, 1e-4])),
                                  "train_step_s": draw(st.floats(0.0, 1.0)),
                                  "sync_s": draw(st.sampled_from([0.0, 0.05, 0.3]))}},
        "run": {"steps": draw(st.integers(2, 8))},
    })


def _at_most_at_admissions(groups: pd.DataFrame, until: pd.Series, limit: int) -> bool:
    """Whether, at every admission time t, at most `limit` groups were admitted by t and not yet past `until`
    (NaN: not yet). Ties at t count as past, so the check can only undercount, never fail a run that kept it."""
    admits = np.sort(groups.t_admit.to_numpy())
    ends = np.sort(np.nan_to_num(until.to_numpy(), nan=np.inf))
    count = np.searchsorted(admits, admits, side="right") - np.searchsorted(ends, admits, side="right")
    return bool((count <= limit).all())


def check_policy_guarantee(cfg, trace, sim) -> None:
    """What each staleness-control policy promises (sim/engine/policies.py), checked on a trace of it."""
    pl, B, s = cfg.pipeline, cfg.workload.batch_prompts, trace.samples
    groups = s.groupby("group_id").agg(t_admit=("t_admit", "first"), t_end=("t_end", "max"),
                                       t_consumed=("t_consumed", "first"), v_start=("version_start", "first"),
                                       v_consumed=("version_consumed", "first"), dropped=("dropped", "first"))
    groups.loc[s.t_end.isna().groupby(s.group_id).any(), "t_end"] = np.nan  # a group still generating has no end
    taken = (groups.v_consumed >= 0) & ~groups.dropped
    stale = (groups.v_consumed - groups.v_start)[taken]
    knobs, policy = pl.knobs(), pl.staleness_control
    running_cap = {"areal": getattr(knobs, "max_concurrent_rollouts", None),
                   "prime_rl": getattr(knobs, "max_inflight", None),
                   "drop": getattr(knobs, "max_inflight_tasks", None) or max(pl.max_staleness, 1) * B}.get(policy)
    if running_cap is not None:
        assert _at_most_at_admissions(groups, groups.t_end, running_cap)
    if policy in ("oldest_unconsumed", "drop"):
        assert (stale <= pl.max_staleness).all()
        dropped = groups[groups.dropped]
        assert ((dropped.v_consumed - dropped.v_start) > pl.max_staleness).all()
    elif policy == "prime_rl":
        assert (stale <= knobs.max_off_policy_steps).all()
    elif policy == "areal" and not pl.in_flight_updates:
        # a worker admits only at the newest version, while accepted + running < (S + v + 1) B: id // B - v <= S
        ids = groups.index.to_numpy()
        assert (ids // B - groups.v_start.to_numpy() <= knobs.max_head_offpolicyness).all()
    elif policy == "tinker":  # started and not yet trained (until the end of the step that trained it)
        step_end = trace.steps.set_index("step").t_end
        trained_at = groups.t_consumed.where(groups.dropped, s.groupby("group_id").learner_step.first().map(step_end))
        assert _at_most_at_admissions(groups, trained_at, B * (knobs.sampling_steps_ahead + 1))
    elif policy == "verl_fully_async":  # admitted between two weight syncs: at most M
        limit = int(B * knobs.require_batches * (1 + knobs.staleness_threshold) * knobs.trigger_parameter_sync_step
                    + 1e-9)
        published = (trace.steps.step + 1) % knobs.trigger_parameter_sync_step == 0  # a sync, even a free one
        syncs = np.r_[0.0, trace.steps.t_end[published].to_numpy(), np.inf]
        for lo, hi in zip(syncs[:-1], syncs[1:]):
            assert ((groups.t_admit > lo) & (groups.t_admit < hi)).sum() <= limit
    elif policy == "queue_drop":
        assert len(sim.buffer) <= pl.queue_drop.capacity
    if policy in ("areal", "tinker", "verl_fully_async", "none"):
        assert not groups.dropped.any()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_invariants(cfg):
    sim, trace = run_both(cfg)
    s = trace.samples
    pl, B, G = cfg.pipeline, cfg.workload.batch_prompts, cfg.workload.group_size
    used = (s.version_consumed >= 0) & ~s.dropped
    stale = (s.version_consumed - s.version_start)[used]

    # The learner trained on exactly steps x batch groups, each sample generated before it was consumed.
    assert used.sum() == cfg.run.steps * B * G
    assert (s.t_end[used] <= s.t_consumed[used]).all()
    # Every generated sample is consumed, dropped, waiting in the buffer (its group complete) or in flight
    # (its group still generating). A group that completes at the very end of the run reaches the buffer by an
    # event at that time, which may come after the learner's last.
    in_flight = s.t_end.isna()
    group_in_flight = in_flight.groupby(s.group_id).transform("any")
    waiting = ~group_in_flight & (s.version_consumed < 0)
    assert (used.astype(int) + s.dropped + group_in_flight + waiting == 1).all()
    handing_over = waiting & (s.t_end.groupby(s.group_id).transform("max") == sim.now)
    assert len(sim.buffer) * G <= waiting.sum() <= len(sim.buffer) * G + handing_over.sum()
    assert not (group_in_flight & (s.version_consumed >= 0)).any()
    # Time and versions move forward for every sample.
    done = ~in_flight
    assert (s.t_admit <= s.t_start).all() and (s.t_start[done] < s.t_end[done]).all()
    assert (s.version_start[done] <= s.version_end[done]).all()
    assert (s.version_mean[done] >= s.version_start[done] - 1e-9).all()
    assert (s.version_mean[done] <= s.version_end[done] + 1e-9).all()
    if not pl.in_flight_updates:
        assert (s.version_end[done] == s.version_start[done]).all()
    # Staleness control and modes.
    if pl.mode == "sync":
        assert (stale == 0).all()
    elif pl.mode in ("one_step_off", "fixed_lag"):  # batch j generated with version max(j - lag, 0)
        lag = 1 if pl.mode == "one_step_off" else pl.max_staleness
        assert (stale == np.minimum(s.learner_step[used], lag)).all()
    else:
        check_policy_guarantee(cfg, trace, sim)
    if s.dropped.any():
        assert pl.mode == "async" and (pl.drop_stale or pl.staleness_control in ("drop", "prime_rl", "queue_drop"))
    # The learner's steps are ordered and never overlap.
    st_ = trace.steps
    assert (st_.t_start.to_numpy()[1:] >= (st_.t_end + st_.weight_sync_s).to_numpy()[:-1] - 1e-12).all()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("interruptible", [False, True])
def test_same_config_and_seed_give_identical_traces(tmp_path, interruptible, engine):
    cfg = make_cfg("async", steps=6, response={"kind": "lognormal", "median": 40, "sigma": 0.8},
                   interruptible=interruptible, sync=0.1)
    paths = [simulate(cfg, engine=engine).write(tmp_path / f"run{i}") for i in range(2)]
    for name in ("samples.parquet", "steps.parquet"):
        assert (paths[0] / name).read_bytes() == (paths[1] / name).read_bytes()
    other = simulate(cfg.with_overrides({"seed": 1}), engine=engine).samples
    assert not np.array_equal(other.t_end.to_numpy(), simulate(cfg).samples.t_end.to_numpy(), equal_nan=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_interruptible_workers_carry_several_versions_per_sample(engine):
    cfg = make_cfg("async", steps=10, train=0.2, sync=0.05, interruptible=True, staleness_control="none",
                   response={"kind": "constant", "value": 100})
    trace = simulate(cfg, engine=engine)
    s = trace.samples
    done = s.t_end.notna()
    assert (s.version_end[done] > s.version_start[done]).any()
    m = compute_metrics(trace)
    assert m["off_policy/in_flight/mean"] > 0
    assert m["staleness/token_mean"] < m["staleness/mean"]  # later tokens are fresher


# --------------------------------------------------------------------------- the compiled engine = the SimPy one
def run_both(cfg):
    """Run cfg on both engines and check they agree exactly: trace (or stall message), clock, counters, what
    is left in the buffer. Returns the compiled engine's Simulation and trace (None if it stalled)."""
    sims, outcomes = {}, {}
    for engine in ENGINES:
        sims[engine] = sim = Simulation(cfg, engine=engine)
        try:
            sim.run_to_end()
            outcomes[engine] = sim.trace()
        except RuntimeError as exc:
            outcomes[engine] = str(exc)
    fast, ref = sims["fast"], sims["simpy"]
    if isinstance(outcomes["simpy"], str):
        assert outcomes["fast"] == outcomes["simpy"]
    else:
        for table in ("samples", "steps"):
            pd.testing.assert_frame_equal(getattr(outcomes["fast"], table), getattr(outcomes["simpy"], table),
                                          check_exact=True)
    assert fast.now == ref.now and list(fast.world.array) == list(ref.world.array)  # every counter of state.py
    n_versions = fast.world.latest + 1
    assert fast.unconsumed[:n_versions] == ref.unconsumed[:n_versions]
    step = len(ref.steps)
    fast_next, ref_next = (copy.deepcopy(sim.buffer) for sim in (fast, ref))  # what the learner would take next
    assert [fast_next.pop(step) for _ in range(len(fast_next))] == [ref_next.pop(step) for _ in range(len(ref_next))]
    return fast, None if isinstance(outcomes["fast"], str) else outcomes["fast"]


@st.composite
def larger_configs(draw):
    """More workers, steps and samples than `configs`, analytic costs too, ties (constant lengths and step
    times), every staleness control, router, batching and admission mode, weight-sync phases, buffer order and capacity,
    co-location (a learner whose speed follows the workers'), the learner's bookkeeping after publishing, responses
    short and long against max_new_tokens (one or many decode steps per calendar bucket), KV budgets, multi-turn
    samples."""
    mode = draw(st.sampled_from(["sync", "one_step_off", "fixed_lag", "async", "async", "async"]))
    group = draw(st.integers(1, 4))
    batch = draw(st.integers(1, 8))
    pipeline = {"mode": mode}
    if mode == "fixed_lag":
        pipeline["max_staleness"] = draw(st.integers(0, 6))
    if mode == "async":
        pipeline = draw(async_pipelines(batch, max_staleness=4))
    pipeline["weight_sync"] = draw(st.sampled_from([{}, {"pause_s": 0.05, "resume_s": 0.02},
                                                    {"pause_s": 0.3, "transfer_s": 0.0, "resume_s": 0.1}]))
    hardware = dict(draw(st.one_of(
        st.just({"gpu": "H100-SXM", "model": "qwen2.5-0.5b"}),
        st.builds(lambda d, p, t, s: {"constant": {"decode_step_s": d, "prefill_s_per_token": p, "train_step_s": t,
                                                   "sync_s": s}},
                  st.sampled_from([0.001, 0.0123]), st.sampled_from([0.0, 1e-4]), st.sampled_from([0.0, 0.05, 1.0]),
                  st.sampled_from([0.0, 0.05, 0.3])))))
    bookkeeping = draw(st.sampled_from([0.0, 0.0, 0.04, 0.7]))  # the learner's, after each publish
    if bookkeeping:
        hardware["efficiency"] = {"learner_bookkeeping_s": bookkeeping}
    colocated = draw(st.booleans())
    if colocated:  # a learner slowed while k of the W workers generate, at a speed that changes mid-step
        hardware["efficiency"] = {**hardware.get("efficiency", {}),
                                  "colocation_gen_slowdown": draw(st.sampled_from([1.0, 1.3])),
                                  "colocation_train_slowdown": draw(st.sampled_from([1.0, 1.11, 2.5]))}
    batching = draw(st.sampled_from(["continuous", "static"]))
    raw = {
        "seed": draw(st.integers(0, 2**16)),
        "workload": {"batch_prompts": batch, "group_size": group, "prompt_len": draw(lengths),
                     "response_len": draw(lengths), "max_new_tokens": draw(st.sampled_from([20, 50, 4000]))},
        "cluster": {"rollout_workers": draw(st.integers(1, 8)), "learner_gpus": draw(st.integers(1, 8)),
                    "router": draw(routers), "batching": batching,
                    "admission": draw(st.sampled_from(["per_group", "per_sample"])) if batching == "continuous"
                    else "per_group", "group_prefill": draw(st.sampled_from(["auto", "shared", "per_sample"])),
                    "colocated": colocated,
                    "max_concurrency": group * draw(st.integers(1, 6)) + draw(st.integers(0, 2))},
        "pipeline": pipeline, "hardware": hardware, "run": {"steps": draw(st.integers(1, 40))},
    }
    if draw(st.integers(0, 3)) == 0:  # multi-turn samples: environment calls, kept or released caches
        env = draw(st.sampled_from([0.0, 0.01, 0.3]))
        raw["workload"]["turns"] = {"count": draw(st.integers(2, 4)), "env_s": env,
                                    "env_s_p99": draw(st.sampled_from([None, 1.0])) if env else None,
                                    "kv": draw(st.sampled_from(["keep", "release"])),
                                    "tool_tokens": draw(st.sampled_from([None, {"kind": "constant", "value": 7},
                                                                         {"kind": "exponential", "mean": 30}]))}
    # A KV budget from one group at its longest (the least a budget may be) to a few: admission waits for room,
    # sequences are evicted and resume.
    policy = draw(st.sampled_from([None, "preempt_recompute", "preempt_swap"] + (
        [] if "turns" in raw["workload"] else ["admit_reserve"])))
    if policy is not None:
        need = group * workload_lengths(parse_config(raw).workload).seq_long
        hardware["memory"] = {"kv_policy": policy, "swap_gbps": 1e-5,
                              "kv_budget_tokens": math.ceil(need * draw(st.sampled_from([1.0, 1.4, 3.0])))}
    return parse_config(raw)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=larger_configs())
def test_engines_agree_on_random_configs(cfg):
    run_both(cfg)


@pytest.mark.parametrize("overrides", [
    {}, {"pipeline.interruptible": True}, {"pipeline.max_staleness": 0, "pipeline.drop_stale": True},
    {"pipeline.mode": "sync"}, {"pipeline.mode": "one_step_off"},
    {"pipeline.queue_order": "freshest", "pipeline.staleness_control": "none", "cluster.rollout_workers": 48,
     "cluster.learner_gpus": 16},
    {"hardware.memory.kv_budget_tokens": 400_000, "pipeline.interruptible": True},
    {"hardware.memory.kv_budget_tokens": 400_000, "hardware.memory.kv_policy": "preempt_swap"},
    {"hardware.memory.kv_budget_tokens": 400_000, "hardware.memory.kv_policy": "admit_reserve"}],
    ids=["oldest_unconsumed", "interruptible", "drop_stale", "sync", "one_step_off", "freshest", "kv_evictions",
         "kv_swap", "kv_reserve"])
def test_engines_agree_on_the_cluster_example(overrides):
    run_both(load_config(CLUSTER, {"run.steps": 6, **overrides}))


def test_a_stalled_pipeline_fails_alike_on_both_engines():
    # A buffer that holds nothing: no worker ever admits a group, and the learner waits for ever.
    cfg = make_cfg("async", staleness_control="none")
    sims = [Simulation(cfg, engine=engine) for engine in ENGINES]
    for sim in sims:
        sim.control.p[P_CAPACITY] = 0
        with pytest.raises(RuntimeError, match="stalled at t=0.000 s after 0 learner steps"):
            sim.run_to_end()


@pytest.mark.parametrize("engine", ENGINES)
def test_progress_callback_sees_every_step(engine):
    sim = Simulation(make_cfg("async", steps=7), engine=engine)
    seen = []
    sim.on_step = seen.append
    sim.run_to_end()
    assert seen == list(range(7))
