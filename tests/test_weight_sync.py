"""Weight sync in phases (`pipeline.weight_sync`: pause, transfer, resume): known answers on one worker that
generates a 1-sample group in G = 10 decode steps of 0.1 s = 1 s, and a learner step of T = 1 s."""

from __future__ import annotations

import numpy as np
import pytest

from sim.config import ConfigError, parse_config
from sim.engine.pipeline import ENGINES, Simulation
from sim.metrics import compute_metrics

G, T = 1.0, 1.0


def cfg_of(mode: str, pause: float = 0.0, transfer: float | None = None, resume: float = 0.0, sync_s: float = 0.0):
    return parse_config({
        "workload": {"batch_prompts": 1, "group_size": 1, "prompt_len": {"kind": "constant", "value": 4},
                     "response_len": {"kind": "constant", "value": 10}, "max_new_tokens": 10},
        "cluster": {"rollout_workers": 1, "max_concurrency": 1},
        "pipeline": {"mode": mode, "weight_sync": {"pause_s": pause, "transfer_s": transfer, "resume_s": resume}},
        "hardware": {"gpu": None, "constant": {"decode_step_s": 0.1, "train_step_s": T, "sync_s": sync_s}},
        "run": {"steps": 12},
    })


def period(cfg, engine: str) -> float:
    """Seconds between learner steps once the pipeline is in its steady state (the last steps)."""
    starts = Simulation(cfg, engine=engine).run().steps["t_start"].to_numpy()
    diffs = np.diff(starts[-5:])
    np.testing.assert_allclose(diffs, diffs[0], rtol=1e-9)
    return float(diffs[0])


@pytest.mark.parametrize("engine", ENGINES)
def test_sync_pays_transfer_and_resume_but_no_pause(engine):
    """sync: generate, train, publish; the worker loads (transfer + resume) before it generates the next batch,
    so a step takes G + T + transfer + resume. Nothing is in flight when the learner publishes: no pause."""
    for pause in (0.0, 5.0):
        assert period(cfg_of("sync", pause=pause, transfer=0.3, resume=0.2), engine) == pytest.approx(
            G + T + 0.3 + 0.2, rel=1e-9)


@pytest.mark.parametrize("engine", ENGINES)
def test_one_step_off_pays_the_pause_on_both_sides(engine):
    """one_step_off: batch j+2 needs the weights published after step j. The learner's cycle is its step and its
    publish, T + P + X (pause P, transfer X); the worker's is its load after the batch it is generating (it drains
    first), P + X + R (resume R), and the next batch, G. The slower cycle sets the period: max(T + P + X,
    P + X + R + G)."""
    for pause, transfer, resume in ((0.0, 0.0, 0.0), (0.4, 0.2, 0.0), (0.0, 0.0, 1.0), (1.5, 0.0, 0.0),
                                    (0.3, 0.1, 0.5)):
        expected = max(T + pause + transfer, pause + transfer + resume + G)
        got = period(cfg_of("one_step_off", pause, transfer, resume), engine)
        assert got == pytest.approx(expected, rel=1e-9), (pause, transfer, resume)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_pause_longer_than_the_gain_makes_async_slower_than_sync(engine):
    """Overlap saves min(G, T) = 1 s a step (one_step_off: 1 s against sync's 2 s). A 1.5 s pause per sync costs
    more than that: 2.5 s a step, slower than sync (which pays no pause), and the speedup metric says so."""
    fast = period(cfg_of("one_step_off"), engine)
    slow = period(cfg_of("one_step_off", pause=1.5), engine)
    sync = period(cfg_of("sync", pause=1.5), engine)
    assert (fast, slow, sync) == pytest.approx((1.0, 2.5, 2.0), rel=1e-9)
    sync_step = Simulation(cfg_of("sync", pause=1.5), engine=engine).run().steps
    trace = Simulation(cfg_of("one_step_off", pause=1.5), engine=engine).run()
    metrics = compute_metrics(trace, float(np.diff(sync_step["t_start"].to_numpy())[-1]))
    assert metrics["speedup/vs_sync"] < 1


@pytest.mark.parametrize("engine", ENGINES)
def test_the_learner_records_pause_and_transfer_and_the_transfer_defaults_to_the_cost_model(engine):
    steps = Simulation(cfg_of("one_step_off", pause=0.4, resume=0.7, sync_s=0.25), engine=engine).run().steps
    np.testing.assert_allclose(steps["weight_sync_s"], 0.4 + 0.25)  # transfer_s null: hardware.constant.sync_s
    steps = Simulation(cfg_of("one_step_off", pause=0.4, transfer=0.1, sync_s=0.25), engine=engine).run().steps
    np.testing.assert_allclose(steps["weight_sync_s"], 0.4 + 0.1)


@pytest.mark.parametrize("bad", [{"pause_s": -1}, {"transfer_s": float("inf")}, {"resume_s": "slow"},
                                 {"drain_s": 1}], ids=["negative", "infinite", "not-a-number", "unknown"])
def test_phases_must_be_finite_seconds(bad):
    data = cfg_of("sync").model_dump(mode="json")
    data["pipeline"]["weight_sync"] = bad
    with pytest.raises(ConfigError, match=r"pipeline\.weight_sync\."):
        parse_config(data)
