"""Per-step logs of the systems people run, read into one table of the quantities calibration needs.

Each system logs the same few things under its own names. `FORMATS` maps them onto the canonical quantities
(`QUANTITIES`) and names, for each, the file of the system's repository that writes it (the commit the names were
read at is in `LogFormat.repository`), so that a renamed metric can be traced. A log is a JSON-lines file (one
object per line; verl's file logger nests the metrics under "data"), a CSV file (plain metric columns, or a W&B
export whose columns are "RUN - metric", with its "__MIN"/"__MAX" columns ignored) or a Hugging Face
`trainer_state.json` (its `log_history`). Several rows may hold one step (prime-rl's trainer and orchestrator, TRL's
profiling timers): they are merged by the step column. Any problem is one `ConfigError` naming the file, the line
or column, and the reason.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from sim.config import ConfigError

# Canonical quantities, per learner step.
QUANTITIES: dict[str, str] = {
    "gen_s": "generation of the step's batch (prefill and decode), seconds",
    "old_logprob_s": "recomputing the behaviour (old / proximal) log-probs on the learner, seconds",
    "ref_logprob_s": "the reference policy's log-probs on the learner, seconds",
    "update_s": "the policy update (forward, backward, optimizer), seconds",
    "sync_s": "the weight sync from the learner to the rollout engines, seconds",
    "bookkeeping_s": "the learner's own work after it publishes and before it waits for its next batch (metrics, "
                     "logging, checkpoints; it overlaps generation), seconds",
    "step_s": "the whole step, seconds",
    "response_mean": "mean response length, tokens",
    "response_max": "longest response, tokens",
    "response_clip": "fraction of responses cut at the length cap",
    "prompt_mean": "mean prompt length, tokens",
    "n_samples": "responses trained on",
    "n_tokens": "prompt and response tokens trained on",
    "gpus": "GPUs the run reports it used",
}
PHASES = ("gen_s", "old_logprob_s", "ref_logprob_s", "update_s", "sync_s")
LEARNER_PHASES = ("old_logprob_s", "ref_logprob_s", "update_s")


@dataclass(frozen=True)
class Metric:
    """A quantity logged under one of `names` (the first the log has wins; `*` matches one path part)."""
    names: tuple[str, ...]
    source: str                  # the file (and function) of the system that writes it
    cumulative: bool = False     # a running total: the step's value is its increase over the previous step
    summed: bool = False         # written once per call, possibly several times a step: summed per step
    row_has: str | None = None   # read only from rows that also hold this key (one name, two writers)


@dataclass(frozen=True)
class Derived:
    """A quantity computed from others (canonical or helper names) when the log has them."""
    needs: tuple[str, ...]
    how: str
    fn: Callable[..., np.ndarray]


@dataclass(frozen=True)
class LogFormat:
    name: str
    repository: str                                    # owner/name@commit where the names were read
    step_keys: tuple[str, ...]                         # the step column: the first the log has
    quantities: dict[str, Metric | Derived]            # canonical quantities and helpers (names starting "_")
    policy: str                                        # its staleness control, for `stalecast whatif`
    hints: dict[str, str] = field(default_factory=dict)  # why a quantity may be missing, and what to do
    orphans_to_next: bool = False                      # rows without a step belong to the next step that has one
    writers: tuple[str, ...] = ()                      # keys only one of the log's writers has in its rows


_VERL = "verl/trainer/ppo/ray_trainer.py (RayPPOTrainer.fit: marked_timer('{t}')), logged as timing_s/{t} by " \
        "compute_timing_metrics in verl/trainer/ppo/metric_utils.py"
_VERL_DATA = "verl/trainer/ppo/metric_utils.py: compute_data_metrics"
_AREAL_T = "areal/trainer/rl_trainer.py (PPOTrainer.train: stats_tracker.record_timing('{t}')); " \
           "areal/utils/stats_tracker.py prefixes timing records with timeperf/"
_AREAL_S = "areal/trainer/ppo/actor.py (_ppo_update: stats_tracker.stat under scope ppo_actor, " \
           "reduced to /avg, /min, /max by areal/utils/stats_tracker.py)"
_PRIME_T = "src/prime_rl/trainer/rl/train.py (the trainer's time_metrics)"
_PRIME_O = "src/prime_rl/orchestrator/orchestrator.py (the orchestrator's step metrics)"
_PRIME_M = "src/prime_rl/orchestrator/metrics.py (EpisodeMetrics.to_wandb / TraceMetrics.to_dict, prefix " \
           "train/agg, subset effective)"
_TRL_P = "trl/trainer/grpo_trainer.py ({f}) through profiling_context / profiling_decorator of " \
         "trl/extras/profiling.py, written to W&B as 'profiling/Time taken: GRPOTrainer.{f}'"
_TRL_M = "trl/trainer/grpo_trainer.py (_generate_and_score_completions: self._metrics); the Hugging Face W&B " \
         "callback prefixes train/"
_TRL_GEN = tuple(f"profiling/Time taken: GRPOTrainer.{f}" for f in
                 ("vLLM.generate", "transformers.generate", "transformers.generate_batch"))


def _train_prefixed(name: str) -> tuple[str, str]:
    return f"train/{name}", name


FORMATS: dict[str, LogFormat] = {f.name: f for f in (
    LogFormat(
        "verl", "volcengine/verl@b178a3cd", ("step", "training/global_step", "_step", "Step"),
        {"gen_s": Metric(("timing_s/gen",), _VERL.format(t="gen")),
         "old_logprob_s": Metric(("timing_s/old_log_prob",), _VERL.format(t="old_log_prob")),
         "ref_logprob_s": Metric(("timing_s/ref",), _VERL.format(t="ref") + "; str(Role.RefPolicy) is 'ref' in "
                                                                           "verl/trainer/ppo/utils.py"),
         "update_s": Metric(("timing_s/update_actor",), _VERL.format(t="update_actor")),
         "sync_s": Metric(("timing_s/update_weights",), _VERL.format(t="update_weights")),
         "step_s": Metric(("timing_s/step",), _VERL.format(t="step")),
         "response_mean": Metric(("response_length/mean",), _VERL_DATA),
         "response_max": Metric(("response_length/max",), _VERL_DATA),
         "response_clip": Metric(("response_length/clip_ratio",), _VERL_DATA),
         "prompt_mean": Metric(("prompt_length/mean",), _VERL_DATA),
         "n_tokens": Metric(("perf/total_num_tokens",), "verl/trainer/ppo/metric_utils.py: "
                                                        "compute_throughout_metrics (sum of attention masks)"),
         "_throughput": Metric(("perf/throughput",), "verl/trainer/ppo/metric_utils.py: compute_throughout_metrics "
                                                     "(tokens / (time_per_step x n_gpus))"),
         "n_samples": Derived(("n_tokens", "prompt_mean", "response_mean"),
                              "perf/total_num_tokens / (prompt_length/mean + response_length/mean)",
                              lambda t, p, r: t / (p + r)),
         "gpus": Derived(("n_tokens", "_throughput", "step_s"),
                         "perf/total_num_tokens / (perf/throughput x timing_s/step)", lambda t, thr, s: t / (thr * s))},
        policy="verl_fully_async"),
    LogFormat(
        "areal", "inclusionAI/AReaL@4aef98d8", ("Step", "_step", "step", "global_step"),
        {"gen_s": Metric(("timeperf/rollout",), _AREAL_T.format(t="rollout")),
         "old_logprob_s": Metric(("timeperf/recompute_logp",), _AREAL_T.format(t="recompute_logp")),
         "ref_logprob_s": Metric(("timeperf/ref_logp",), _AREAL_T.format(t="ref_logp")),
         "update_s": Metric(("timeperf/train_step",), _AREAL_T.format(t="train_step")),
         "sync_s": Metric(("timeperf/update_weights",), _AREAL_T.format(t="update_weights")),
         "prompt_mean": Metric(("ppo_actor/prompt_len/avg",), _AREAL_S),
         "_seq_mean": Metric(("ppo_actor/seq_len/avg",), _AREAL_S),
         "_seq_max": Metric(("ppo_actor/seq_len/max",), _AREAL_S),
         "n_samples": Metric(("ppo_actor/n_seqs",), _AREAL_S + " (the n_seqs denominator, summed)"),
         "response_mean": Derived(("_seq_mean", "prompt_mean"), "ppo_actor/seq_len/avg - ppo_actor/prompt_len/avg",
                                  lambda s, p: s - p),
         "response_max": Derived(("_seq_max", "prompt_mean"), "ppo_actor/seq_len/max - ppo_actor/prompt_len/avg "
                                                              "(approximate: the longest sequence's prompt taken at "
                                                              "the mean)", lambda s, p: s - p),
         "n_tokens": Derived(("n_samples", "_seq_mean"), "ppo_actor/n_seqs x ppo_actor/seq_len/avg",
                             lambda n, s: n * s)},
        policy="areal",
        hints={"response_clip": "AReaL's ppo_actor/no_eos_ratios counts sequences as long as the padded batch, "
                                "which the longest always is, so it is not read as the clip ratio"}),
    LogFormat(
        "prime-rl", "PrimeIntellect-ai/prime-rl@559b4477", ("step",),
        {"_orch_step_s": Metric(("time/step",), _PRIME_O, row_has="progress/rollouts"),
         "_wait_for_policy_s": Metric(("time/wait_for_policy",), _PRIME_O),
         "gen_s": Derived(("_orch_step_s", "_wait_for_policy_s"), "the orchestrator's time/step - "
                          "time/wait_for_policy (the time it took to collect the batch)", lambda s, w: s - w),
         "update_s": Metric(("time/forward_backward",), _PRIME_T),
         "sync_s": Metric(("time/broadcast_weights",), _PRIME_T),
         "response_mean": Metric(("train/agg/effective/num_output_tokens/mean",), _PRIME_M),
         "response_max": Metric(("train/agg/effective/num_output_tokens/max",), _PRIME_M),
         "prompt_mean": Metric(("train/agg/effective/num_input_tokens/mean",), _PRIME_M),
         "response_clip": Metric(("train/agg/effective/*/is_truncated/mean",), _PRIME_M + " (per agent)"),
         "_output_tokens": Metric(("progress/output_tokens",), _PRIME_O),
         "_input_tokens": Metric(("progress/input_tokens",), _PRIME_O),
         "n_samples": Derived(("_output_tokens", "response_mean"), "progress/output_tokens / "
                              "train/agg/effective/num_output_tokens/mean", lambda o, r: o / r),
         "n_tokens": Derived(("_input_tokens", "_output_tokens"), "progress/input_tokens + progress/output_tokens",
                             lambda i, o: i + o)},
        policy="prime_rl", writers=("progress/rollouts", "time/forward_backward"),
        hints={"step_s": "prime-rl's trainer time/step includes its wait for a batch generated asynchronously, so "
                         "it is not read: the step is the sum of the phases",
               "gen_s": "prime-rl writes the orchestrator's time/step to its own rows of metrics.jsonl (those with "
                        "progress/rollouts); a W&B export of the trainer's run alone has none"}),
    LogFormat(
        "trl", "huggingface/trl@f2cd5771", ("train/global_step", "step", "global_step"),
        {"gen_s": Metric(_TRL_GEN, _TRL_P.format(f="_generate_single_turn: vLLM.generate or transformers.generate"),
                         summed=True),
         "sync_s": Metric(("profiling/Time taken: GRPOTrainer.sync_weights",),
                          _TRL_P.format(f="_generate_single_turn: sync_weights"), summed=True),
         "step_s": Metric(_train_prefixed("step_time"), "trl/trainer/grpo_trainer.py (training_step: step_time, "
                                                         "which includes generating the batch)"),
         "_prepare_s": Metric(("profiling/Time taken: GRPOTrainer._prepare_inputs",),
                              _TRL_P.format(f="_prepare_inputs"), summed=True),
         "update_s": Derived(("step_s", "_prepare_s"), "step_time - the _prepare_inputs timer (generation, scoring, "
                             "old and reference log-probs)", lambda s, p: s - p),
         "response_mean": Metric(_train_prefixed("completions/mean_length"), _TRL_M),
         "response_max": Metric(_train_prefixed("completions/max_length"), _TRL_M),
         "response_clip": Metric(_train_prefixed("completions/clipped_ratio"), _TRL_M),
         "n_tokens": Metric(_train_prefixed("num_tokens"), _TRL_M + " (state.num_input_tokens_seen, a running "
                                                                    "total)", cumulative=True)},
        policy="drop", orphans_to_next=True,
        hints={"gen_s": "TRL writes its profiling timers (profiling/Time taken: GRPOTrainer.vLLM.generate) only to "
                        "W&B, MLflow or Trackio (trl/extras/profiling.py), not to trainer_state.json: export the W&B "
                        "run as CSV",
               "prompt_mean": "TRL's GRPOTrainer logs no prompt length: pass --prompt-len",
               "n_samples": "TRL logs no batch size: pass --batch-prompts and --group-size"}),
    LogFormat(
        "stalecast", "this repository", ("step",),
        {"gen_s": Metric(("time/queue_wait_s",), "real/learner.py (Learner.step; replaced by the wait the trace's "
                                                 "step times give: sim/calibrate/stalecast_run.py)"),
         "update_s": Metric(("time/train_s",), "real/learner.py (Learner.train_on)"),
         "sync_s": Metric(("time/weight_sync_s",), "real/learner.py (Learner.train_on: publishing the weights)"),
         "response_mean": Metric(("len/mean",), "real/learner.py (Learner.train_on)")},
        policy="oldest_unconsumed"),
)}


@dataclass
class RunLog:
    """One run's log, read: a row per learner step (canonical quantities, NaN where the log has none)."""
    path: Path
    format: str
    steps: pd.DataFrame
    sources: dict[str, str]                    # quantity -> where it came from (metric names, source files)
    config: object | None = None               # stalecast: the run's own RunConfig
    groups: list[list[int]] | None = None      # per-sample lengths, whole groups: [prompt, responses...]

    def has(self, quantity: str) -> bool:
        return quantity in self.steps and self.steps[quantity].notna().any()


# --------------------------------------------------------------------------- raw tables
_LINE = "__line__"  # the source line of each raw row, for error messages


def _load_rows(path: Path) -> pd.DataFrame:
    """Raw rows (strings or numbers as written) with their source line numbers; W&B run prefixes removed."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the log file (stalecast: the run folder's metrics.jsonl is "
                          f"found by --format stalecast)")
    if not path.is_file():
        raise ConfigError(f"{path}: no such log file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte at offset {exc.start}); a log is JSON lines or CSV") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the log: {exc.strerror or exc}") from None
    if not text.strip():
        raise ConfigError(f"{path}: empty log")
    stripped = text.lstrip()
    if path.suffix == ".csv" or not stripped.startswith(("{", "[")):
        frame = _csv_rows(path)
    elif path.suffix == ".json":
        frame = _json_rows(path, text)
    else:
        frame = _jsonl_rows(path, text)
    if frame.empty:
        raise ConfigError(f"{path}: no rows")
    return frame


def json_objects(path: Path, text: str, error: type[Exception] = ConfigError):
    """(line number, object) of each non-blank line of a JSONL text; a line that is not a JSON object raises
    `error` naming the file and the line."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}: line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise error(f"{path}: line {number}: expected a JSON object per line, got {type(row).__name__}")
        yield number, row


def _jsonl_rows(path: Path, text: str) -> pd.DataFrame:
    rows = []
    for number, row in json_objects(path, text):
        if isinstance(row.get("data"), dict):  # verl's FileLogger: {"step": N, "data": {metrics}}
            row = {**row.pop("data"), **row}
        rows.append({**row, _LINE: number})
    return pd.DataFrame(rows)


def _json_rows(path: Path, text: str) -> pd.DataFrame:
    """A Hugging Face trainer_state.json: its log_history, one row per logging call."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    history = data.get("log_history") if isinstance(data, dict) else None
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise ConfigError(f"{path}: a .json log must be a Hugging Face trainer_state.json with a log_history list "
                          f"of objects; give JSON lines or CSV otherwise")
    return pd.DataFrame([{**r, _LINE: f"log_history[{i}]"} for i, r in enumerate(history)])


def _csv_rows(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ConfigError(f"{path}: not a readable CSV file ({reason})") from None
    frame = frame[[c for c in frame.columns if not c.endswith(("__MIN", "__MAX"))]]  # W&B's band columns
    runs = {c.split(" - ", 1)[0] for c in frame.columns if " - " in c}
    if len(runs) > 1:
        raise ConfigError(f"{path}: a W&B export of {len(runs)} runs ({', '.join(sorted(runs)[:4])}); export one "
                          f"run, or give one log per run")
    frame.columns = [c.split(" - ", 1)[1] if " - " in c else c for c in frame.columns]
    frame = frame.replace({"": np.nan})
    frame[_LINE] = np.arange(2, len(frame) + 2)  # line 1 is the header
    return frame


def _numbers(raw: pd.DataFrame, column: str, path: Path) -> pd.Series:
    """A column as floats; a value that is not a number is an error naming its line."""
    values = pd.to_numeric(raw[column], errors="coerce")
    bad = values.isna() & raw[column].notna()
    if bad.any():
        text = raw.loc[bad, column].astype(str)
        ok_nan = text.str.strip().str.lower().isin(("nan", "none", "null", "infinity", "-infinity", "inf", "-inf"))
        bad &= ~ok_nan.reindex(bad.index, fill_value=False)
    if bad.any():
        first = bad.idxmax()
        raise ConfigError(f"{path}: line {raw.at[first, _LINE]}: column {column}: {raw.at[first, column]!r} is not "
                          f"a number")
    return values.astype(np.float64)


def _find_column(columns, names: tuple[str, ...], path: Path) -> str | None:
    for name in names:
        if "*" in name:
            hits = [c for c in columns if fnmatch.fnmatchcase(c, name) and c.count("/") == name.count("/")]
            if len(hits) > 1:
                raise ConfigError(f"{path}: {len(hits)} columns match {name} ({', '.join(hits[:3])}); calibrate reads "
                                  f"one (a run with one agent)")
            if hits:
                return hits[0]
        elif name in columns:
            return name
    return None


# --------------------------------------------------------------------------- one table per log
def read_log(path: str | Path, fmt: str) -> RunLog:
    """Read `path` as a log of system `fmt` (a FORMATS key)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: unknown (known: {', '.join(FORMATS)})")
    path = Path(path)
    if fmt == "stalecast":
        from sim.calibrate.stalecast_run import read_stalecast_run  # a run folder: config, trace, metrics
        return read_stalecast_run(path)
    steps, sources = read_steps(path, FORMATS[fmt])
    return RunLog(path, fmt, steps, sources)


def read_steps(path: Path, spec: LogFormat) -> tuple[pd.DataFrame, dict[str, str]]:
    """The per-step table of a log of format `spec`, and where each quantity came from."""
    raw = _load_rows(path)
    step_col = _find_column(raw.columns, spec.step_keys, path)
    if step_col is None:
        raise ConfigError(f"{path}: no step column (looked for {', '.join(spec.step_keys)}); is --format "
                          f"{spec.name} right?")
    step = _numbers(raw, step_col, path)
    if spec.orphans_to_next:
        step = step.bfill()
    raw, step = raw[step.notna()], step[step.notna()]
    if raw.empty:
        raise ConfigError(f"{path}: column {step_col}: no row has a step")
    metrics = {q: m for q, m in spec.quantities.items() if isinstance(m, Metric)}
    found = {q: c for q, m in metrics.items() if (c := _find_column(raw.columns, m.names, path)) is not None}
    if not any(q in found for q in PHASES):
        shown = ", ".join(c for c in raw.columns if c != _LINE)[:160]
        expected = ", ".join(metrics[q].names[0] for q in PHASES if q in metrics)
        raise ConfigError(f"{path}: not a {spec.name} log: it has none of {spec.name}'s timings ({expected}); its "
                          f"columns: {shown}")
    _check_writers(raw, spec, path)
    by_step = step.astype(np.int64)
    table: dict[str, pd.Series] = {}
    sources: dict[str, str] = {}
    for q, column in found.items():
        m = metrics[q]
        rows = raw[column].notna()
        if m.row_has is not None:
            rows &= raw[m.row_has].notna() if m.row_has in raw else False
        values = _numbers(raw, column, path)[rows]
        grouped = values.groupby(by_step[rows])
        per_step = grouped.sum(min_count=1) if m.summed else grouped.last()
        if m.cumulative:
            per_step = per_step.diff()
        table[q] = per_step
        sources[q] = f"{column} ({m.source})"
    index = pd.Index(sorted(by_step.unique()), name="step")
    steps = pd.DataFrame({q: s.reindex(index) for q, s in table.items()}, index=index)
    for q, d in spec.quantities.items():
        if isinstance(d, Derived) and q not in steps and all(n in steps for n in d.needs):
            steps[q] = d.fn(*(steps[n] for n in d.needs))
            sources[q] = d.how
    steps = steps[[q for q in steps.columns if not q.startswith("_")]]
    _check_values(steps, path)
    return steps, {q: s for q, s in sources.items() if not q.startswith("_")}


def _check_writers(raw: pd.DataFrame, spec: LogFormat, path: Path) -> None:
    """A name two writers use (prime-rl's time/step, by its trainer and its orchestrator) is told apart by a key only
    one of them writes in its rows; a row holding keys of both (a W&B export that merged them) is ambiguous."""
    present = [k for k in spec.writers if k in raw]
    if len(present) > 1:
        both = raw[present].notna().all(axis=1)
        if both.any():
            raise ConfigError(f"{path}: line {raw.loc[both, _LINE].iloc[0]}: holds both {' and '.join(present)}: "
                              f"{spec.name}'s writers merged in one row, so the names they share are ambiguous; give "
                              f"the JSON-lines file they write")


def _check_values(steps: pd.DataFrame, path: Path) -> None:
    for q in steps.columns:
        values = steps[q].to_numpy()
        bad = np.isfinite(values) & (values < 0) | np.isinf(values)
        if bad.any():
            step = steps.index[np.flatnonzero(bad)[0]]
            raise ConfigError(f"{path}: step {step}: {q} ({QUANTITIES[q]}) is {values[bad][0]:g}; a time, length or "
                              f"count cannot be negative or infinite")


def missing_reason(log: RunLog, quantity: str) -> str:
    """Why `log` lacks `quantity`, in the system's own words where the format knows."""
    spec = FORMATS[log.format]
    hint = spec.hints.get(quantity)
    source = spec.quantities.get(quantity)
    if hint:
        return hint
    if isinstance(source, Metric):
        return f"{spec.name} logs it as {' or '.join(source.names)} ({source.source})"
    if isinstance(source, Derived):
        return f"calibrate derives it as {source.how}"
    return f"{spec.name} does not log it"

