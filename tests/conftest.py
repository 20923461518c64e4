"""Shared fixtures: the example configs, a small config with fixed hardware costs, and its simulated trace."""

import copy
from pathlib import Path

import pytest

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
