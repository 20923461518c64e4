"""`stalecast calibrate`: known answers on synthetic logs of a known cost model (tests/fixtures/calibrate, written by
its make_fixtures.py), the two-size fit of the learner, the interval where one size leaves the split open, the
length fit, one-line errors on malformed or foreign logs, and the loop from a real sync run of the tiny CPU example
to its reproduced step time."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from sim.calibrate.fit import Layout, Options, calibrate
from sim.calibrate.lengths import capped_mean, clip_fraction, fit_lengths
from sim.cli import main
from sim.config import ConfigError
from sim.hardware.measured import load_profile

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "calibrate"
TINY = ROOT / "examples" / "tiny_cpu.yaml"
sys.path.insert(0, str(FIXTURES))
import make_fixtures as truth  # noqa: E402 - the generator of the fixtures, and the model they were made from

TOL = 0.05
HARDWARE = {"gpu": truth.GPU, "model": truth.MODEL, "group_size": truth.GROUP_SIZE}
# Each fixture, the options its format needs, and which learner phases its log separates (others land in `other`).
CASES = {
    "verl_8gpu.jsonl": ("verl", {}, ("update_s", "old_logprob_s", "ref_logprob_s", "other_s")),
    "verl_8gpu_wandb.csv": ("verl", {"gpus": [8]}, ("update_s", "old_logprob_s", "ref_logprob_s", "other_s")),
    "areal_8gpu_wandb.csv": ("areal", {"gpus": [8], "max_new_tokens": truth.CAP,
                                       "response_sigma": truth.RESPONSE_SIGMA},
                             ("update_s", "old_logprob_s", "ref_logprob_s")),
    "prime-rl_metrics.jsonl": ("prime-rl", {"rollout_gpus": [4], "learner_gpus": [4]}, ("update_s",)),
    "trl_8gpu_wandb.csv": ("trl", {"gpus": [8], "prompt_len": 400, "batch_prompts": truth.BATCH_PROMPTS},
                           ("update_s",)),
}


def close(value: float, expected: float, tol: float = TOL) -> bool:
    return abs(value / expected - 1) <= tol


def true_rate(phase, learner_gpus: int) -> float:
    """The known per-token rate of a phase at `learner_gpus`."""
    return phase.rate_s_per_token * (phase.serial_share + (1 - phase.serial_share) * truth.REFERENCE_GPUS
                                     / learner_gpus)


def test_fixtures_are_what_the_generator_writes(tmp_path):
    written = truth.write_all(tmp_path)
    assert written, "the generator wrote nothing"
    for path in written:
        assert path.read_bytes() == (FIXTURES / path.relative_to(tmp_path)).read_bytes(), path.name


@pytest.mark.parametrize("name", list(CASES))
def test_calibration_recovers_the_known_costs(name):
    fmt, extra, phases = CASES[name]
    cal, residuals = calibrate([FIXTURES / name], fmt, Options(**HARDWARE, **extra))
    learner_gpus = cal.reference_gpus
    assert close(cal.decode_scale["point"], truth.DECODE_SCALE)
    assert close(cal.sync_s, truth.SYNC_S)
    for phase in phases:
        known, fit = truth.PHASES[phase], cal.phases[phase]
        assert close(fit.fixed_s, known.fixed_s), (phase, fit)
        if known.rate_s_per_token:
            assert close(fit.rate_s_per_token, true_rate(known, learner_gpus)), (phase, fit)
    wl = cal.workload
    assert (wl["batch_prompts"], wl["group_size"], wl["max_new_tokens"]) == (truth.BATCH_PROMPTS, truth.GROUP_SIZE,
                                                                               truth.CAP)
    assert close(wl["response_len"]["median"], truth.RESPONSE_MEDIAN)
    assert close(wl["response_len"]["sigma"], truth.RESPONSE_SIGMA)
    # the simulator, with the fit, reproduces the logged sync step
    assert close(cal.logs[0]["step_s_reproduced"], cal.logs[0]["step_s_logged"], 0.02)
    assert set(residuals["part"]) >= {"gen_s", *phases}


def test_stalecast_run_folder_replays_its_own_lengths():
    cal, _ = calibrate([FIXTURES / "stalecast_run"], "stalecast", Options())
    assert cal.workload["groups_in_order"] and len(cal.workload["groups"]) == 16 * 8
    # a stalecast run logs one learner time: the sum of the phases
    fixed = sum(p.fixed_s for p in truth.PHASES.values())
    rate = sum(true_rate(p, 2) for p in truth.PHASES.values())
    fit = cal.phases["update_s"]
    assert close(fit.fixed_s, fixed) and close(fit.rate_s_per_token, rate)
    assert close(cal.decode_scale["point"], truth.DECODE_SCALE) and close(cal.sync_s, truth.SYNC_S)
    assert close(cal.logs[0]["step_s_reproduced"], cal.logs[0]["step_s_logged"], 0.01)


def test_two_learner_sizes_identify_the_fixed_and_parallel_parts():
    cal, _ = calibrate([FIXTURES / "verl_8gpu.jsonl", FIXTURES / "verl_16gpu.jsonl"], "verl", Options(**HARDWARE))
    assert cal.serial_identified and cal.reference_gpus == 8
    assert [c.label for c in cal.corners()] == ["point"]  # nothing left to bracket
    for name in ("update_s", "old_logprob_s", "ref_logprob_s"):
        known, fit = truth.PHASES[name], cal.phases[name]
        serial = fit.rate_s_per_token * fit.serial_share                   # seconds per token at any size
        parallel = fit.rate_s_per_token * (1 - fit.serial_share) * 8      # seconds per token on one GPU
        assert close(fit.fixed_s, known.fixed_s), name
        assert close(serial, known.rate_s_per_token * known.serial_share), name
        assert close(parallel, known.rate_s_per_token * (1 - known.serial_share) * 8), name
    for log in cal.logs:  # each size's generation and step
        assert close(log["decode_scale"], truth.DECODE_SCALE)
        assert close(log["step_s_reproduced"], log["step_s_logged"], 0.02)


@pytest.mark.parametrize("learner_gpus", [2, 4, 16])
def test_one_size_interval_contains_the_learner_time_at_another(learner_gpus):
    cal, _ = calibrate([FIXTURES / "verl_8gpu.jsonl"], "verl", Options(**HARDWARE))
    assert not cal.serial_identified
    tokens = 300_000
    known = sum(truth.PHASES[p].seconds(tokens, learner_gpus) for p in truth.PHASES)
    ends = [cal.learner_s(tokens, learner_gpus, c.serial_share) for c in cal.corners()]
    assert min(ends) < known < max(ends)
    # the truth's share (0.25) is inside the assumed range, so the range's ends bracket it strictly
    assert not close(min(ends), known, 0.01) and not close(max(ends), known, 0.01)


def test_profile_and_calibration_round_trip(tmp_path):
    from sim.calibrate.fit import load_calibration
    from sim.hardware.measured import load_profile

    cal, _ = calibrate([FIXTURES / "verl_8gpu.jsonl"], "verl", Options(**HARDWARE))
    out = tmp_path / "verl.yaml"
    cal.save(out)
    profile = load_profile(out)  # a measured profile any config can name
    assert profile.sync_s == pytest.approx(cal.sync_s)
    assert profile.train(200_000) == pytest.approx(cal.learner_s(200_000, 8, 0.0))
    again = load_calibration(out)
    assert again.to_dict() == cal.to_dict()
    cfg = again.config(Layout(4, 1, 4, False), "async", 10, profile=str(out))
    assert cfg.hardware.profile == str(out) and cfg.cluster.learner_gpus == 4


def test_lengths_from_a_per_sample_dump(tmp_path):
    """AReaL's rollout dump (prompt_len, seqlen per sample) gives whole groups, resampled instead of a fitted
    distribution."""
    rng = np.random.default_rng(3)
    groups = [[int(rng.integers(150, 650)), *map(int, np.clip(np.ceil(rng.lognormal(math.log(500), 0.7, 8)), 1, 2048))]
              for _ in range(24)]
    dump = tmp_path / "rollout" / "1" / "0.jsonl"
    dump.parent.mkdir(parents=True)
    dump.write_text("".join(json.dumps({"task_id": t, "sample_idx": i, "prompt_len": g[0], "seqlen": g[0] + r,
                                        "head_version": 0, "tail_version": 0, "reward": 0.0}) + "\n"
                            for t, g in enumerate(groups) for i, r in enumerate(g[1:])))
    fmt = CASES["areal_8gpu_wandb.csv"][0]
    cal, _ = calibrate([FIXTURES / "areal_8gpu_wandb.csv"], fmt,
                       Options(**HARDWARE, gpus=[8], max_new_tokens=truth.CAP, lengths_dump=str(tmp_path / "rollout")))
    assert cal.workload["groups"] == groups and not cal.workload["groups_in_order"]
    assert any("per-sample dump" in note for note in cal.notes)
    with pytest.raises(ConfigError, match="a group of 8 responses, where --group-size is 4"):
        calibrate([FIXTURES / "areal_8gpu_wandb.csv"], fmt, Options(**{**HARDWARE, "group_size": 4}, gpus=[8],
                                                                    lengths_dump=str(tmp_path / "rollout")))


# --------------------------------------------------------------------------- lengths
@pytest.mark.parametrize("mu,sigma,cap", [(math.log(500), 0.7, 2048), (math.log(40), 1.2, 64), (math.log(8), 0.3, 16)])
def test_capped_moments_match_sampling(mu, sigma, cap):
    rng = np.random.default_rng(1)
    draws = np.clip(np.ceil(rng.lognormal(mu, sigma, 400_000)), 1, cap)  # as sim/workload.py draws
    assert capped_mean(mu, sigma, cap) == pytest.approx(draws.mean(), rel=3e-3)
    assert clip_fraction(mu, sigma, cap) == pytest.approx((draws == cap).mean(), abs=2e-3)


def test_length_fit_inverts_the_moments():
    mu, sigma, cap = math.log(300), 0.8, 1024
    by_clip = fit_lengths(capped_mean(mu, sigma, cap), cap, clip=clip_fraction(mu, sigma, cap))
    assert by_clip.median == pytest.approx(300, rel=1e-6) and by_clip.sigma == pytest.approx(0.8, rel=1e-6)
    # no response cut: the median per-step maximum of n responses sits where F(max)^n = 1/2
    from scipy.stats import lognorm
    n, wide_cap = 256, 100_000
    top = lognorm(sigma, scale=300).ppf(0.5 ** (1 / n))
    by_max = fit_lengths(capped_mean(mu, sigma, wide_cap), wide_cap, clip=0.0, max_median=top, n_per_step=n)
    assert by_max.median == pytest.approx(300, rel=1e-3) and by_max.sigma == pytest.approx(0.8, rel=1e-3)
    with pytest.raises(ConfigError, match="--response-sigma"):
        fit_lengths(200.0, 1024)


# --------------------------------------------------------------------------- errors: one line, file and place
def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _calibrate(log, fmt, *extra) -> int:
    return main(["calibrate", str(log), "--format", fmt, "--gpu", truth.GPU, "--model", truth.MODEL,
                 "--group-size", "8", *extra])


@pytest.mark.parametrize("content,where", [
    ('{"step": 1, "data": {"timing_s/gen": 1.0}}\n{"step": 2, "data": {\n', "line 2: not valid JSON"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
    ('{"step": 1, "data": {"timing_s/gen": "fast"}}\n', "line 1: column timing_s/gen: 'fast' is not a number"),
    ('{"step": 1, "data": {"timing_s/gen": -2.0}}\n', "step 1: gen_s"),
])
def test_malformed_jsonl_names_the_line(tmp_path, capsys, content, where):
    log = tmp_path / "bad.jsonl"
    log.write_text(content)
    assert _calibrate(log, "verl", "--gpus", "8") == 2
    line = _one_error(capsys)
    assert str(log) in line and where in line


def test_malformed_csv_names_line_and_column(tmp_path, capsys):
    log = tmp_path / "bad.csv"
    log.write_text("Step,run - timing_s/gen\n1,2.5\n2,oops\n")
    assert _calibrate(log, "verl", "--gpus", "8") == 2
    line = _one_error(capsys)
    assert str(log) in line and "line 3" in line and "timing_s/gen" in line


def test_foreign_log_is_named(capsys):
    assert _calibrate(FIXTURES / "areal_8gpu_wandb.csv", "verl", "--gpus", "8") == 2
    line = _one_error(capsys)
    assert "not a verl log" in line and "timing_s/gen" in line


def test_merged_writers_are_ambiguous(tmp_path, capsys):
    log = tmp_path / "prime.csv"
    log.write_text("step,time/step,progress/rollouts,time/forward_backward\n1,2.0,256,3.0\n")
    assert _calibrate(log, "prime-rl", "--gpus", "8") == 2
    line = _one_error(capsys)
    assert str(log) in line and "line 2" in line and "ambiguous" in line


def test_export_of_several_runs_is_refused(tmp_path, capsys):
    log = tmp_path / "two.csv"
    log.write_text("Step,a - timing_s/gen,b - timing_s/gen\n1,1,2\n")
    assert _calibrate(log, "verl", "--gpus", "8") == 2
    assert "2 runs" in _one_error(capsys)


def test_missing_options_are_named(capsys):
    assert main(["calibrate", str(FIXTURES / "verl_8gpu_wandb.csv"), "--format", "verl", "--gpu", truth.GPU,
                 "--model", truth.MODEL, "--gpus", "8"]) == 2
    assert "--group-size" in _one_error(capsys)
    assert _calibrate(FIXTURES / "prime-rl_metrics.jsonl", "prime-rl") == 2
    assert "--gpus N" in _one_error(capsys)
    assert _calibrate(FIXTURES / "trl_8gpu_wandb.csv", "trl", "--gpus", "8") == 2
    assert "--batch-prompts" in _one_error(capsys)
    assert _calibrate(FIXTURES / "trl_8gpu_wandb.csv", "trl", "--gpus", "8", "--batch-prompts", "32") == 2
    assert "--prompt-len" in _one_error(capsys)


def test_cli_writes_profile_calibration_and_residuals(tmp_path, capsys):
    out = tmp_path / "cal" / "verl.yaml"
    assert _calibrate(FIXTURES / "verl_8gpu.jsonl", "verl", "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "reproduced" in text and "could not" in text and "serial share" in text
    assert out.is_file() and (tmp_path / "cal" / "verl.calibration.yaml").is_file()
    residuals = (tmp_path / "cal" / "verl.residuals.csv").read_text().splitlines()
    assert residuals[0] == "log,step,part,logged_s,fitted_s" and len(residuals) > 40
    # a file that is not a calibrated profile is not replaced
    other = tmp_path / "notes.yaml"
    other.write_text("mine: 1\n")
    assert _calibrate(FIXTURES / "verl_8gpu.jsonl", "verl", "--out", str(other)) == 2
    assert "--force" in _one_error(capsys) and other.read_text() == "mine: 1\n"


# --------------------------------------------------------------------------- the loop on a real run
def test_real_sync_run_is_reproduced(tmp_path, capsys):
    """A 12-step sync run of the tiny CPU example, calibrated from its own folder: the simulator with the fit gives
    its measured step time within 10 %."""
    from sim.metrics import compute_metrics
    from sim.trace import read_trace

    run = tmp_path / "run"
    assert main(["train", str(TINY), "--mode", "sync", "--steps", "12", "--set", "real.warm_start_steps=0",
                 "--out", str(run)]) == 0
    out = tmp_path / "tiny.yaml"
    assert main(["calibrate", str(run / "metrics.jsonl"), "--format", "stalecast", "--out", str(out)]) == 0
    from sim.calibrate.fit import load_calibration

    cal = load_calibration(out)
    trace = read_trace(run / "trace")
    measured = compute_metrics(trace)["time/step_s"]
    assert close(cal.logs[0]["step_s_reproduced"], measured, 0.10), (cal.logs[0], measured)
    # The learner's bookkeeping: its wait after each sync less the wait it times itself, from after it wrote the step
    st = trace.steps
    prev_free = np.r_[0.0, (st["t_end"] + st["weight_sync_s"]).to_numpy()[:-1]]
    queue_wait = {row["step"]: row["time/queue_wait_s"]
                  for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    bookkeeping = st["t_start"].to_numpy() - prev_free - np.array([queue_wait[s] for s in st["step"]])
    assert (bookkeeping >= 0).all() and cal.bookkeeping_s > 0
    assert cal.bookkeeping_s == pytest.approx(bookkeeping.mean(), rel=1e-9)
    assert load_profile(out).learner_bookkeeping_s == cal.bookkeeping_s
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"
