"""Groups over a rollout engine (real/engine/batching.py): continuous batching refills freed slots at the next decode
step, static batching only an empty engine, admission by sample starts and ends every sample at the simulator's
step, and every admitted group is handed over once, whole."""

import numpy as np
import pytest

from real.engine import Finished
from real.engine.batching import GroupBatcher
from sim.config import parse_config
from sim.engine.pipeline import Simulation


class ScriptedEngine:
    """A rollout engine whose sequences end after a scripted number of tokens (the batching logic alone)."""

    def __init__(self, slots: int, length_of):
        self.slots, self.length_of = slots, length_of
        self.left: dict[int, int] = {}   # active sequence -> tokens still to sample

    def free_slots(self) -> int:
        return self.slots - len(self.left)

    def active(self) -> int:
        return len(self.left)

    def admit(self, seq_ids, prompts) -> None:
        assert len(seq_ids) <= self.free_slots()
        self.left.update((sid, self.length_of(sid)) for sid in seq_ids)

    def step(self) -> list[Finished]:
        done = []
        for sid in list(self.left):
            self.left[sid] -= 1
            if self.left[sid] == 0:
                n = self.length_of(sid)
                done.append(Finished(sid, [1] * n, [0.0] * n, [0] * n))
                del self.left[sid]
        return done


def drive(batcher, engine, n_groups: int):
    """Admit groups whenever there is room until n_groups are admitted, then drain. Returns (free slots at each decode
    step while groups were still waiting to be admitted, groups handed over in order)."""
    admitted, idle, steps, handed = 0, [], 0, []
    while admitted < n_groups or not batcher.empty:
        batcher.start_waiting(float(steps))  # a worker's order at a step boundary: waiting samples, then new groups
        while admitted < n_groups and batcher.room():
            batcher.admit(admitted, [0], float(steps))
            admitted += 1
        if admitted < n_groups:
            idle.append(engine.free_slots())
        handed += batcher.step(lambda: float(steps))
        steps += 1
    return idle, handed


@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_continuous_batching_leaves_no_slot_idle_that_a_group_could_take(group_size):
    """Every decode step while groups wait: fewer than G slots free (none at all when G = 1)."""
    rng = np.random.default_rng(group_size)
    lengths = rng.lognormal(np.log(8), 0.8, size=4000).astype(int) + 1   # long-tailed, by sequence id
    slots = 16
    engine = ScriptedEngine(slots, lambda sid: int(lengths[sid]))
    batcher = GroupBatcher(engine, group_size, static=False)
    n_groups = 600 // group_size
    idle, handed = drive(batcher, engine, n_groups)
    assert len(idle) > 100 and max(idle) <= group_size - 1
    _whole(handed, n_groups, group_size, lengths)


def _whole(handed, n_groups: int, group_size: int, lengths) -> None:
    assert sorted(g.gid for g in handed) == list(range(n_groups))
    for g in handed:  # whole groups, each sample's tokens as scripted
        assert [len(s.tokens) for s in g.samples] == [int(lengths[g.gid * group_size + i]) for i in range(group_size)]


@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_admission_by_sample_leaves_no_slot_idle_while_groups_wait(group_size):
    """per_sample: a group is admitted with one free slot and its other samples take the next freed slots, so no
    slot is free at any decode step while groups wait (per_group leaves up to G - 1)."""
    rng = np.random.default_rng(group_size)
    lengths = rng.lognormal(np.log(8), 0.8, size=4000).astype(int) + 1
    n_groups = 600 // group_size
    engine = ScriptedEngine(13, lambda sid: int(lengths[sid]))  # 13 slots: a multiple of no group size here
    batcher = GroupBatcher(engine, group_size, static=False, per_sample=True)
    idle, handed = drive(batcher, engine, n_groups)
    assert len(idle) > 100 and max(idle) == 0
    _whole(handed, n_groups, group_size, lengths)
    per_group = ScriptedEngine(13, lambda sid: int(lengths[sid]))
    assert max(drive(GroupBatcher(per_group, group_size, static=False), per_group, n_groups)[0]) > 0
    with pytest.raises(ValueError, match="per_sample needs continuous batching"):
        GroupBatcher(engine, group_size, static=True, per_sample=True)


def run_by_sample(batcher, prompts: list[list[int]]) -> list:
    """Drive a per_sample batcher as a worker does, with decode step k running from time k to k + 1: at each step
    boundary its waiting samples first, then groups (ids 0, 1, ... with these prompts) while there is room and the
    next one's first sample starts (real/worker.py `kv_takes`); until every group is handed over. Returns them."""
    admitted, step, handed = 0, 0, []
    while admitted < len(prompts) or not batcher.empty:
        batcher.start_waiting(float(step))
        while admitted < len(prompts) and batcher.room() and batcher.starts([len(prompts[admitted])])[0] > 0:
            batcher.admit(admitted, prompts[admitted], float(step))
            admitted += 1
        handed += batcher.step(lambda: float(step + 1))
        step += 1
    return handed


def test_admission_by_sample_starts_and_ends_every_sample_at_the_simulators_step():
    """The simulator and the batcher on the same schedules: one continuous worker admitting by sample, the first
    learner step's groups (sync mode: admitted in id order as slots allow), a decode step of 1 s and no prefill
    cost, so the simulator's time is its step count. Each sample starts and ends at the same step. (The
    simulator's trace gives a group's start as each sample's t_start; a sample's own start is its end less its
    length.)"""
    rng = np.random.default_rng(0)
    waited = 0
    for case in range(20):
        G, B = int(rng.integers(2, 6)), int(rng.integers(3, 10))
        slots = int(rng.integers(G, 3 * G + 1))
        cfg = parse_config({
            "seed": case,
            "workload": {"batch_prompts": B, "group_size": G, "max_new_tokens": 20,
                         "prompt_len": {"kind": "constant", "value": 8},
                         "response_len": {"kind": "lognormal", "median": 6, "p99": 20}},
            "cluster": {"rollout_workers": 1, "max_concurrency": slots, "batching": "continuous",
                        "admission": "per_sample"},
            "pipeline": {"mode": "sync"},
            "hardware": {"constant": {"decode_step_s": 1.0, "prefill_s_per_token": 0.0, "train_step_s": 1.0}},
            "run": {"steps": 1}})
        sim = Simulation(cfg).run().samples
        sim = sim[sim["group_id"] < B]
        lengths = dict(zip(sim["sample_id"], sim["response_len"]))
        engine = ScriptedEngine(slots, lengths.__getitem__)
        batcher = GroupBatcher(engine, G, static=False, per_sample=True)
        handed = run_by_sample(batcher, [[0]] * B)
        start = {g.gid * G + i: t for g in handed for i, t in enumerate(g.t_start)}
        end = {g.gid * G + i: t for g in handed for i, t in enumerate(g.t_end)}
        assert end == dict(zip(sim["sample_id"], sim["t_end"])), case
        assert start == {i: e - n for i, e, n in zip(sim["sample_id"], sim["t_end"], sim["response_len"])}, case
        waited += sum(t > min(g.t_start) for g in handed for t in g.t_start)
    assert waited >= 20  # samples that started after their group's first: the schedules exercise the waiting


def test_static_batching_admits_only_into_an_empty_engine_and_releases_the_batch_at_its_end():
    lengths = {sid: 1 + (sid % 5) * 3 for sid in range(64)}   # 1..13 tokens
    engine = ScriptedEngine(8, lengths.__getitem__)
    batcher = GroupBatcher(engine, 2, static=True)
    assert batcher.room() == 4
    for gid in range(4):
        batcher.admit(gid, [0], 0.0)
    assert batcher.room() == 0
    released = []
    for step in range(13):
        out = batcher.step(lambda: float(step))
        assert batcher.room() == (4 if step == 12 else 0)
        released.append([g.gid for g in out])
    assert released[:12] == [[]] * 12 and sorted(released[12]) == [0, 1, 2, 3]  # all at the longest one's end
    # continuous, the same lengths waste fewer slot-steps than static
    idle = {}
    for static in (True, False):
        engine = ScriptedEngine(8, lengths.__getitem__)
        idle[static] = sum(drive(GroupBatcher(engine, 2, static), engine, 32)[0])
    assert idle[False] < idle[True]


def test_sample_end_times_are_those_of_the_step_that_finished_them():
    engine = ScriptedEngine(4, lambda sid: [2, 5][sid % 2])
    batcher = GroupBatcher(engine, 2, static=False)
    batcher.admit(0, [0], 0.5)
    done = []
    for step in range(5):
        done += batcher.step(lambda: 10.0 + step)
    (group,) = done
    assert group.t_start == [0.5, 0.5] and group.t_end == [11.0, 14.0]
