"""validate/: distances between staleness distributions, the comparison rows, and the --trace command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sim.cli import main
from sim.engine.pipeline import simulate
from validate.compare import Tolerances, compare, ks_distance, wasserstein1


def test_distances_on_hand_computed_cases():
    a = np.array([0, 0, 1, 1])
    b = np.array([1, 1, 2, 2])
    # CDFs: a = [.5, 1, 1], b = [0, .5, 1] -> |diff| = [.5, .5, 0]
    assert wasserstein1(a, b) == pytest.approx(1.0)   # a shifted by one version
    assert ks_distance(a, b) == pytest.approx(0.5)
    assert wasserstein1(a, a) == 0 and ks_distance(a, a) == 0


def test_compare_judges_each_metric_by_its_tolerance(config_data):
    from sim.config import parse_config
    cfg = parse_config(config_data)
    base = simulate(cfg)
    rows = {r.metric: r for r in compare(base, base)}
    assert all(r.ok is not False for r in rows.values())
    assert rows["staleness/mean"].error == 0 and rows["staleness/wasserstein1"].error == 0

    # A measurement whose learner was twice as slow: rates off by 50 %, which fails a 10 % tolerance.
    slow = simulate(cfg)
    for col in ("t_start", "t_end"):
        slow.steps[col] *= 2
    slow.steps["weight_sync_s"] *= 2
    rows = {r.metric: r for r in compare(base, slow, Tolerances(rel=0.10))}
    assert rows["throughput/samples_per_s"].rel_error == pytest.approx(1.0)
    assert rows["throughput/samples_per_s"].ok is False
    assert rows["time/step_s"].rel_error == pytest.approx(-0.5)
    assert rows["staleness/mean"].ok is True  # the versions did not change


def test_validate_command_against_an_external_samples_file(tmp_path, config_data):
    import yaml
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config_data))
    assert main(["simulate", str(cfg_path), "--no-sync-baseline", "--out", str(tmp_path / "sim")]) == 0
    samples = tmp_path / "sim" / "trace" / "samples.parquet"
    out = tmp_path / "report"
    assert main(["validate", str(cfg_path), "--trace", str(samples), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pass"] is True
    assert {r["metric"] for r in report["rows"]} >= {"staleness/mean", "staleness/p90", "throughput/samples_per_s",
                                                    "staleness/wasserstein1", "staleness/ks"}
    for name in ("report.md", "staleness.png", "throughput.png", "timeline.png"):
        assert (out / name).is_file()

    # A different staleness bound predicts a different distribution: the command fails (exit 1).
    config_data["pipeline"] = {"mode": "sync"}
    cfg_path.write_text(yaml.safe_dump(config_data))
    assert main(["validate", str(cfg_path), "--trace", str(samples), "--out", str(out)]) == 1


def test_in_run_cost_ratios_are_one_on_the_simulators_own_trace(config_data):
    """The diagnostic charges a learner step and a static batch as the simulator does: on a simulated trace
    (analytic costs that depend on batch size and context) every step and every batch comes out at x1."""
    from sim.config import parse_config
    from sim.hardware.cost import cost_model_for
    from validate.costs import cost_ratios, generation_ratios, learner_ratios

    config_data["hardware"] = {"gpu": "H100-SXM", "model": "tiny", "train_tokens": "padded"}
    config_data["cluster"].update(batching="static", colocated=False)
    config_data["workload"]["prompt_len"] = {"kind": "exponential", "mean": 6}
    config_data["run"]["steps"] = 8
    cfg = parse_config(config_data)
    trace, cost = simulate(cfg), cost_model_for(cfg)
    assert np.allclose(learner_ratios(trace, cost), 1.0) and len(learner_ratios(trace, cost)) == 8
    gen = generation_ratios(trace, cost)
    assert len(gen) >= 8 and np.allclose(gen, 1.0)
    ratios = cost_ratios(trace, cost)
    assert ratios["learner_step"] == pytest.approx(1.0) and ratios["generation_batch"] == pytest.approx(1.0)
    assert ratios["learner_step_mean"] == pytest.approx(1.0)

    # A run whose learner took 30 % longer per step shows as x1.3 on the learner only.
    slow = simulate(cfg)
    slow.steps["t_end"] = slow.steps["t_start"] + 1.3 * (slow.steps["t_end"] - slow.steps["t_start"])
    assert np.allclose(learner_ratios(slow, cost), 1.3)
    # ... and one step of the eight at x3 moves the mean (x1.25), not the median: what a ratio of medians hides.
    tail = simulate(cfg)
    tail.steps.loc[0, "t_end"] = tail.steps.loc[0, "t_start"] + 3 * (tail.steps.loc[0, "t_end"]
                                                                      - tail.steps.loc[0, "t_start"])
    ratios = cost_ratios(tail, cost)
    assert ratios["learner_step"] == pytest.approx(1.0) and ratios["learner_step_mean"] == pytest.approx(1 + 2 / 8)


def test_decode_step_ratios_charge_each_timed_step_at_its_sequences_and_context(config_data):
    """A worker's engine steps built by hand: samples A (prompt 5, 4 tokens) and B (prompt 9, 2 tokens) admitted
    before step 0, C (prompt 6, 3 tokens) after B ended, before step 2. Steps 0 and 2 prefill; steps 1 (A, B: 2
    sequences, context 6 + 10), 3 (A, C: 8 + 7) and 4 (C: 8) only decode. Each step takes 1.25x the simulator's
    decode step (the prefills 0.01 s more), with 2 ms between steps and 1 ms from an admission to its step: the
    three decode steps come out at x1.25, and the time outside steps is the gaps' share of the busy period."""
    from sim.config import parse_config
    from sim.hardware.cost import cost_model_for
    from sim.trace import Trace
    from validate.costs import cost_ratios, decode_step_ratios

    config_data["hardware"] = {"gpu": "H100-SXM", "model": "tiny"}
    cost = cost_model_for(parse_config(config_data))
    samples = {"A": (0, 5, 4), "B": (0, 9, 2), "C": (2, 6, 3)}  # first step, prompt, tokens
    gap, lead = 0.002, 0.001
    t, seconds, active, start, end = [], [], [], {}, {}
    now = lead
    for j in range(5):
        on = {k: v for k, v in samples.items() if v[0] <= j < v[0] + v[2]}
        context = sum(prompt + j - first for first, prompt, _ in on.values())
        t.append(now)
        seconds.append(1.25 * cost.decode_step_s(len(on), context) + (0.01 if j in (0, 2) else 0.0))
        active.append(len(on))
        for k, (first, _, tokens) in on.items():
            start.setdefault(k, now - lead)
            if j == first + tokens - 1:
                end[k] = now + seconds[-1]
        now += seconds[-1] + gap
    rows = [{"group_id": i, "sample_id": i, "worker_id": 0, "prompt_len": samples[k][1],
             "response_len": samples[k][2], "t_start": start[k], "t_admit": start[k], "t_end": end[k],
             "learner_step": -1}
            for i, k in enumerate("ABC")]
    trace = Trace(pd.DataFrame(rows), pd.DataFrame({"step": [0], "t_start": [0.0], "t_end": [now],
                                                    "weight_sync_s": [0.0]}), {"rollout_workers": 1})
    log = pd.DataFrame({"worker_id": 0, "segment": 0, "t_start": t, "seconds": seconds, "active": active})
    assert start["C"] > end["B"]  # C took B's slot
    timed, outside = decode_step_ratios(trace, log, cost)
    np.testing.assert_allclose(timed["ratio"], [1.25, 1.25, 1.25])
    assert timed["active"].tolist() == [2, 2, 1] and timed["t_start"].tolist() == [t[1], t[3], t[4]]
    busy = end["C"] - start["A"]
    assert outside == pytest.approx((busy - sum(seconds)) / busy)

    # The run ending halfway through step 3: only engine time before the end counts against the busy time.
    until = t[3] + seconds[3] / 2
    ended = Trace(trace.samples, trace.steps.assign(t_end=until), trace.header)
    inside = sum(seconds[:3]) + seconds[3] / 2
    assert decode_step_ratios(ended, log, cost)[1] == pytest.approx((until - start["A"] - inside) / (until - start["A"]))

    # C still generating when the run ended counts to the last step; a step whose logged count the trace does not
    # account for is left out; static batching has no decode steps to charge.
    trace.samples.loc[2, "t_end"] = np.nan
    np.testing.assert_allclose(decode_step_ratios(trace, log, cost)[0]["ratio"], [1.25, 1.25, 1.25])
    log.loc[4, "active"] = 2
    assert len(decode_step_ratios(trace, log, cost)[0]) == 2
    ratios = cost_ratios(trace, cost, static=False, runs=[(trace, log), (trace, None)])
    assert ratios["decode_step"] == pytest.approx(1.25) and ratios["decode_steps"] == 2
    assert np.isnan(ratios["decode_step_full"]) and np.isnan(ratios["decode_step_few"])  # no slots given

    # By occupancy, against a worker's slots (step 4 restored, and twice as slow): steps 1 and 3 advanced 2
    # sequences, all of 2 slots, and step 4 one, more than a quarter of them; of 4 slots, step 4 is a quarter and no
    # step is full.
    log.loc[4, "active"] = 1
    log.loc[4, "seconds"] *= 2.0
    full = cost_ratios(trace, cost, static=False, runs=[(trace, log)], slots=2)
    assert full["decode_step_full"] == pytest.approx(1.25) and np.isnan(full["decode_step_few"])
    few = cost_ratios(trace, cost, static=False, runs=[(trace, log)], slots=4)
    assert few["decode_step_few"] == pytest.approx(2.5) and np.isnan(few["decode_step_full"])
    assert np.isnan(cost_ratios(trace, cost, static=True, runs=[(trace, log)])["decode_step"])


def test_runs_laid_end_to_end_pool_samples_and_time(config_data):
    """Two runs end to end: rates are all samples over all time, every sample keeps its staleness, and the second
    run's steps, versions, groups and times follow the first's (in-flight samples stay in flight)."""
    from sim.config import parse_config
    from sim.metrics import compute_metrics, run_wall_s, sample_staleness
    from validate.loop import end_to_end

    config_data["run"]["steps"] = 6
    a = simulate(parse_config(config_data))
    config_data["seed"] = 7
    config_data["run"]["steps"] = 4
    b = simulate(parse_config(config_data))
    both = end_to_end([a, b])
    ma, mb, m = compute_metrics(a), compute_metrics(b), compute_metrics(both)

    assert len(both.steps) == 10 and list(both.steps["step"]) == list(range(10))
    assert both.steps["version"].is_unique
    assert run_wall_s(both.steps) == pytest.approx(run_wall_s(a.steps) + run_wall_s(b.steps))
    n_used = int((a.samples["learner_step"] >= 0).sum() + (b.samples["learner_step"] >= 0).sum())
    assert m["throughput/samples_per_s"] == pytest.approx(n_used / (run_wall_s(a.steps) + run_wall_s(b.steps)))
    assert m["time/step_s"] == pytest.approx((ma["time/step_s"] * 6 + mb["time/step_s"] * 4) / 10)
    assert sorted(sample_staleness(both.samples)) == sorted([*sample_staleness(a.samples),
                                                             *sample_staleness(b.samples)])
    assert both.samples["sample_id"].is_unique and both.samples["group_id"].nunique() == (
        a.samples["group_id"].nunique() + b.samples["group_id"].nunique())
    second = both.samples.iloc[len(a.samples):]
    assert (second["t_admit"] >= run_wall_s(a.steps)).all()
    in_flight = second["learner_step"].to_numpy() < 0
    assert in_flight.any()
    assert (second["version_consumed"].to_numpy()[in_flight] == -1).all()   # missing stays missing
    assert end_to_end([a]) is a


def test_runs_laid_end_to_end_keep_each_runs_rollout_idle(config_data):
    """A group still generating when its run ended was busy until that run's end, not the last run's: the idle
    fraction of runs laid end to end is their idle fractions weighted by their wall times. (Read as open until the
    end of all runs, one in-flight group at the end of the first run made the worker look busy throughout the
    others.)"""
    from sim.config import load_config
    from sim.metrics import group_intervals, rollout_idle, run_wall_s
    from validate.loop import end_to_end

    tiny = Path(__file__).resolve().parents[1] / "examples" / "tiny_cpu.yaml"
    runs = [simulate(load_config(tiny, {"seed": seed, "run.steps": steps, "pipeline.staleness_control": "areal",
                                        "pipeline.interruptible": None}))  # AReaL's gate: groups run ahead
            for seed, steps in ((0, 16), (7, 12), (3, 14))]
    assert all(np.isnan(group_intervals(r.samples)[2]).any() for r in runs[:2])  # open groups at the ends
    walls = np.array([run_wall_s(r.steps) for r in runs])
    expected = float(np.dot([rollout_idle(r) for r in runs], walls) / walls.sum())
    assert rollout_idle(end_to_end(runs)) == pytest.approx(expected, rel=1e-9)


def test_validate_rejects_a_non_positive_repeat_count(tmp_path, config_data, capsys):
    import yaml
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config_data))
    assert main(["validate", str(cfg_path), "--repeats", "0", "--out", str(tmp_path / "report")]) == 2
    printed = capsys.readouterr()
    assert "--repeats" in printed.err and "at least 1, got 0" in printed.err
    assert not (tmp_path / "report").exists()


def test_the_report_says_which_policy_the_runs_start_from(config_data, tmp_path):
    from sim.config import parse_config
    from validate.loop import starting_policy_note

    cfg = parse_config(config_data)  # the tiny preset
    assert "each run's own seed's" in starting_policy_note(cfg)
    assert starting_policy_note(cfg.with_overrides({"real.init_seed": 3})) == (
        "starting policy: one for every run (real.init_seed 3)")
    (tmp_path / "config.json").write_text("{}")
    assert starting_policy_note(cfg.with_overrides({"real.model": str(tmp_path)})) == (
        f"starting policy: the checkpoint {tmp_path}, every run")
