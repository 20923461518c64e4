"""Static batching (`cluster.batching: static`, what `stalecast train`'s workers do): known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sim.config import parse_config
from sim.engine.pipeline import Simulation, simulate


def cfg_of(batching, concurrency=4, group=2, steps=6, decode=0.01, prefill=0.001, prompt=10, **pipeline):
    """One worker, 2 groups of `group` samples per step, exponential lengths, fixed costs."""
    return parse_config({
        "workload": {"batch_prompts": 2, "group_size": group, "prompt_len": {"kind": "constant", "value": prompt},
                     "response_len": {"kind": "exponential", "mean": 20}, "max_new_tokens": 200},
        "cluster": {"rollout_workers": 1, "max_concurrency": concurrency, "batching": batching},
        "pipeline": {"mode": "async", "staleness_control": "none", **pipeline},
        "hardware": {"constant": {"decode_step_s": decode, "prefill_s_per_token": prefill, "train_step_s": 0.001}},
        "run": {"steps": steps}, "seed": 3,
    })


def test_static_batches_start_when_the_last_ends_and_release_together():
    """Never blocked (no staleness control): batch k holds groups 2k, 2k+1 (4 slots, 2 samples a group); it
    starts when batch k-1's longest sample ends, pays one prefill of its 2 x 2 x 10 prompt tokens, and every
    sample ends prefill + length x decode step after the start; its groups reach the learner at the batch end."""
    trace = simulate(cfg_of("static"))
    s = trace.samples.sort_values("sample_id")
    s = s[np.isfinite(s["t_end"])]
    start = 0.0
    for _, batch in s.groupby(s["group_id"] // 2):
        if batch["group_id"].nunique() < 2:
            break  # the last batch may be cut by the end of the run
        assert batch["t_admit"].min() == pytest.approx(start)
        expected_end = start + 0.001 * 2 * 2 * 10 + batch["response_len"] * 0.01
        np.testing.assert_allclose(batch["t_end"], expected_end, rtol=1e-9)
        end = batch["t_end"].max()
        consumed = batch["t_consumed"].dropna()
        assert (consumed >= end - 1e-12).all()  # not before the whole batch has ended
        start = end


def test_one_group_per_batch_is_continuous_batching():
    """With room for one group and free prefill, a static batch is what the continuous batch does: the same
    trace. (Prefill differs by default: a static batch prefills every sample's copy of the prompt, g x p
    tokens, where a continuous engine prefills a group's shared prompt once; cluster.group_prefill sets either.)"""
    gated = {"max_staleness": 2, "staleness_control": "oldest_unconsumed", "prefill": 0.0}
    a = simulate(cfg_of("static", concurrency=2, **gated))
    b = simulate(cfg_of("continuous", concurrency=2, **gated), engine="simpy")
    pd.testing.assert_frame_equal(a.samples, b.samples)
    pd.testing.assert_frame_equal(a.steps, b.steps)


@pytest.mark.parametrize("engine", ["fast", "simpy"])
@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_group_prefill_charges_one_prompt_or_every_samples_copy(engine, batching):
    """One group of 2 samples, a 10-token prompt at 0.001 s a token, 0.01 s a decode step: its first sample ends
    0.01 (one copy) or 0.02 s (two copies) of prefill plus its decode steps after the start."""
    for mode, copies in (("shared", 1), ("per_sample", 2)):
        cfg = cfg_of(batching, concurrency=2, steps=1).with_overrides({"cluster.group_prefill": mode})
        s = simulate(cfg, engine=engine).samples.sort_values("sample_id").iloc[0]
        assert s["t_end"] - s["t_start"] == pytest.approx(copies * 10 * 0.001 + s["response_len"] * 0.01, abs=1e-12)
    auto = simulate(cfg_of(batching, concurrency=2, steps=1), engine=engine).samples.sort_values("sample_id").iloc[0]
    assert auto["t_end"] - auto["t_start"] == pytest.approx((2 if batching == "static" else 1) * 10 * 0.001
                                                            + auto["response_len"] * 0.01, abs=1e-12)


def test_static_batching_runs_on_the_compiled_engine_as_on_simpy():
    """The compiled loop models static batching: the same trace as the SimPy engine, bit for bit, with one worker
    and with several that a router shares the batches among."""
    for cfg in (cfg_of("static"), cfg_of("static", concurrency=6, prefill=0.0004).with_overrides(
            {"cluster.rollout_workers": 3, "pipeline.staleness_control": "oldest_unconsumed",
             "pipeline.max_staleness": 1})):
        assert Simulation(cfg).engine == "fast"
        fast, ref = simulate(cfg, engine="fast"), simulate(cfg, engine="simpy")
        pd.testing.assert_frame_equal(fast.samples, ref.samples, check_exact=True)
        pd.testing.assert_frame_equal(fast.steps, ref.steps, check_exact=True)
