"""Every metric checked by hand on a trace small enough to compute on paper."""

import math

import numpy as np
import pandas as pd
import pytest

from sim.metrics import compute_metrics, ess, generating_beside, kl_estimates, staleness_histogram
from sim.trace import SAMPLE_COLUMNS, STEP_COLUMNS, Trace

NAN = float("nan")

# Three learner steps, each followed by a 0.5 s weight sync: wall = 5.5 + 0.5 = 6.0 s, 2 s per step.
STEPS = pd.DataFrame({"step": [0, 1, 2], "t_start": [1.0, 3.0, 4.5], "t_end": [2.0, 4.0, 5.5],
                      "version": [0, 1, 2], "weight_sync_s": [0.5, 0.5, 0.5]})

# group g, worker w, response length, times, versions; v_mean is the token-averaged version.
#        g  w  len  t_start t_end  t_cons v_start v_end v_mean v_cons dropped
ROWS = [(0, 0, 10, 0.0, 1.0, 1.0, 0, 0, 0.0, 0, False),    # stale 0
        (0, 0, 20, 0.0, 0.8, 1.0, 0, 0, 0.0, 0, False),    # stale 0
        (1, 1, 30, 0.5, 2.5, 3.0, 0, 1, 0.5, 1, False),    # stale 1, all in flight (interrupted once)
        (1, 1, 40, 0.5, 2.8, 3.0, 0, 1, 0.25, 1, False),   # stale 1, all in flight
        (2, 0, 50, 0.6, 1.5, 4.5, 0, 0, 0.0, 2, True),     # dropped group: counted once, no staleness
        (2, 0, 55, 0.6, 1.2, 4.5, 0, 0, 0.0, 2, True),
        (3, 1, 60, 4.0, NAN, NAN, 2, -1, NAN, -1, False),  # still generating at the end
        (3, 1, 70, 4.0, NAN, NAN, 2, -1, NAN, -1, False),
        (4, 0, 80, 3.0, 4.2, 4.5, 1, 1, 1.0, 2, False),    # stale 1, in queue
        (5, 1, 90, 2.0, 3.5, 4.5, 0, 0, 0.0, 2, False)]    # stale 2, in queue


def make_trace(steps=STEPS, rows=ROWS) -> Trace:
    names = ["group_id", "worker_id", "response_len", "t_start", "t_end", "t_consumed", "version_start",
             "version_end", "version_mean", "version_consumed", "dropped"]
    s = pd.DataFrame(rows, columns=names)
    s["sample_id"] = np.arange(len(s))
    s["prompt_len"], s["t_admit"], s["reward"], s["preemptions"] = 5, s["t_start"], NAN, -1
    s["learner_step"] = np.where(s["dropped"], -1, s["version_consumed"])
    t = steps.copy()
    for col in STEP_COLUMNS:
        if col not in t:
            t[col] = NAN if STEP_COLUMNS[col] == "float64" else 8
    return Trace(s[list(SAMPLE_COLUMNS)].astype(SAMPLE_COLUMNS), t[list(STEP_COLUMNS)].astype(STEP_COLUMNS),
                 {"rollout_workers": 2})


@pytest.fixture(scope="module")
def m():
    return compute_metrics(make_trace(), sync_step_s=3.0)


def test_staleness(m):
    # Consumed, not dropped: staleness 0, 0, 1, 1, 1, 2.
    assert m["staleness/mean"] == pytest.approx(5 / 6)
    assert m["staleness/max"] == 2
    # inverted_cdf: the smallest s with F(s) >= q; F(0) = 2/6, F(1) = 5/6, F(2) = 1.
    assert (m["staleness/p50"], m["staleness/p90"], m["staleness/p99"]) == (1, 2, 2)
    assert staleness_histogram(make_trace().samples) == {0: 2, 1: 3, 2: 1}


def test_token_staleness_and_split(m):
    # Σ len·(v_cons − v_mean) / Σ len = (0 + 0 + 30·0.5 + 40·0.75 + 80·1 + 90·2) / 270 = 305 / 270.
    assert m["staleness/token_mean"] == pytest.approx(305 / 270)
    assert m["off_policy/in_flight/mean"] == pytest.approx(2 / 6)   # v_end − v_start: 0 0 1 1 0 0
    assert m["off_policy/in_queue/mean"] == pytest.approx(3 / 6)    # v_cons − v_end: 0 0 0 0 1 2
    assert m["len/mean"] == pytest.approx(270 / 6)


def test_counts(m):
    assert m["dropped/groups"] == 1
    assert m["samples/generated"] == 8 and m["samples/in_flight"] == 2


def test_throughput(m):
    assert m["time/wall_s"] == pytest.approx(6.0)
    assert m["throughput/samples_per_s"] == pytest.approx(6 / 6.0)
    assert m["throughput/tokens_per_s"] == pytest.approx(270 / 6.0)  # response tokens of consumed samples
    assert m["throughput/steps_per_h"] == pytest.approx(3600 / 2.0)
    assert m["time/step_s"] == pytest.approx(2.0)
    assert m["speedup/vs_sync"] == pytest.approx(3.0 / 2.0)


def test_idle_and_waits(m):
    # Learner busy: three 1 s steps + three 0.5 s syncs = 4.5 s of 6 s.
    assert m["idle/trainer"] == pytest.approx(1 - 4.5 / 6.0)
    # Worker 0: [0, 1] ∪ [0.6, 1.5] ∪ [3, 4.2] = 1.5 + 1.2 s.
    # Worker 1: [0.5, 2.8] ∪ [2, 3.5] ∪ [4, wall = 6] (still generating) = 3.0 + 2.0 s.
    assert m["idle/rollout"] == pytest.approx(1 - (2.7 + 5.0) / (2 * 6.0))
    # The learner is free at 0, 2.5, 4.5 and starts at 1.0, 3.0, 4.5: waits 1.0, 0.5, 0.
    assert m["time/queue_wait_s"] == pytest.approx(0.5)
    assert m["time/weight_sync_s"] == pytest.approx(0.5)


def test_rollout_idle_ignores_row_order(m):
    shuffled = make_trace(rows=[ROWS[i] for i in (9, 3, 6, 0, 8, 5, 1, 7, 4, 2)])
    assert compute_metrics(shuffled)["idle/rollout"] == pytest.approx(m["idle/rollout"])


def test_generating_beside_other_workers():
    # The busy periods of test_idle_and_waits: worker 0 [0, 1.5] and [3, 4.2], worker 1 [0.5, 3.5] and [4, 6].
    # One generating: [0, 0.5], [1.5, 3], [3.5, 4], [4.2, 6] = 4.3 s; both: [0.5, 1.5], [3, 3.5], [4, 4.2] = 1.7 s,
    # 3.4 worker-seconds. Of 7.7 worker-seconds generating, 4.3 beside nobody and 3.4 beside the other worker.
    np.testing.assert_allclose(generating_beside(make_trace()), [4.3 / 7.7, 3.4 / 7.7])
    shuffled = make_trace(rows=[ROWS[i] for i in (9, 3, 6, 0, 8, 5, 1, 7, 4, 2)])
    np.testing.assert_allclose(generating_beside(shuffled), [4.3 / 7.7, 3.4 / 7.7])
    idle = make_trace(rows=[r for r in ROWS if r[0] == 3])  # one group, never finished: worker 1 alone
    np.testing.assert_allclose(generating_beside(idle), [1.0, 0.0])


def test_no_speedup_without_baseline():
    assert compute_metrics(make_trace())["speedup/vs_sync"] is None


def test_learning_metrics_none_when_empty_mean_otherwise(m):
    for name in ("ess/token", "ess/seq", "kl/k3", "grad_norm", "clip_frac", "reward/mean", "lr"):
        assert m[name] is None, name
    logged = STEPS.assign(grad_norm=[1.0, 2.0, 6.0], kl=[0.1, 0.2, 0.3], ess_token=[1.0, 0.8, 0.6],
                          reward_mean=[NAN, 1.0, 2.0])  # reward logged on two steps only
    got = compute_metrics(make_trace(steps=logged))
    assert got["grad_norm"] == pytest.approx(3.0)
    assert got["kl/k3"] == pytest.approx(0.2)
    assert got["ess/token"] == pytest.approx(0.8)
    assert got["reward/mean"] == pytest.approx(1.5)
    assert got["ess/seq"] is None and got["lr"] is None


def test_ess():
    assert ess(np.full(4, 2.0)) == pytest.approx(1.0)
    assert ess(np.array([1.0, 2.0, 3.0])) == pytest.approx(36 / 42)  # (1+2+3)² / (3·(1+4+9))
    assert ess(np.array([1.0, 0.0, 0.0, 0.0])) == pytest.approx(1 / 4)  # one sample carries all weight
    # Sequence level: weight = exp(Σ token log-ratios); sequences summing to ln 2 and 0 give weights 2 and 1.
    seq_w = np.exp([math.log(2) + 0.0, 0.0 + 0.0])
    assert ess(seq_w) == pytest.approx(9 / 10)


@pytest.mark.parametrize("p, q", [([0.5, 0.25, 0.25], [0.2, 0.3, 0.5]), ([0.75, 0.125, 0.125], [0.125, 0.125, 0.75]),
                                  ([0.5, 0.5], [0.5, 0.5])])
def test_kl_estimators_on_known_categorical_distributions(p, q):
    """Behavior p sampled the tokens, the current policy is q: k1 and k3 are unbiased estimators of KL(p || q), so
    over tokens in exact proportion to p (8 tokens: p's probabilities are eighths) their means are the exact KL;
    k2 is biased upward here, and k3 with the ratio inverted (r = p/q) estimates something else."""
    p, q = np.array(p), np.array(q)
    exact = float(np.sum(p * np.log(p / q)))
    tokens = np.repeat(np.arange(len(p)), (8 * p).astype(int))   # [8] categories, in proportion to p
    log_r = np.log(q[tokens] / p[tokens])                        # log π_θ/π_behav per sampled token
    est = kl_estimates(log_r)
    assert est["k1"] == pytest.approx(exact, abs=1e-12) and est["k3"] == pytest.approx(exact, abs=1e-12)
    assert est["k3"] >= 0 and est["k2"] >= 0
    inverted = kl_estimates(-log_r)["k3"]                        # r = π_behav/π_θ: χ² - KL, not KL
    chi2 = float(np.sum((p - q) ** 2 / q))
    assert inverted == pytest.approx(chi2 - exact, abs=1e-12)
    if exact > 0:
        assert abs(inverted - exact) > 0.05


def test_one_token_does_not_dominate_the_corrected_k3():
    """The audit's case: one token at log-ratio -8 (the current policy gives it e^-8 of the behavior's probability)
    among 512 on policy: the inverted k3 reads 5.8, the corrected one 0.014."""
    log_r = np.zeros(512)
    log_r[0] = -8.0
    assert kl_estimates(log_r)["k3"] == pytest.approx((math.exp(-8) - 1 + 8) / 512)
    assert kl_estimates(log_r)["k3"] < 0.015 < 5.7 < kl_estimates(-log_r)["k3"]
