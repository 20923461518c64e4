"""The whole loop `stalecast validate CONFIG` runs: profile, predict, train for real (configured mode and sync),
compare; then, apart, a post-hoc recalibration.

Honesty rules: the prediction is made from the profile and the config before the measured runs start,
with response (and prompt) lengths from the config or from a pilot run that is not one of the measured runs
(its own seed). The recalibrated prediction replays the measured run's lengths: it is reported in a second
table and never judged as the prediction.

Repeats: a shared machine's speed wanders by ~9 % over half a minute, and a run's lengths depend on its seed,
so one run of each kind is one draw. With `repeats` R there are R pilots (seeds seed+1, seed+3, ...), then the
profile, then R measured runs in each mode (seeds seed, seed+2, ...; the modes alternate A S, S A, ... so a slow
spell falls on both alike). The prediction is R simulated runs, run r with pilot r's lengths and seed r's
config, and each side's R runs are laid end to end (`end_to_end`): rates are all samples over all time, and
staleness pools every run's samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sim.config import RunConfig
from sim.metrics import compute_metrics, run_wall_s
from sim.trace import Trace

LENGTH_SOURCES = ("config", "pilot")
SYNC = {"pipeline.mode": "sync", "pipeline.interruptible": False}  # a config's sync baseline


@dataclass
class LoopResult:
    profile_path: Path
    length_source: str                 # what the notes say about where lengths came from
    predicted: Trace                   # the honest prediction, configured mode (its runs end to end)
    predicted_sync: Trace
    measured: Trace                    # the measured runs end to end
    measured_sync: Trace
    recalibrated: Trace                # the prediction with the measured runs' lengths (post hoc)
    recalibrated_sync: Trace
    costs: dict[str, dict[str, float]]  # run -> in-run cost ratios against the profile (validate.costs; post hoc)
    runs: list[dict] = field(default_factory=list)  # each measured pair on its own: the machine's repeatability
    notes: list[str] = field(default_factory=list)


def run_dir(name: str, r: int) -> str:
    """Folder of repeat r (0-based): `measured`, `measured-2`, `measured-3`, ..."""
    return name if r == 0 else f"{name}-{r + 1}"


def end_to_end(traces: list[Trace]) -> Trace:
    """Runs laid end to end as one trace: run r's times start where run r-1's wall time ends, and its steps,
    versions, groups and samples are numbered on after the earlier runs' (missing values, -1, stay missing).
    Rates over the result are all samples over all time; every sample keeps its staleness."""
    import pandas as pd

    if len(traces) == 1:
        return traces[0]
    # each run's first group and end: a group counts as busy within its own run (sim.metrics.rollout_idle)
    samples, steps, runs = [], [], {"first_group": [], "end": []}
    t0 = step0 = group0 = sample0 = 0
    for tr in traces:
        runs["first_group"].append(group0)
        s, st = tr.samples.copy(), tr.steps.copy()
        for col in ("t_admit", "t_start", "t_end", "t_consumed"):
            s[col] += t0
        for col in ("t_start", "t_end"):
            st[col] += t0
        for frame, cols, offset in ((s, ("version_start", "version_end", "version_consumed", "learner_step"), step0),
                                    (s, ("group_id",), group0), (s, ("sample_id",), sample0),
                                    (st, ("step", "version"), step0)):
            for col in cols:
                frame[col] = np.where(frame[col] >= 0, frame[col] + offset, frame[col])
        s["version_mean"] += step0
        samples.append(s)
        steps.append(st)
        t0 += run_wall_s(tr.steps)
        runs["end"].append(t0)
        step0 += len(tr.steps)
        group0 += int(tr.samples["group_id"].max()) + 1
        sample0 += int(tr.samples["sample_id"].max()) + 1
    return Trace(pd.concat(samples, ignore_index=True), pd.concat(steps, ignore_index=True),
                 {**traces[0].header, "runs_laid_end_to_end": runs})


def run_row(r: int, seed: int, mode: str, measured: Trace, measured_sync: Trace) -> dict:
    """One measured pair on its own: samples/s and s/step in the configured mode, s/step in sync mode, speedup."""
    m, ms = compute_metrics(measured), compute_metrics(measured_sync)
    return {"run": r + 1, "seed": seed, "mode": mode, "samples_per_s": m["throughput/samples_per_s"],
            "step_s": m["time/step_s"], "sync_step_s": ms["time/step_s"],
            "speedup_vs_sync": ms["time/step_s"] / m["time/step_s"]}


def lengths_from(trace: Trace) -> dict:
    """Overrides that make a config replay `trace`'s consumed groups whole and in admission order: each group's
    prompt length with its samples' response lengths (`workload.groups`), so lengths that occur together stay
    together and lengths that change over a run change in the simulation too."""
    used = trace.samples[trace.samples["learner_step"] >= 0].sort_values(["group_id", "sample_id"])
    groups = [[int(g["prompt_len"].iloc[0]), *(max(1, int(r)) for r in g["response_len"])]
              for _, g in used.groupby("group_id")]
    return {"workload.groups": groups, "workload.groups_in_order": True, "workload.prompt_len": None,
            "workload.response_len": None}


def measured_seeds(cfg: RunConfig, repeats: int) -> list[int]:
    """The measured runs' seeds, one per repeat; each pilot takes the odd seed after its run's."""
    return [cfg.seed + 2 * r for r in range(repeats)]


def prediction_config(cfg: RunConfig, profile_path: Path) -> RunConfig:
    """The config the loop predicts with: the measured profile, learner steps charged for padded tokens (stalecast
    train's learner pads each batch to its longest row: a step costs those tokens), every sample's copy of a group's
    prompt prefilled (the real engines admit a group as group_size sequences: real/engine/batching.py), groups
    routed `fill_first` (a real worker takes as many groups as its free slots hold, first come, first served, in
    one locked admission: real/worker.py `RolloutWorker.admit`; in a sync run of 16 groups over 3 workers of 8
    groups' room, two workers took 8 each and the third none, every step), and no KV budget unless
    kv_budget_tokens gives one (the real workers impose no other: real/engine/kv.py)."""
    overrides = {"hardware.profile": str(Path(profile_path).resolve()), "hardware.train_tokens": "padded",
                 "cluster.group_prefill": "per_sample", "cluster.router": "fill_first"}
    if cfg.hardware.memory.kv_budget_tokens is None:
        overrides["hardware.memory.kv_policy"] = "unlimited"
    return cfg.with_overrides(overrides)


def pilot_bookkeeping_s(trace: Trace, step_metrics: list[dict]) -> float:
    """The learner's mean bookkeeping per step in a `stalecast train` run (its trace and per-step metrics), as
    `calibrate` reads it from the run's folder."""
    from sim.metrics import learner_bookkeeping_s

    queue_wait = {m["step"]: m["time/queue_wait_s"] for m in step_metrics}
    return float(learner_bookkeeping_s(trace.steps, [queue_wait[s] for s in trace.steps["step"]]).mean())


def predict_runs(pred_cfg: RunConfig, seeds: list[int], lengths_per_run: list[dict],
                 overrides: dict | None = None) -> Trace:
    """One simulated run per seed with its lengths (`lengths_from` a pilot, or {}), laid end to end."""
    from sim.engine.pipeline import simulate

    return end_to_end([simulate(pred_cfg.with_overrides({"seed": seed, **lens, **(overrides or {})}))
                       for seed, lens in zip(seeds, lengths_per_run)])


def starting_policy_note(cfg: RunConfig) -> str:
    """Where the runs start from (a pilot's lengths stand for a run's; with the tiny preset, they need not start
    from one policy)."""
    from sim.hardware.specs import MODELS

    if cfg.real.model not in MODELS:
        return f"starting policy: the checkpoint {cfg.real.model}, every run"
    if cfg.real.init_seed is not None:
        return f"starting policy: one for every run (real.init_seed {cfg.real.init_seed})"
    return "starting policy: each run's own seed's (real.init_seed null), pilots' and measured runs' alike"


def run_loop(cfg: RunConfig, out: Path, *, profile: str | None, lengths: str, pilot_steps: int | None,
             say: Callable[[str], None], repeats: int = 1, train_timeout_s: float = 3600.0,
             quick_profile: bool = False) -> LoopResult:
    """Everything is written under `out` (a scratch folder the caller renames when the report is complete)."""
    from real.profile import measure_profile, plan_for
    from real.runfolder import RunFolder
    from real.trainer import Trainer
    from sim.hardware.measured import load_profile, save_profile
    from validate.costs import in_run_costs

    if lengths not in LENGTH_SOURCES:
        raise ValueError(f"lengths: '{lengths}' is not one of {', '.join(LENGTH_SOURCES)}")
    if repeats < 1:
        raise ValueError(f"repeats: {repeats} is not a positive number of runs")
    seeds = measured_seeds(cfg, repeats)
    notes = []
    # The pilots first, the profile last: this shared machine's speed drifts over minutes, so the profile is
    # measured right before the runs it predicts.
    if lengths == "pilot":
        # Lengths change as training goes on (early responses run long): a pilot is a run of the same config
        # and mode with another seed, and its groups are replayed in admission order.
        pilot_steps = pilot_steps or cfg.run.steps
        pilot_lengths, bookkeeping = [], []
        for r, seed in enumerate(seeds):
            say(f"pilot run {r + 1} of {repeats} ({pilot_steps} {cfg.pipeline.mode} steps, seed {seed + 1}) "
                "for the lengths")
            pilot_cfg = cfg.with_overrides({"run.steps": pilot_steps, "seed": seed + 1})
            pilot = Trainer(pilot_cfg, out / run_dir("pilot", r), timeout_s=train_timeout_s).run()
            pilot_lengths.append(lengths_from(pilot.trace))
            bookkeeping.append(pilot_bookkeeping_s(pilot.trace, pilot.step_metrics))
        notes.append(f"lengths: whole groups (a prompt length with its responses') replayed in order from "
                     f"{repeats} {pilot_steps}-step pilot run(s) ({cfg.pipeline.mode} mode, seeds "
                     f"{', '.join(str(s + 1) for s in seeds)}; not measured runs), one per predicted run")
        bookkeeping_s = float(np.mean(bookkeeping))
    else:
        pilot_lengths, bookkeeping_s = [{} for _ in seeds], None
        notes.append("lengths: the config's prompt_len / response_len distributions")

    notes.append(starting_policy_note(cfg))

    if profile is None:
        say("profiling this machine")
        profile_path = out / "profile.yaml"
        save_profile(measure_profile(cfg, plan_for(cfg, quick=quick_profile), say), profile_path)
        notes.append("hardware: measured by `stalecast profile` in this validation, right before the measured runs "
                     "(profile.yaml)")
    else:
        profile_path = Path(profile).resolve()
        notes.append(f"hardware: the given profile {profile}")
    pred_cfg = prediction_config(cfg, profile_path)
    if load_profile(profile_path).learner_bookkeeping_s is not None:
        notes.append("learner bookkeeping: the profile's learner_bookkeeping_s")
    elif bookkeeping_s is not None:
        pred_cfg = pred_cfg.with_overrides({"hardware.efficiency.learner_bookkeeping_s": bookkeeping_s})
        notes.append(f"learner bookkeeping: {bookkeeping_s:.4f} s a step after each publish, timed in the pilot "
                     f"runs (the learner's wait after its sync less its own time/queue_wait_s)")
    else:
        notes.append(f"learner bookkeeping: not timed without pilot runs; the config's "
                     f"{cfg.hardware.efficiency.learner_bookkeeping_s:g} s (hardware.efficiency)")
    notes.append("learner steps: charged for padded tokens (every sample at its batch's longest), as stalecast "
                 "train's learner computes them")


    def predict(lengths_per_run: list[dict]) -> tuple[Trace, Trace]:
        return (predict_runs(pred_cfg, seeds, lengths_per_run),
                predict_runs(pred_cfg, seeds, lengths_per_run, SYNC))

    say("predicting (before the measured runs)")
    predicted, predicted_sync = predict(pilot_lengths)
    notes.append("generation charged at the profile's co-location factor for the workers' idle fraction (and, in "
                 "sync mode, the number of workers generating at once) that the prediction settles at: " + ", ".join(
                     f"{mode} x{t.header['generation_slowdown']:.3f} " + (
                         "(the same at any idle fraction)" if t.header["worker_idle_charged"] is None
                         else f"at {100 * t.header['worker_idle_charged']:.0f} % idle") + (
                         "" if t.header.get("beside_charged") is None
                         else f", beside {t.header['beside_charged']:.2f} other workers generating on average")
                     for mode, t in ((cfg.pipeline.mode, predicted), ("sync", predicted_sync))))

    measured_runs, sync_runs = [], []
    for r, seed in enumerate(seeds):
        kinds = [(cfg.pipeline.mode, "measured", measured_runs, {}), ("sync", "measured_sync", sync_runs, SYNC)]
        for mode, name, into, overrides in (kinds if r % 2 == 0 else kinds[::-1]):
            say(f"training for real: {mode} mode, {cfg.run.steps} steps, seed {seed} (run {r + 1} of {repeats})")
            run_cfg = cfg.with_overrides({"seed": seed, **overrides})
            into.append(Trainer(run_cfg, out / run_dir(name, r), timeout_s=train_timeout_s).run().trace)
    measured, measured_sync = end_to_end(measured_runs), end_to_end(sync_runs)
    runs = [run_row(r, seed, cfg.pipeline.mode, m, ms)
            for r, (seed, m, ms) in enumerate(zip(seeds, measured_runs, sync_runs))]
    if repeats == 1:
        notes.append("measured: `stalecast train` in the config's mode and in sync mode (measured/, measured_sync/)")
    else:
        notes.append(f"measured: `stalecast train`, {repeats} runs in each mode (seeds {', '.join(map(str, seeds))}; "
                     f"measured/, measured_sync/, then -2, -3, ...), modes alternating ({cfg.pipeline.mode} first, "
                     "then sync first, ...); the numbers are of each mode's runs laid end to end (all samples over "
                     "all time), the prediction's likewise")

    say("recalibrating (post hoc: the measured runs' lengths)")
    recalibrated, recalibrated_sync = predict([lengths_from(m) for m in measured_runs])
    notes.append("recalibrated (post hoc, not the prediction): the same profile, with the measured runs' lengths")
    folders = lambda name: ", ".join(f"{run_dir(name, r)}/" for r in range(repeats))  # noqa: E731
    static = cfg.cluster.batching == "static"
    each = lambda name, traces: [(t, RunFolder(out / run_dir(name, r)).read_engine_steps())  # noqa: E731
                                 for r, t in enumerate(traces)]
    costs = {f"{cfg.pipeline.mode} ({folders('measured')})":
             in_run_costs(pred_cfg, measured, each("measured", measured_runs), static),
             f"sync ({folders('measured_sync')})":
             in_run_costs(pred_cfg.with_overrides(SYNC), measured_sync, each("measured_sync", sync_runs), static)}
    return LoopResult(profile_path, lengths, predicted, predicted_sync, measured, measured_sync, recalibrated,
                      recalibrated_sync, costs, runs, notes)
