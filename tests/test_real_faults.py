"""Faults during `stalecast train`: a killed rollout worker, SIGTERM, and the main process killed outright. Each time
the run folder keeps every completed step, readable as a trace (`stalecast validate --trace` reads it), nothing is
left beside it, and `--resume` finishes the run. What these assert holds however the processes are scheduled:
they wait for what happened (lines in metrics.jsonl), never for a time."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from real.learner import WorkerError
from real.runfolder import RunFolder
from real.trainer import Trainer
from sim.cli import main
from sim.config import load_config
from sim.trace import read_trace

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny_cpu.yaml"
QUICK = {"real.warm_start_steps": 0, "cluster.rollout_workers": 1}


def _lines(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _check_kept(run: Path, status: str) -> int:
    """The folder of a run that ended early: every completed step in metrics.jsonl and in a readable trace whose
    steps are those lines. Returns the number of steps."""
    summary, lines = _summary(run), _lines(run)
    assert summary["status"] == status and summary["steps_done"] == len(lines) > 0
    trace = read_trace(run / "trace")
    assert list(trace.steps["step"]) == [m["step"] for m in lines] == list(range(len(lines)))
    consumed = trace.samples[trace.samples["learner_step"] >= 0]
    assert len(consumed) == len(lines) * trace.steps["n_samples"].iloc[0]
    return len(lines)


def _check_complete(run: Path, steps: int, segments: int) -> None:
    summary, trace = _summary(run), read_trace(run / "trace")
    assert summary["status"] == "complete" and len(summary["segments"]) == segments
    assert list(trace.steps["step"]) == list(range(steps)) and len(_lines(run)) == steps
    assert trace.steps["t_start"].is_monotonic_increasing  # a resumed run's clock goes on from its checkpoint
    acc = summary["accounting"]
    assert acc["complete"] and acc["consumed"] + acc["dropped"] + acc["waiting"] + acc["in_flight"] == \
        acc["admitted_groups"] == trace.samples["group_id"].nunique()


def test_killed_worker_keeps_every_completed_step_and_resume_finishes(tmp_path):
    cfg = load_config(TINY, {**QUICK, "pipeline.mode": "async", "run.steps": 10, "real.checkpoint_every": 4})
    run = tmp_path / "run"

    def kill(trainer, step, metrics):
        if step == 5:
            os.kill(trainer.workers[0].pid, signal.SIGKILL)

    trainer = Trainer(cfg, run, timeout_s=300, on_step=kill)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"rollout worker 0 \(pid \d+\) exited with code -9 \(SIGKILL\)"):
        trainer.run()
    assert time.monotonic() - t0 < 120
    assert not any(p.is_alive() for p in trainer.workers)     # every process stopped
    done = _check_kept(run, "failed")
    assert done >= 6 and "SIGKILL" in _summary(run)["ended_because"]
    assert _summary(run)["checkpoint_step"] == done             # the last whole step was checkpointed
    kept = _lines(run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing beside the run folder

    rc = main(["validate", str(TINY), "--trace", str(run / "trace"), "--out", str(tmp_path / "report")])
    assert rc in (0, 1, 3) and (tmp_path / "report" / "report.md").is_file()  # read and judged, not refused

    Trainer.resume(run, timeout_s=300).run()
    _check_complete(run, 10, segments=2)
    assert _lines(run)[:done] == kept                            # what was kept stays as it was


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "sim.cli", "train", *args], stdout=out, stderr=out)


def _wait_for_lines(run: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(_lines(run)) < n:
        assert proc.poll() is None, f"the run ended early with code {proc.returncode}"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads child processes from /proc")
def test_sigterm_and_a_killed_main_process_keep_the_steps_and_resume_finishes(tmp_path):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    sets = [f"--set={k}={v}" for k, v in {**QUICK, "real.checkpoint_every": 3}.items()]
    proc = _start([str(TINY), "--steps", "24", "--out", str(run), *sets], log)
    _wait_for_lines(run, 4, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()
    first = _check_kept(run, "interrupted")
    assert _summary(run)["ended_because"] == "SIGTERM" and _summary(run)["checkpoint_step"] == first

    proc = _start(["--resume", str(run)], log)
    _wait_for_lines(run, first + 4, proc)
    workers = _children(proc.pid)
    proc.kill()  # SIGKILL: nothing of this process runs any more
    proc.wait(timeout=30)
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "rollout workers outlived the killed main process"
    assert _summary(run)["status"] == "running"                  # killed: it never said it ended
    trace = read_trace(run / "trace")                             # the per-step files, readable as they are
    assert len(trace.steps) >= first + 4 and list(trace.steps["step"]) == list(range(len(trace.steps)))

    proc = _start(["--resume", str(run)], log)
    assert proc.wait(timeout=600) == 0, log.read_text()
    _check_complete(run, 24, segments=3)
    steps = RunFolder(run).read_engine_steps()  # the killed segment wrote none; the other two's are both kept
    assert set(steps["segment"]) == {0, 2} and (steps["seconds"] > 0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "run"]  # no scratch folder left anywhere
    assert not [p for p in run.iterdir() if p.name.startswith(".") and p.name != ".stalecast-output"]


def test_a_run_folder_before_its_first_step_reads_as_no_rows(tmp_path):
    """A run that fails before its first step (a worker dying at start-up) reads its folder back as empty, so the
    failure itself is what the run reports, not a missing trace file."""
    from real.trainer import trace_header

    cfg = load_config(TINY)
    folder = RunFolder(tmp_path / "run")
    folder.create(cfg, trace_header(cfg))
    samples, steps = folder.completed_rows()
    assert len(samples) == 0 and len(steps) == 0


@pytest.mark.parametrize("command", ["train", "profile", "validate"])
def test_the_fast_engine_refuses_a_model_family_it_has_no_forward_for(tmp_path, capsys, command):
    """real.engine fast with a checkpoint of another family: one error line and exit 2 before anything is written."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from real.model import save_policy
    from real.tokenizer import CharTokenizer

    checkpoint = tmp_path / "gpt2"
    save_policy(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                           bos_token_id=1, eos_token_id=2)), CharTokenizer(), checkpoint)
    out = tmp_path / ("out.yaml" if command == "profile" else "out")
    assert main([command, str(TINY), "--set", f"real.model={checkpoint}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "real.engine: 'fast' cannot run real.model" in err and "model type 'gpt2' is not supported" in err
    assert not out.exists()
