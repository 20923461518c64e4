"""What a learner step costs in the simulator: padded tokens, and a co-located learner slowed while workers
generate. Known answers on fixed costs."""

from __future__ import annotations

import numpy as np
import pytest

from sim.config import parse_config
from sim.engine.pipeline import ENGINES, Simulation, simulate
from sim.hardware.cost import build_cost_model
from sim.hardware.measured import Colocation, MeasuredProfile


def lengths_cfg(train_tokens: str, workers: int = 2):
    """Lognormal lengths, 3 groups of 4 per step, 2 s + 1 ms per charged token per learner step."""
    return parse_config({
        "workload": {"batch_prompts": 3, "group_size": 4, "prompt_len": {"kind": "lognormal", "median": 20, "p99": 60},
                     "response_len": {"kind": "lognormal", "median": 30, "p99": 200}, "max_new_tokens": 256},
        "cluster": {"rollout_workers": workers, "max_concurrency": 16},
        "pipeline": {"mode": "async", "max_staleness": 2},
        "hardware": {"constant": {"decode_step_s": 0.01, "train_step_s": 2.0, "train_s_per_token": 0.001},
                     "train_tokens": train_tokens},
        "run": {"steps": 12}, "seed": 5,
    })


@pytest.mark.parametrize("engine", ["fast", "simpy"])
@pytest.mark.parametrize("train_tokens", ["packed", "padded"])
def test_a_step_is_charged_for_its_packed_or_padded_tokens(engine, train_tokens):
    """packed: the consumed samples' prompt + response tokens; padded: every sample at the batch's longest."""
    trace = simulate(lengths_cfg(train_tokens), engine=engine)
    s = trace.samples[(trace.samples["learner_step"] >= 0) & ~trace.samples["dropped"]]
    tokens = s["prompt_len"] + s["response_len"]
    by_step = tokens.groupby(s["learner_step"])
    charged = by_step.sum() if train_tokens == "packed" else by_step.max() * by_step.size()
    steps = trace.steps.set_index("step")
    np.testing.assert_allclose(steps["t_end"] - steps["t_start"], 2.0 + 0.001 * charged, rtol=1e-9)
    np.testing.assert_array_equal(steps["n_tokens"], by_step.sum())  # the trace keeps the real tokens
    if train_tokens == "padded":
        assert (by_step.max() * by_step.size() > by_step.sum()).all()  # the lengths vary: padding costs


def one_step_off(slowdown: float):
    """One worker, one 1-sample group per step, 3 decode steps of 0.1 s; learner steps of 1 s alone."""
    cfg = parse_config({
        "workload": {"batch_prompts": 1, "group_size": 1, "prompt_len": {"kind": "constant", "value": 4},
                     "response_len": {"kind": "constant", "value": 3}, "max_new_tokens": 3},
        "cluster": {"rollout_workers": 1, "max_concurrency": 1, "colocated": True},
        "pipeline": {"mode": "one_step_off"},
        "hardware": {"gpu": None, "constant": {"decode_step_s": 0.1, "train_step_s": 1.0}},
        "run": {"steps": 5},
    })
    return cfg, build_cost_model(cfg, MeasuredProfile(colocation=Colocation(1.0, slowdown)))


@pytest.mark.parametrize("engine", ENGINES)
def test_a_colocated_learner_is_slowed_only_while_the_worker_generates(engine):
    """One step off: step k trains while the worker generates group k+1 (0.3 s, starting with the step), so
    0.3 s of the step run at 1/3 speed: a step lasts 0.3 + (1 - 0.3/3) = 1.2 s, not 3 s."""
    cfg, cost = one_step_off(3.0)
    sim = Simulation(cfg, cost, engine=engine)
    steps = sim.run().steps
    np.testing.assert_allclose(steps["t_end"] - steps["t_start"], 1.2, rtol=1e-9)
    assert steps["t_start"].iloc[0] == pytest.approx(0.3)  # the first group, generated alone
    cfg, cost = one_step_off(1.0)
    np.testing.assert_allclose(np.diff(Simulation(cfg, cost, engine=engine).run().steps[["t_start", "t_end"]]
                                       .to_numpy()), 1.0)


def test_groups_keep_their_lengths_together_and_in_order():
    """workload.groups: each simulated group is one of the given groups whole; in order, group n is groups[n]
    (cycling); otherwise drawn uniformly."""
    from sim.workload import GroupStream

    groups = [[5, 1, 2], [9, 30, 40], [7, 3, 3]]
    base = {"workload": {"batch_prompts": 1, "group_size": 2, "groups": groups, "max_new_tokens": 35},
            "cluster": {"rollout_workers": 1, "max_concurrency": 2}, "hardware": {"constant": {"decode_step_s": 1}},
            "run": {"steps": 1}}
    capped = [[p, *(min(r, 35) for r in rs)] for p, *rs in groups]
    in_order = parse_config({**base, "workload": {**base["workload"], "groups_in_order": True}})
    prompts, responses, tokens = GroupStream(in_order, np.random.SeedSequence(0)).block(0)
    rows = np.column_stack([prompts, responses])
    np.testing.assert_array_equal(rows[:7], [capped[n % 3] for n in range(7)])
    np.testing.assert_array_equal(tokens, 2 * prompts + responses.sum(axis=1))
    prompts, responses, _ = GroupStream(parse_config(base), np.random.SeedSequence(0)).block(0)
    rows = [list(r) for r in np.column_stack([prompts, responses])]
    assert all(r in capped for r in rows) and rows[:7] != [capped[n % 3] for n in range(7)]
    counts = np.bincount([capped.index(r) for r in rows], minlength=3) / len(rows)
    np.testing.assert_allclose(counts, 1 / 3, atol=0.03)
