"""Traces are checked at the door: every read goes through `check_trace`, which refuses a trace that breaks the
schema's rules with one line naming the file, the column, the count and the first rows; and the validate verdict
is PASS, FAIL or INCOMPLETE, never a PASS for what was not judged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.cli import main
from sim.config import ConfigError, parse_config
from sim.engine.pipeline import simulate
from sim.trace import Trace, TraceError, read_any_trace, read_trace
from validate.compare import FAIL, INCOMPLETE, PASS, Row, Tolerances, compare, not_judged, verdict


def write_folder(folder: Path, samples: pd.DataFrame, steps: pd.DataFrame, header: dict | None, fmt: str) -> Path:
    """A trace folder as another system would write it (pandas, not Trace.write). CSV spells NaN out as "nan" so
    that a NaN stays a NaN: an empty cell is the CSV way of writing a missing value."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in (("samples", samples), ("steps", steps)):
        if fmt == "parquet":
            frame.to_parquet(folder / f"{name}.parquet", index=False)
        else:
            frame.to_csv(folder / f"{name}.csv", index=False, na_rep="nan")
    if header is not None:
        (folder / "header.json").write_text(json.dumps(header))
    return folder


@pytest.fixture
def parts(tiny_trace):
    """Copies of the small simulated trace's tables and header, to corrupt."""
    return tiny_trace.samples.copy(), tiny_trace.steps.copy(), json.loads(json.dumps(tiny_trace.header))


def _set(frame: pd.DataFrame, col: str, rows, value) -> None:
    """frame.loc[rows, col] = value, the column first widened to hold it (text; floats for NaN, inf, 0.5)."""
    if isinstance(value, str):
        frame[col] = frame[col].astype(str)
    elif isinstance(value, float) and frame[col].dtype.kind in "iub" and not value.is_integer():
        frame[col] = frame[col].astype("float64")
    frame.loc[rows, col] = value


def _set_all(frame: pd.DataFrame, rows, **values) -> None:
    for col, value in values.items():
        _set(frame, col, rows, value)


def _negate_times(s, t, h):
    for col in ("t_admit", "t_start", "t_end", "t_consumed"):
        s[col] = -s[col]


def _drop_step_1(s, t, h):
    return s, t.drop(index=1)


def _swap_steps(s, t, h):
    t["step"] = t["step"].to_numpy()[[1, 0, 2]]


# (id, corruption of (samples, steps, header) in place, or returning new (samples, steps), the file the error names,
# what it says after the file name).
# The small trace: 8 groups of 2 samples (rows 2g, 2g+1); groups 0-1 taken at step 0, 2-3 at step 1, 4-5 at step
# 2 (versions 0, 1, 2), groups 6-7 waiting; 2 workers.
CORRUPTIONS = [
    ("nan-version", lambda s, t, h: _set(s, "version_start", [0, 4, 9], math.nan), "samples",
     "column version_start: 3 rows have NaN (rows 0, 4, 9); a version must be a whole number >= 0 (-1 = not started)"),
    ("fractional-version", lambda s, t, h: _set(s, "version_end", [3], 0.5), "samples",
     "column version_end: 1 row is not a whole number (row 3);"),
    ("text-in-int-column", lambda s, t, h: _set(s, "group_id", [6], "six"), "samples",
     "column group_id: 1 row is not a number (row 6: 'six'); a group id must be a whole number >= 0"),
    ("inf-time", lambda s, t, h: _set(s, "t_end", [3], math.inf), "samples",
     "column t_end: 1 row is infinite (row 3); a time must be a finite number of seconds >= 0"),
    ("negative-times", _negate_times, "samples", "column t_admit: 8 rows are below 0 (rows 8, 9, 10, 11, 12, ...)"),
    ("version-below-missing", lambda s, t, h: _set(s, "version_end", [5], -3), "samples",
     "column version_end: 1 row is below -1 (row 5);"),
    ("dropped-not-boolean", lambda s, t, h: _set(s, "dropped", [1], "maybe"), "samples",
     "column dropped: 1 row is not true or false (row 1: 'maybe')"),
    ("reward-infinite", lambda s, t, h: _set(s, "reward", [2], math.inf), "samples",
     "column reward: 1 row is infinite (row 2); a reward must be finite (NaN = none)"),
    ("admitted-after-start", lambda s, t, h: _set(s, "t_admit", [8, 9], 0.2), "samples",
     "column t_start: 2 rows have t_start < t_admit (rows 8, 9); a sample starts after it is admitted"),
    ("consumed-before-end", lambda s, t, h: _set(s, "t_end", [4], 0.5), "samples",
     "column t_consumed: 1 row has t_consumed < t_end (row 4); a sample is consumed after it finishes"),
    ("negative-staleness", lambda s, t, h: _set_all(s, [8, 9], version_start=3, version_end=3, version_mean=3.0),
     "samples", "column version_consumed: 2 rows have version_consumed < version_end (rows 8, 9);"),
    ("consumed-unfinished", lambda s, t, h: _set(s, "t_end", [0], math.nan), "samples",
     "column t_end: 1 row is consumed with no t_end (row 0); a consumed sample has finished"),
    ("consumed-without-time", lambda s, t, h: _set(s, "t_consumed", [0, 1], math.nan), "samples",
     "column t_consumed: 2 rows do not agree with version_consumed on whether the sample was consumed (rows 0, 1)"),
    ("step-without-version", lambda s, t, h: _set_all(s, [0, 1], t_consumed=math.nan, version_consumed=-1),
     "samples",
     "column learner_step: 2 rows have a learner step but no version_consumed (rows 0, 1)"),
    ("worker-beyond-header", lambda s, t, h: _set(s, "worker_id", [12, 13], 2), "samples",
     "column worker_id: 2 rows have a worker id >= 2 (rows 12, 13); the header has 2 rollout worker(s)"),
    ("duplicate-sample-ids", lambda s, t, h: _set(s, "sample_id", [5], 4), "samples",
     "column sample_id: 1 row has the id of an earlier row (row 5); sample ids are unique"),
    ("every-row-group-0", lambda s, t, h: _set(s, "group_id", slice(None), 0), "samples",
     "column group_id: 1 group does not have 2 samples (group 0); config.workload.group_size in"),
    ("group-split-across-workers", lambda s, t, h: _set(s, "worker_id", [13], 1), "samples",
     "column worker_id: 1 group has samples that disagree (group 6); every sample of a group shares it"),
    ("group-consumed-twice", lambda s, t, h: _set(s, "t_consumed", [3], 0.06), "samples",
     "column t_consumed: 1 group has samples that disagree (group 1)"),
    ("group-missing-a-sample", lambda s, t, h: (s.drop(index=15), t), "samples",
     "column group_id: 1 group does not have 2 samples"),
    ("steps-not-sorted", _swap_steps, "steps", "column step: 1 row does not come after the row before (row 1);"),
    ("step-ends-before-start", lambda s, t, h: _set(t, "t_end", [1], 0.1), "steps",
     "column t_end: 1 step has t_end < t_start (step 1); a step ends after it starts"),
    ("step-time-missing", lambda s, t, h: _set(t, "t_start", [2], math.nan), "steps",
     "column t_start: 1 step has no value (step 2); every step has a start time"),
    ("step-time-infinite", lambda s, t, h: _set(t, "weight_sync_s", [0], math.inf), "steps",
     "column weight_sync_s: 1 step is infinite (step 0)"),
    ("step-missing", _drop_step_1, "samples",
     "column learner_step: 4 rows have a learner step missing from the steps table (rows 4: step 1, 5: step 1, "
     "6: step 1, "
     "7: step 1);"),
    ("n-samples-mismatch", lambda s, t, h: _set(t, "n_samples", [1], 6), "steps",
     "column n_samples: 1 step does not match the samples trained on at the step (step 1: 6 vs 4);"),
    ("step-version-mismatch", lambda s, t, h: _set(t, "version", [2], 5), "samples",
     "column version_consumed: 4 rows do not match the version of the step that took them (rows 8, 9, 10, 11)"),
    ("header-group-size", lambda s, t, h: h["config"]["workload"].update(group_size="two"), "header.json",
     "config.workload.group_size must be a whole number >= 1, got 'two'"),
]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("corrupt, file, message", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_a_corrupted_trace_is_refused_naming_file_column_and_rows(tmp_path, parts, fmt, corrupt, file, message):
    samples, steps, header = parts
    samples, steps = corrupt(samples, steps, header) or (samples, steps)
    folder = write_folder(tmp_path / "trace", samples, steps, header, fmt)
    path = folder / (file if file == "header.json" else f"{file}.{fmt}")
    with pytest.raises(TraceError) as err:
        read_trace(folder)
    assert str(err.value).startswith(f"{path}: {message}")
    assert "\n" not in str(err.value)


def test_the_uncorrupted_trace_reads_back_equal(tmp_path, parts, tiny_trace):
    """The corruptions above start from a trace that passes, in both formats."""
    for fmt in ("parquet", "csv"):
        back = read_trace(write_folder(tmp_path / fmt, *parts, fmt))
        pd.testing.assert_frame_equal(back.samples, tiny_trace.samples, check_exact=True)
        pd.testing.assert_frame_equal(back.steps, tiny_trace.steps, check_exact=True)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    (lambda p: p.write_text(p.read_text().splitlines()[0] + "\n") if p.suffix == ".csv"
     else pd.read_parquet(p).iloc[:0].to_parquet(p, index=False), "no rows"),
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "not a readable Parquet file ("),
], ids=["zero-bytes", "header-only", "truncated"])
@pytest.mark.parametrize("table", ["samples", "steps"])
def test_an_unreadable_table_file_is_refused_naming_it(tmp_path, parts, fmt, damage, message, table):
    folder = write_folder(tmp_path / "trace", *parts, fmt)
    path = folder / f"{table}.{fmt}"
    damage(path)
    with pytest.raises(TraceError) as err:
        read_trace(folder)
    if fmt == "csv" and message.startswith("not a readable"):
        # A CSV file cut short reads as fewer rows, the last one short of cells: a rule of the trace then fails.
        assert str(err.value).startswith(str(folder)) and "column " in str(err.value)
    else:
        assert str(err.value).startswith(f"{path}: {message}")


def test_a_csv_row_with_extra_fields_is_refused_naming_the_file(tmp_path, parts):
    folder = write_folder(tmp_path / "trace", *parts, "csv")
    path = folder / "samples.csv"
    path.write_text(path.read_text() + "1,2,3," * 10 + "\n")
    with pytest.raises(TraceError, match=rf"^{path}: not a readable CSV file \(.*Expected 17 fields"):
        read_trace(folder)


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"), ("[1, 2]", "expected a JSON object, got list"), ("\xff", "not valid JSON")])
def test_a_broken_header_is_refused_naming_it(tmp_path, parts, text, message):
    folder = write_folder(tmp_path / "trace", *parts[:2], None, "parquet")
    (folder / "header.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(TraceError, match=f"^{folder / 'header.json'}: {message}"):
        read_trace(folder)


def test_missing_values_follow_the_schema_and_nan_in_an_integer_column_does_not(tmp_path, parts):
    """An empty CSV cell, or a null in an integer Parquet column, is a missing value: -1 where the column allows
    one. A NaN in an integer column is an error, and so is a missing value where every row needs one."""
    samples, steps, header = parts
    waiting = samples["learner_step"] < 0
    folder = tmp_path / "csv"
    write_folder(folder, samples, steps, header, "csv")
    for col in ("version_consumed", "learner_step"):  # the waiting groups' -1 written as empty cells
        frame = pd.read_csv(folder / "samples.csv", dtype=str, keep_default_na=False)
        frame.loc[waiting, col] = ""
        frame.to_csv(folder / "samples.csv", index=False)
    pd.testing.assert_frame_equal(read_trace(folder).samples, samples, check_exact=True)
    frame.loc[3, "group_id"] = ""
    frame.to_csv(folder / "samples.csv", index=False)
    with pytest.raises(TraceError, match=r"samples\.csv: column group_id: 1 row has no value \(row 3\); a group id"):
        read_trace(folder)

    nullable = samples.astype({"version_consumed": "Int32"})
    nullable.loc[waiting, "version_consumed"] = pd.NA
    write_folder(tmp_path / "pq", nullable, steps, header, "parquet")
    pd.testing.assert_frame_equal(read_trace(tmp_path / "pq").samples, samples, check_exact=True)
    as_float = samples.astype({"version_consumed": "float64"})
    as_float.loc[waiting, "version_consumed"] = np.nan
    write_folder(tmp_path / "pq", as_float, steps, header, "parquet")
    with pytest.raises(TraceError, match=r"column version_consumed: 4 rows have NaN \(rows 12, 13, 14, 15\)"):
        read_trace(tmp_path / "pq")


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_single_samples_file_is_checked_too(tmp_path, parts, fmt):
    samples, _, _ = parts
    path = tmp_path / f"samples.{fmt}"
    write_folder(tmp_path, samples, parts[1], None, fmt)
    trace = read_any_trace(path)
    assert trace.steps["n_samples"].tolist() == [4, 4, 4]
    # Without a header no group size is known, but a group's samples must still agree.
    write_folder(tmp_path, samples.assign(group_id=0), parts[1], None, fmt)
    with pytest.raises(TraceError, match=rf"^{path}: column worker_id: 1 group has samples that disagree \(group 0\)"):
        read_any_trace(path)
    write_folder(tmp_path, samples.assign(learner_step=-1), parts[1], None, fmt)
    with pytest.raises(TraceError, match=rf"^{path}: column learner_step: no sample names a learner step"):
        read_any_trace(path)


CONFIGS = st.fixed_dictionaries({
    "mode": st.sampled_from(["sync", "one_step_off", "async"]),
    "control": st.sampled_from(["oldest_unconsumed", "drop", "areal", "prime_rl", "tinker", "none"]),
    "staleness": st.integers(0, 2), "interruptible": st.booleans(), "group": st.integers(1, 3),
    "batch": st.integers(1, 3), "workers": st.integers(1, 3), "steps": st.integers(1, 6),
    "seed": st.integers(0, 1000), "batching": st.sampled_from(["continuous", "static"]),
})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(c=CONFIGS)
def test_simulated_traces_pass_the_checks(tmp_path_factory, config_data, c):
    """Simulated traces of many configurations (in-flight, waiting and dropped samples, interrupted workers, static
    batches) read back unchanged through the checks, as a folder and as a single samples file."""
    async_only = {"staleness_control": c["control"], "max_staleness": c["staleness"],
                  "interruptible": c["interruptible"]} if c["mode"] == "async" else {}
    config_data.update(seed=c["seed"], run={"steps": c["steps"]})
    config_data["pipeline"] = {"mode": c["mode"], **async_only}
    config_data["workload"].update(group_size=c["group"], batch_prompts=c["batch"])
    config_data["cluster"] = {"rollout_workers": c["workers"], "max_concurrency": 3 * c["group"],
                              "batching": c["batching"]}
    trace = simulate(parse_config(config_data))
    out = tmp_path_factory.mktemp("sim")
    for fmt in ("parquet", "csv"):
        folder = trace.write(out / fmt, fmt)
        back = read_trace(folder)
        pd.testing.assert_frame_equal(back.samples, trace.samples, check_exact=True)
        pd.testing.assert_frame_equal(back.steps, trace.steps, check_exact=True)
        assert read_any_trace(folder / f"samples.{fmt}").steps["step"].tolist() == trace.steps["step"].tolist()


def test_the_real_trainers_conventions_pass(tmp_path, parts):
    """Rows the real trainer writes beside the simulator's: a group whose worker was killed before it reported
    (worker -1, prompt length -1, nothing but its id), a group admitted and still generating (no start yet,
    response 0 tokens), and a group taken and dropped at a step (consumption set, not counted in n_samples)."""
    samples, steps, header = parts
    unreported = {"worker_id": -1, "prompt_len": -1, "response_len": 0, "t_admit": np.nan, "t_start": np.nan,
                  "t_end": np.nan, "t_consumed": np.nan, "version_start": -1, "version_end": -1,
                  "version_mean": np.nan, "version_consumed": -1, "learner_step": -1, "dropped": False,
                  "preemptions": 0}
    in_flight = {**unreported, "worker_id": 1, "prompt_len": 4, "t_admit": 0.3, "version_start": 2}
    dropped = {**unreported, "worker_id": 0, "prompt_len": 4, "response_len": 3, "t_admit": 0.0, "t_start": 0.0,
               "t_end": 0.03, "t_consumed": 0.16, "version_start": 0, "version_end": 0, "version_mean": 0.0,
               "version_consumed": 1, "learner_step": 1, "dropped": True}
    extra = pd.DataFrame([{**row, "sample_id": 16 + 2 * g + i, "group_id": 8 + g, "reward": np.nan}
                          for g, row in enumerate((unreported, in_flight, dropped)) for i in range(2)])
    samples = pd.concat([samples, extra.astype(samples.dtypes.to_dict())], ignore_index=True)
    for fmt in ("parquet", "csv"):
        back = read_trace(write_folder(tmp_path / fmt, samples, steps, header, fmt))
        pd.testing.assert_frame_equal(back.samples, samples, check_exact=True)


# --------------------------------------------------------------------------- the verdict and the CLI
def test_verdict_is_fail_then_incomplete_then_pass():
    row = lambda ok, kind="judged": Row("m", 1.0, 1.0, 0.0, 0.0, "±10%", ok, kind)  # noqa: E731
    assert verdict([row(True), row(None, "reported"), row(None, "not requested")]) == PASS
    assert verdict([row(True), row(None)]) == INCOMPLETE
    assert verdict([row(False), row(None)]) == FAIL


def test_compare_says_what_was_not_judged_and_why(tiny_trace):
    step_s = 0.1
    rows = {r.metric: r for r in compare(tiny_trace, tiny_trace)}
    assert verdict(rows.values()) == PASS
    assert rows["speedup/vs_sync"].status == "not requested" and rows["staleness/ks"].status == "reported"
    assert not_judged(list(rows.values())) == [
        "speedup/vs_sync (not requested: no sync-mode step times to compare)"]

    # A sync step time on the measured side only: the speedup was asked for and cannot be computed.
    rows = compare(tiny_trace, tiny_trace, Tolerances(), None, step_s)
    speedup = next(r for r in rows if r.metric == "speedup/vs_sync")
    assert speedup.ok is None and speedup.status == "not computed" and verdict(rows) == INCOMPLETE
    assert speedup.note == "not computed on the predicted side: no sync-mode step time"
    assert next(r for r in compare(tiny_trace, tiny_trace, Tolerances(), step_s, step_s)
                if r.metric == "speedup/vs_sync").ok

    # A measurement whose learner trained on nothing: no staleness to compare, and a throughput of 0 that fails.
    idle = Trace(tiny_trace.samples.assign(version_consumed=-1, learner_step=-1, t_consumed=np.nan),
                 tiny_trace.steps, tiny_trace.header)
    rows = compare(tiny_trace, idle)
    assert verdict(rows) == FAIL
    missing = [r.metric for r in rows if r.status == "not computed"]
    assert missing == ["staleness/mean", "off_policy/in_flight/mean", "off_policy/in_queue/mean", "staleness/p50",
                       "staleness/p90", "staleness/p99", "staleness/max", "staleness/wasserstein1"]
    assert all(r.note == "not computed on the measured side: no sample the learner trained on"
               for r in rows if r.metric in missing)


@pytest.mark.parametrize("field", ["rel", "small_mean_abs", "quantile_abs", "idle_abs", "distance_max"])
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_tolerances_must_be_finite_and_not_negative(field, value):
    with pytest.raises(ConfigError, match=f"tolerance {field}: must be a finite number >= 0"):
        Tolerances(**{field: value})
    assert getattr(Tolerances(**{field: 0.0}), field) == 0.0  # 0: exact


@pytest.fixture
def cfg_path(tmp_path, config_data):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config_data))
    return path


@pytest.mark.parametrize("option", ["--tol-rel", "--tol-mean-abs", "--tol-quantile", "--tol-idle", "--tol-w1"])
@pytest.mark.parametrize("value", ["-1", "nan", "inf", "ten"])
def test_validate_rejects_a_bad_tolerance_option(tmp_path, cfg_path, capsys, option, value):
    assert main(["validate", str(cfg_path), "--trace", str(tmp_path), option, value,
                 "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and value in err
    assert not (tmp_path / "report").exists()


def test_validate_refuses_a_bad_trace_in_one_line(tmp_path, cfg_path, parts, capsys):
    samples, steps, header = parts
    _set(samples, "version_consumed", [8, 9], 0)  # consumed at version 0, generated with version 1
    folder = write_folder(tmp_path / "bad", samples, steps, header, "parquet")
    assert main(["validate", str(cfg_path), "--trace", str(folder), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {folder / 'samples.parquet'}: column version_consumed: 2 rows have version_consumed < "
                   f"version_end (rows 8, 9); the learner is never behind the weights a sample was generated with\n")
    assert not (tmp_path / "report").exists()


def test_validate_reports_the_verdict_and_what_was_not_judged(tmp_path, cfg_path, tiny_trace, capsys):
    tiny_trace.write(tmp_path / "measured")
    out = tmp_path / "report"
    assert main(["validate", str(cfg_path), "--trace", str(tmp_path / "measured"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == PASS and report["pass"] is True
    assert report["not_judged"] == ["speedup/vs_sync (not requested: no sync-mode step times to compare)"]
    assert "not judged: speedup/vs_sync (not requested" in capsys.readouterr().out
    assert "- not judged: speedup/vs_sync (not requested" in (out / "report.md").read_text()


def test_validate_is_incomplete_when_a_judged_metric_cannot_be_computed(tmp_path, cfg_path, tiny_trace, capsys,
                                                                       monkeypatch):
    """No trace that passes the checks leaves a judged metric without a value while the others agree (a trace with
    nothing trained has a throughput of 0, a FAIL), so the metric is made incomputable where it is computed: the
    verdict, the exit code (3), the report and the console line all follow from a None in compare's input."""
    import sim.metrics
    monkeypatch.setattr(sim.metrics, "rollout_idle", lambda trace: math.nan)  # compute_metrics: NaN -> None
    tiny_trace.write(tmp_path / "measured")
    out = tmp_path / "report"
    assert main(["validate", str(cfg_path), "--trace", str(tmp_path / "measured"), "--out", str(out)]) == 3
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == INCOMPLETE and report["pass"] is False
    assert "idle/rollout (not computed on either side: no finite value)" in report["not_judged"]
    printed = capsys.readouterr().out
    assert "INCOMPLETE" in printed and "not judged: idle/rollout (not computed on either side" in printed
    assert "**Result: INCOMPLETE**" in (out / "report.md").read_text()
