"""Studies: the sweep engine (tables, resume, Ray), the fast run path, the named studies from the command
line, and the planner checked against exhaustive simulation. Small analytic configs keep it quick."""

import copy
import json
import math

import pandas as pd
import pytest
import yaml

from sim.cli import main
from sim.config import ConfigError, parse_config
from sim.engine.pipeline import Simulation
from sim.metrics import compute_metrics
from studies import runner
from studies.sweep import Backend, Sweep, grid, replication_seeds, run_sweep, write_tables

# A 0.5B policy on H100s with short responses: the split matters (analytic costs) and runs take milliseconds.
SMALL = {
    "name": "small-study",
    "workload": {"batch_prompts": 4, "group_size": 2, "prompt_len": {"kind": "constant", "value": 16},
                 "response_len": {"kind": "lognormal", "median": 32, "p99": 256}, "max_new_tokens": 256},
    "cluster": {"rollout_workers": 2, "max_concurrency": 8, "learner_gpus": 2},
    "pipeline": {"mode": "async", "max_staleness": 1},
    "hardware": {"gpu": "H100-SXM", "model": "qwen2.5-0.5b"},
    "run": {"steps": 8},
}


def small(**overrides):
    return parse_config(copy.deepcopy(SMALL)).with_overrides(overrides)


@pytest.fixture
def small_yaml(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


def same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-12,
                                                                                          abs_tol=1e-12))


# --------------------------------------------------------------------------- the fast run path
@pytest.mark.parametrize("overrides", [
    {}, {"pipeline.interruptible": True}, {"pipeline.mode": "sync"},
    {"pipeline.staleness_control": "drop", "pipeline.max_staleness": 0, "cluster.rollout_workers": 4},
], ids=["oldest_unconsumed", "interruptible", "sync", "drop"])
def test_run_metrics_equal_compute_metrics(overrides):
    cfg = small(**overrides, **{"run.steps": 12})
    expected = compute_metrics(Simulation(cfg).run())
    got = runner.run_config(cfg)["metrics"]
    assert got.keys() == expected.keys()
    assert all(same(got[k], expected[k]) for k in expected), {k: (got[k], expected[k]) for k in expected}


def test_runs_sharing_a_cached_workload_equal_fresh_runs():
    # A process keeps the streams it drew, by seed and workload: a run that extends one another run started
    # (past one stream block of groups) gives what it gives on a fresh stream.
    runner._STREAMS.clear()
    runner.run_config(small(**{"cluster.rollout_workers": 4, "run.steps": 12}))
    shared = runner.run_config(small(**{"run.steps": 1100}))
    runner._STREAMS.clear()
    fresh = runner.run_config(small(**{"run.steps": 1100}))
    assert shared["metrics"] == fresh["metrics"]


def test_a_run_whose_bound_never_acted_stands_for_larger_bounds():
    # One worker decoding one group at a time feeds a fast learner: a bound of 4 never acts.
    slow_generation = {"cluster.rollout_workers": 1, "cluster.max_concurrency": 2, "cluster.learner_gpus": 8}
    loose = runner.run_config(small(**slow_generation, **{"pipeline.max_staleness": 4}))
    assert loose["bound_free"]
    looser = runner.run_config(small(**slow_generation, **{"pipeline.max_staleness": 50}))
    assert loose["metrics"] == looser["metrics"]
    tight = runner.run_config(small(**slow_generation, **{"pipeline.max_staleness": 1}))
    assert not tight["bound_free"] and tight["metrics"] != loose["metrics"]


# --------------------------------------------------------------------------- the sweep engine
@pytest.fixture
def counted(monkeypatch):
    """Counts simulations (in-process backend); `fail_after` makes the n+1-th call raise like a Ctrl-C."""
    calls = {"n": 0, "sync": 0, "fail_after": None}
    real = runner.run_config

    def run(cfg):
        if calls["fail_after"] is not None and calls["n"] >= calls["fail_after"]:
            raise KeyboardInterrupt
        calls["n"] += 1
        calls["sync"] += cfg.pipeline.mode == "sync"
        return real(cfg)

    monkeypatch.setattr(runner, "run_config", run)
    return calls


def test_sweep_table_one_row_per_run_and_replication(tmp_path, counted):
    sweep = Sweep(small(), grid({"cluster.rollout_workers": [1, 3], "pipeline.max_staleness": [1, 2]}), reps=2)
    with Backend(jobs=1) as backend:
        result = run_sweep(sweep, tmp_path, backend)
    table = result.table
    assert len(table) == 8 and (table["status"] == "ok").all()
    assert list(table["seed"].unique()) == replication_seeds(0, 2)
    assert {"cluster.rollout_workers", "pipeline.max_staleness", "replication", "staleness/p99", "idle/rollout",
            "speedup/vs_sync", "time/wall_s", "compute_s"} <= set(table.columns)
    assert table["speedup/vs_sync"].notna().all()
    # One sync baseline per (split, seed), shared by both bounds, and shorter than the runs.
    assert counted["sync"] == 4
    assert (table["sync/step_s"] > 0).all()
    agg = result.aggregate
    row = agg[(agg["metric"] == "throughput/samples_per_s") & (agg["cluster.rollout_workers"] == 3)
              & (agg["pipeline.max_staleness"] == 2)].iloc[0]
    values = table[(table["cluster.rollout_workers"] == 3) & (table["pipeline.max_staleness"] == 2)][
        "throughput/samples_per_s"]
    assert row["n"] == 2 and row["mean"] == pytest.approx(values.mean())
    assert row["ci95_low"] < row["mean"] < row["ci95_high"]
    paths = write_tables(result, tmp_path)
    assert pd.read_parquet(tmp_path / "table.parquet").shape == table.shape
    assert all(p.exists() for p in paths)


def test_finished_sweep_does_no_work_and_killed_sweep_finishes_the_rest(tmp_path, counted):
    sweep = Sweep(small(), [{"cluster.rollout_workers": r} for r in (1, 2, 3, 4)], reps=2, sync_baseline=False)
    counted["fail_after"] = 3
    with Backend(jobs=1) as backend, pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, tmp_path, backend)
    assert len(list((tmp_path / "runs").glob("*.json"))) == 3

    counted["fail_after"] = None
    with Backend(jobs=1) as backend:
        first = run_sweep(sweep, tmp_path, backend)
    assert counted["n"] == 8 and first.simulated == 5 and first.cached == 3

    with Backend(jobs=1) as backend:
        again = run_sweep(sweep, tmp_path, backend)
    assert counted["n"] == 8 and again.simulated == 0 and again.cached == 8
    pd.testing.assert_frame_equal(first.table, again.table)


def test_infeasible_runs_are_failed_rows_with_a_reason(tmp_path, monkeypatch):
    run_to_end = Simulation.run_to_end

    def stall_three_workers(self):
        if self.cfg.cluster.rollout_workers == 3:
            raise RuntimeError("the pipeline stalled at t=1.000 s after 2 learner steps")
        return run_to_end(self)

    monkeypatch.setattr(Simulation, "run_to_end", stall_three_workers)
    points = [{"cluster.rollout_workers": 2}, {"cluster.rollout_workers": 3}, {"cluster.max_concurrency": 1}]
    with Backend(jobs=1) as backend:
        result = run_sweep(Sweep(small(), points, reps=1), tmp_path, backend)
    status = result.table["status"].tolist()
    errors = result.table["error"].tolist()
    assert status == ["ok", "failed", "failed"]
    assert "stalled" in errors[1]
    assert "max_concurrency" in errors[2] and "group_size" in errors[2]
    assert set(result.aggregate["cluster.rollout_workers"].dropna()) == {2}
    write_tables(result, tmp_path)  # failed rows (missing metrics) still make valid Parquet


def test_ray_backend_gives_the_same_table(tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'ray>=2.9')")
    sweep = Sweep(small(), grid({"cluster.rollout_workers": [1, 3], "pipeline.max_staleness": [1, 4]}), reps=2)
    with Backend(jobs=1) as backend:
        local = run_sweep(sweep, tmp_path / "local", backend)
    with Backend(jobs=2, ray="local") as backend:
        assert backend.name.startswith("ray")
        remote = run_sweep(sweep, tmp_path / "ray", backend)
    assert remote.simulated + remote.reused == local.simulated + local.reused
    assert len(list((tmp_path / "ray" / "runs").glob("*.json"))) == remote.simulated + remote.reused
    drop = ["compute_s"]
    pd.testing.assert_frame_equal(local.table.drop(columns=drop), remote.table.drop(columns=drop))


@pytest.mark.parametrize("policy, knob", [("oldest_unconsumed", None), ("areal", "max_head_offpolicyness"),
                                          ("prime_rl", "max_async_level")])
def test_bound_and_ratio_studies_vary_the_bound_where_the_policy_keeps_it(policy, knob):
    """areal and prime_rl ignore pipeline.max_staleness: a study that varied only it would draw one curve per S
    that are all the same run. The bound goes into the policy's own knob, and the runs at two bounds differ."""
    from studies.named import BoundStudy, RatioStudy
    cfg = small(**{"pipeline.staleness_control": policy, "cluster.learner_gpus": 2})
    _, points, _ = BoundStudy(bounds=[0, 4]).grid(cfg)
    _, ratio_points, _ = RatioStudy(bounds=[0, 4], rollout_workers=[2]).grid(cfg)
    for bound, point in zip([0, 4], points):
        assert point["pipeline.max_staleness"] == bound  # the tables' column either way
        if knob is not None:
            assert point[f"pipeline.{policy}"][knob] == bound
        assert {k: v for k, v in ratio_points[[0, 4].index(bound)].items() if not k.startswith("cluster.")} == point
    runs = [runner.run_config(cfg.with_overrides({**point, "run.steps": 12}))["metrics"] for point in points]
    assert runs[0]["staleness/mean"] < runs[1]["staleness/mean"]
    for bad, why in (({"pipeline.staleness_control": "none"}, "none has no staleness bound"),
                     ({"pipeline.mode": "sync"}, "only async mode has")):
        with pytest.raises(ConfigError, match=why):
            BoundStudy(bounds=[1]).grid(small(**bad))
        with pytest.raises(ConfigError, match=why):
            RatioStudy(bounds=[1]).grid(small(**bad))


# --------------------------------------------------------------------------- named studies, from the command line
STUDY_RUNS = [
    ("ratio", ["--bounds", "1,4", "--jobs", "2"], "ratio", 3 * 2),
    ("bound", ["--bounds", "0,2,8"], "bound", 3),
    ("tail", ["--tail-ratios", "2,8"], "tail", 2 * 2),
    ("sync-vs-async", ["--models", "qwen2.5-0.5b,qwen2.5-1.5b", "--scales", "0.5,1"], "sync_vs_async", 2 * 2),
    ("policies", ["--bounds", "1,2"], "policies", 8 * 2),
]


@pytest.mark.parametrize("name,options,figure,points", STUDY_RUNS, ids=[s[0] for s in STUDY_RUNS])
def test_named_study_writes_its_outputs(tmp_path, small_yaml, name, options, figure, points):
    out = tmp_path / "out"
    jobs = [] if "--jobs" in options else ["--jobs", "1"]
    assert main(["study", name, str(small_yaml), "--out", str(out), "--steps", "6", "--reps", "2",
                 *options, *jobs]) == 0
    for file in ("table.parquet", "table.csv", "table_aggregate.parquet", "table_aggregate.csv",
                 f"{figure}.png", f"{figure}.svg", "summary.md"):
        assert (out / file).stat().st_size > 0, file
    table = pd.read_csv(out / "table.csv")
    assert len(table) == points * 2 and (table["status"] == "ok").all()
    summary = (out / "summary.md").read_text()
    assert summary.startswith(f"# {name} study") and "|" in summary


def test_study_rejects_a_config_it_cannot_vary(tmp_path, capsys):
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "pipeline": {"mode": "sync"}}))
    assert main(["study", "tail", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "interruptible" in capsys.readouterr().err


# --------------------------------------------------------------------------- the planner against brute force
def brute_force_best(tmp_path, budget: int, bounds: list[int], steps: int, max_mean: float):
    """Every split and bound simulated with the planner's steps and seed; the best feasible one."""
    points = [{"cluster.rollout_workers": r, "cluster.learner_gpus": budget - r, "cluster.max_concurrency": 8,
               "cluster.gpus_per_worker": 1, "pipeline.max_staleness": s}
              for r in range(1, budget) for s in bounds]
    with Backend(jobs=1) as backend:
        table = run_sweep(Sweep(small(), points, steps=steps, sync_baseline=False), tmp_path, backend).table
    ok = table[(table["status"] == "ok") & (table["staleness/mean"] <= max_mean)]
    ranked = ok.sort_values(["throughput/samples_per_s", "staleness/mean", "pipeline.max_staleness",
                             "cluster.rollout_workers"], ascending=[False, True, True, True])
    best = ranked.iloc[0]
    return int(best["cluster.rollout_workers"]), int(best["pipeline.max_staleness"])


@pytest.mark.parametrize("budget,coarse", [(6, 8), (16, 3)], ids=["exhaustive-coarse", "pruned"])
def test_plan_recommends_the_best_feasible_split(tmp_path, small_yaml, capsys, budget, coarse):
    out = tmp_path / "plan"
    assert main(["plan", str(small_yaml), "--gpus", str(budget), "--bounds", "1,2,4", "--steps", "10",
                 "--max-mean-staleness", "1.5", "--coarse", str(coarse), "--jobs", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Recommended:" in printed
    for file in ("plan.parquet", "plan.csv", "pareto.png", "pareto.svg", "plan.md"):
        assert (out / file).exists(), file
    plan = pd.read_csv(out / "plan.csv")
    top = plan[plan["rank"] == 1].iloc[0]
    assert top["feasible"] and top["staleness/mean"] <= 1.5
    assert pd.notna(top["speedup/vs_sync"])
    assert plan["pareto"].any()
    if coarse < budget - 1:
        assert len(plan) < 3 * (budget - 1)  # the search skipped splits
    expected = brute_force_best(tmp_path / "brute", budget, [1, 2, 4], 10, 1.5)
    assert (int(top["rollout_workers"]), int(top["bound"])) == expected


def test_policies_study_runs_every_policy_at_its_matched_knob(tmp_path, small_yaml):
    """Each policy's own knob carries the bound, every run has its sync baseline (the baseline forgets the policy),
    and the policies whose bound is on admissions only show their guarantee or its absence: oldest_unconsumed and
    drop never consume a group staler than S."""
    from sim.engine.policies import POLICIES

    out = tmp_path / "out"
    assert main(["study", "policies", str(small_yaml), "--out", str(out), "--steps", "10", "--reps", "1",
                 "--bounds", "1", "--jobs", "1"]) == 0
    table = pd.read_csv(out / "table.csv")
    assert sorted(table["policy"]) == sorted(POLICIES) and (table["status"] == "ok").all()
    assert table["speedup/vs_sync"].notna().all() and (table["idle/rollout"] >= 0).all()
    by = table.set_index("policy")
    assert by.loc["oldest_unconsumed", "staleness/max"] <= 1 and by.loc["drop", "staleness/max"] <= 1
    assert json.loads(by.loc["areal", "pipeline.areal"]) == {"max_head_offpolicyness": 1}
