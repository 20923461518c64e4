"""Per-sample dumps of other systems as stalecast traces, for `stalecast validate CONFIG --trace PATH --trace-format
SYSTEM`.

Each system dumps some of what a trace holds (sim/trace.py SAMPLE_COLUMNS) under its own names; `DUMPS` maps them,
naming for each column the field and the file of the system that writes it, or why the dump has none. A record may
also carry a column under stalecast's own name (say `t_consumed`, added by the user's logger), which is read as is:
that is how a dump that lacks a column can still be imported. What neither gives is one `TraceError` naming every
missing column and where the system keeps (or does not keep) it. Then the trace passes the same checks as any
other (sim/trace.py check_trace), and its learner steps are derived from its samples.

Times are shifted so that the earliest sample starts at 0 (the systems write wall-clock seconds). These systems
send each sample of a group as its own request, while a stalecast trace admits a group whole: a group's t_start is
its earliest sample's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from sim.calibrate.logs import json_objects
from sim.trace import SAMPLE_COLUMNS, SAMPLE_REQUIRED, Trace, TraceError, read_any_trace, trace_from_samples

REQUIRED = (*SAMPLE_REQUIRED, "learner_step", "prompt_len")  # what read_any_trace needs of a samples file
TIME_COLUMNS = ("t_admit", "t_start", "t_end", "t_consumed")


@dataclass(frozen=True)
class Column:
    """How a dump gives one trace column: `get(record)` (None where the record has no value), or None where the
    system does not dump it; `source` names the field and the file that writes it, or says why there is none."""
    get: Callable[[dict], object] | None
    source: str


@dataclass(frozen=True)
class Dump:
    name: str
    repository: str
    where: str                                  # where the system writes its dump
    records: Callable[[Path], Iterator[tuple[dict, str]]]  # one record per sample, with "file:line" for errors
    columns: dict[str, Column]


def _jsonl(path: Path) -> Iterator[tuple[dict, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the dump ({getattr(exc, 'strerror', None) or exc})") from None
    for number, record in json_objects(path, text, TraceError):
        yield record, f"{path}:{number}"


def _files(path: Path, pattern: str) -> list[Path]:
    files = sorted(path.rglob(pattern)) if path.is_dir() else [path]
    if not files:
        raise TraceError(f"{path}: no {pattern} files in the folder")
    return files


def _records(pattern: str, expand: Callable[[dict, Path], Iterator[dict]] | None = None):
    def read(path: Path) -> Iterator[tuple[dict, str]]:
        for file in _files(path, pattern):
            for record, at in _jsonl(file):
                for sample in (expand(record, file) if expand else [record]):
                    yield sample, at
    return read


def _get(*keys):
    """A nested field, None where any key is absent."""
    def get(record: dict):
        value = record
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value
    return get


def _none(why: str) -> Column:
    return Column(None, why)


# --------------------------------------------------------------------------- prime-rl: episodes with traces
def _prime_rl_samples(episode: dict, file: Path) -> Iterator[dict]:
    """One sample per trace of an episode, with the consuming step from the dump's folder (rollouts/step_N/...)."""
    step = next((int(p.removeprefix("step_")) for p in file.parts if p.startswith("step_")
                 and p.removeprefix("step_").isdigit()), None)
    for trace in episode.get("traces") or [{}]:
        calls = [c for c in trace.get("calls") or [] if isinstance(c.get("usage"), dict)]
        yield {**episode, "_trace": trace, "_step": step,
               "_prompt": calls[0]["usage"].get("input_tokens") if calls else None,
               "_response": sum(c["usage"].get("completion_tokens") or 0 for c in calls) if calls else None}


_PRIME_EP = "verifiers/v1 Episode.to_record (PrimeIntellect-ai/verifiers verifiers/v1/episode.py), written by " \
            "src/prime_rl/monitors/file.py FileMonitor.log_episodes"
_VERL_DUMP = "verl/trainer/ppo/ray_trainer.py _dump_generations (input, output, gts, score, step and the reward's " \
             "extra fields)"
_AREAL_DUMP = "areal/infra/workflow_executor.py _dump_trajectory"
_TRL_TRACE = "trl/experimental/async_grpo/async_grpo_trainer.py log_rollout_traces (Trackio trace metadata)"

DUMPS: dict[str, Dump] = {d.name: d for d in (
    Dump("verl", "volcengine/verl@b178a3cd", "trainer.rollout_data_dir/{global_step}.jsonl",
         _records("*.jsonl"),
         {"learner_step": Column(lambda r: r["step"] - 1 if isinstance(r.get("step"), int) else None,
                                 f"step, the trainer's global step from 1 ({_VERL_DUMP})"),
          "reward": Column(_get("score"), f"score ({_VERL_DUMP})"),
          "group_id": _none("verl groups a prompt's responses by the batch's uid, which the dump leaves out"),
          "version_start": _none("fully-async verl keeps param_version_start in the batch (verl/experimental/"
                                 "fully_async_policy/detach_utils.py), not in the dump"),
          "version_end": _none("param_version_end, likewise in the batch only"),
          "version_consumed": _none("the trainer's param version is not dumped"),
          "response_len": _none("the dump holds the decoded text, not token counts"),
          "prompt_len": _none("likewise text only"),
          "worker_id": _none("the server that generated a sample is not dumped"),
          **{t: _none("the dump holds no times") for t in ("t_start", "t_end", "t_consumed")}}),
    Dump("areal", "inclusionAI/AReaL@4aef98d8", "{stats log path}/rollout/{tail_version}/{task_id}.jsonl",
         _records("*.jsonl"),
         {"group_id": Column(_get("task_id"), f"task_id ({_AREAL_DUMP})"),
          "prompt_len": Column(_get("prompt_len"), f"prompt_len ({_AREAL_DUMP})"),
          "response_len": Column(lambda r: r["seqlen"] - r["prompt_len"] if isinstance(r.get("seqlen"), int)
                                 and isinstance(r.get("prompt_len"), int) else None,
                                 f"seqlen - prompt_len ({_AREAL_DUMP})"),
          "version_start": Column(_get("head_version"), f"head_version, the oldest token's ({_AREAL_DUMP})"),
          "version_end": Column(_get("tail_version"), f"tail_version, the newest token's ({_AREAL_DUMP})"),
          "reward": Column(_get("reward"), f"reward ({_AREAL_DUMP})"),
          "version_consumed": _none("AReaL dumps a trajectory when it is generated, before the trainer takes it"),
          "learner_step": _none("likewise: the step that trained on it is not known when it is dumped"),
          "worker_id": _none("the rollout server is not dumped"),
          **{t: _none("the dump holds no times") for t in ("t_start", "t_end", "t_consumed")}}),
    Dump("prime-rl", "PrimeIntellect-ai/prime-rl@559b4477", "{run}/rollouts/step_{N}/train/effective/traces.jsonl",
         _records("traces.jsonl", _prime_rl_samples),
         {"group_id": Column(_get("group", "id"), f"group.id ({_PRIME_EP})"),
          "version_start": Column(_get("run", "work", "policy", "start"), f"run.work.policy.start ({_PRIME_EP})"),
          "version_end": Column(_get("run", "work", "policy", "end"), f"run.work.policy.end ({_PRIME_EP})"),
          "learner_step": Column(lambda r: r["_step"] - 1 if r.get("_step") is not None else None,
                                 "the step_N folder of the dump: batch N, trained from v{N-1} "
                                 "(src/prime_rl/orchestrator/utils.py episode_staleness)"),
          "version_consumed": Column(lambda r: r["_step"] - 1 if r.get("_step") is not None else None,
                                     "v{N-1} for the step_N folder (episode_staleness, as above)"),
          "t_start": Column(_get("_trace", "timing", "agent", "start"), f"traces[].timing.agent.start ({_PRIME_EP})"),
          "t_end": Column(_get("_trace", "timing", "agent", "end"), f"traces[].timing.agent.end ({_PRIME_EP})"),
          "prompt_len": Column(_get("_prompt"), f"traces[].calls[0].usage.input_tokens ({_PRIME_EP})"),
          "response_len": Column(_get("_response"), f"sum of traces[].calls[].usage.completion_tokens ({_PRIME_EP})"),
          "reward": Column(_get("_trace", "reward"), f"traces[].reward ({_PRIME_EP})"),
          "t_consumed": _none("the episode record holds no time of consumption (the orchestrator's metrics.jsonl "
                              "row of step N has its wall time)"),
          "worker_id": _none("the inference server a trace ran on is not in the record")}),
    Dump("trl", "huggingface/trl@f2cd5771", "Trackio traces of the async GRPO trainer, exported as JSON lines",
         _records("*.jsonl"),
         {"group_id": Column(_get("metadata", "group_id"), f"metadata.group_id ({_TRL_TRACE})"),
          "version_start": Column(_get("metadata", "model_version"), f"metadata.model_version ({_TRL_TRACE})"),
          "version_consumed": Column(_get("step"), f"step: the trainer's model version when it took the samples "
                                                   f"({_TRL_TRACE})"),
          "prompt_len": Column(_get("metadata", "prompt_tokens"), f"metadata.prompt_tokens ({_TRL_TRACE})"),
          "response_len": Column(_get("metadata", "completion_tokens"), f"metadata.completion_tokens ({_TRL_TRACE})"),
          "reward": Column(_get("metadata", "reward"), f"metadata.reward ({_TRL_TRACE})"),
          "learner_step": _none("the optimizer step is not in the trace (its step is the model version)"),
          "worker_id": _none("the vLLM server is not in the trace"),
          **{t: _none("the trace holds no times") for t in ("t_start", "t_end", "t_consumed")}}),
)}
FORMATS = ("stalecast", *DUMPS)


def read_trace_as(path: str | Path, fmt: str) -> Trace:
    """A measured trace: stalecast's (a trace folder or a samples file), or another system's dump mapped onto it."""
    if fmt == "stalecast":
        return read_any_trace(path)
    return import_dump(Path(path), DUMPS[fmt])


def _mapped(path: Path, dump: Dump, needed: tuple[str, ...], purpose: str) -> pd.DataFrame:
    """The dump's records as trace columns (all of SAMPLE_COLUMNS, None where a record has no value); every `needed`
    column has a value in every record, or one TraceError says which, where, and where the system keeps it."""
    if not path.exists():
        raise TraceError(f"{path}: no such {dump.name} dump (it writes {dump.where})")
    rows, places = [], []
    for record, at in dump.records(path):
        row = {}
        for column in SAMPLE_COLUMNS:
            value = record.get(column)  # the column under stalecast's own name wins
            how = dump.columns.get(column)
            if value is None and how is not None and how.get is not None:
                value = how.get(record)
            row[column] = value
        rows.append(row)
        places.append(at)
    if not rows:
        raise TraceError(f"{path}: no records")
    raw = pd.DataFrame(rows)
    missing = [c for c in needed if raw[c].isna().all()]
    if missing:
        reasons = "; ".join(f"{c} ({dump.columns[c].source})" for c in missing)
        raise TraceError(f"{path}: this {dump.name} dump ({dump.where}) lacks what {purpose} needs: {reasons}. Add "
                         f"the missing fields to each record under these names to use it")
    for column in needed:
        holes = raw[column].isna().to_numpy()
        if holes.any():
            raise TraceError(f"{places[int(np.argmax(holes))]}: no {column} ({dump.columns[column].source}), though "
                             f"other records have one")
    return raw


def import_dump(path: Path, dump: Dump) -> Trace:
    raw = _mapped(path, dump, REQUIRED, "a stalecast trace")
    raw = raw.dropna(axis=1, how="all")  # columns no record has: the schema's defaults (no interruption, ...)
    raw["group_id"] = pd.factorize(raw["group_id"].astype(str))[0]  # ids may be strings (prime-rl)
    times = [c for c in TIME_COLUMNS if c in raw]
    values = raw[times].apply(pd.to_numeric, errors="coerce")
    raw[times] = values - np.nanmin(values["t_start"].to_numpy(np.float64))
    raw["t_start"] = raw.groupby("group_id")["t_start"].transform("min")  # a trace admits a group whole
    return trace_from_samples(raw, set(raw.columns), path, REQUIRED, f"{dump.name} dump: {path}",
                              f"{path} (mapped from {dump.name})")


def dump_groups(path: str | Path, fmt: str) -> list[list[int]]:
    """Whole groups of a dump, in the order they appear: [prompt length, its response lengths...], for
    `stalecast calibrate --lengths-dump` (the lengths alone: no times needed)."""
    raw = _mapped(Path(path), DUMPS[fmt], ("group_id", "prompt_len", "response_len"), "the lengths of its groups")
    groups = raw.groupby(raw["group_id"].astype(str), sort=False)
    return [[int(g["prompt_len"].iloc[0]), *map(int, g["response_len"])] for _, g in groups]
