"""Request routing (sim/engine/routers.py): which worker the next group goes to, on both engines."""

import numpy as np
import pytest

from sim.config import parse_config
from sim.engine.pipeline import ENGINES, simulate
from sim.engine.routers import FILL_FIRST, LEAST_LOADED, ROUND_ROBIN, choose


def test_choose_on_hand_set_workers():
    free, eligible = np.array([2, 5, 5, 1]), np.array([1, 1, 1, 0])
    assert choose(LEAST_LOADED, free, eligible, -1) == 1          # most free slots, the lowest id among equals
    assert choose(FILL_FIRST, free, eligible, -1) == 0            # the lowest id with room
    assert choose(ROUND_ROBIN, free, eligible, 1) == 2            # after the last one a group went to
    assert choose(ROUND_ROBIN, free, eligible, 2) == 0            # ... wrapping around, skipping worker 3
    assert choose(LEAST_LOADED, free, np.zeros(4, np.int64), -1) == -1


def sync_cfg(router, workers=4, batch=8, steps=2):
    return parse_config({
        "workload": {"batch_prompts": batch, "group_size": 1, "prompt_len": {"kind": "constant", "value": 4},
                     "response_len": {"kind": "constant", "value": 10}, "max_new_tokens": 16},
        "cluster": {"rollout_workers": workers, "max_concurrency": batch, "router": router},
        "pipeline": {"mode": "sync"},
        "hardware": {"constant": {"decode_step_s": 0.1, "train_step_s": 1.0, "sync_s": 0.0}},
        "run": {"steps": steps}})


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("router, per_worker", [("least_loaded", [2, 2, 2, 2]), ("round_robin", [2, 2, 2, 2]),
                                                ("fill_first", [8, 0, 0, 0])])
def test_sync_batches_spread_over_more_workers_than_they_need(engine, router, per_worker):
    """Sync mode, a batch of 8 one-sample groups, 4 workers of 8 slots each: any one worker could take the whole
    batch. least_loaded gives each group to the worker with the most free slots (8, 8, 8, 8 -> 7, 8, 8, 8 -> ...):
    2 each; round_robin 2 each in turn (groups 0..7 to workers 0, 1, 2, 3, 0, 1, 2, 3); fill_first fills worker 0."""
    trace = simulate(sync_cfg(router), engine=engine)
    s = trace.samples
    for step in range(2):
        batch = s[s.group_id // 8 == step]
        assert np.bincount(batch.worker_id, minlength=4).tolist() == per_worker
    if router == "round_robin":
        assert s.worker_id.tolist()[:8] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert (s.t_start[s.group_id < 8] == 0).all()  # the whole first batch starts at once, wherever it goes


@pytest.mark.parametrize("engine", ENGINES)
def test_least_loaded_sends_a_new_group_to_the_emptiest_worker(engine):
    """Async, 2 workers of 4 slots, groups of one sample of 8 tokens, bound 1 with batches of 2: at 0 the gate
    allows (1 + 0 + 1) x 2 = 4 groups; least_loaded spreads them 2 and 2 (4, 4 -> 3, 4 -> 3, 3 -> 2, 3 -> 2, 2)."""
    cfg = parse_config({
        "workload": {"batch_prompts": 2, "group_size": 1, "prompt_len": {"kind": "constant", "value": 1},
                     "response_len": {"kind": "constant", "value": 8}, "max_new_tokens": 16},
        "cluster": {"rollout_workers": 2, "max_concurrency": 4},
        "pipeline": {"mode": "async", "max_staleness": 1},
        "hardware": {"constant": {"decode_step_s": 0.1, "train_step_s": 1.0, "sync_s": 0.0}},
        "run": {"steps": 2}})
    s = simulate(cfg, engine=engine).samples
    first = s[s.t_admit == 0]
    assert len(first) == 4 and first.worker_id.tolist() == [0, 1, 0, 1]
