"""The trace schema shared by simulated and real runs: one row per sample, one row per learner step.

A trace is a folder: `samples.parquet`, `steps.parquet` (or `.csv`) and `header.json` with the config
and the run's provenance. Missing values: times are NaN, versions and steps are -1.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, NoReturn

import numpy as np
import pandas as pd

from sim.errors import StalecastError
from sim.outputs import staged

SCHEMA = "stalecast.trace/1"

# column -> dtype (docs/design.md). `version_mean` (token-averaged policy version of the sample's tokens) is there
# so token staleness can be computed from any trace; it equals version_start without interruptions. `preemptions`:
# how often the rollout engine evicted the sample's KV cache (hardware.memory.kv_policy; -1 = not recorded).
SAMPLE_COLUMNS: dict[str, str] = {
    "sample_id": "int64", "group_id": "int64", "worker_id": "int32",
    "prompt_len": "int32", "response_len": "int32",
    "t_admit": "float64", "t_start": "float64", "t_end": "float64", "t_consumed": "float64",
    "version_start": "int32", "version_end": "int32", "version_mean": "float64", "version_consumed": "int32",
    "learner_step": "int32", "dropped": "bool", "reward": "float32", "preemptions": "int32",
}
STEP_COLUMNS: dict[str, str] = {
    "step": "int32", "t_start": "float64", "t_end": "float64", "version": "int32",
    "n_samples": "int32", "n_tokens": "int64", "queue_len": "int32",
    "lr": "float64", "grad_norm": "float64", "kl": "float64", "ess_token": "float64", "ess_seq": "float64",
    "reward_mean": "float64", "clip_frac": "float64", "weight_sync_s": "float64",
}


class TraceError(StalecastError, ValueError):
    """A trace file that does not follow the schema: names the file, the column and the reason."""


@dataclass
class Trace:
    samples: pd.DataFrame
    steps: pd.DataFrame
    header: dict = field(default_factory=dict)
    # The whole samples table a chunk of rows at a time, when `samples` holds only some of its columns: a large
    # simulation writes its table straight from its ledger instead of holding every column of every sample.
    sample_chunks: Callable[[], Iterator[pd.DataFrame]] | None = None

    @property
    def n_workers(self) -> int:
        return int(self.header.get("rollout_workers") or self.samples["worker_id"].max() + 1)

    def write(self, out_dir: str | Path, fmt: str = "parquet") -> Path:
        """Write atomically: the folder appears complete or not at all (and replaces only a stalecast folder)."""
        if fmt not in ("parquet", "csv"):
            raise ValueError(f"unknown trace format {fmt!r} (parquet or csv)")
        with staged(Path(out_dir), "trace", option="trace folder") as tmp:
            for name, frame in (("samples", self.samples), ("steps", self.steps)):
                path = tmp / f"{name}.{fmt}"
                if name == "samples" and self.sample_chunks is not None:
                    write_chunks(self.sample_chunks(), path)
                elif fmt == "parquet":
                    frame.to_parquet(path, index=False)
                else:
                    frame.to_csv(path, index=False)
            (tmp / "header.json").write_text(json.dumps(self.header, indent=2, default=str))
        return Path(out_dir)


def write_chunks(frames: Iterable[pd.DataFrame], path: Path) -> None:
    """One table file (.parquet or .csv) from row chunks with the same columns (at least one), holding one chunk
    at a time: what `to_parquet(index=False)` or `to_csv(index=False)` writes of the chunks put together (the same
    bytes for a single chunk; in Parquet a row group or more per chunk, the same table read back)."""
    if path.suffix == ".csv":
        for i, frame in enumerate(frames):
            frame.to_csv(path, index=False, header=i == 0, mode="w" if i == 0 else "a")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    try:
        for frame in frames:
            table = pa.Table.from_pandas(frame, schema=writer.schema if writer else None, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def provenance(source: str) -> dict:
    from sim import __version__
    return {"source": source, "stalecast": __version__, "host": platform.node(),
            "python": platform.python_version(), "created": datetime.now(timezone.utc).isoformat()}


# --------------------------------------------------------------------------- reading: every trace passes the door
# A CSV cell left empty (or spelt as missing, as R, polars and SQL exports write it) is a missing value: -1 in the
# integer columns that allow one, NaN in the time columns. "nan" spelt out is a NaN value: an error in an integer
# column. In Parquet a null in an integer column is missing; a NaN (or null) in a floating column is NaN.
CSV_MISSING = ["", "NA", "N/A", "n/a", "null", "NULL", "None", "<NA>", "#N/A"]
NAN_TEXT = ("nan", "+nan", "-nan")
SHOWN = 5  # offending rows an error names

# Integer columns: (what a value is, what -1 means; None when every row needs a value).
INT_MEANING: dict[str, tuple[str, str | None]] = {
    "sample_id": ("a sample id", None), "group_id": ("a group id", None),
    "worker_id": ("a worker id", "unknown"), "prompt_len": ("a length", "unknown"), "response_len": ("a length", None),
    "version_start": ("a version", "not started"), "version_end": ("a version", "not finished"),
    "version_consumed": ("a version", "not consumed"), "learner_step": ("a learner step", "not consumed"),
    "preemptions": ("a count", "not recorded"),
    "step": ("a learner step", None), "version": ("a version", "unknown"),
    "n_samples": ("a count", "unknown"), "n_tokens": ("a count", "unknown"), "queue_len": ("a count", "unknown"),
}
# Floating columns: (why, may be NaN, lowest value or None). Learning diagnostics (grad_norm, kl, ess_*,
# reward_mean, clip_frac) are not checked: a diverged run records them as they were, infinite or NaN.
SAMPLE_FLOATS: dict[str, tuple[str, bool, float | None]] = {
    **{c: ("a time must be a finite number of seconds >= 0 (NaN = not yet)", True, 0.0)
       for c in ("t_admit", "t_start", "t_end", "t_consumed")},
    "version_mean": ("a token-averaged version must be finite and >= 0 (NaN = no tokens yet)", True, 0.0),
    "reward": ("a reward must be finite (NaN = none)", True, None),
}
STEP_FLOATS: dict[str, tuple[str, bool, float | None]] = {
    "t_start": ("every step has a start time: a finite number of seconds >= 0", False, 0.0),
    "t_end": ("every step has an end time: a finite number of seconds >= 0", False, 0.0),
    "weight_sync_s": ("a duration must be a finite number of seconds >= 0 (NaN = unknown)", True, 0.0),
    "lr": ("a learning rate must be finite (NaN = unknown)", True, None),
}
# Every sample of a group shares these: a group is admitted whole to one worker and consumed whole.
GROUP_SHARED = ("worker_id", "t_start", "version_start", "t_consumed", "version_consumed", "learner_step", "dropped")


def _int_why(col: str) -> str:
    noun, missing = INT_MEANING[col]
    return f"{noun} must be a whole number >= 0" + (f" (-1 = {missing})" if missing else "")


def _fail(where, col: str | None, bad: np.ndarray, what: str, why: str, unit: str = "row",
          ids: np.ndarray | None = None, value: Callable[[int], str] | None = None) -> NoReturn:
    """Raise the one-line error: `where: column col: N rows have X (rows i, j, ...); why`. `what` holds
    {has}/{is}/{do} for the verb that agrees with N; `ids` names the offending rows (default: row numbers from 0);
    `value(i)` shows what row i holds."""
    idx = np.flatnonzero(bad)
    n = len(idx)
    names = idx[:SHOWN] if ids is None else np.asarray(ids)[idx[:SHOWN]]
    shown = [f"{i}: {value(j)}" if value is not None else str(i) for i, j in zip(names, idx[:SHOWN])]
    one = n == 1
    verbs = {"has": "has" if one else "have", "is": "is" if one else "are", "do": "does" if one else "do"}
    column = f"column {col}: " if col else ""
    raise TraceError(f"{where}: {column}{n} {unit}{'' if one else 's'} {what.format(**verbs)} "
                     f"({unit}{'' if one else 's'} {', '.join(shown)}{', ...' if n > SHOWN else ''}); {why}")


def _one_line(exc: BaseException, path: Path) -> str:
    """The reason a reader gave, on one line, without the path the error already starts with."""
    text = " ".join(str(exc).replace(f" '{path}'", "").replace(str(path), "").split())
    return text[:200] or type(exc).__name__


def _load(path: Path) -> tuple[pd.DataFrame, set[str]]:
    """A table file as read, and the columns whose null cells are missing values rather than NaN (see above)."""
    kind = "Parquet" if path.suffix == ".parquet" else "CSV"
    if path.stat().st_size == 0:
        raise TraceError(f"{path}: empty file (0 bytes)")
    try:
        if kind == "Parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            table = pq.read_table(path)
            frame = table.to_pandas()
            marked = {f.name for f in table.schema if not pa.types.is_floating(f.type)}
        else:
            frame = pd.read_csv(path, keep_default_na=False, na_values=CSV_MISSING)
            marked = set(frame.columns)
    except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:  # ArrowInvalid is one
        raise TraceError(f"{path}: not a readable {kind} file ({_one_line(exc, path)})") from None
    if frame.empty:
        raise TraceError(f"{path}: no rows")
    return frame, marked


def _read_table(folder: Path, name: str) -> tuple[pd.DataFrame, set[str], Path]:
    for ext in ("parquet", "csv"):
        path = folder / f"{name}.{ext}"
        if path.is_file():
            return (*_load(path), path)
    raise TraceError(f"{folder}: no {name}.parquet or {name}.csv")


def _require(frame: pd.DataFrame, path: Path, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise TraceError(f"{path}: missing column(s) {', '.join(missing)}")


def _numbers(raw: pd.Series, path: Path, col: str, why: str) -> np.ndarray:
    """float64 values of a column; text that is not a number is an error (NaN spelt out reads as NaN)."""
    if pd.api.types.is_numeric_dtype(raw) or pd.api.types.is_bool_dtype(raw):
        return raw.to_numpy(np.float64, na_value=np.nan)
    values = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    text = raw.astype("string").str.strip().str.lower()
    bad = np.isnan(values) & raw.notna().to_numpy() & ~text.isin(NAN_TEXT).to_numpy(bool)
    if bad.any():
        _fail(path, col, bad, "{is} not a number", why, value=lambda i: repr(raw.iloc[i]))
    return values


def _int_column(raw: pd.Series, dtype: str, marked: bool, path: Path, col: str) -> np.ndarray:
    """An integer column: NaN, infinite or fractional values are errors; a missing cell is -1 where allowed."""
    bounds = np.iinfo(dtype)
    if pd.api.types.is_integer_dtype(raw) and not raw.hasnans:
        values = raw.to_numpy()
    else:
        values = _numbers(raw, path, col, _int_why(col))
        missing = raw.isna().to_numpy() if marked else np.zeros(len(values), bool)
        for bad, what in ((np.isnan(values) & ~missing, "{has} NaN"), (np.isinf(values), "{is} infinite"),
                          (np.isfinite(values) & (values != np.trunc(values)), "{is} not a whole number")):
            if bad.any():
                _fail(path, col, bad, what, _int_why(col))
        if missing.any():
            if INT_MEANING[col][1] is None:
                _fail(path, col, missing, "{has} no value", _int_why(col))
            values = np.where(missing, -1.0, values)
    outside = (values < bounds.min) | (values > bounds.max)
    if outside.any():
        _fail(path, col, outside, f"{{is}} outside the {dtype} range", _int_why(col), value=lambda i: values[i])
    return values.astype(dtype, copy=False)


def _bool_column(raw: pd.Series, path: Path, col: str) -> np.ndarray:
    if pd.api.types.is_bool_dtype(raw) and not raw.hasnans:
        return raw.to_numpy(bool)
    text = raw.astype("string").str.strip().str.lower()
    true, false = text.isin(("true", "1", "1.0")).to_numpy(bool), text.isin(("false", "0", "0.0")).to_numpy(bool)
    if not (true | false).all():
        _fail(path, col, ~(true | false), "{is} not true or false", "dropped is true or false on every row",
              value=lambda i: repr(raw.iloc[i]))
    return true


def _conform(raw: pd.DataFrame, marked: set[str], columns: dict[str, str], floats: dict, path: Path
             ) -> dict[str, np.ndarray]:
    """The schema's columns the file has, read as their dtypes."""
    out = {}
    for col, dtype in columns.items():
        if col not in raw.columns:
            continue
        if dtype == "bool":
            out[col] = _bool_column(raw[col], path, col)
        elif dtype.startswith("int"):
            out[col] = _int_column(raw[col], dtype, col in marked, path, col)
        else:
            why = floats[col][0] if col in floats else f"{col} is a number"
            out[col] = _numbers(raw[col], path, col, why).astype(dtype)
    return out


def _frame(cols: dict[str, np.ndarray], n: int, columns: dict[str, str]) -> pd.DataFrame:
    """The full table: columns the file lacks hold the missing value (NaN, -1, False)."""
    def absent(dtype: str) -> np.ndarray:
        return np.full(n, np.nan if dtype.startswith("float") else (False if dtype == "bool" else -1), dtype)
    return pd.DataFrame({c: cols[c] if c in cols else absent(dtype) for c, dtype in columns.items()}).astype(columns)


SAMPLE_REQUIRED = ("group_id", "worker_id", "response_len", "t_start", "t_end", "t_consumed",
                   "version_start", "version_consumed")
STEP_REQUIRED = ("step", "t_start", "t_end")


def _samples(raw: pd.DataFrame, marked: set[str], path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """The samples table; defaults for columns other systems may not log: no interruption, nothing dropped."""
    _require(raw, path, required)
    cols = _conform(raw, marked, SAMPLE_COLUMNS, SAMPLE_FLOATS, path)
    cols.setdefault("sample_id", np.arange(len(raw), dtype="int64"))
    cols.setdefault("version_end", cols["version_start"])
    if "version_mean" not in cols:  # every token carries the start version; none yet where not started
        v = cols["version_start"]
        cols["version_mean"] = np.where(v >= 0, v, np.nan)
    return _frame(cols, len(raw), SAMPLE_COLUMNS)


def _read_header(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        header = json.loads(path.read_text())
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TraceError(f"{path}: not valid JSON ({_one_line(exc, path)})") from None
    if not isinstance(header, dict):
        raise TraceError(f"{path}: expected a JSON object, got {type(header).__name__}")
    return header


def read_trace(folder: str | Path) -> Trace:
    """Read a trace folder (ours or another system's, with at least the required columns); `check_trace` vets it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TraceError(f"{folder}: no such trace folder")
    raw, marked, spath = _read_table(folder, "samples")
    samples = _samples(raw, marked, spath, SAMPLE_REQUIRED)
    raw, marked, tpath = _read_table(folder, "steps")
    _require(raw, tpath, STEP_REQUIRED)
    steps = _frame(_conform(raw, marked, STEP_COLUMNS, STEP_FLOATS, tpath), len(raw), STEP_COLUMNS)
    trace = Trace(samples, steps, _read_header(folder / "header.json"))
    check_trace(trace, spath, tpath, folder / "header.json")
    return trace


def steps_from_samples(samples: pd.DataFrame) -> pd.DataFrame:
    """Learner-step rows for a trace that logged only samples: a step starts when its samples are consumed
    and ends when the next one starts (the last lasts the median step). Weight sync is not separable: 0."""
    used = samples[(samples["learner_step"] >= 0) & ~samples["dropped"]]
    if used.empty:
        raise TraceError("column learner_step: no sample names a learner step it was trained at (all -1 or "
                         "dropped); the learner steps of a samples file are derived from the samples they trained on")
    by_step = used.groupby("learner_step")
    starts = by_step["t_consumed"].min().to_numpy()
    period = float(np.median(np.diff(starts))) if len(starts) > 1 else 0.0
    tokens = (used["prompt_len"].clip(lower=0) + used["response_len"]).groupby(used["learner_step"]).sum()
    done_at = samples.groupby("group_id")["t_end"].max()  # NaN while a sample is still generating
    taken_at = samples.groupby("group_id")["t_consumed"].first().reindex(done_at.index)
    waiting = [int(((done_at <= t) & ~(taken_at < t)).sum()) for t in starts]
    return pd.DataFrame({
        "step": by_step.size().index.to_numpy(), "t_start": starts, "t_end": np.r_[starts[1:], starts[-1] + period],
        "version": by_step["version_consumed"].first().to_numpy(), "n_samples": by_step.size().to_numpy(),
        "n_tokens": tokens.to_numpy(), "queue_len": waiting, "weight_sync_s": 0.0,
    })


def read_any_trace(path: str | Path) -> Trace:
    """A trace folder, or a single samples file (.parquet/.csv) from another system: its learner-step
    rows are derived with `steps_from_samples`."""
    path = Path(path)
    if path.is_dir():
        return read_trace(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file or folder")
    if path.suffix not in (".parquet", ".csv"):
        raise TraceError(f"{path}: expected a .parquet or .csv samples file, or a trace folder")
    raw, present = _load(path)
    return trace_from_samples(raw, present, path, (*SAMPLE_REQUIRED, "learner_step", "prompt_len"),
                              f"external: {path}", path)


def trace_from_samples(raw: pd.DataFrame, present: set, path: Path, required: tuple[str, ...], source: str,
                       where) -> Trace:
    """A checked trace from one table of samples read from `path` (`present`: the columns the file had; the
    schema's defaults fill the others), its learner-step rows derived from the samples (`steps_from_samples`).
    `where` names the samples in errors."""
    samples = _samples(raw, present, path, required)
    try:
        derived = steps_from_samples(samples)
    except TraceError as exc:
        raise TraceError(f"{path}: {exc}") from None
    steps = _frame({c: derived[c].to_numpy() for c in derived.columns}, len(derived), STEP_COLUMNS)
    trace = Trace(samples, steps, {"source": source})
    check_trace(trace, where, f"{path} (learner steps derived from its samples)")
    return trace


# --------------------------------------------------------------------------- the checks
def _header_count(header: dict, keys: tuple[str, ...], where) -> int | None:
    """A count the header holds at keys (e.g. config.workload.group_size), if it has one."""
    value = header
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise TraceError(f"{where}: {'.'.join(keys)} must be a whole number >= 1, got {value!r}")
    return value


def _check_columns(frame: pd.DataFrame, where, floats: dict, ids: np.ndarray | None, unit: str) -> None:
    """Ranges of the integer columns; finiteness, missing values and ranges of the checked floating ones."""
    for col in frame.columns:
        values = frame[col].to_numpy()
        if col in INT_MEANING:
            lowest = -1 if INT_MEANING[col][1] else 0
            if len(values) and values.min() < lowest:
                _fail(where, col, values < lowest, f"{{is}} below {lowest}", _int_why(col), unit, ids)
        elif col in floats:
            why, nan_ok, lowest = floats[col]
            if not nan_ok and np.isnan(values).any():
                _fail(where, col, np.isnan(values), "{has} no value", why, unit, ids)
            if np.isinf(values).any():
                _fail(where, col, np.isinf(values), "{is} infinite", why, unit, ids)
            if lowest is not None and (values < lowest).any():
                _fail(where, col, values < lowest, f"{{is}} below {lowest:g}", why, unit, ids)


def _check_samples(s: pd.DataFrame, where, workers: int | None) -> None:
    _check_columns(s, where, SAMPLE_FLOATS, None, "row")
    col = {c: s[c].to_numpy() for c in s.columns}
    ids = col["sample_id"]
    if not np.all(ids[1:] > ids[:-1]):  # not increasing (as the project writes them): sort to find repeats
        order = np.argsort(ids, kind="stable")
        repeat = np.zeros(len(ids), bool)
        repeat[order[1:]] = ids[order[1:]] == ids[order[:-1]]
        if repeat.any():
            _fail(where, "sample_id", repeat, "{has} the id of an earlier row", "sample ids are unique")
    # NaN compares False: each pair is checked where both times are present.
    for early, late, why in (("t_admit", "t_start", "a sample starts after it is admitted"),
                             ("t_start", "t_end", "a sample ends after it starts"),
                             ("t_end", "t_consumed", "a sample is consumed after it finishes"),
                             ("t_admit", "t_end", "a sample ends after it is admitted"),
                             ("t_admit", "t_consumed", "a sample is consumed after it is admitted"),
                             ("t_start", "t_consumed", "a sample is consumed after it starts")):
        bad = col[early] > col[late]
        if bad.any():
            _fail(where, late, bad, f"{{has}} {late} < {early}", why)
    for early, late, why in (("version_start", "version_end", "a sample's last token is generated with a version "
                              "no older than its first's"),
                             ("version_end", "version_consumed", "the learner is never behind the weights a sample "
                              "was generated with"),
                             ("version_start", "version_consumed", "staleness (version_consumed - version_start) "
                              "is never negative")):
        bad = (col[late] >= 0) & (col[early] > col[late])
        if bad.any():
            _fail(where, late, bad, f"{{has}} {late} < {early}", why)
    consumed = col["version_consumed"] >= 0
    for bad, column, what, why in (
            (consumed == np.isnan(col["t_consumed"]), "t_consumed",
             "{do} not agree with version_consumed on whether the sample was consumed",
             "a consumed sample has a time and a version of consumption, an unconsumed one neither (NaN, -1)"),
            ((col["learner_step"] >= 0) & ~consumed, "learner_step", "{has} a learner step but no version_consumed",
             "a sample taken by a learner step has the version it was taken at"),
            (consumed & np.isnan(col["t_end"]), "t_end", "{is} consumed with no t_end",
             "a consumed sample has finished"),
            (consumed & (col["version_start"] < 0), "version_start", "{is} consumed with no version_start (-1)",
             "a consumed sample has started"),
            (~np.isnan(col["t_start"]) & (col["worker_id"] < 0), "worker_id", "{has} a t_start but no worker (-1)",
             "a sample that started runs on a worker")):
        if bad.any():
            _fail(where, column, bad, what, why)
    if workers is not None and col["worker_id"].max() >= workers:
        _fail(where, "worker_id", col["worker_id"] >= workers, f"{{has}} a worker id >= {workers}",
              f"the header has {workers} rollout worker(s), ids 0 to {workers - 1}")


def _check_groups(s: pd.DataFrame, where, group_size: int | None, header_at) -> None:
    """A group's samples share GROUP_SHARED; every group has the same number of samples (the header's
    group_size, where it has one)."""
    gid = s["group_id"].to_numpy()
    order = None if np.all(gid[1:] >= gid[:-1]) else np.argsort(gid, kind="stable")
    pick = (lambda c: s[c].to_numpy()) if order is None else (lambda c: s[c].to_numpy()[order])  # noqa: E731
    gid = pick("group_id")
    first = np.r_[0, np.flatnonzero(gid[1:] != gid[:-1]) + 1]
    sizes = np.diff(np.r_[first, len(gid)])
    if group_size is not None:
        expected, what, why = group_size, "", f"config.workload.group_size in {header_at} is {group_size}"
    else:
        expected, what, why = int(np.bincount(sizes).argmax()), ", as most do", "every group has as many samples"
    if (sizes != expected).any():
        _fail(where, "group_id", sizes != expected, f"{{do}} not have {expected} samples{what}", why, "group",
              gid[first])
    for c in GROUP_SHARED:
        values = pick(c)
        ref = np.repeat(values[first], sizes)
        differ = values != ref
        if values.dtype.kind == "f":
            differ &= ~(np.isnan(values) & np.isnan(ref))
        if differ.any():
            _fail(where, c, np.logical_or.reduceat(differ, first), "{has} samples that disagree",
                  "every sample of a group shares it (a group is admitted to one worker and consumed whole)",
                  "group", gid[first])


def _check_steps(st: pd.DataFrame, where) -> None:
    step = st["step"].to_numpy()
    _check_columns(st, where, STEP_FLOATS, step, "step")
    back = np.r_[False, step[1:] <= step[:-1]]
    if back.any():
        _fail(where, "step", back, "{do} not come after the row before", "step ids are unique and sorted")
    t_start, t_end = st["t_start"].to_numpy(), st["t_end"].to_numpy()
    if (t_end < t_start).any():
        _fail(where, "t_end", t_end < t_start, "{has} t_end < t_start", "a step ends after it starts", "step", step)
    last = st.iloc[-1]
    if not last["t_end"] + np.nan_to_num(last["weight_sync_s"]) > 0:
        raise TraceError(f"{where}: column t_end: the last step ends at 0 s; a run lasts some time (rates are per "
                         f"second)")


def _check_links(s: pd.DataFrame, st: pd.DataFrame, samples_at, steps_at) -> None:
    """Samples against the per-step rows: each learner step a sample names exists, each step's version is that of
    the samples taken at it, and its n_samples counts those it trained on. Samples that name no learner step
    (another system's trace without the column) cannot be counted per step."""
    steps = st["step"].to_numpy()
    named = s["learner_step"].to_numpy()
    taken = named >= 0
    if not taken.any():
        return
    pos = np.searchsorted(steps, named[taken])
    exists = (pos < len(steps)) & (steps[np.minimum(pos, len(steps) - 1)] == named[taken])
    if not exists.all():
        lost = np.zeros(len(named), bool)
        lost[np.flatnonzero(taken)[~exists]] = True
        _fail(samples_at, "learner_step", lost, "{has} a learner step missing from the steps table",
              f"each learner step a sample names has a row in {Path(str(steps_at)).name}",
              value=lambda i: f"step {named[i]}")
    step_version = st["version"].to_numpy()[pos]
    differ = np.zeros(len(named), bool)
    differ[taken] = (step_version >= 0) & (s["version_consumed"].to_numpy()[taken] != step_version)
    if differ.any():
        _fail(samples_at, "version_consumed", differ, "{do} not match the version of the step that took them",
              "a learner step takes its samples at its own version")
    trained = np.bincount(pos[~s["dropped"].to_numpy()[taken]], minlength=len(steps))
    n_samples = st["n_samples"].to_numpy()
    off = (n_samples >= 0) & (n_samples != trained)
    if off.any():
        _fail(steps_at, "n_samples", off, "{do} not match the samples trained on at the step",
              "n_samples counts the samples consumed at the step and not dropped", "step", steps,
              value=lambda i: f"{n_samples[i]} vs {trained[i]}")


def check_trace(trace: Trace, samples_at: str | Path = "samples", steps_at: str | Path = "steps",
                header_at: str | Path = "header") -> None:
    """Raise TraceError at the first rule the trace breaks, naming the file (`*_at`), the column, the count and
    the first offending rows: ranges and finiteness of each column, the order of a sample's times and versions,
    consumption, unique sample ids, groups, sorted steps, and samples against steps. Missing values follow the
    schema: NaN times, -1 versions, steps, workers and prompt lengths."""
    if trace.samples.empty or trace.steps.empty:
        raise TraceError(f"{samples_at if trace.samples.empty else steps_at}: no rows")
    group_size = _header_count(trace.header, ("config", "workload", "group_size"), header_at)
    workers = _header_count(trace.header, ("rollout_workers",), header_at)
    _check_samples(trace.samples, samples_at, workers)
    _check_groups(trace.samples, samples_at, group_size, header_at)
    _check_steps(trace.steps, steps_at)
    _check_links(trace.samples, trace.steps, samples_at, steps_at)
