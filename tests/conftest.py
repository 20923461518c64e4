"""Shared fixtures: the example configs, a small config with fixed hardware costs, and its simulated trace."""

import copy
from pathlib import Path

import pytest
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

_SMALL_CONFIG = {
    "name": "small",
    "workload": {"batch_prompts": 2, "group_size": 2, "prompt_len": {"kind": "constant", "value": 4},
                 "response_len": {"kind": "exponential", "mean": 5}, "max_new_tokens": 8},
    "cluster": {"rollout_workers": 2, "max_concurrency": 4},
    "pipeline": {"mode": "async", "max_staleness": 1},
    "hardware": {"constant": {"decode_step_s": 0.01, "train_step_s": 0.1, "sync_s": 0.01}},
    "run": {"steps": 3},
}


def pytest_generate_tests(metafunc):
    """A test that takes `example` runs once per YAML file in examples/."""
    if "example" in metafunc.fixturenames:
        metafunc.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])


@pytest.fixture
def config_data() -> dict:
    """A fresh copy of a small, valid config (fixed hardware costs), to mutate."""
    return copy.deepcopy(_SMALL_CONFIG)


@pytest.fixture(scope="session")
def tiny_trace():
    """The trace of simulating the small config (3 learner steps). Do not mutate it."""
    from sim.config import parse_config
    from sim.engine.pipeline import simulate

    return simulate(parse_config(copy.deepcopy(_SMALL_CONFIG)))


@st.composite
def async_pipelines(draw, batch: int, max_staleness: int = 3) -> dict:
    """The pipeline section of an async config under any staleness-control policy (sim/engine/policies.py), with
    random knobs: for the engines' differential and invariant tests."""
    from sim.engine.policies import POLICIES

    policy = draw(st.sampled_from(sorted(POLICIES)))
    pl = {"mode": "async", "staleness_control": policy, "max_staleness": draw(st.integers(0, max_staleness)),
          "interruptible": draw(st.one_of(st.none(), st.booleans())),
          "queue_order": draw(st.sampled_from(["fifo", "freshest"])),
          "queue_capacity": draw(st.one_of(st.none(), st.integers(batch, batch + 3)))}
    small = st.integers(0, max_staleness)
    if policy == "oldest_unconsumed":
        pl["drop_stale"] = draw(st.booleans())
    elif policy == "areal":
        pl["areal"] = {"max_head_offpolicyness": draw(small),
                       "max_concurrent_rollouts": draw(st.one_of(st.none(), st.integers(1, 2 * batch)))}
    elif policy == "verl_fully_async":
        pl["verl_fully_async"] = {"staleness_threshold": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
                                  "trigger_parameter_sync_step": draw(st.integers(1, 3)),
                                  "require_batches": draw(st.integers(1, 2)), "partial_rollout": draw(st.booleans())}
    elif policy == "prime_rl":
        pl["prime_rl"] = {"max_async_level": draw(small), "max_off_policy_steps": draw(small),
                          "max_inflight": draw(st.one_of(st.none(), st.integers(1, 2 * batch)))}
    elif policy == "tinker":
        pl["tinker"] = {"sampling_steps_ahead": draw(small)}
    elif policy == "drop":
        pl["drop"] = {"max_inflight_tasks": draw(st.one_of(st.none(), st.integers(1, 2 * batch)))}
    elif policy == "queue_drop":
        pl |= {"queue_order": "fifo", "queue_capacity": None, "queue_drop": {"capacity": draw(st.integers(1, 6))}}
    return pl
