"""The real trainer's processes: staleness control rules (pure), the weight channel, and short end-to-end runs
of examples/tiny_cpu.yaml in sync and async mode, plus a worker killed mid-run."""

import json
import math
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch

from real.learner import InstabilityDetector
from real.runfolder import RunFolder
from sim.engine.buffer import Buffer
from real.weights import SharedMemoryChannel, StaleVersionError
from sim.engine.control import BLOCKED, DRAIN, Control, oldest_unconsumed
from sim.config import Instability, load_config, parse_config
from sim.metrics import compute_metrics, sample_staleness
from sim.trace import read_trace

# One xdist process runs the module, so its training runs (module fixtures) are computed once.
pytestmark = pytest.mark.xdist_group("test_real_train")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny_cpu.yaml"
SYNC_STEPS = 15
EXAMPLE = load_config(TINY)
BATCH = EXAMPLE.workload.batch_prompts * EXAMPLE.workload.group_size  # samples per learner step


def control(mode="async", policy="oldest_unconsumed", interruptible=False, capacity=None, B=8, S=2, **pipeline):
    """The rules of a config with these settings (sim.engine.control.Control)."""
    pl = {"mode": mode, "max_staleness": S, **pipeline}
    if mode == "async":
        pl |= {"staleness_control": policy, "interruptible": interruptible, "queue_capacity": capacity}
    return Control.from_config(parse_config({
        "workload": {"batch_prompts": B, "group_size": 1, "prompt_len": {"kind": "constant", "value": 1},
                     "response_len": {"kind": "constant", "value": 1}, "max_new_tokens": 1},
        "cluster": {"rollout_workers": 1, "max_concurrency": 1}, "pipeline": pl, "run": {"steps": 1}}))


def block(c, version=0, latest=0, n_admitted=0, live=0, buffered=0, oldest=0):
    return c.admission_block(version=version, latest=latest, n_admitted=n_admitted, live=live, buffered=buffered,
                             oldest=oldest)


# --------------------------------------------------------------------------- admission rules
def test_sync_generates_batch_j_with_version_j():
    c = control("sync")
    assert block(c, n_admitted=7) is None                            # batch 0, version 0
    assert block(c, n_admitted=8) == BLOCKED                         # batch 1 needs version 1, not published
    assert block(c, n_admitted=8, latest=1) == DRAIN                 # published: load it first
    assert block(c, version=1, latest=1, n_admitted=8) is None
    assert c.load_target(version=0, latest=1, n_admitted=8) == 1
    assert c.load_target(version=0, latest=1, n_admitted=7) is None  # batch 0 not fully admitted yet


def test_one_step_off_uses_the_previous_version():
    c = control("one_step_off")
    assert block(c, n_admitted=15) is None                           # batches 0 and 1: version 0
    assert block(c, n_admitted=16, latest=0) == BLOCKED              # batch 2 needs version 1
    assert c.load_target(version=0, latest=2, n_admitted=16) == 1    # exactly j - 1, even if 2 exists
    assert block(c, version=1, latest=2, n_admitted=16) is None


def test_async_gating_bound_uses_the_oldest_unconsumed_version():
    c = control(B=8, S=2)
    assert block(c, live=23) is None and block(c, live=24) == BLOCKED    # (S + 0 + 1) * B = 24
    assert block(c, version=1, latest=1, live=24, oldest=0) == BLOCKED  # an old group still out: v_ref = 0
    assert block(c, version=1, latest=1, live=24, oldest=1) is None
    assert block(c, version=0, latest=1, live=0) == DRAIN               # non-interruptible: load first
    assert block(control(interruptible=True), version=0, latest=1, live=0, oldest=0) is None
    assert block(control(policy="none"), live=10_000) is None           # no gate
    assert block(control(capacity=8), buffered=8) == BLOCKED             # the buffer is full
    assert control().load_target(version=0, latest=3, n_admitted=5) == 3


def test_drop_rule_and_oldest_unconsumed():
    c = control(policy="drop", S=1)
    assert c.drop(3, 1) and not c.drop(3, 2)
    assert not control().drop(100, 0)                                   # the gate alone never drops
    assert control(drop_stale=True, S=1).drop(3, 1)                     # ... with drop_stale it does
    assert oldest_unconsumed([0, 2, 1, 0], 0, latest=3) == 1
    assert oldest_unconsumed([0, 0, 0, 0], 0, latest=3) == 3


def test_ledger_counts_unconsumed_groups_in_a_ring_of_versions():
    """Under the gate every outstanding version lies in [latest - S, latest]: a ring of S + 2 counts keeps them apart,
    however long the run."""
    from real.worker import Ledger

    ledger = Ledger(mp.get_context("spawn"), 2, 1)  # S = 2: a ring of 4
    assert len(ledger.unconsumed) == 4 and ledger.oldest(1000) == 1000
    ledger.count(998, +1)
    ledger.count(1000, +1)
    assert ledger.oldest(1000) == 998
    ledger.count(998, -1)
    assert ledger.oldest(1000) == 1000 and ledger.oldest(1001) == 1000
    ledger.count(1002, +1)  # the slot 998 had, now free
    ledger.count(1000, -1)
    assert ledger.oldest(1002) == 1002 and list(ledger.unconsumed) == [0, 0, 1, 0]


def test_gating_bounds_staleness_when_groups_finish_out_of_order():
    """Workers with lagging versions, groups finishing in random order, the learner consuming FIFO: no
    consumed group is ever staler than S (a process-free replay of what the real pipeline does)."""
    rng = np.random.default_rng(0)
    B, S = 3, 2
    c = control(B=B, S=S, interruptible=True)
    version, n_admitted, unconsumed = 0, 0, [0] * 5000
    running, done, worst = [], [], 0
    worker_v = [0, 0]
    for _ in range(5000):
        w = int(rng.integers(2))
        worker_v[w] = int(rng.integers(worker_v[w], version + 1))     # loads happen at random times
        if rng.random() < 0.5 and block(c, version=worker_v[w], latest=version, n_admitted=n_admitted,
                                        live=n_admitted, oldest=oldest_unconsumed(unconsumed, 0, version)) is None:
            running.append((n_admitted, worker_v[w]))
            unconsumed[worker_v[w]] += 1
            n_admitted += 1
        if running and rng.random() < 0.5:
            done.append(running.pop(int(rng.integers(len(running)))))
        if len(done) >= B:
            for gid, v in done[:B]:
                worst = max(worst, version - v)
                unconsumed[v] -= 1
            done = done[B:]
            version += 1
    assert version > 100 and worst == S


def test_buffer_orders():
    fifo, fresh, batch = Buffer("fifo"), Buffer("freshest"), Buffer("fifo", batch_prompts=2)
    for gid, v in [(0, 0), (1, 2), (2, 1), (3, 0)]:
        fifo.put(gid, v), fresh.put(gid, v), batch.put(gid, v)
    assert [fifo.pop(0) for _ in range(4)] == [0, 1, 2, 3]
    assert [fresh.pop(0) for _ in range(4)] == [1, 2, 0, 3]
    assert batch.pop(1) in (2, 3) and batch.pop(1) in (2, 3) and batch.pop(1) is None and len(batch) == 2


def test_instability_detector():
    cfg = Instability(warmup_steps=2, reward_drop=0.5, reward_window=2, recover_window=3, kl_max=1.0)

    def run(rewards, kls=None, losses=None):
        det = InstabilityDetector(cfg)
        n = len(rewards)
        for i in range(n):
            det.update(i, rewards[i], (kls or [0.0] * n)[i], (losses or [0.0] * n)[i])
        return det.step

    # 2-step averages: 0.3, 0.55, 0.4, 0.2, 0.2, 0.2 from step 1: below half of 0.55 from step 4 on
    assert run([0.1, 0.5, 0.6, 0.2, 0.2, 0.2, 0.2, 0.2]) == 4
    assert run([0.1, 0.5, 0.6, 0.2, 0.2, 0.6, 0.7]) is None            # fell, recovered within the window
    assert run([0.5] * 6, kls=[0, 0, 0, 2.0, 0, 0]) == 3
    assert run([0.5] * 6, kls=[2.0, 0, 0, 0, 0, 0]) is None             # during warm-up: not a collapse
    assert run([0.5] * 4, losses=[0, math.nan, 0, 0]) == 1              # a non-finite loss always counts


def test_weight_channel_versions_and_slots():
    ctx = mp.get_context("spawn")
    torch.manual_seed(0)
    src, dst = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    chan = SharedMemoryChannel(src, ctx, n_slots=2)
    assert chan.latest_version() == -1
    assert chan.publish(src, 0) >= 0
    with torch.no_grad():
        src.weight.add_(1.0)
    chan.publish(src, 1)
    assert chan.load_into(dst, 0)[0] == 0 and not torch.equal(dst.weight, src.weight)
    assert chan.load_into(dst)[0] == 1 and torch.equal(dst.weight, src.weight) and torch.equal(dst.bias, src.bias)
    chan.publish(src, 2)  # overwrites slot 0 (version 0)
    with pytest.raises(StaleVersionError):
        chan.load_into(dst, 0)


def test_learner_wakes_every_waiting_worker_when_it_publishes_or_takes_groups():
    """Blocked workers sleep on their wake semaphore (no polling beside the learner): every change the learner
    makes that can unblock one must release every worker's."""
    from real.learner import GroupRecord, Learner
    from real.model import build_policy
    from real.worker import Ledger

    ctx = mp.get_context("spawn")
    model, tok = build_policy(EXAMPLE)
    ledger = Ledger(ctx, 4, 2)
    learner = Learner(EXAMPLE, model, tok, SharedMemoryChannel(model, ctx), ledger, None, check_workers=lambda: None,
                      deadline=math.inf)
    assert not any(w.acquire(False) for w in ledger.wake)
    learner.publish()  # new weights
    assert all(w.acquire(False) for w in ledger.wake)
    ledger.unconsumed[0], ledger.buffered.value = 1, 1
    learner._retire([GroupRecord(0, 0, 12, 0.0, 0)], step=0, dropped=False)  # a group taken: room in gate and buffer
    assert ledger.buffered.value == 0 and ledger.unconsumed[0] == 0
    learner.publish()
    ledger.drain_wake(0)  # worker 0 is about to look: both wake-ups are spent, worker 1 keeps its own
    assert not ledger.wake[0].acquire(False) and ledger.wake[1].acquire(False) and ledger.wake[1].acquire(False)


# --------------------------------------------------------------------------- end to end
# What these assert holds for every schedule of the processes: the sync run's learning (one worker, sync mode: batch
# j is generated with version j by the one worker, so the run is the same however the OS schedules it: two runs of it
# give identical metrics, see test_sync_run_is_reproducible), and the async run's bounds and accounting.
@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
    """The example as shipped (warm start, then GRPO) in sync mode, through the CLI as a user runs it; the outputs
    are read back from disk."""
    from sim.cli import main

    out = tmp_path_factory.mktemp("sync") / "run"
    assert main(["train", str(TINY), "--mode", "sync", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def async_run(tmp_path_factory):
    from real.trainer import Trainer

    """The example in async mode with gating, shortened: bounds and accounting do not need the full run."""
    cfg = load_config(TINY, {"pipeline.mode": "async", "pipeline.staleness_control": "oldest_unconsumed", "run.steps": 30,
                             "real.warm_start_steps": 5})
    return Trainer(cfg, tmp_path_factory.mktemp("async") / "run", timeout_s=600).run()


def _accounted(trace, summary):
    acc = summary["accounting"]
    n_groups = trace.samples["group_id"].nunique()
    assert acc["complete"] and acc["admitted_groups"] == n_groups
    assert acc["consumed"] + acc["dropped"] + acc["waiting"] + acc["in_flight"] == n_groups
    assert sorted(trace.samples["group_id"].unique()) == list(range(n_groups))  # every admitted group


def _metrics_lines(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_sync_run_is_on_policy_and_complete(sync_run):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint/config.json", "trace/header.json"):
        assert (sync_run / name).is_file(), name
    trace = read_trace(sync_run / "trace")
    summary = json.loads((sync_run / "summary.json").read_text())
    steps = EXAMPLE.run.steps
    assert trace.header["source"] == "real" and len(trace.steps) == steps and summary["status"] == "complete"
    stale = sample_staleness(trace.samples)
    assert len(stale) == steps * BATCH and (stale == 0).all()
    _accounted(trace, summary)
    metrics = compute_metrics(trace)
    assert metrics["staleness/max"] == 0 and metrics["ess/token"] == pytest.approx(1.0)
    lines = _metrics_lines(sync_run)
    assert len(lines) == steps and lines[-1]["staleness/hist"] == {"0": BATCH}
    assert {"by_staleness/0/grad_norm", "time/weight_sync_s", "time/queue_wait_s", "kl/k3"} <= set(lines[-1])
    used = trace.samples[trace.samples["learner_step"] >= 0]
    assert used["reward"].between(0, 1).all() and (used["t_end"] <= used["t_consumed"]).all()


def test_sync_run_learns(sync_run):
    """Mean reward over the last fifth of steps clearly above the first fifth: by 0.05 (on a 0-1 scale) and by
    three standard errors of the difference (step rewards are noisy: 16 prompts a step, of 1-4 digits). Sync mode
    with one worker is deterministic, so this passes or fails the same way on a busy machine."""
    reward = np.array([m["reward/mean"] for m in _metrics_lines(sync_run)])
    fifth = len(reward) // 5
    first, last = reward[:fifth], reward[-fifth:]
    rise = last.mean() - first.mean()
    stderr = math.sqrt(first.var(ddof=1) / fifth + last.var(ddof=1) / fifth)
    assert rise > max(0.05, 3 * stderr), (first.mean(), last.mean(), stderr)


def test_sync_run_is_reproducible(sync_run, tmp_path):
    """The same config and seed again, its first steps: identical numbers (what makes the learning test above
    independent of the machine's load)."""
    from sim.cli import main

    steps = 6
    assert main(["train", str(TINY), "--mode", "sync", "--steps", str(steps), "--out", str(tmp_path / "again")]) == 0
    keys = ("reward/mean", "grad_norm", "loss", "kl/k3", "update_norm")
    again = _metrics_lines(tmp_path / "again")
    assert [[m[k] for k in keys] for m in again] == [[m[k] for k in keys] for m in _metrics_lines(sync_run)[:steps]]


def test_fixed_lag_runs_are_identical_and_exactly_as_stale_as_the_lag(tmp_path):
    """fixed_lag: batch j is generated with version j - S, so every batch after the first S is S versions stale and
    the run is the same however its processes are scheduled: two runs with one seed give identical numbers."""
    from sim.cli import main

    S, steps = 3, 7
    runs = []
    for name in ("a", "b"):
        args = ["train", str(TINY), "--mode", "fixed_lag", "--steps", str(steps), "--set", f"pipeline.max_staleness={S}",
                "--set", "real.warm_start_steps=0", "--out", str(tmp_path / name)]
        assert main(args) == 0
        runs.append(_metrics_lines(tmp_path / name))
    for j, m in enumerate(runs[0]):
        assert m["staleness/hist"] == {str(min(j, S)): BATCH}
    keys = ("reward/mean", "grad_norm", "loss", "kl/k1", "kl/k3", "update_norm", "ess/seq")
    assert [[m[k] for k in keys] for m in runs[0]] == [[m[k] for k in keys] for m in runs[1]]


def test_async_run_is_stale_within_the_bound(async_run):
    trace, summary = async_run.trace, async_run.summary
    S = 2
    stale = sample_staleness(trace.samples)
    assert len(stale) == 30 * BATCH and stale.min() >= 0 and stale.max() <= S
    _accounted(trace, summary)
    metrics = compute_metrics(trace)  # the same function reports simulated and real traces
    assert metrics["staleness/max"] <= S and metrics["dropped/groups"] == 0
    for m in async_run.step_metrics:  # per staleness range: the samples of each range, counted and measured
        assert m["staleness/max"] <= S and sum(m["staleness/hist"].values()) == BATCH
        for s, n in m["staleness/hist"].items():
            assert m[f"by_staleness/{s}/n_samples"] == n and math.isfinite(m[f"by_staleness/{s}/grad_norm"])


def test_train_config_errors_exit_2(tmp_path, capsys):
    from sim.cli import main

    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert main(["train", str(TINY), "--set", "pipeline.max_staleness=-1"]) == 2


def test_train_says_which_routing_its_workers_run():
    """stalecast train's workers take groups first come, first served (fill_first): a config naming another router
    is told so; one worker, or fill_first, needs no note."""
    from real.cli import router_note

    two = EXAMPLE.with_overrides({"cluster.rollout_workers": 2})
    assert "first come, first served" in router_note(two) and "least_loaded applies to simulations only" in \
        router_note(two)
    assert router_note(two.with_overrides({"cluster.router": "fill_first"})) is None
    assert router_note(EXAMPLE) is None


def test_continuous_batching_refills_a_worker_between_decode_steps(tmp_path):
    """Continuous batching for real (examples/tiny_cpu_longtail.yaml untrained, so answers run to geometric lengths;
    one worker, sync mode: the same run however the processes are scheduled): groups join the worker while earlier
    groups are still generating, and the run is on-policy and fully accounted for."""
    from real.trainer import Trainer

    cfg = load_config(ROOT / "examples" / "tiny_cpu_longtail.yaml",
                      {"pipeline.mode": "sync", "cluster.rollout_workers": 1, "run.steps": 3,
                       "real.warm_start_steps": 0})
    result = Trainer(cfg, tmp_path / "run", timeout_s=600).run()
    trace = result.trace
    batch = cfg.workload.batch_prompts * cfg.workload.group_size
    stale = sample_staleness(trace.samples)
    assert (stale == 0).all() and len(stale) == 3 * batch
    _accounted(trace, result.summary)
    used = trace.samples[trace.samples["learner_step"] >= 0]
    groups = used.groupby("group_id").agg(start=("t_start", "first"), end=("t_end", "max"))
    joined = [(a, b) for a in groups.index for b in groups.index
              if groups.start[a] < groups.start[b] < groups.end[a]]
    assert joined, "no group joined while another was generating"
    assert cfg.cluster.max_concurrency < batch  # a batch does not fit the slots at once: refills are needed

    # The worker timed every engine step: a finished sample took one token in each step from the one after its
    # admission to the one that ended it, and each step advanced as many sequences as the trace has in flight.
    steps = RunFolder(tmp_path / "run").read_engine_steps()
    assert len(steps) and (steps["worker_id"] == 0).all() and (steps["segment"] == 0).all()
    assert (steps["seconds"] > 0).all() and (steps["active"] > 0).all()
    t = steps["t_start"].to_numpy()
    assert (np.diff(t) > 0).all()
    done = trace.samples.dropna(subset=["t_end"])
    taken = np.searchsorted(t, done["t_end"], side="right") - np.searchsorted(t, done["t_start"], side="left")
    assert (taken == done["response_len"].to_numpy()).all()
    admitted = trace.samples["t_start"].fillna(trace.samples["t_admit"])  # still generating: admitted only
    ended = trace.samples["t_end"].fillna(np.inf)
    assert [((admitted <= tj) & (ended >= tj)).sum() for tj in t] == steps["active"].tolist()


def test_admission_by_sample_fills_every_slot_while_a_batch_waits(tmp_path):
    """cluster.admission per_sample for real (the long-tail example untrained, so answers run to geometric lengths,
    one worker with 30 slots for groups of 4, sync mode: the same run however the processes are scheduled): a group
    is admitted with one free slot and its other samples start in later steps, so every decode step from a batch's
    first start to its last is full; each sample still takes one token a step, and the run is accounted for."""
    from real.trainer import Trainer

    cfg = load_config(ROOT / "examples" / "tiny_cpu_longtail.yaml",
                      {"pipeline.mode": "sync", "cluster.rollout_workers": 1, "run.steps": 2,
                       "cluster.admission": "per_sample", "cluster.max_concurrency": 30, "real.warm_start_steps": 0})
    result = Trainer(cfg, tmp_path / "run", timeout_s=600).run()
    trace, G, slots = result.trace, cfg.workload.group_size, cfg.cluster.max_concurrency
    assert slots % G and (sample_staleness(trace.samples) == 0).all()
    _accounted(trace, result.summary)
    steps = RunFolder(tmp_path / "run").read_engine_steps()
    t, active = steps["t_start"].to_numpy(), steps["active"].to_numpy()
    done = trace.samples.dropna(subset=["t_end"])
    last = np.searchsorted(t, done["t_end"], side="right") - 1
    first = last - done["response_len"].to_numpy() + 1      # one token a step, the first in the prefill step
    assert (first >= np.searchsorted(t, done["t_start"], side="left")).all()  # not before its group's start
    # each step advanced exactly the finished samples from their first step to their last, up to the first step of
    # a group still unfinished when the run stopped
    in_flight = np.zeros(len(t) + 1, int)
    np.add.at(in_flight, first, 1)
    np.add.at(in_flight, last + 1, -1)
    unfinished = trace.samples[trace.samples["t_end"].isna()]
    cut = int(np.searchsorted(t, unfinished["t_start"].fillna(unfinished["t_admit"]).min(), side="left"))
    assert cut > len(t) // 2 and (np.cumsum(in_flight)[:cut] == active[:cut]).all()
    staggered = 0
    for step in range(cfg.run.steps):
        batch = done[done["learner_step"] == step]
        starts = first[(done["learner_step"] == step).to_numpy()]
        assert (active[starts.min():starts.max()] == slots).all(), step  # full until its last sample started
        staggered += int((batch.assign(first=starts).groupby("group_id")["first"].nunique() > 1).sum())
    assert staggered > 0, "no group's samples started at different steps"
