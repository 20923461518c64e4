"""`stalecast validate --trace PATH --trace-format SYSTEM`: other systems' per-sample dumps mapped onto the trace
schema (validate/importers.py): the fields each dump has land in the right columns, a dump lacking a column is one
error naming it and where the system keeps it (or not), and a dump completed under stalecast's names imports."""

import json
from pathlib import Path

import pytest
import yaml

from sim.cli import main
from sim.metrics import compute_metrics
from sim.trace import TraceError
from validate.importers import read_trace_as


def _write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def areal_dump(folder: Path, extra: bool) -> Path:
    """AReaL's _dump_trajectory records ({log}/rollout/{tail_version}/{task_id}.jsonl): 4 groups of 2; with `extra`,
    the columns AReaL does not dump, under stalecast's names."""
    for task in range(4):
        records = []
        for i in range(2):
            record = {"task_id": task, "sample_idx": i, "seqlen": 40 + 3 * task + i, "prompt_len": 20,
                      "head_version": task // 2, "tail_version": task // 2 + 1, "reward": 0.5, "prompt": "p",
                      "completion": "c"}
            if extra:
                record |= {"worker_id": task % 2, "t_start": 1000.0 + task, "t_end": 1004.0 + task + i,
                           "t_consumed": 1010.0 + 2 * (task // 2), "version_consumed": 2 + task // 2,
                           "learner_step": task // 2}
            records.append(record)
        _write(folder / "rollout" / str(task // 2 + 1) / f"{task}.jsonl", records)
    return folder / "rollout"


def test_areal_dump_lacking_times_names_every_missing_column(tmp_path):
    with pytest.raises(TraceError) as err:
        read_trace_as(areal_dump(tmp_path, extra=False), "areal")
    text = str(err.value)
    for column in ("worker_id", "t_start", "t_end", "t_consumed", "version_consumed", "learner_step"):
        assert column in text
    assert "group_id" not in text and "head_version" not in text  # what AReaL dumps is found


def test_areal_dump_completed_under_stalecast_names(tmp_path):
    trace = read_trace_as(areal_dump(tmp_path, extra=True), "areal")
    s = trace.samples
    assert list(s["response_len"]) == [40 + 3 * t + i - 20 for t in range(4) for i in range(2)]
    assert (s["version_end"] - s["version_start"] == 1).all()  # head and tail versions
    assert s["t_start"].min() == 0.0 and s["t_end"].max() == pytest.approx(8.0)  # shifted to start at 0
    metrics = compute_metrics(trace)
    assert metrics["staleness/mean"] == 2.0 and metrics["off_policy/in_flight/mean"] == 1.0
    assert list(trace.steps["n_samples"]) == [4, 4]


def prime_rl_dump(folder: Path, extra: bool) -> Path:
    """prime-rl's FileMonitor episodes (rollouts/step_N/train/effective/traces.jsonl), verifiers Episode records:
    two steps of 2 groups x 2 episodes, each one trace generated from policy v0 to v{N-1}."""
    for step in (1, 2):
        records = []
        for g in range(2):
            for i in range(2):
                start = 1.7e9 + 10 * step + g + 0.1 * i
                record = {"id": f"e{step}{g}{i}", "group": {"id": f"g{step}-{g}"},
                          "run": {"type": "train", "id": "r", "work": {"type": "train", "step": step,
                                                                       "policy": {"start": 0, "end": step - 1}}},
                          "traces": [{"timing": {"agent": {"start": start, "end": start + 2}}, "reward": 1.0,
                                      "calls": [{"usage": {"input_tokens": 30, "completion_tokens": 5 + i}},
                                                {"usage": {"input_tokens": 40, "completion_tokens": 7}}]}]}
                if extra:
                    record |= {"worker_id": g, "t_consumed": 1.7e9 + 10 * step + 5}
                records.append(record)
        _write(folder / f"step_{step}" / "train" / "effective" / "traces.jsonl", records)
    return folder


def test_prime_rl_dump_maps_versions_times_and_lengths(tmp_path):
    with pytest.raises(TraceError) as err:
        read_trace_as(prime_rl_dump(tmp_path / "bare", extra=False), "prime-rl")
    text = str(err.value)
    assert "t_consumed" in text and "worker_id" in text
    assert "version_start" not in text and "t_start" not in text
    trace = read_trace_as(prime_rl_dump(tmp_path / "full", extra=True), "prime-rl")
    s = trace.samples
    assert list(s["learner_step"]) == [0] * 4 + [1] * 4  # batch N trains from v{N-1}
    assert list(s["response_len"]) == [12, 13] * 4 and (s["prompt_len"] == 30).all()
    assert (s.groupby("group_id")["t_start"].nunique() == 1).all()  # a group starts with its first sample
    assert s["t_start"].min() == 0.0
    metrics = compute_metrics(trace)  # generated from v0 on, until v{N-1}: step 2's samples took new weights in flight
    assert metrics["staleness/mean"] == 0.5 and metrics["off_policy/in_flight/mean"] == 0.5


@pytest.mark.parametrize("fmt,record,named", [
    ("verl", {"input": "q", "output": "a", "gts": "a", "score": 1.0, "step": 3}, ("uid", "param_version_start")),
    ("trl", {"step": 4, "metadata": {"group_id": 1, "model_version": 3, "prompt_tokens": 9,
                                     "completion_tokens": 4, "reward": 1.0}}, ("t_start", "learner_step")),
])
def test_other_dumps_say_what_they_lack(tmp_path, fmt, record, named):
    dump = _write(tmp_path / "dump.jsonl", [record])
    with pytest.raises(TraceError) as err:
        read_trace_as(dump, fmt)
    assert all(word in str(err.value) for word in named)


def test_validate_reads_a_dump(tmp_path, config_data, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_data))
    bare = areal_dump(tmp_path / "bare", extra=False)
    assert main(["validate", str(config), "--trace", str(bare), "--trace-format", "areal",
                 "--out", str(tmp_path / "v1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "t_consumed" in err[0] and str(bare) in err[0]
    full = areal_dump(tmp_path / "full", extra=True)
    assert main(["validate", str(config), "--trace", str(full), "--trace-format", "areal",
                 "--out", str(tmp_path / "v2")]) in (0, 1, 3)
    report = json.loads((tmp_path / "v2" / "report.json").read_text())
    measured = {r["metric"]: r["measured"] for r in report["rows"]}
    assert measured["staleness/mean"] == 2.0


def test_malformed_dump_line_is_named(tmp_path):
    dump = tmp_path / "rollout" / "1" / "0.jsonl"
    dump.parent.mkdir(parents=True)
    dump.write_text('{"task_id": 0}\n{"task_id": \n')
    with pytest.raises(TraceError, match=rf"{dump}: line 2: not valid JSON"):
        read_trace_as(tmp_path / "rollout", "areal")
