"""`stalecast whatif`: the table, recommendation and figure from a calibrated run, and its interval: on a log of one
learner size (the learner's serial share unidentified) the range it prints contains what the known cost model that
made the log gives, wherever the learner's speed matters."""

import copy
import sys
from pathlib import Path

import pandas as pd
import pytest

from sim.calibrate.fit import Layout, Options, PhaseFit, calibrate
from sim.cli import main
from sim.hardware.measured import save_profile
from studies import runner
from studies.named import matched_policy
from studies.sweep import replication_seeds
from studies.whatif import splits

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "calibrate"
sys.path.insert(0, str(FIXTURES))
import make_fixtures as truth  # noqa: E402 - the generator of the fixtures, and the model they were made from

GPUS, BOUND, STEPS = 6, 1, 60
OPTIONS = ["--gpu", truth.GPU, "--model", truth.MODEL, "--group-size", "8"]


@pytest.fixture(scope="module")
def whatif(tmp_path_factory):
    """A what-if of the 8-GPU verl log on 6 GPUs, from its calibrated profile: (calibration, summary table, folder)."""
    from sim.calibrate.fit import load_calibration

    tmp = tmp_path_factory.mktemp("whatif")
    profile = tmp / "verl.yaml"
    assert main(["calibrate", str(FIXTURES / "verl_8gpu.jsonl"), "--format", "verl", *OPTIONS,
                 "--out", str(profile)]) == 0
    out = tmp / "out"
    assert main(["whatif", str(profile), "--gpus", str(GPUS), "--bounds", str(BOUND), "--steps", str(STEPS),
                 "--out", str(out)]) == 0
    return load_calibration(profile), pd.read_csv(out / "whatif.csv"), out


def test_table_figure_and_recommendation(whatif, capsys):
    cal, summary, out = whatif
    assert list(summary["rollout_gpus"]) == [1, 2, 3, 4, 5] and set(summary["bound"]) == {BOUND}
    assert (summary["rollout_gpus"] + summary["learner_gpus"] == GPUS).all()
    for metric in ("time/step_s", "throughput/samples_per_s", "speedup", "staleness/mean", "idle/trainer"):
        assert (summary[f"{metric} low"] <= summary[metric] + 1e-12).all(), metric
        assert (summary[metric] <= summary[f"{metric} high"] + 1e-12).all(), metric
    # one learner size logged: splits whose learner is not the logged 8 GPUs have a range
    assert (summary["time/step_s high"] > summary["time/step_s low"]).any()
    text = (out / "summary.md").read_text()
    assert "recommended:" in text and "could not" in text and "reproduces" in text
    best = summary.loc[summary["throughput/samples_per_s"].idxmax()]
    assert f"recommended: {int(best['rollout_gpus'])} rollout GPUs" in text
    for name in ("whatif.png", "whatif.svg", "runs_table.csv"):
        assert (out / name).stat().st_size > 0
    # the speedup is over the logged sync run, as the calibration reproduces it
    assert summary["speedup"].to_numpy() == pytest.approx(
        cal.logs[0]["step_s_reproduced"] / summary["time/step_s"].to_numpy(), rel=0.01)


def _known_model(cal):
    """The calibration with what the fixtures were made from in place of the fit: the learner's phases with their
    serial share (0.25, which one learner size does not identify) and the decode scale."""
    known = copy.deepcopy(cal)
    known.phases = {n: PhaseFit(p.fixed_s, p.rate_s_per_token, p.serial_share) for n, p in truth.PHASES.items()}
    known.decode_scale = {"point": truth.DECODE_SCALE}
    return known


def test_interval_contains_the_known_model(whatif, tmp_path):
    cal, summary, _ = whatif
    known = _known_model(cal)
    seed = replication_seeds(cal.config(Layout(1, 1, 1, False)).seed, 1)[0]  # the what-if's workload draw
    for layout in splits(GPUS, 1):
        path = tmp_path / f"known-L{layout.learner_gpus}.yaml"
        save_profile(known.profile(layout.learner_gpus, known.corners()[0]), path)
        cfg = cal.config(layout, "async", STEPS, seed=seed, profile=str(path)).with_overrides(
            matched_policy("verl_fully_async", BOUND, cal.workload["batch_prompts"]))
        metrics = runner.run_config(cfg)["metrics"]
        row = summary[summary["rollout_gpus"] == layout.rollout_workers].iloc[0]
        learner_bound = row["idle/trainer"] < 0.3
        for metric in ("throughput/samples_per_s", "time/step_s"):
            value = metrics[metric]
            if learner_bound:  # the learner's unidentified split moves the result: the range holds the truth
                assert row[f"{metric} low"] <= value <= row[f"{metric} high"], (layout, metric, value)
            else:  # generation-bound: only identified costs act, and the point is right to their fit error
                assert value == pytest.approx(row[metric], rel=0.01), (layout, metric)
    assert (summary["idle/trainer"] < 0.3).sum() >= 2  # both kinds of split were checked
    assert (summary["idle/trainer"] >= 0.3).sum() >= 1


def test_whatif_from_a_log(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["whatif", str(FIXTURES / "prime-rl_metrics.jsonl"), "--format", "prime-rl", *OPTIONS,
                 "--log-rollout-gpus", "4", "--log-learner-gpus", "4", "--gpus", "4", "--bounds", "1,2",
                 "--steps", "30", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "async (prime_rl) on 4 GPUs" in text and "recommended:" in text
    summary = pd.read_csv(out / "whatif.csv")
    assert len(summary) == 3 * 2 and set(summary["bound"]) == {1, 2}
    # prime_rl holds max staleness <= max_off_policy_steps (8, its default) and gates on max_async_level = bound
    assert (summary["staleness/max"] <= 8).all()


def test_whatif_errors_are_one_line(tmp_path, capsys):
    def one_error() -> str:
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    bare = tmp_path / "bare.yaml"
    bare.write_text("sync_s: 1.0\n")
    assert main(["whatif", str(bare), "--gpus", "4", "--out", str(tmp_path / "a")]) == 2
    assert "calibration beside it" in one_error()
    assert main(["whatif", str(FIXTURES / "verl_8gpu.jsonl"), "--gpus", "4", "--out", str(tmp_path / "b")]) == 2
    assert "--format" in one_error()
    cal, _ = calibrate([FIXTURES / "verl_8gpu.jsonl"], "verl", Options(gpu=truth.GPU, model=truth.MODEL,
                                                                          group_size=8))
    cal.save(tmp_path / "cal.yaml")
    assert main(["whatif", str(tmp_path / "cal.yaml"), "--gpus", "1", "--out", str(tmp_path / "c")]) == 2
    assert "--gpus 1" in one_error() and not (tmp_path / "c").exists()
