"""The whole validation loop on the tiny CPU example, shortened: profile -> predict -> train (async and sync) ->
compare, plus the profile command on its own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sim.calibrate.stalecast_run import read_stalecast_run
from sim.cli import main
from sim.config import load_config
from sim.hardware.measured import load_profile

# One xdist process runs the module, so its profile (a module fixture) is measured once.
pytestmark = pytest.mark.xdist_group("test_validate_loop")

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny_cpu.yaml"
SHORT = ["--set", "run.steps=6", "--set", "real.warm_start_steps=4"]


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "tiny.yaml"
    assert main(["profile", str(TINY), "--quick", "--out", str(out)]) == 0
    return out


def test_profile_measures_every_table_and_the_simulator_uses_it(profile_path):
    prof = load_profile(profile_path)
    assert prof.machine["device"] == "cpu" and prof.model == "tiny"
    assert all(s > 0 for row in prof.decode.seconds for s in row)
    assert prof.train.seconds[-1] > prof.train.seconds[0] > 0      # more tokens, a longer learner step
    c = prof.colocation
    assert prof.sync_s > 0 and c.train_slowdown >= 1
    for curve in (c.gen_slowdown, c.sync_gen_slowdown):  # each against the idle fractions it was measured at
        assert curve.idle == (0.0, 0.3, 0.6) and all(v >= 1 for v in curve.slowdown)
    assert c.sync_gen_beside is None  # one worker: no others to generate beside
    from sim.engine.pipeline import Simulation
    sim = Simulation(load_config(TINY, {"hardware.profile": str(profile_path), "run.steps": 5}))
    assert set(sim.cost.sources.values()) == {"measured"}
    assert len(sim.run().steps) == 5


def test_profile_times_sync_generation_against_the_crowd(tmp_path):
    """Two workers: sync generation is also timed beside 1 other worker (and beside none: x1 by definition)."""
    out = tmp_path / "two.yaml"
    assert main(["profile", str(TINY), "--quick", "--set", "cluster.rollout_workers=2", "--out", str(out)]) == 0
    beside = load_profile(out).colocation.sync_gen_beside
    assert len(beside) == 2 and beside[0] == 1.0 and beside[1] >= 1


def test_validate_runs_the_whole_loop(tmp_path, profile_path, capsys):
    out = tmp_path / "report"
    code = main(["validate", str(TINY), "--profile", str(profile_path), "--pilot-steps", "2", "--repeats", "2",
                 *SHORT, "--out", str(out)])
    assert code in (0, 1)  # a short run on a shared machine may miss the tolerances; the loop must complete
    report = json.loads((out / "report.json").read_text())
    assert report["pass"] == (code == 0)
    judged = {r["metric"]: r for r in report["rows"]}
    assert judged["staleness/mean"]["measured"] > 0 and judged["speedup/vs_sync"]["measured"] > 0
    assert report["recalibrated_rows"] is not None
    assert any("pilot run" in n for n in report["notes"])        # where the lengths came from
    assert any(n.startswith("starting policy: each run's own seed's") for n in report["notes"])
    # ... and the learner's bookkeeping the prediction charges
    timed = np.mean([read_stalecast_run(out / name).steps["bookkeeping_s"].mean() for name in ("pilot", "pilot-2")])
    assert timed > 0 and any(f"learner bookkeeping: {timed:.4f} s a step" in n for n in report["notes"])
    for name in ("report.md", "staleness.png", "throughput.png", "timeline.png", "measured/trace",
                 "measured_sync/trace", "pilot/trace", "measured-2/trace", "measured_sync-2/trace", "pilot-2/trace"):
        assert (out / name).exists(), name
    # Two runs of each kind, each with its own seed; the judged numbers are of both runs end to end.
    assert [(r["run"], r["seed"]) for r in report["runs"]] == [(1, 0), (2, 2)]
    assert judged["time/step_s"]["measured"] == pytest.approx(
        sum(r["step_s"] for r in report["runs"]) / 2, rel=0.02)  # equal step counts: the mean of the two
    assert "one by one" in (out / "report.md").read_text()
    assert "Recalibrated post hoc" in (out / "report.md").read_text()
    # The post-hoc cost check: both runs, every ratio a plain positive number (x1 = as profiled; a short run on a
    # shared machine lands near it, nowhere near 0 or 10).
    assert len(report["costs"]) == 2 and "In-run costs against the profile" in (out / "report.md").read_text()
    assert all(0.2 < c[k] < 5 for c in report["costs"].values() for k in ("learner_step", "generation_batch"))
