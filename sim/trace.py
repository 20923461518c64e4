"""The trace schema shared by simulated and real runs: one row per sample, one row per learner step.

A trace is a folder: `samples.parquet`, `steps.parquet` (or `.csv`) and `header.json` with the config
and the run's provenance. Missing values: times are NaN, versions and steps are -1.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from sim.errors import StalecastError
from sim.outputs import staged

SCHEMA = "stalecast.trace/1"

# column -> dtype. `version_mean` (token-averaged policy version of the sample's tokens) extends DESIGN.md's
# list so token staleness can be computed from any trace; it equals version_start without interruptions.
SAMPLE_COLUMNS: dict[str, str] = {
    "sample_id": "int64", "group_id": "int64", "worker_id": "int32",
    "prompt_len": "int32", "response_len": "int32",
    "t_admit": "float64", "t_start": "float64", "t_end": "float64", "t_consumed": "float64",
    "version_start": "int32", "version_end": "int32", "version_mean": "float64", "version_consumed": "int32",
    "learner_step": "int32", "dropped": "bool", "reward": "float32",
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

    @property
    def n_workers(self) -> int:
        return int(self.header.get("rollout_workers") or self.samples["worker_id"].max() + 1)

    def write(self, out_dir: str | Path, fmt: str = "parquet") -> Path:
        """Write atomically: the folder appears complete or not at all (and replaces only a stalecast folder)."""
        if fmt not in ("parquet", "csv"):
            raise ValueError(f"unknown trace format {fmt!r} (parquet or csv)")
        with staged(Path(out_dir), "trace", option="trace folder") as tmp:
            for name, frame in (("samples", self.samples), ("steps", self.steps)):
                if fmt == "parquet":
                    frame.to_parquet(tmp / f"{name}.parquet", index=False)
                else:
                    frame.to_csv(tmp / f"{name}.csv", index=False)
            (tmp / "header.json").write_text(json.dumps(self.header, indent=2, default=str))
        return Path(out_dir)


def provenance(source: str) -> dict:
    from sim import __version__
    return {"source": source, "stalecast": __version__, "host": platform.node(),
            "python": platform.python_version(), "created": datetime.now(timezone.utc).isoformat()}


def _read_table(folder: Path, name: str) -> tuple[pd.DataFrame, Path]:
    for ext, reader in (("parquet", pd.read_parquet), ("csv", pd.read_csv)):
        path = folder / f"{name}.{ext}"
        if path.is_file():
            return reader(path), path
    raise TraceError(f"{folder}: no {name}.parquet or {name}.csv")


def _require(frame: pd.DataFrame, path: Path, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise TraceError(f"{path}: missing column(s) {', '.join(missing)}")


def _conform(frame: pd.DataFrame, columns: dict[str, str], path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    _require(frame, path, required)
    for col, dtype in columns.items():
        if col not in frame.columns:
            frame[col] = np.nan if dtype.startswith("float") else (False if dtype == "bool" else -1)
        try:
            frame[col] = frame[col].fillna(-1).astype(dtype) if dtype.startswith("int") else frame[col].astype(dtype)
        except (TypeError, ValueError) as exc:
            raise TraceError(f"{path}: column {col}: cannot read as {dtype}: {exc}") from None
    return frame[list(columns)]


SAMPLE_REQUIRED = ("group_id", "worker_id", "response_len", "t_start", "t_end", "t_consumed",
                   "version_start", "version_consumed")
STEP_REQUIRED = ("step", "t_start", "t_end")


def _fill_optional(samples: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Defaults for sample columns other systems may not log: no interruption, nothing dropped."""
    _require(samples, path, SAMPLE_REQUIRED)  # before the defaults below read version_start
    if "sample_id" not in samples.columns:
        samples["sample_id"] = np.arange(len(samples))
    if "version_end" not in samples.columns:
        samples["version_end"] = samples["version_start"]
    if "version_mean" not in samples.columns:
        samples["version_mean"] = samples["version_start"].astype("float64")
    if "dropped" not in samples.columns:
        samples["dropped"] = False
    return samples


def read_trace(folder: str | Path) -> Trace:
    """Read a trace folder (ours or another system's, with at least the required columns)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TraceError(f"{folder}: no such trace folder")
    samples, spath = _read_table(folder, "samples")
    steps, tpath = _read_table(folder, "steps")
    samples = _conform(_fill_optional(samples, spath), SAMPLE_COLUMNS, spath, SAMPLE_REQUIRED)
    steps = _conform(steps, STEP_COLUMNS, tpath, STEP_REQUIRED)
    header_path = folder / "header.json"
    header = json.loads(header_path.read_text()) if header_path.is_file() else {}
    return Trace(samples, steps, header)


def steps_from_samples(samples: pd.DataFrame) -> pd.DataFrame:
    """Learner-step rows for a trace that logged only samples: a step starts when its samples are consumed
    and ends when the next one starts (the last lasts the median step). Weight sync is not separable: 0."""
    used = samples[(samples["learner_step"] >= 0) & ~samples["dropped"]]
    if used.empty:
        raise TraceError("samples: no consumed samples (learner_step >= 0) to derive learner steps from")
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
    reader = {".parquet": pd.read_parquet, ".csv": pd.read_csv}.get(path.suffix)
    if reader is None:
        raise TraceError(f"{path}: expected a .parquet or .csv samples file, or a trace folder")
    samples = _fill_optional(reader(path), path)
    for col in ("learner_step", "prompt_len"):
        if col not in samples.columns:
            raise TraceError(f"{path}: missing column {col}")
    samples = _conform(samples, SAMPLE_COLUMNS, path, SAMPLE_REQUIRED)
    steps = _conform(steps_from_samples(samples), STEP_COLUMNS, path, STEP_REQUIRED)
    return Trace(samples, steps, {"source": f"external: {path}"})
