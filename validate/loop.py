"""The whole loop `stalecast validate CONFIG` runs: profile, predict, train for real (configured mode and sync),
compare; then, apart, a post-hoc recalibration.

Honesty rules: the prediction is made from the profile and the config before the measured runs start,
with response (and prompt) lengths from the config or from a pilot run that is not one of the measured runs
(its own seed). The recalibrated prediction replays the measured run's lengths: it is reported in a second
table and never judged as the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sim.config import RunConfig
from sim.trace import Trace

LENGTH_SOURCES = ("config", "pilot")


@dataclass
class LoopResult:
    profile_path: Path
    length_source: str                 # what the notes say about where lengths came from
    predicted: Trace                   # the honest prediction, configured mode
    predicted_sync: Trace
    measured: Trace
    measured_sync: Trace
    recalibrated: Trace                # the prediction with the measured run's lengths (post hoc)
    recalibrated_sync: Trace
    costs: dict[str, dict[str, float]]  # run -> in-run cost ratios against the profile (validate.costs; post hoc)
    notes: list[str] = field(default_factory=list)


def lengths_from(trace: Trace) -> dict:
    """Overrides that make a config replay `trace`'s consumed groups whole and in admission order: each group's
    prompt length with its samples' response lengths (`workload.groups`), so lengths that occur together stay
    together and lengths that change over a run change in the simulation too."""
    used = trace.samples[trace.samples["learner_step"] >= 0].sort_values(["group_id", "sample_id"])
    groups = [[int(g["prompt_len"].iloc[0]), *(max(1, int(r)) for r in g["response_len"])]
              for _, g in used.groupby("group_id")]
    return {"workload.groups": groups, "workload.groups_in_order": True, "workload.prompt_len": None,
            "workload.response_len": None}


def run_loop(cfg: RunConfig, out: Path, *, profile: str | None, lengths: str, pilot_steps: int | None,
             say: Callable[[str], None], train_timeout_s: float = 3600.0, quick_profile: bool = False) -> LoopResult:
    """Everything is written under `out` (a scratch folder the caller renames when the report is complete)."""
    from real.profile import measure_profile, plan_for
    from real.trainer import Trainer
    from sim.engine.pipeline import simulate
    from sim.hardware.cost import cost_model_for
    from sim.hardware.measured import save_profile
    from validate.costs import cost_ratios

    if lengths not in LENGTH_SOURCES:
        raise ValueError(f"lengths: '{lengths}' is not one of {', '.join(LENGTH_SOURCES)}")
    notes = []
    # The pilot first, the profile last: this shared machine's speed drifts over minutes, so the profile is
    # measured right before the runs it predicts.
    if lengths == "pilot":
        # Lengths change as training goes on (early responses run long): the pilot is a run of the same config
        # and mode with another seed, and its groups are replayed in admission order.
        pilot_steps = pilot_steps or cfg.run.steps
        say(f"pilot run ({pilot_steps} {cfg.pipeline.mode} steps, seed {cfg.seed + 1}) for the lengths")
        pilot_cfg = cfg.with_overrides({"run.steps": pilot_steps, "seed": cfg.seed + 1})
        pilot = Trainer(pilot_cfg, out / "pilot", timeout_s=train_timeout_s).run()
        pilot_lengths = lengths_from(pilot.trace)
        notes.append(f"lengths: whole groups (a prompt length with its responses') replayed in order from a "
                     f"{pilot_steps}-step pilot run ({cfg.pipeline.mode} mode, seed {cfg.seed + 1}; not one of the "
                     f"measured runs)")
    else:
        pilot_lengths = {}
        notes.append("lengths: the config's prompt_len / response_len distributions")

    if profile is None:
        say("profiling this machine")
        profile_path = out / "profile.yaml"
        save_profile(measure_profile(cfg, plan_for(cfg, quick=quick_profile), say), profile_path)
        notes.append("hardware: measured by `stalecast profile` in this validation, right before the measured runs "
                     "(profile.yaml)")
    else:
        profile_path = Path(profile).resolve()
        notes.append(f"hardware: the given profile {profile}")
    # stalecast train's learner pads each batch to its longest row: a step costs those tokens.
    pred_cfg = cfg.with_overrides({"hardware.profile": str(profile_path.resolve()), "hardware.train_tokens": "padded",
                                   **pilot_lengths})
    notes.append("learner steps: charged for padded tokens (every sample at its batch's longest), as stalecast "
                 "train's learner computes them")

    sync = {"pipeline.mode": "sync", "pipeline.interruptible": False}
    say("predicting (before the measured runs)")
    predicted = simulate(pred_cfg)
    predicted_sync = simulate(pred_cfg.with_overrides(sync))

    say(f"training for real: {cfg.pipeline.mode} mode, {cfg.run.steps} steps")
    measured = Trainer(cfg, out / "measured", timeout_s=train_timeout_s).run().trace
    say(f"training for real: sync mode, {cfg.run.steps} steps")
    measured_sync = Trainer(cfg.with_overrides(sync), out / "measured_sync", timeout_s=train_timeout_s).run().trace

    say("recalibrating (post hoc: the measured run's lengths)")
    replay = pred_cfg.with_overrides(lengths_from(measured))
    recalibrated = simulate(replay)
    recalibrated_sync = simulate(replay.with_overrides(sync))
    notes.append("recalibrated (post hoc, not the prediction): the same profile, with the measured run's lengths")
    costs = {f"{cfg.pipeline.mode} (measured/)": cost_ratios(measured, cost_model_for(pred_cfg)),
             "sync (measured_sync/)": cost_ratios(measured_sync, cost_model_for(pred_cfg.with_overrides(sync)))}
    return LoopResult(profile_path, lengths, predicted, predicted_sync, measured, measured_sync, recalibrated,
                      recalibrated_sync, costs, notes)
