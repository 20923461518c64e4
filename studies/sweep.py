"""Sweeps: a base config and a list of override dicts (or a grid of them), replicated over seeds, simulated
in parallel, one tidy table out.

    sweep = Sweep(base, grid({"cluster.rollout_workers": [8, 16], "pipeline.max_staleness": [1, 4]}), reps=3)
    with Backend(jobs=2) as backend:
        result = run_sweep(sweep, Path("out"), backend)

Every run is keyed by a hash of its resolved config (base + overrides + seed; the cosmetic `name` aside)
and stored under OUT/runs/KEY.json the moment it finishes, so a finished sweep does no work when run again
and a killed one finishes the rest. The sync baseline a speedup needs depends on neither the staleness
bound nor the run's own length, so it is one short run per (other overrides, seed), shared by every bound.
Runs that differ only in the bound go to one worker, smallest bound first, so a run whose bound never
acted stands for the larger ones (see runner.py). The table has one row per (grid point, replication):
label and override columns, `replication`, `seed`, every metric of `sim.metrics.compute_metrics`,
`sync/step_s`, `compute_s` (seconds spent simulating), `status` and `error`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sim.config import POLICY_KNOBS, ConfigError, RunConfig
from studies import runner

RECORD_FORMAT = "stalecast.study-run/1"  # part of every key: a new record format never reads old files
# A sync run never consults these, so they are pinned to one value to share its baseline across them.
SYNC_PINNED = {"pipeline.mode": "sync", "pipeline.interruptible": False, "pipeline.max_staleness": 0,
               "pipeline.staleness_control": "none", "pipeline.drop_stale": False, "pipeline.queue_order": "fifo",
               **{f"pipeline.{name}": None for name in POLICY_KNOBS}}


def grid(axes: dict[str, list]) -> list[dict]:
    """The cartesian product of dotted-key axes, as override dicts (first axis varies slowest)."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def replication_seeds(base_seed: int, reps: int) -> list[int]:
    """Independent seeds for `reps` replications, spawned from the base seed (the same for every grid point,
    so points are compared on the same workloads)."""
    return [int(child.generate_state(1, np.uint32)[0]) for child in np.random.SeedSequence(base_seed).spawn(reps)]


# Config sections a simulator run does not read: changing them must not re-run (or re-key) a stored run.
NOT_SIMULATED = {"name", "real", "stability"}


def run_key(cfg: RunConfig) -> str:
    data = cfg.model_dump(mode="json", exclude=NOT_SIMULATED)
    text = json.dumps([RECORD_FORMAT, data], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class Sweep:
    base: RunConfig = field(metadata={"help": "The config every run starts from."})
    points: list[dict] = field(metadata={"help": "One override dict (dotted key -> value) per grid point."})
    labels: list[dict] | None = field(default=None, metadata={
        "help": "Extra columns per grid point (e.g. rollout GPUs), same length as points; table only."})
    reps: int = field(default=1, metadata={"help": "Replications (independent seeds) per grid point."})
    steps: int | None = field(default=None, metadata={"help": "Learner steps per run (default: base run.steps)."})
    sync_baseline: bool = field(default=True, metadata={
        "help": "Simulate the sync-mode baseline of each point and seed for speedup/vs_sync."})
    sync_steps: int = field(default=20, metadata={
        "help": "Learner steps of each sync baseline (its steps are alike: 20 steps give the 300-step "
                "mean step time within 0.6 % on the 64-GPU example)."})


@dataclass
class SweepResult:
    table: pd.DataFrame
    aggregate: pd.DataFrame
    simulated: int       # runs simulated by this call (sync baselines included)
    reused: int          # runs taken from a smaller bound's run whose bound never acted
    cached: int          # runs already stored by an earlier call
    seconds: float


# --------------------------------------------------------------------------- where runs execute
class Backend:
    """Runs task batches: in this process (jobs=1), on a spawn-safe process pool, or as Ray tasks.
    One backend serves several sweeps (the planner's rounds) without restarting its workers.

    ray: None (local processes), "local" (start a Ray instance on this machine with `jobs` CPUs), "auto"
    (join the running cluster) or a cluster address."""

    def __init__(self, jobs: int | None = None, ray: str | None = None):
        self.jobs = jobs or os.cpu_count() or 1
        self.ray_address = ray
        self._pool: ProcessPoolExecutor | None = None
        self._ray = None
        self._started_ray = False

    def __enter__(self) -> "Backend":
        if self.ray_address is not None:
            try:
                import ray
            except ImportError:
                raise ConfigError("--ray needs the ray package: pip install 'ray>=2.9'") from None
            if not ray.is_initialized():
                if self.ray_address == "local":
                    ray.init(num_cpus=self.jobs, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=self.ray_address, log_to_driver=False)
                self._started_ray = True
            self._ray = ray
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._pool is not None:  # on an error or Ctrl-C, don't wait for the runs in flight
            self._pool.shutdown(wait=exc_type is None, cancel_futures=True)
        if self._started_ray:
            self._ray.shutdown()

    @property
    def remote(self) -> bool:
        """Whether runs may execute on other machines (without this machine's files)."""
        return self._ray is not None

    @property
    def name(self) -> str:
        if self._ray is not None:
            return f"ray ({self.ray_address})"
        return "in-process" if self.jobs == 1 else f"{self.jobs} local processes"

    def map_unordered(self, fn: Callable, tasks: list) -> Iterator:
        """fn(task) for every task, yielded as each finishes."""
        if self._ray is not None:
            remote = self._ray.remote(fn)
            pending = [remote.remote(task) for task in tasks]
            while pending:
                done, pending = self._ray.wait(pending, num_returns=1)
                yield self._ray.get(done[0])
        elif self.jobs == 1:
            yield from map(fn, tasks)
        else:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.jobs, mp_context=get_context("spawn"),
                                                 initializer=_exit_with_parent, initargs=(os.getpid(),))
            pending = {self._pool.submit(fn, task) for task in tasks}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()


def _exit_with_parent(parent: int) -> None:
    """Pool worker start-up: a worker whose parent was killed outright (no clean-up ran) ends itself instead
    of waiting forever for tasks."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


# --------------------------------------------------------------------------- planning the runs
@dataclass
class _Run:
    point: int
    replication: int
    seed: int
    key: str
    cfg: RunConfig | None       # None when the overrides make an invalid config
    error: str | None = None
    sync_key: str | None = None


def _apply(base: RunConfig, overrides: dict) -> RunConfig:
    try:
        return base.with_overrides(overrides)
    except (KeyError, TypeError):
        raise ConfigError(f"a sweep override names a field that does not exist: {overrides}") from None


def _invalid_reason(exc: ValidationError) -> str:
    return "invalid config: " + "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}".lstrip(": ")
        for e in exc.errors())


def _plan_runs(sweep: Sweep) -> tuple[list[_Run], dict[str, RunConfig]]:
    """Every (point, replication) run, and the sync baselines they need, by key."""
    seeds = replication_seeds(sweep.base.seed, sweep.reps)
    steps = sweep.steps or sweep.base.run.steps
    runs, baselines = [], {}
    for i, overrides in enumerate(sweep.points):
        for rep, seed in enumerate(seeds):
            full = {**overrides, "seed": seed, "run.steps": steps}
            try:
                cfg = _apply(sweep.base, full)
            except ValidationError as exc:
                text = json.dumps([RECORD_FORMAT, sweep.base.model_dump(mode="json"), full], sort_keys=True, default=str)
                runs.append(_Run(i, rep, seed, hashlib.sha256(text.encode()).hexdigest()[:20], None,
                                 _invalid_reason(exc)))
                continue
            run = _Run(i, rep, seed, run_key(cfg), cfg)
            if sweep.sync_baseline and cfg.pipeline.mode != "sync":
                try:
                    sync_cfg = cfg.with_overrides({**SYNC_PINNED, "run.steps": min(steps, sweep.sync_steps)})
                except ValidationError:  # e.g. a queue capacity sync mode cannot use: no speedup
                    sync_cfg = None
                if sync_cfg is not None:
                    run.sync_key = run_key(sync_cfg)
                    baselines[run.sync_key] = sync_cfg
            runs.append(run)
    return runs, baselines


def _chains(configs: dict[str, RunConfig]) -> list[list[tuple[str, RunConfig]]]:
    """Group runs that differ only in the staleness bound, each group in ascending order of the bound."""
    groups: dict[str, list[tuple[str, RunConfig]]] = {}
    for key, cfg in configs.items():
        rest = cfg.model_dump(mode="json", exclude=NOT_SIMULATED)
        rest["pipeline"].pop("max_staleness")
        groups.setdefault(json.dumps(rest, sort_keys=True), []).append((key, cfg))
    return [sorted(chain, key=lambda kc: kc[1].pipeline.max_staleness) for chain in groups.values()]


# --------------------------------------------------------------------------- the store
class RunStore:
    """One JSON file per finished run under `folder`, written atomically."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict | None:
        path = self.folder / f"{key}.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def put(self, key: str, record: dict) -> None:
        tmp = self.folder / f".{key}.{os.getpid()}.tmp"  # a kill mid-write leaves no half file under the key
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.folder / f"{key}.json")


# --------------------------------------------------------------------------- running
def run_sweep(sweep: Sweep, out: Path, backend: Backend, console: Console | None = None,
              label: str = "runs") -> SweepResult:
    """Simulate every run of `sweep` not yet stored under out/runs/, then build the tables (not written;
    see write_tables)."""
    start = time.perf_counter()
    store = RunStore(Path(out) / "runs")
    runs, baselines = _plan_runs(sweep)
    configs = {**{r.key: r.cfg for r in runs if r.cfg is not None}, **baselines}
    records = {key: rec for key in configs if (rec := store.get(key)) is not None}
    cached = len(records)

    tasks = []
    for chain in _chains(configs):
        if any(key not in records for key, _ in chain):
            tasks.append([(key, cfg, records.get(key)) for key, cfg in chain])
    # Longest tasks first, so the last ones to finish are short (sync baselines are).
    tasks.sort(key=lambda t: -sum(cfg.run.steps for _, cfg, rec in t if rec is None))

    simulated = reused = 0
    todo = len(configs) - cached
    # Workers on this machine store each run as it finishes; Ray workers may be elsewhere, so the driver does.
    run_chain = runner.run_chain if backend.remote else functools.partial(runner.run_chain, save=store.put)
    with _Progress(console, label, todo) as advance:
        for finished in backend.map_unordered(run_chain, tasks):
            for key, record in finished:
                if backend.remote:
                    store.put(key, record)
                records[key] = record
                if record.get("reused_from"):
                    reused += 1
                else:
                    simulated += 1
                advance()
    table = _table(sweep, runs, records)
    return SweepResult(table, aggregate(table, _point_columns(table)), simulated, reused, cached,
                       time.perf_counter() - start)


class _Progress:
    """A rich progress bar over runs (nothing without a console)."""

    def __init__(self, console: Console | None, label: str, total: int):
        self.bar = None
        if console is not None and total:
            self.bar = Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=console, transient=True)
            self.task = self.bar.add_task("", total=total)

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return (lambda: self.bar.advance(self.task)) if self.bar is not None else (lambda: None)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def _scalar(value):
    """Table cells must be scalars (Parquet): lists and dicts become JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _table(sweep: Sweep, runs: list[_Run], records: dict[str, dict]) -> pd.DataFrame:
    ok = [rec["metrics"] for rec in records.values() if rec["status"] == "ok"]
    metric_names = list(ok[0]) if ok else []
    rows = []
    for run in runs:
        labels = sweep.labels[run.point] if sweep.labels else {}
        record = records[run.key] if run.cfg is not None else runner.failed_record(run.error)
        metrics = {name: record["metrics"].get(name) for name in metric_names}
        sync = records.get(run.sync_key) if run.sync_key else None
        sync_step = sync["metrics"]["time/step_s"] if sync and sync["status"] == "ok" else None
        if record["status"] == "ok":
            if run.cfg.pipeline.mode == "sync":
                metrics["speedup/vs_sync"] = 1.0
            elif sync_step:
                metrics["speedup/vs_sync"] = sync_step / metrics["time/step_s"]
        rows.append({**{k: _scalar(v) for k, v in labels.items()},
                     **{k: _scalar(v) for k, v in sweep.points[run.point].items()},
                     "replication": run.replication, "seed": run.seed, "key": run.key, **metrics,
                     "sync/step_s": sync_step, "compute_s": record["compute_s"],
                     "reused_from": record.get("reused_from"), "status": record["status"], "error": record["error"]})
    return pd.DataFrame(rows)


def metric_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if "/" in c and pd.api.types.is_numeric_dtype(table[c])]


def _point_columns(table: pd.DataFrame) -> list[str]:
    """Columns that identify a grid point: everything before `replication`."""
    cols = list(table.columns)
    return cols[: cols.index("replication")] if "replication" in cols else []


def aggregate(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per grid point and metric, over successful replications: n, mean, std and the 95 % confidence
    interval of the mean (Student t with n-1 degrees of freedom; NaN for a single replication)."""
    from scipy import stats

    ok = table[table["status"] == "ok"] if "status" in table else table
    metrics = [m for m in metric_columns(ok) if ok[m].notna().any()]
    if ok.empty or not metrics:
        return pd.DataFrame(columns=[*by, "metric", "n", "mean", "std", "ci95_low", "ci95_high"])
    long = ok.melt(id_vars=by, value_vars=metrics, var_name="metric").dropna(subset=["value"])
    grouped = long.groupby([*by, "metric"], sort=False, dropna=False)["value"]
    agg = grouped.agg(n="count", mean="mean", std="std").reset_index()
    half = stats.t.ppf(0.975, np.maximum(agg["n"] - 1, 1)) * agg["std"] / np.sqrt(agg["n"])
    agg["ci95_low"], agg["ci95_high"] = agg["mean"] - half, agg["mean"] + half
    return agg


def write_tables(result: SweepResult, out: Path, stem: str = "table") -> list[Path]:
    """OUT/STEM.parquet and .csv (one row per run), OUT/STEM_aggregate.parquet and .csv."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for frame, name in ((result.table, stem), (result.aggregate, f"{stem}_aggregate")):
        for ext, write in (("parquet", frame.to_parquet), ("csv", frame.to_csv)):
            path = out / f"{name}.{ext}"
            write(path, index=False)
            paths.append(path)
    return paths


def status_line(result: SweepResult, backend: Backend) -> str:
    failed = int((result.table["status"] != "ok").sum())
    return (f"{len(result.table)} rows: {result.simulated} runs simulated, {result.reused} reused from a smaller "
            f"bound, {result.cached} already stored, {failed} failed; {result.seconds:.1f} s on {backend.name}")


def describe_failures(table: pd.DataFrame) -> Iterable[str]:
    failed = table[table["status"] != "ok"]
    for reason, count in failed["error"].value_counts().items():
        yield f"{count} failed run(s): {reason}"
