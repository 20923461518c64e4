"""The staleness-control policies (sim/engine/policies.py): each rule on hand-set counters, and each policy on a
deterministic schedule derived by hand, on both engines.

The schedules share one setting: one worker, groups of one sample, one prompt token, responses of the given
lengths in order (`workload.groups_in_order`), a decode step of 0.25 s whatever the batch, no prefill, a learner
step of 1 s and (unless said) a free weight sync. Group gN is the N-th group admitted. "stale" is the learner's
version when it takes a group less the group's version_start.
"""

import numpy as np
import pytest

from sim.config import ConfigError, config_help, parse_config
from sim.engine import policies as P
from sim.engine.control import Control
from sim.engine.pipeline import ENGINES, simulate


def schedule_cfg(policy, knobs=None, interruptible=None, S=1, lens=(1,) * 24, steps=4, concurrency=4, sync=0.0):
    pipeline = {"mode": "async", "staleness_control": policy, "max_staleness": S, "interruptible": interruptible}
    if knobs is not None:
        pipeline[policy] = knobs
    return parse_config({
        "workload": {"batch_prompts": 1, "group_size": 1, "groups": [[1, n] for n in lens], "groups_in_order": True,
                     "max_new_tokens": 16},
        "cluster": {"rollout_workers": 1, "max_concurrency": concurrency}, "pipeline": pipeline,
        "hardware": {"constant": {"decode_step_s": 0.25, "train_step_s": 1.0, "sync_s": sync}},
        "run": {"steps": steps}})


def outcome(cfg, engine):
    """(step start times, (group, stale) taken per step, dropped groups, the trace)."""
    trace = simulate(cfg, engine=engine)
    g = trace.samples.groupby("group_id").first()
    taken = g[(g.learner_step >= 0) & ~g.dropped].sort_values("learner_step")
    return (trace.steps.t_start.round(6).tolist(),
            [(int(i), int(r.version_consumed - r.version_start)) for i, r in taken.iterrows()],
            g.index[g.dropped].tolist(), trace)


# --------------------------------------------------------------------------- the rules on hand-set counters
def rules(policy="oldest_unconsumed", B=4, S=1, **pipeline):
    return Control.from_config(parse_config({
        "workload": {"batch_prompts": B, "group_size": 1, "prompt_len": {"kind": "constant", "value": 1},
                     "response_len": {"kind": "constant", "value": 1}, "max_new_tokens": 1},
        "cluster": {"rollout_workers": 1, "max_concurrency": 1},
        "pipeline": {"mode": "async", "staleness_control": policy, "max_staleness": S, **pipeline},
        "run": {"steps": 1}}))


def admits(c, **counters):
    base = dict(version=0, latest=0, n_admitted=0, live=0, running=0, buffered=0, trained=0, oldest=0, since_sync=0)
    return c.admission_code(**(base | counters)) == P.ADMIT


def test_oldest_unconsumed_counts_from_the_oldest_outstanding_version():
    c = rules(B=4, S=1)  # (S + v + 1) B = 8 at v = 0
    assert admits(c, live=7) and not admits(c, live=8)
    assert not admits(c, version=2, latest=2, live=8, oldest=0)      # an old group is still out: v = 0
    assert admits(c, version=2, latest=2, live=8, oldest=1)          # (1 + 1 + 1) 4 = 12
    assert not c.drop(5, 0) and rules(drop_stale=True).drop(5, 3) and not rules(drop_stale=True).drop(5, 4)


def test_areal_counts_from_the_learners_version_and_caps_running():
    c = rules("areal", B=4, areal={"max_head_offpolicyness": 1, "max_concurrent_rollouts": 3})
    assert admits(c, version=2, latest=2, live=15, running=2, oldest=0)   # (1 + 2 + 1) 4 = 16: the old group no matter
    assert not admits(c, version=2, latest=2, live=16, oldest=0)
    assert not admits(c, running=3)                                      # max_concurrent_rollouts
    assert not c.drop(100, 0)                                            # AReaL drops nothing when taking


def test_verl_counts_admissions_since_the_sync_and_the_queue():
    # M = 4 groups x 1 batch x (1 + 0.5) x 2 updates per sync = 12
    c = rules("verl_fully_async", B=4, verl_fully_async={"staleness_threshold": 0.5, "trigger_parameter_sync_step": 2})
    assert c.sync_every == 2 and admits(c, since_sync=11) and not admits(c, since_sync=12)
    assert not admits(c, buffered=12)


def test_prime_rl_bounds_the_batch_ahead_and_drops_past_max_off_policy_steps():
    c = rules("prime_rl", B=4, prime_rl={"max_async_level": 1, "max_off_policy_steps": 2, "max_inflight": 5})
    assert admits(c, latest=3, live=19) and not admits(c, latest=3, live=20)  # batch 5 is 2 ahead of version 3
    assert not admits(c, running=5)
    assert c.drop(5, 2) and not c.drop(4, 2)


def test_tinker_bounds_groups_started_and_not_trained():
    c = rules("tinker", B=4, tinker={"sampling_steps_ahead": 2})  # 4 (2 + 1) = 12
    assert admits(c, n_admitted=20, trained=9) and not admits(c, n_admitted=20, trained=8)


def test_drop_caps_generations_in_flight_and_drops_past_max_staleness():
    c = rules("drop", B=4, S=2)  # TRL's auto max_inflight_tasks: max_staleness x groups per step = 8
    assert admits(c, running=7, live=10_000) and not admits(c, running=8)
    assert c.drop(5, 2) and not c.drop(4, 2)
    assert not admits(rules("drop", B=4, S=2, drop={"max_inflight_tasks": 3}), running=3)


def test_queue_drop_evicts_from_a_full_buffer_and_admits_always():
    c = rules("queue_drop", queue_drop={"capacity": 2})
    assert admits(c, live=10_000, running=10_000) and c.evicts(2) and not c.evicts(1)


def test_a_drop_wakes_the_workers_only_where_it_can_open_admission():
    # A drop leaves `live`, moves `oldest` and counts as `trained`, and frees buffer room: only the rules reading
    # these can turn to ADMIT. TRL's drop reads the groups generating, which a drop (of a generated group) leaves.
    c = rules("drop")
    assert not c.drop_may_admit and c.drops
    assert admits(c, running=7) == admits(c, running=7, live=0, trained=9, oldest=3)  # what a drop changes
    assert rules("drop", queue_capacity=8).drop_may_admit
    for policy in ("oldest_unconsumed", "areal", "prime_rl", "tinker"):
        assert rules(policy).drop_may_admit
    assert not rules("queue_drop", queue_drop={"capacity": 4}).drop_may_admit and rules(
        "queue_drop", queue_drop={"capacity": 4}).drops
    assert not rules("areal").drops


def test_workers_take_weights_in_flight_as_their_system_does():
    assert [rules(p, **({"queue_drop": {"capacity": 1}} if p == "queue_drop" else {})).interruptible
            for p in ("areal", "prime_rl", "tinker", "drop", "queue_drop", "none")] == [True] * 4 + [False] * 2
    verl = {"verl_fully_async": {"partial_rollout": False}}
    assert not rules("verl_fully_async", interruptible=None, **verl).interruptible
    assert not rules("areal", interruptible=False).interruptible  # set: as set


def test_config_names_each_policys_knobs_and_refuses_others(config_data):
    config_data["pipeline"] = {"mode": "async", "staleness_control": "areal", "prime_rl": {"max_async_level": 2}}
    with pytest.raises(ConfigError, match="prime_rl: these knobs are of staleness_control: prime_rl"):
        parse_config(config_data)
    config_data["pipeline"] = {"mode": "async", "staleness_control": "gating"}
    with pytest.raises(ConfigError, match="'gating' is now called 'oldest_unconsumed'"):
        parse_config(config_data)
    config_data["pipeline"] = {"mode": "async", "staleness_control": "queue_drop"}
    with pytest.raises(ConfigError, match="queue_drop: give its capacity"):
        parse_config(config_data)
    text = config_help()
    for name, spec in P.POLICIES.items():
        assert name in text
        for knob in spec.knobs:
            assert f"{knob}:" in text, knob


def test_a_run_is_described_by_the_knobs_that_bound_it(tmp_path, capsys):
    """The summary names the knobs that set a policy's bound with their values: max_staleness only for the
    policies that read it. areal's bound is its own max_head_offpolicyness (AReaL's default 0), whatever
    max_staleness says."""
    import yaml

    from sim.cli import main
    assert P.describe(schedule_cfg("oldest_unconsumed", S=3).pipeline) == "oldest_unconsumed S=3"
    assert P.describe(schedule_cfg("drop", {"max_inflight_tasks": 2}, S=3).pipeline) == (
        "drop S=3, max_inflight_tasks=2")
    assert P.describe(schedule_cfg("areal", S=3).pipeline) == (
        "areal max_head_offpolicyness=0, max_concurrent_rollouts=None")
    assert P.describe(schedule_cfg("tinker", {"sampling_steps_ahead": 2}).pipeline) == "tinker sampling_steps_ahead=2"
    assert P.describe(schedule_cfg("none").pipeline) == "none"
    path = tmp_path / "areal.yaml"
    path.write_text(yaml.safe_dump(schedule_cfg("areal", S=3).model_dump(mode="json")))
    assert main(["simulate", str(path), "--out", str(tmp_path / "out")]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "per step" in line)
    assert "async, areal max_head_offpolicyness=0, max_concurrent_rollouts=None," in header and "S=3" not in header


# --------------------------------------------------------------------------- each policy on a hand-derived schedule
@pytest.mark.parametrize("engine", ENGINES)
def test_areal_lets_a_late_group_be_staler_than_its_bound_where_oldest_unconsumed_does_not(engine):
    """Responses 8, 1, 1, ... tokens; bound 1; workers take weights in flight.

    areal (max_head_offpolicyness 1): at 0 it admits g0 (8 tokens) and g1 (1): accepted + running = 2 < (1 + 0 + 1).
    g1 ends at 0.25, step 0 takes it (stale 0) and publishes v1 at 1.25. The count allows (1 + 1 + 1) = 3: g2 starts
    at 1.25 (version 1), ends at 1.5, step 1 takes it (stale 0) and publishes v2 at 2.5. g0 ended at 2.0 (version 1
    since 1.25): step 2 takes it at 2.5 at version 2, 2 versions after it started: staler than the bound.

    oldest_unconsumed (S = 1): after v1 the count allows (1 + min(1, 0) + 1) = 2 while g0 (version 0) is out: nothing
    starts until g0 ends at 2.0; step 1 takes g0 then (stale 1), and g2 starts at 2.0 at version 1."""
    lens = (8,) + (1,) * 12
    starts, taken, dropped, _ = outcome(schedule_cfg("areal", {"max_head_offpolicyness": 1}, lens=lens), engine)
    assert starts == [0.25, 1.5, 2.5, 3.5] and taken[:3] == [(1, 0), (2, 0), (0, 2)] and not dropped
    starts, taken, dropped, _ = outcome(schedule_cfg("oldest_unconsumed", lens=lens), engine)
    assert starts == [0.25, 2.0, 3.0, 4.0] and taken[:3] == [(1, 0), (0, 1), (2, 1)] and not dropped


@pytest.mark.parametrize("engine", ENGINES)
def test_verl_publishes_every_trigger_parameter_sync_step_updates(engine):
    """verl_fully_async, staleness_threshold 0, trigger_parameter_sync_step 2, no partial rollout, a sync of 0.5 s.
    M = 1 x 1 x (1 + 0) x 2 = 2 groups per sync: g0 and g1 start at 0 and end at 0.25. Step 0 takes one at 0.25 and
    trains to 1.25 (no sync: version 0 still); step 1 takes the other and trains to 2.25, then the weights go out
    (v1) with a 0.5 s sync on both sides: the worker loads until 2.75, admits g2 and g3 (they end at 3.0), the
    learner takes them at 3.0 and 4.0 at version 1. Nothing is ever stale."""
    cfg = schedule_cfg("verl_fully_async", {"staleness_threshold": 0.0, "trigger_parameter_sync_step": 2,
                                            "partial_rollout": False}, sync=0.5)
    starts, taken, dropped, trace = outcome(cfg, engine)
    assert starts == [0.25, 1.25, 3.0, 4.0] and all(s == 0 for _, s in taken) and not dropped
    assert trace.steps.version.tolist() == [0, 0, 1, 1] and trace.steps.weight_sync_s.tolist() == [0, 0.5, 0, 0.5]
    assert trace.samples.t_admit.tolist()[:4] == [0.0, 0.0, 2.75, 2.75]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("ahead, starts, stale", [(0, [0.25, 1.5, 2.75, 4.0], [0, 0, 0, 0]),
                                                  (1, [0.25, 1.25, 2.25, 3.25], [0, 1, 1, 1])])
def test_tinker_keeps_k_steps_of_groups_ahead(engine, ahead, starts, stale):
    """tinker: at most 1 x (K + 1) groups started and not yet trained. K = 0: one group at a time; the next starts
    when the step that trains the last one ends (1.25, then 2.5, ...): synchronous, never stale. K = 1: g0 and g1 at 0;
    step 0 takes one at 0.25 and trains to 1.25, when the other may be joined by g2 (version 1); step 1 takes the
    other (version 0) at 1.25 at version 1: stale 1, and so on, a step apart."""
    got_starts, taken, dropped, _ = outcome(schedule_cfg("tinker", {"sampling_steps_ahead": ahead}), engine)
    assert got_starts == starts and [s for _, s in taken] == stale and not dropped


@pytest.mark.parametrize("engine", ENGINES)
def test_drop_caps_in_flight_and_drops_the_stale(engine):
    """drop (TRL) with max_staleness 0 and max_inflight_tasks 1, one slot, workers draining for new weights: a group
    every 0.25 s (g0 at 0, g1 at 0.25, ...). Step 0 takes g0 at 0.25 and publishes v1 at 1.25; the worker, which
    finishes g4 (admitted at 1.0) at 1.25, loads v1 and admits g5 at 1.25. Step 1 finds g1..g4 (version 0) staler
    than 0 and drops them, then takes g5 at 1.5."""
    starts, taken, dropped, _ = outcome(schedule_cfg("drop", {"max_inflight_tasks": 1}, S=0, interruptible=False,
                                                     concurrency=1), engine)
    assert starts[:2] == [0.25, 1.5] and taken[:2] == [(0, 0), (5, 0)] and dropped[:4] == [1, 2, 3, 4]


@pytest.mark.parametrize("engine", ENGINES)
def test_queue_drop_discards_the_oldest_waiting_group(engine):
    """queue_drop, a buffer of 1, one slot: a group ends every 0.25 s. Step 0 takes g0 at 0.25 and trains to 1.25;
    g1 waits (0.5), g2 pushes it out (0.75), g3 pushes g2 out (1.0), g4 pushes g3 out (1.25); step 1 takes g4 at
    1.25 (version 0 at version 1: stale 1)."""
    starts, taken, dropped, _ = outcome(schedule_cfg("queue_drop", {"capacity": 1}, concurrency=1), engine)
    assert starts[:2] == [0.25, 1.25] and taken[:2] == [(0, 0), (4, 1)] and dropped[:3] == [1, 2, 3]


@pytest.mark.parametrize("engine", ENGINES)
def test_prime_rl_replaces_the_groups_it_drops(engine):
    """prime_rl, max_async_level 1, max_off_policy_steps 0, workers draining for new weights: at 0 batches 0 and 1
    may start (1 ahead): g0 and g1, both ending at 0.25. Step 0 takes one of them (stale 0) and publishes v1 at 1.25;
    at v1 the other (version 0) is too stale and is dropped, which frees its place: the worker, on v1, admits g2 and
    g3 at 1.25, and step 1 takes the first to end (stale 0) at 1.5."""
    starts, taken, dropped, _ = outcome(schedule_cfg("prime_rl", {"max_async_level": 1, "max_off_policy_steps": 0},
                                                     interruptible=False), engine)
    assert starts[:2] == [0.25, 1.5] and [s for _, s in taken] == [0, 0, 0, 0]
    assert dropped[:1] in ([0], [1]) and taken[1][0] in (2, 3)
