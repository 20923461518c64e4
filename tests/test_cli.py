"""The `stalecast simulate` command, in-process and as the installed console script."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sim.cli import main
from sim.config import Cluster, Efficiency, LognormalLen, Pipeline, Workload
from sim.outputs import MARKER
from sim.trace import read_trace

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny_cpu.yaml"

DESIGN_METRICS = [
    *(f"staleness/{q}" for q in ("mean", "p50", "p90", "p99", "max")),
    "off_policy/in_flight/mean", "off_policy/in_queue/mean",
    "throughput/samples_per_s", "throughput/tokens_per_s", "throughput/steps_per_h",
    "idle/trainer", "idle/rollout", "speedup/vs_sync", "ess/token", "ess/seq", "kl/k3", "grad_norm",
    "clip_frac", "reward/mean", "len/mean", "lr", "time/weight_sync_s", "time/queue_wait_s", "dropped/groups",
]


def check_outputs(out, steps):
    """The output folder holds a readable trace, metrics.json and a PNG; returns metrics.json's content."""
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "metrics.json", "staleness.png", "trace"]
    assert sorted(p.name for p in (out / "trace").iterdir()) == [MARKER, "header.json", "samples.parquet",
                                                                 "steps.parquet"]
    assert len(read_trace(out / "trace").steps) == steps
    assert (out / "staleness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "metrics.json").read_text())


def test_simulate_example(example, tmp_path, capsys):
    data, out = yaml.safe_load(example.read_text()), tmp_path / "out"
    assert main(["simulate", str(example), "--steps", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "staleness" in printed and "speedup over sync" in printed
    payload = check_outputs(out, steps=3)
    metrics, baseline = payload["metrics"], payload["sync_baseline"]
    assert set(DESIGN_METRICS) <= set(metrics)
    assert payload["config"]["name"] == data["name"]
    assert payload["config"]["run"]["steps"] == 3
    # Definition: sync pipeline's time per step over this one's.
    assert metrics["speedup/vs_sync"] == pytest.approx(baseline["time/step_s"] / metrics["time/step_s"])
    assert 0 <= metrics["idle/trainer"] <= 1 and 0 <= metrics["idle/rollout"] <= 1
    assert metrics["throughput/samples_per_s"] > 0 and metrics["kl/k3"] is None  # no learning in a simulation
    # Every learner step trains on batch_prompts x group_size samples.
    wl = data["workload"]
    assert sum(payload["staleness_histogram"].values()) == 3 * wl["batch_prompts"] * wl["group_size"]


def test_set_overrides_take_effect(tmp_path):
    out = tmp_path / "out"
    args = ["simulate", str(TINY), "--steps", "3", "--no-sync-baseline", "--out", str(out),
            "--set", "pipeline.max_staleness=0", "--set", "pipeline.mode=async"]
    assert main(args) == 0
    payload = check_outputs(out, steps=3)
    assert payload["config"]["pipeline"]["max_staleness"] == 0
    assert payload["metrics"]["staleness/max"] == 0
    assert payload["sync_baseline"] is None and payload["metrics"]["speedup/vs_sync"] is None


def test_sync_mode_speedup_is_one(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["simulate", str(TINY), "--steps", "2", "--set", "pipeline.mode=sync", "--out", str(out)]) == 0
    metrics = check_outputs(out, steps=2)["metrics"]
    assert metrics["speedup/vs_sync"] == 1.0 and metrics["staleness/max"] == 0


def test_bad_config_exits_2_and_writes_nothing(tmp_path, capsys):
    data = yaml.safe_load(TINY.read_text())
    data["workload"].update(batch_prompt=8, group_size=0)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["simulate", str(path), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines  # one line per problem, however long the path
    assert lines[0].startswith("error: ")
    problems = sorted(line.removeprefix("error: ") for line in lines)
    assert problems[0].startswith(f"{path}: workload.batch_prompt: unknown field (did you mean 'batch_prompts'?)")
    assert problems[1].startswith(f"{path}: workload.group_size: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_bad_override_and_missing_config(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["simulate", str(TINY), "--set", "pipeline.mode=bogus", "--out", str(out)]) == 2
    assert f"{TINY} (override): pipeline.mode: " in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "absent.yaml"), "--out", str(out)]) == 2
    assert f"{tmp_path / 'absent.yaml'}: no such config file" in capsys.readouterr().err
    assert main(["simulate"]) == 2
    assert "a config file is required" in capsys.readouterr().err
    assert not out.exists()


def test_help_config_prints_every_field(capsys):
    assert main(["simulate", "--help-config"]) == 0
    lines = {line.strip() for line in capsys.readouterr().out.splitlines()}
    for model in (Workload, Cluster, Pipeline, Efficiency, LognormalLen):
        for name, field in model.model_fields.items():
            assert f"{name}: {field.description or ''}".strip() in lines, name


def test_console_script(tmp_path):
    exe = shutil.which("stalecast")
    assert exe, "the stalecast console script is not installed"
    out = tmp_path / "out"
    done = subprocess.run([exe, "simulate", str(TINY), "--steps", "2", "--no-sync-baseline", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    check_outputs(out, steps=2)
