"""The folder of a training run, written as the run goes, so that a run killed at any moment keeps every step it
completed, and `stalecast train --resume DIR` continues it from its last checkpoint.

    DIR/.stalecast-output   marker (sim.outputs): DIR may be replaced by a later run
    DIR/config.yaml         the run's config (what --resume reads)
    DIR/summary.json        status "running" until the run ends; then "complete", "interrupted" or "failed" with why
    DIR/metrics.jsonl       one line per completed learner step, appended and flushed as the step ends
    DIR/trace/              while running: steps.csv and samples.csv, appended per step (the groups the step took
                            or dropped); when the run ends, however it ends, the whole trace as Parquet, with the
                            groups still waiting or generating
    DIR/engine_steps.parquet  when the run ends: every rollout worker's engine steps, timed (worker_id, segment,
                            t_start, seconds, active), for `validate`'s in-run costs; a resumed run appends its own
    DIR/checkpoint/         every `real.checkpoint_every` steps and at the end: the policy (a model folder that
                            `real.model` loads), the optimizer's state, `state.json` (where to resume) and, in
                            modes that generate with older weights, the flat weights of those versions

The per-step files are appended samples first, then the step row, then the metrics line: a step whose line is in
metrics.jsonl is complete in the trace. A checkpoint is written beside (`checkpoint.partial`) and swapped in, so
`checkpoint/` is always whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import torch
import yaml

from sim.config import ConfigError, RunConfig, parse_config
from sim.outputs import claim, remove_stale_scratch
from sim.trace import SAMPLE_COLUMNS, STEP_COLUMNS, Trace

RUNNING, COMPLETE, INTERRUPTED, FAILED = "running", "complete", "interrupted", "failed"
CHECKPOINT_FORMAT = "stalecast.checkpoint/1"
ENGINE_STEP_COLUMNS = {"worker_id": "int64", "segment": "int64", "t_start": "float64", "seconds": "float64",
                       "active": "int64"}


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.trace_dir = self.path / "trace"
        self.checkpoint_dir = self.path / "checkpoint"
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self.engine_steps_path = self.path / "engine_steps.parquet"

    # ------------------------------------------------------------------ a new run
    def create(self, cfg: RunConfig, header: dict, force: bool = False) -> None:
        """A fresh folder (an earlier stalecast output at the same path is replaced)."""
        claim(self.path, "train", force, fresh=True)
        (self.path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        self._start_trace(header)
        self.metrics_path.write_text("")

    def _start_trace(self, header: dict) -> None:
        claim(self.trace_dir, "trace")
        (self.trace_dir / "header.json").write_text(json.dumps(header, indent=2, default=str))

    def append_step(self, metrics: dict, step_row: dict, sample_rows: list[dict]) -> None:
        """One completed learner step: the samples it took or dropped, its step row, its metrics line."""
        _append_csv(self.trace_dir / "samples.csv", sample_rows, SAMPLE_COLUMNS)
        _append_csv(self.trace_dir / "steps.csv", [step_row], STEP_COLUMNS)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.summary_path, summary)

    def write_trace(self, trace: Trace) -> None:
        """The whole trace as Parquet, replacing the per-step CSV files in one rename."""
        trace.write(self.trace_dir)

    def write_engine_steps(self, steps: pd.DataFrame) -> None:
        """This segment's engine steps, after those of earlier segments (a resumed run), in one rename."""
        earlier = self.read_engine_steps()
        if earlier is not None:
            steps = pd.concat([earlier, steps], ignore_index=True)
        tmp = self.engine_steps_path.with_name(".engine_steps.parquet.tmp")
        steps.astype(ENGINE_STEP_COLUMNS).to_parquet(tmp, index=False)
        os.replace(tmp, self.engine_steps_path)

    # ------------------------------------------------------------------ reading back
    def read_engine_steps(self) -> pd.DataFrame | None:
        """The workers' timed engine steps, or None for a folder without them (a run from before they were kept)."""
        if not self.engine_steps_path.is_file():
            return None
        return pd.read_parquet(self.engine_steps_path).astype(ENGINE_STEP_COLUMNS)

    def read_config(self) -> RunConfig:
        path = self.path / "config.yaml"
        if not path.is_file():
            raise ConfigError(f"--resume {self.path}: not a training run folder (no config.yaml)")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not readable: {exc}") from None
        return parse_config(data, str(path))

    def read_summary(self) -> dict | None:
        try:
            return json.loads(self.summary_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def completed_rows(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(samples, steps) the folder holds for completed steps: the per-step CSV files while a run is going, or
        the final Parquet trace's retired groups (taken or dropped) once it ended; none before the first step."""
        from sim.trace import read_trace

        if not (self.trace_dir / "samples.parquet").is_file():
            samples = _read_csv(self.trace_dir / "samples.csv", SAMPLE_COLUMNS)
            steps = _read_csv(self.trace_dir / "steps.csv", STEP_COLUMNS)
        else:
            trace = read_trace(self.trace_dir)
            samples, steps = trace.samples, trace.steps
        return samples[samples["learner_step"] >= 0].reset_index(drop=True), steps

    def metrics_rows(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def rewind(self, steps_done: int, header: dict) -> tuple[pd.DataFrame, list[dict]]:
        """Keep only steps < steps_done (what the checkpoint holds) and reopen the per-step files to append to;
        returns the kept samples and metrics lines."""
        samples, steps = self.completed_rows()
        samples = samples[samples["learner_step"] < steps_done]
        steps = steps[steps["step"] < steps_done]
        metrics = [m for m in self.metrics_rows() if m["step"] < steps_done]
        if len(steps) != steps_done or len(metrics) != steps_done:
            raise ConfigError(f"--resume {self.path}: the checkpoint is at step {steps_done} but the folder holds "
                              f"{len(steps)} step rows and {len(metrics)} metrics lines before it")
        remove_stale_scratch(self.trace_dir)
        if self.trace_dir.exists():
            shutil.rmtree(self.trace_dir)
        self._start_trace(header)
        for name, frame in (("samples", samples), ("steps", steps)):
            frame.to_csv(self.trace_dir / f"{name}.csv", index=False)
        tmp = self.metrics_path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))
        os.replace(tmp, self.metrics_path)
        return samples.reset_index(drop=True), metrics

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, model, tokenizer, optimizer, state: dict, older_weights: dict[int, torch.Tensor]
                        ) -> None:
        """The learner after `state["steps_done"]` steps; `older_weights`: version -> flat weights that
        generation still needs (modes with a fixed lag)."""
        from real.model import save_policy

        partial = self.path / "checkpoint.partial"
        if partial.exists():
            shutil.rmtree(partial)
        save_policy(model, tokenizer, partial)
        torch.save(optimizer.state_dict(), partial / "optimizer.pt")
        if older_weights:
            torch.save(older_weights, partial / "older_weights.pt")
        write_json_atomic(partial / "state.json", {"format": CHECKPOINT_FORMAT, **state})
        old = self.path / "checkpoint.old"
        if old.exists():
            shutil.rmtree(old)
        if self.checkpoint_dir.exists():
            os.replace(self.checkpoint_dir, old)
        os.replace(partial, self.checkpoint_dir)
        shutil.rmtree(old, ignore_errors=True)

    def checkpoint_state(self) -> dict | None:
        """state.json of the checkpoint, or None without one (a run killed before its first)."""
        old, partial = self.path / "checkpoint.old", self.path / "checkpoint.partial"
        if old.exists() and not self.checkpoint_dir.exists():  # killed between the swap's two renames
            os.replace(old, self.checkpoint_dir)
        for stray in (old, partial):
            shutil.rmtree(stray, ignore_errors=True)
        path = self.checkpoint_dir / "state.json"
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{path}: not a checkpoint this version of stalecast reads ({state.get('format')})")
        return state

    def load_optimizer(self, optimizer) -> None:
        optimizer.load_state_dict(torch.load(self.checkpoint_dir / "optimizer.pt", weights_only=True))

    def older_weights(self) -> dict[int, torch.Tensor]:
        path = self.checkpoint_dir / "older_weights.pt"
        return torch.load(path, weights_only=True) if path.is_file() else {}


def _append_csv(path: Path, rows: list[dict], columns: dict[str, str]) -> None:
    if not rows:
        return
    frame = pd.DataFrame(rows, columns=list(columns)).astype(columns)
    new = not path.is_file()
    with open(path, "a") as f:
        frame.to_csv(f, header=new, index=False)
        f.flush()


def _read_csv(path: Path, columns: dict[str, str]) -> pd.DataFrame:
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})
    return pd.read_csv(path).astype(columns)
