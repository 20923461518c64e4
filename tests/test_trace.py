"""Trace files: lossless round trips, atomic writes, and reading other systems' traces."""

import io

import numpy as np
import pandas as pd
import pytest

from sim.metrics import compute_metrics
from sim.errors import OutputError
from sim.outputs import MARKER
from sim.trace import SAMPLE_COLUMNS, STEP_COLUMNS, Trace, TraceError, read_trace


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_round_trip(tiny_trace, tmp_path, fmt):
    s = tiny_trace.samples
    # The trace exercises the missing values: unconsumed samples (-1 step, NaN time) and empty reward.
    assert (s["learner_step"] == -1).any() and s["t_consumed"].isna().any() and s["reward"].isna().all()
    out = tiny_trace.write(tmp_path / "trace", fmt)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "header.json", f"samples.{fmt}", f"steps.{fmt}"])
    back = read_trace(out)
    assert back.samples.dtypes.to_dict() == SAMPLE_COLUMNS
    assert back.steps.dtypes.to_dict() == STEP_COLUMNS
    pd.testing.assert_frame_equal(back.samples, tiny_trace.samples, check_exact=True)
    pd.testing.assert_frame_equal(back.steps, tiny_trace.steps, check_exact=True)
    assert back.header == tiny_trace.header
    assert back.header["config"]["workload"]["group_size"] == 2
    assert back.n_workers == 2


def test_write_replaces_only_a_stalecast_folder(tiny_trace, tmp_path):
    out = tmp_path / "trace"
    tiny_trace.write(out)
    (out / "stale.txt").write_text("old")
    tiny_trace.write(out)  # stalecast wrote it (marker): replaced whole
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace"]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="was not written by stalecast"):
        tiny_trace.write(theirs)
    assert (theirs / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs", "trace"]


def test_failed_write_leaves_nothing_behind(tiny_trace, tmp_path, monkeypatch):
    out = tmp_path / "trace"
    tiny_trace.write(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real, calls = pd.DataFrame.to_parquet, []

    def fails_after_first_file(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", fails_after_first_file)
    with pytest.raises(OSError, match="disk full"):
        tiny_trace.write(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the existing trace is untouched

    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        tiny_trace.write(tmp_path / "fresh")
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace"]  # no new folder, no scratch folder


def test_unknown_format_writes_nothing(tiny_trace, tmp_path):
    with pytest.raises(ValueError, match="unknown trace format"):
        tiny_trace.write(tmp_path / "trace", "xlsx")
    assert list(tmp_path.iterdir()) == []


def write_external(folder, samples: str, steps: str):
    folder.mkdir()
    (folder / "samples.csv").write_text(samples)
    (folder / "steps.csv").write_text(steps)
    return folder


# Groups of one sample (a group's samples share worker, start and consumption: see test_trace_checks.py).
EXTERNAL_SAMPLES = """group_id,worker_id,response_len,t_start,t_end,t_consumed,version_start,version_consumed
0,0,10,0.0,1.0,2.0,0,1
1,1,30,0.0,0.5,0.5,0,0
2,1,20,1.5,,,1,
"""
EXTERNAL_STEPS = "step,t_start,t_end\n0,0.5,1.5\n1,2.0,4.0\n"


def test_external_csv_with_required_columns_only(tmp_path):
    trace = read_trace(write_external(tmp_path / "ext", EXTERNAL_SAMPLES, EXTERNAL_STEPS))
    s, t = trace.samples, trace.steps
    assert list(s.columns) == list(SAMPLE_COLUMNS) and s.dtypes.to_dict() == SAMPLE_COLUMNS
    assert list(t.columns) == list(STEP_COLUMNS) and t.dtypes.to_dict() == STEP_COLUMNS
    assert trace.header == {}
    # Optional columns get the documented missing values.
    assert s["sample_id"].tolist() == [0, 1, 2]
    assert (s["prompt_len"] == -1).all() and (s["learner_step"] == -1).all()
    assert s["t_admit"].isna().all() and s["reward"].isna().all()
    assert not s["dropped"].any()
    # Without per-token versions, a sample's tokens all carry its start version.
    assert s["version_end"].tolist() == [0, 0, 1]
    assert s["version_mean"].tolist() == [0.0, 0.0, 1.0]
    # Empty cells: a missing version is -1, a missing time NaN.
    assert s["version_consumed"].tolist() == [1, 0, -1]
    assert s["t_end"].isna().tolist() == [False, False, True]
    for col in ("version", "n_samples", "n_tokens", "queue_len"):
        assert (t[col] == -1).all(), col
    for col in ("lr", "grad_norm", "kl", "ess_token", "ess_seq", "reward_mean", "clip_frac", "weight_sync_s"):
        assert t[col].isna().all(), col
    # The one metrics module reads it: staleness of the two consumed samples is 1 and 0.
    m = compute_metrics(trace)
    assert m["staleness/mean"] == 0.5
    assert m["time/wall_s"] == 4.0 and m["throughput/tokens_per_s"] == 40 / 4.0


@pytest.mark.parametrize("table, drop", [("samples", "version_start"), ("samples", "t_consumed"), ("steps", "t_end")])
def test_missing_required_column(tmp_path, table, drop):
    frames = {"samples": pd.read_csv(io.StringIO(EXTERNAL_SAMPLES)),
              "steps": pd.read_csv(io.StringIO(EXTERNAL_STEPS))}
    frames[table] = frames[table].drop(columns=drop)
    folder = write_external(tmp_path / "ext", frames["samples"].to_csv(index=False), frames["steps"].to_csv(index=False))
    with pytest.raises(TraceError) as err:
        read_trace(folder)
    assert str(err.value) == f"{folder / f'{table}.csv'}: missing column(s) {drop}"


def test_unreadable_column_and_missing_folder(tmp_path):
    folder = write_external(tmp_path / "ext", EXTERNAL_SAMPLES.replace("0,0,10,", "0,zero,10,"), EXTERNAL_STEPS)
    with pytest.raises(TraceError, match=r"samples\.csv: column worker_id: 1 row is not a number \(row 0: 'zero'\); "
                                         r"a worker id must be a whole number >= 0 \(-1 = unknown\)$"):
        read_trace(folder)
    with pytest.raises(TraceError, match="no such trace folder"):
        read_trace(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match=r"no samples\.parquet or samples\.csv"):
        read_trace(tmp_path / "empty")


def test_in_memory_trace_header_defaults():
    trace = Trace(pd.DataFrame({"worker_id": np.array([0, 3], np.int32)}), pd.DataFrame())
    assert trace.header == {} and trace.n_workers == 4
