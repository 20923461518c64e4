"""Fitting a calibration to per-step logs, and turning it into measured profiles and run configs.

What a synchronous run's log identifies, and how (docs/calibrate.md has the whole argument):

- **Learner phases** (the policy update, recomputed old log-probs, reference log-probs, and whatever else of the
  step is not generation or sync, "other"): each a fixed part plus a part per trained token, least squares over
  steps, both parts non-negative. Against learner GPUs L the per-token part is split into a serial share that does
  not shrink and a parallel share that shrinks like 1/L: T(tokens, L) = fixed + tokens x r x (s + (1 - s) L_ref / L),
  r the rate at the reference size L_ref. Logs of two or more learner sizes identify s per phase (least squares on
  [1, tokens, tokens / L]); one size does not, and s is taken from the analytic model (0: its training time divides
  by L) with a stated range, whose ends are simulated.
- **Weight sync**: its mean.
- **Generation**: its time per batch. The cost of one decode step against active sequences and context cannot be
  separated from one batch size: only its average over the batches is identified (printed per decode step: the
  batch's generation time over its longest response). Its shape falls back to the roofline of the named GPU and
  model (sim/hardware/cost.py), scaled so that the simulator generates the log's batches in the log's time
  (prefill scaled with it: the log does not separate them). The roofline's balance of compute against memory time
  is not identified either: its compute part is scaled by a factor with a stated range, each end refitted.
- **Lengths** (sim/calibrate/lengths.py), batch shape and layout: from the log, or from options where it lacks them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from sim.calibrate.lengths import fit_lengths
from sim.calibrate.logs import FORMATS, LEARNER_PHASES, RunLog, missing_reason, read_log
from sim.config import ConfigError, Efficiency, RunConfig, parse_config
from sim.hardware.measured import Curve, DecodeGrid, MeasuredProfile, save_profile
from sim.hardware.specs import GPUS, MODELS

SERIAL_SHARE_RANGE = (0.0, 0.5)   # assumed serial share of the per-token learner time, one learner size logged
DECODE_COMPUTE_RANGE = (0.5, 2.0)  # assumed factor on the roofline's decode compute time, against its memory time
OTHER = "other_s"  # the rest of a step: reward, advantages, logging (charged to the learner)
SCHEMA = "stalecast.calibration/1"


@dataclass(frozen=True)
class Layout:
    """Where a run ran: R rollout engines of T GPUs each, and L learner GPUs (the same GPUs when colocated)."""
    rollout_workers: int
    gpus_per_worker: int
    learner_gpus: int
    colocated: bool

    @property
    def gpus(self) -> int:
        return self.learner_gpus if self.colocated else self.rollout_workers * self.gpus_per_worker + self.learner_gpus

    def describe(self) -> str:
        engines = f"{_count(self.rollout_workers, 'engine')} of {_count(self.gpus_per_worker, 'GPU')}"
        if self.colocated:
            return f"colocated on {_count(self.learner_gpus, 'GPU')} ({engines}, the learner on all)"
        return f"{_count(self.rollout_workers * self.gpus_per_worker, 'rollout GPU')} ({engines}) + " \
               f"{_count(self.learner_gpus, 'learner GPU')}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass
class Options:
    """What the user tells calibration that the log may not: layout (one value for every log, or one per log),
    hardware, batch shape, lengths, and the ranges of what no log identifies."""
    gpus: list[int] | None = None
    rollout_gpus: list[int] | None = None
    learner_gpus: list[int] | None = None
    gpus_per_worker: int = 1
    gpu: str | None = None
    model: str | None = None
    batch_prompts: int | None = None
    group_size: int | None = None
    prompt_len: int | None = None
    max_new_tokens: int | None = None
    response_sigma: float | None = None
    lengths_dump: str | None = None   # a per-sample dump of the run: its groups' lengths, resampled
    max_concurrency: int | None = None
    skip_steps: int = 0
    serial_share_range: tuple[float, float] = SERIAL_SHARE_RANGE
    decode_compute_range: tuple[float, float] = DECODE_COMPUTE_RANGE
    sim_steps: int = 100


@dataclass
class PhaseFit:
    fixed_s: float
    rate_s_per_token: float          # at the reference learner size
    serial_share: float | None       # of the per-token time at the reference size; None: not identified

    def seconds(self, tokens, learner_gpus: int, reference_gpus: int, serial_share: float):
        s = self.serial_share if self.serial_share is not None else serial_share
        return self.fixed_s + tokens * self.rate_s_per_token * (s + (1.0 - s) * reference_gpus / learner_gpus)


@dataclass(frozen=True)
class Corner:
    """One set of values for what the logs left unidentified: `point` is the estimate, the others the ends."""
    label: str
    decode: str          # a key of Calibration.decode_scale
    serial_share: float  # used where a phase's own share is not identified


@dataclass
class Calibration:
    format: str
    logs: list[dict]                      # per log: path, layout, steps, logged and reproduced sync step time
    hardware: dict                        # gpu, model, efficiency, train_tokens
    cluster: dict                         # engine shape: max_concurrency, gpus_per_worker, batching (the split
                                          # comes per log, or per what-if)
    workload: dict                        # the config's workload section
    decode_compute: dict[str, float]      # "point", "low", "high" -> factor on the roofline's decode compute time
    decode_scale: dict[str, float]        # the same keys -> fitted scale of generation costs
    decode_step_mean_s: list[float]       # per log: generation time over decode steps (longest response)
    reference_gpus: int                   # learner size the phase rates are at
    phases: dict[str, PhaseFit]
    serial_share_range: tuple[float, float]
    sync_s: float
    notes: list[str] = field(default_factory=list)  # what was identified, what was not and what it fell back to
    bookkeeping_s: float = 0.0            # the learner's work per step after publishing (0: not logged)

    # ---------------------------------------------------------------- what the logs left open
    @property
    def serial_identified(self) -> bool:
        return all(p.serial_share is not None for p in self.phases.values())

    def corners(self) -> list[Corner]:
        """The point estimate, then every combination of the ends of the unidentified ranges."""
        lo, hi = self.serial_share_range
        point = Corner("point", "point", lo)  # the analytic model's share (0), or the least the range allows
        decode_ends = [k for k in ("low", "high") if k in self.decode_scale] or ["point"]
        serial_ends = [None] if self.serial_identified else list(dict.fromkeys((lo, hi)))
        out = [point]
        for d in decode_ends:
            for s in serial_ends:
                parts = ([f"decode compute x{self.decode_compute[d]:g}"] if d != "point" else []) + (
                    [f"serial share {s:g}"] if s is not None else [])
                if parts:
                    out.append(Corner(", ".join(parts), d, point.serial_share if s is None else s))
        return out

    # ---------------------------------------------------------------- costs
    def learner_s(self, tokens, learner_gpus: int, serial_share: float):
        return sum(p.seconds(tokens, learner_gpus, self.reference_gpus, serial_share) for p in self.phases.values())

    def config(self, layout: Layout, mode: str = "sync", steps: int = 100, seed: int = 0,
               profile: str | None = None, pipeline: dict | None = None) -> RunConfig:
        """A run config of the calibrated workload and hardware on `layout` (costs from `profile`, if given)."""
        if layout.gpus_per_worker != self.cluster["gpus_per_worker"]:
            raise ConfigError(f"the calibration's decode costs are of engines of {self.cluster['gpus_per_worker']} "
                              f"GPU(s); a layout of {layout.gpus_per_worker}-GPU engines is not calibrated")
        data = {"name": "calibrated", "seed": seed, "workload": self.workload,
                "cluster": {**self.cluster, **asdict(layout)},
                "pipeline": {"mode": mode, **(pipeline or {})},
                "hardware": {**self.hardware, "profile": profile}, "run": {"steps": steps}}
        return parse_config(data, "calibration")

    def _roofline(self, decode: str):
        """The analytic cost model of the named GPU and model, its decode compute time scaled by decode_compute."""
        from sim.hardware.cost import build_cost_model

        eff = dict(self.hardware.get("efficiency") or {})
        base = eff.get("decode_compute", Efficiency().decode_compute)
        eff["decode_compute"] = base / self.decode_compute[decode]
        if eff["decode_compute"] > 1:
            raise ConfigError(f"--decode-compute-range: a factor of {self.decode_compute[decode]:g} on the roofline's "
                              f"decode compute time needs decode_compute {base:g} / {self.decode_compute[decode]:g} "
                              f"<= 1; narrow the range")
        layout = Layout(1, self.cluster["gpus_per_worker"], 1, False)
        # at least two rows of active sequences: a profile's decode grid needs two
        cfg = self.config(layout).with_overrides({"hardware.efficiency": eff, "cluster.max_concurrency":
                                                  max(2, self.cluster["max_concurrency"])})
        return build_cost_model(cfg)

    def profile(self, learner_gpus: int, corner: Corner, scale: float | None = None) -> MeasuredProfile:
        """The measured profile of `corner` with a learner on `learner_gpus`: decode and prefill from the scaled
        roofline (per rollout engine), training from the fitted phases, sync as logged."""
        roof = self._roofline(corner.decode)
        k = self.decode_scale[corner.decode] if scale is None else scale
        max_n = int(self.cluster["max_concurrency"])
        # every count up to 128, then 1 % apart at most: the roofline bends once in the active count
        active = np.unique(np.r_[np.arange(1, max(2, min(max_n, 128)) + 1),
                                 np.round(np.geomspace(128, max(max_n, 128), 400)).astype(int)])
        active = active[active <= max(2, max_n)]
        longest = self._longest_prompt() + int(self.workload["max_new_tokens"])
        context = np.unique(np.round(np.geomspace(1, 2 * longest, 24), 1))
        seconds = [[k * roof.decode_step_s(int(n), float(n * c)) for c in context] for n in active]
        prompt_tokens = np.r_[0.0, np.geomspace(1, 2 * max_n * self._longest_prompt(), 40)]
        prefill = [k * roof.prefill_s(float(p)) for p in prompt_tokens]
        batch_tokens = 2.0 * self.workload["batch_prompts"] * self.workload["group_size"] * longest
        train = [self.learner_s(t, learner_gpus, corner.serial_share) for t in (0.0, batch_tokens)]
        return MeasuredProfile(
            machine={"calibrated_from": [log["path"] for log in self.logs], "format": self.format,
                     "gpu": self.hardware["gpu"], "corner": corner.label, "learner_gpus": learner_gpus},
            model=self.hardware["model"] if isinstance(self.hardware["model"], str) else "custom",
            decode=DecodeGrid(tuple(int(n) for n in active), tuple(float(c) for c in context),
                              tuple(tuple(row) for row in seconds)),
            prefill=Curve(tuple(float(p) for p in prompt_tokens), tuple(prefill)),
            train=Curve((0.0, batch_tokens), tuple(train)),
            sync_s=self.sync_s, learner_bookkeeping_s=self.bookkeeping_s)

    def _longest_prompt(self) -> int:
        wl = self.workload
        if wl.get("groups"):
            return max(g[0] for g in wl["groups"])
        return int(wl["prompt_len"]["value"])

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict:
        out = asdict(self)
        out["serial_share_range"] = list(self.serial_share_range)
        return {"schema": SCHEMA, **out}

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "Calibration":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ConfigError(f"{where}: not a calibration written by `stalecast calibrate` (schema {SCHEMA})")
        data = {k: v for k, v in data.items() if k != "schema"}
        try:
            data["phases"] = {k: PhaseFit(**v) for k, v in data["phases"].items()}
            data["serial_share_range"] = tuple(data["serial_share_range"])
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{where}: incomplete calibration ({exc})") from None

    def save(self, profile_path: Path) -> Path:
        """The point profile at `profile_path` (a measured profile any config can name) and this calibration
        beside it (`sidecar`), which `stalecast whatif` reads. Returns the sidecar's path."""
        save_profile(self.profile(self.reference_gpus, self.corners()[0]), profile_path)
        side = sidecar(profile_path)
        tmp = side.with_name(f".{side.name}.tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(side)
        return side

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]


def sidecar(profile_path: Path) -> Path:
    return profile_path.with_name(profile_path.stem + ".calibration.yaml")


def load_calibration(profile_path: str | Path) -> Calibration:
    """The calibration saved beside a calibrated profile."""
    from sim.config import read_yaml

    profile_path = Path(profile_path)
    side = sidecar(profile_path)
    if not profile_path.is_file():
        raise ConfigError(f"{profile_path}: no such profile")
    if not side.is_file():
        raise ConfigError(f"{profile_path}: no calibration beside it ({side.name}, written by `stalecast calibrate "
                          f"--out`); whatif needs the workload and the ranges the calibration found: give the log "
                          f"instead, with --format")
    return Calibration.from_dict(read_yaml(side, "calibration file"), str(side))


# --------------------------------------------------------------------------- fitting
def calibrate(paths: list[str | Path], fmt: str, opts: Options) -> tuple[Calibration, pd.DataFrame]:
    """Fit the logs at `paths` (one run each, same workload) of system `fmt`. Returns the calibration and the
    per-step residuals (log, step, part, logged, fitted)."""
    logs = [_trimmed(read_log(p, fmt), opts.skip_steps) for p in paths]
    layouts = [_layout(log, i, len(logs), opts) for i, log in enumerate(logs)]
    notes: list[str] = []
    hardware = _hardware(logs[0], opts)
    workload, cluster = _workload(logs, layouts, opts, notes)
    tokens = [_tokens(log, workload) for log in logs]
    reference = layouts[0].learner_gpus
    phases, residuals = _fit_phases(logs, layouts, tokens, reference, notes)
    sync_s = _mean_sync(logs, notes)
    bookkeeping_s = _pooled(logs, "bookkeeping_s")
    lo, hi = opts.decode_compute_range
    decode_compute = {"point": 1.0, **({"low": lo, "high": hi} if (lo, hi) != (1.0, 1.0) else {})}
    cal = Calibration(fmt, [{"path": str(log.path), "layout": asdict(layout), "steps": len(log.steps)}
                            for log, layout in zip(logs, layouts)],
                      hardware, cluster, workload, decode_compute, dict.fromkeys(decode_compute, 1.0), [], reference,
                      phases, tuple(opts.serial_share_range), sync_s, notes, bookkeeping_s or 0.0)
    residuals += _fit_generation(cal, logs, layouts, opts)
    _reproduce(cal, logs, layouts, opts)
    _describe_unidentified(cal, layouts)
    return cal, pd.DataFrame(residuals, columns=["log", "step", "part", "logged_s", "fitted_s"])


def _trimmed(log: RunLog, skip: int) -> RunLog:
    usable = log.steps["gen_s"].notna() if "gen_s" in log.steps else None
    if usable is None or not usable.any():
        raise ConfigError(f"{log.path}: no generation time per step: {missing_reason(log, 'gen_s')}")
    steps = log.steps[usable].iloc[skip:]
    if len(steps) < 3:
        raise ConfigError(f"{log.path}: {len(steps)} step(s) with a generation time after skipping {skip}; "
                          f"calibration needs at least 3")
    groups = log.groups
    if groups is not None and skip:  # a stalecast run's groups, in the order its steps consumed them
        per_step = len(groups) // len(log.steps)
        groups = groups[skip * per_step:]
    return RunLog(log.path, log.format, steps, log.sources, log.config, groups)


def _option_for(values: list[int] | None, i: int, n: int, name: str) -> int | None:
    if values is None:
        return None
    if len(values) not in (1, n):
        raise ConfigError(f"{name} {','.join(map(str, values))}: give one value for every log or one per log "
                          f"({n} logs)")
    return values[0] if len(values) == 1 else values[i]


def _layout(log: RunLog, i: int, n: int, opts: Options) -> Layout:
    if log.config is not None:
        cl = log.config.cluster
        return Layout(cl.rollout_workers, cl.gpus_per_worker, cl.learner_gpus, cl.colocated)
    tp = opts.gpus_per_worker
    gpus = _option_for(opts.gpus, i, n, "--gpus")
    rollout = _option_for(opts.rollout_gpus, i, n, "--rollout-gpus")
    learner = _option_for(opts.learner_gpus, i, n, "--learner-gpus")
    if gpus is not None and (rollout is not None or learner is not None):
        raise ConfigError("--gpus (a colocated run) and --rollout-gpus / --learner-gpus (a disaggregated one) "
                          "describe different layouts: give one")
    if (rollout is None) != (learner is None):
        raise ConfigError("--rollout-gpus and --learner-gpus go together (a disaggregated run)")
    if gpus is None and rollout is None and log.has("gpus"):
        gpus = int(round(float(log.steps["gpus"].median())))
    if gpus is not None:
        if gpus % tp:
            raise ConfigError(f"--gpus {gpus}: not a multiple of --gpus-per-worker {tp}")
        return Layout(gpus // tp, tp, gpus, True)
    if rollout is None:
        raise ConfigError(f"{log.path}: the log does not say how many GPUs ran it: pass --gpus N (rollout and "
                          f"learner colocated on N GPUs) or --rollout-gpus R --learner-gpus L")
    if rollout % tp:
        raise ConfigError(f"--rollout-gpus {rollout}: not a multiple of --gpus-per-worker {tp}")
    return Layout(rollout // tp, tp, learner, False)


def _hardware(log: RunLog, opts: Options) -> dict:
    if log.config is not None:
        hw = log.config.hardware
        if (opts.gpu or hw.gpu) is None:
            raise ConfigError(f"--gpu: required: the run's config.yaml names no hardware.gpu, whose roofline shapes "
                              f"the decode cost (known: {', '.join(GPUS)})")
        return {"gpu": opts.gpu or hw.gpu, "model": opts.model or hw.model,
                "efficiency": hw.efficiency.model_dump(), "train_tokens": hw.train_tokens}
    for option, value, known in (("--gpu", opts.gpu, GPUS), ("--model", opts.model, MODELS)):
        if value is None:
            raise ConfigError(f"{option}: required for a {log.format} log (the roofline that shapes the decode cost "
                              f"needs the GPU and the model; known: {', '.join(known)})")
        if value not in known:
            raise ConfigError(f"{option} {value}: unknown (known: {', '.join(known)})")
    return {"gpu": opts.gpu, "model": opts.model, "efficiency": {}, "train_tokens": "packed"}


def _pooled(logs: list[RunLog], quantity: str, weight: str | None = None) -> float | None:
    values, weights = [], []
    for log in logs:
        if log.has(quantity):
            v = log.steps[quantity].to_numpy(np.float64)
            w = log.steps[weight].to_numpy(np.float64) if weight and log.has(weight) else np.ones_like(v)
            keep = np.isfinite(v) & np.isfinite(w)
            values.append(v[keep])
            weights.append(w[keep])
    if not values or not np.concatenate(weights).sum():
        return None
    return float(np.average(np.concatenate(values), weights=np.concatenate(weights)))


def _workload(logs: list[RunLog], layouts: list[Layout], opts: Options, notes: list[str]) -> tuple[dict, dict]:
    first = logs[0]
    cfg = first.config
    group = opts.group_size or (cfg.workload.group_size if cfg is not None else None)
    if group is None:
        raise ConfigError(f"--group-size: required: a {first.format} log does not record how many responses each "
                          f"prompt gets (verl: actor_rollout_ref.rollout.n; AReaL: gconfig.n_samples; prime-rl: "
                          f"rollouts_per_example; TRL: num_generations)")
    per_log = [float(log.steps["n_samples"].median()) if log.has("n_samples") else None for log in logs]
    if opts.batch_prompts is not None:
        batch = opts.batch_prompts
    elif per_log[0] is not None:
        if any(n is not None and abs(n - per_log[0]) > 0.01 * per_log[0] for n in per_log):
            raise ConfigError(f"the logs trained on different batches ({', '.join(f'{n:.0f}' for n in per_log if n)} "
                              f"responses per step); calibrate fits logs of one workload")
        batch = round(per_log[0] / group)
        if batch < 1 or abs(batch * group - per_log[0]) > 0.01 * per_log[0]:
            raise ConfigError(f"{first.path}: {per_log[0]:.0f} responses per step is not a whole number of groups of "
                              f"--group-size {group}")
    else:
        raise ConfigError(f"--batch-prompts: required: {missing_reason(first, 'n_samples')}")
    n = batch * group
    max_n = opts.max_concurrency or (cfg.cluster.max_concurrency if cfg is not None else
                                     group * math.ceil(n / min(l.rollout_workers for l in layouts) / group))
    tp = {layout.gpus_per_worker for layout in layouts}
    if len(tp) > 1:
        raise ConfigError(f"the logs ran engines of {' and '.join(map(str, sorted(tp)))} GPUs; calibrate fits one "
                          f"engine shape")
    cluster = {"max_concurrency": max_n, "gpus_per_worker": tp.pop(),
               "batching": cfg.cluster.batching if cfg is not None else "continuous"}
    if cfg is not None:
        notes.append(f"lengths: the run's own, from its trace ({len(first.groups)} groups replayed in order)")
        return {"batch_prompts": batch, "group_size": group, "groups": first.groups, "groups_in_order": True,
                "max_new_tokens": cfg.workload.max_new_tokens}, cluster
    if opts.lengths_dump is not None:
        return _dump_workload(logs, opts, batch, group, notes), cluster
    prompt = opts.prompt_len or _pooled(logs, "prompt_mean", "n_samples")
    if prompt is None:
        raise ConfigError(f"--prompt-len: required: {missing_reason(first, 'prompt_mean')}")
    prompt_note = (f"prompt length: {opts.prompt_len} tokens as given" if opts.prompt_len else
                   f"prompt length: the logged mean, {prompt:.1f} tokens, for every prompt (the log gives no spread)")
    clip = _pooled(logs, "response_clip", "n_samples")
    longest = max((float(log.steps["response_max"].max()) for log in logs if log.has("response_max")), default=None)
    cap = opts.max_new_tokens
    if cap is None:
        if longest is None:
            raise ConfigError(f"--max-new-tokens: required: the log gives no longest response "
                              f"({missing_reason(first, 'response_max')})")
        cap = int(round(longest))
        notes.append(f"max_new_tokens: {cap}, the longest logged response" + (
            " (responses were cut there: the cap)" if clip else " (none reported cut: the cap is at least this)"))
    mean = _pooled(logs, "response_mean", "n_samples")
    if mean is None:
        raise ConfigError(f"{first.path}: no response length: {missing_reason(first, 'response_mean')}")
    max_median = (float(np.median(np.concatenate([log.steps["response_max"].dropna().to_numpy() for log in logs
                                                  if log.has("response_max")]))) if longest is not None else None)
    fit = fit_lengths(mean, cap, clip, max_median, float(n), opts.response_sigma)
    notes.append(f"response lengths: lognormal median {fit.median:.1f}, sigma {fit.sigma:.3f}, cut at {cap}, from "
                 f"{fit.how}")
    notes.append(prompt_note)
    return {"batch_prompts": batch, "group_size": group, "prompt_len": {"kind": "constant", "value": round(prompt)},
            "response_len": fit.as_config(), "max_new_tokens": cap}, cluster


def _dump_workload(logs: list[RunLog], opts: Options, batch: int, group: int, notes: list[str]) -> dict:
    """Lengths from a per-sample dump of the run (validate/importers.py): its whole groups, resampled."""
    from validate.importers import DUMPS, dump_groups

    fmt = logs[0].format
    if fmt not in DUMPS:
        raise ConfigError(f"--lengths-dump: a {fmt} run's own lengths are read from its folder already")
    groups = dump_groups(opts.lengths_dump, fmt)
    odd = next((g for g in groups if len(g) != group + 1), None)
    if odd is not None:
        raise ConfigError(f"--lengths-dump {opts.lengths_dump}: a group of {len(odd) - 1} responses, where "
                          f"--group-size is {group}")
    logged = max((int(log.steps["response_max"].max()) for log in logs if log.has("response_max")), default=0)
    cap = opts.max_new_tokens or max(logged, max(max(g[1:]) for g in groups))
    notes.append(f"lengths: {len(groups)} groups of the per-sample dump {opts.lengths_dump}, resampled whole; cut at "
                 f"{cap}")
    return {"batch_prompts": batch, "group_size": group, "groups": groups, "groups_in_order": False,
            "max_new_tokens": cap}


def _tokens(log: RunLog, workload: dict) -> np.ndarray:
    """Tokens each step trained on: logged, else samples x (prompt + response) from the step's means."""
    st = log.steps
    logged = st["n_tokens"].to_numpy(np.float64) if log.has("n_tokens") else np.full(len(st), np.nan)
    if np.isfinite(logged).all():
        return logged
    n = st["n_samples"] if log.has("n_samples") else workload["batch_prompts"] * workload["group_size"]
    prompt = st["prompt_mean"] if log.has("prompt_mean") else _mean_prompt(workload)
    tokens = np.where(np.isfinite(logged), logged, (n * (prompt + st["response_mean"])).to_numpy(np.float64))
    if not np.isfinite(tokens).all():
        raise ConfigError(f"{log.path}: steps without a token count or response length "
                          f"({missing_reason(log, 'n_tokens')})")
    return tokens


def _mean_prompt(workload: dict) -> float:
    if workload.get("groups"):
        return float(np.mean([g[0] for g in workload["groups"]]))
    return float(workload["prompt_len"]["value"])


def _phase_values(log: RunLog) -> dict[str, np.ndarray]:
    """Per step, each learner phase the log has, and `other`: the step less every logged phase."""
    st = log.steps
    out = {p: st[p].to_numpy(np.float64) for p in LEARNER_PHASES if log.has(p)}
    if log.has("step_s"):
        parts = sum(np.nan_to_num(st[p].to_numpy(np.float64)) for p in ("gen_s", *LEARNER_PHASES, "sync_s")
                    if log.has(p))
        out[OTHER] = st["step_s"].to_numpy(np.float64) - parts
    return out


def _fit_phases(logs: list[RunLog], layouts: list[Layout], tokens: list[np.ndarray], reference: int,
                notes: list[str]) -> tuple[dict[str, PhaseFit], list[tuple]]:
    from scipy.optimize import nnls

    values = [_phase_values(log) for log in logs]
    names = [p for p in (*LEARNER_PHASES, OTHER) if any(p in v for v in values)]
    if not any(p in names for p in LEARNER_PHASES):
        raise ConfigError(f"{logs[0].path}: no learner time per step: {missing_reason(logs[0], 'update_s')}")
    sizes = sorted({layout.learner_gpus for layout in layouts})
    phases, residuals = {}, []
    for name in names:
        rows = [(v[name], t, np.full(len(t), layout.learner_gpus), log) for v, t, layout, log
                in zip(values, tokens, layouts, logs) if name in v]
        y = np.concatenate([r[0] for r in rows])
        t = np.concatenate([r[1] for r in rows])
        gpus = np.concatenate([r[2] for r in rows])
        ok = np.isfinite(y)
        both_sizes = len(np.unique(gpus)) > 1
        design = np.column_stack([np.ones_like(t), t] + ([t * reference / gpus] if both_sizes else []))
        coef, _ = nnls(design[ok], y[ok])
        if both_sizes:  # rate at the reference size = serial + parallel part there
            rate = coef[1] + coef[2]
            fit = PhaseFit(float(coef[0]), float(rate), float(coef[1] / rate) if rate > 0 else 0.0)
        else:
            fit = PhaseFit(float(coef[0]), float(coef[1]), None)
        phases[name] = fit
        for y_log, t_log, g_log, log in rows:
            fitted = fit.seconds(t_log, g_log, reference, 0.0)
            residuals += [(str(log.path), int(s), name, float(a), float(b))
                          for s, a, b in zip(log.steps.index, y_log, fitted) if np.isfinite(a)]
    all_tokens = np.concatenate(tokens)
    spread = float(all_tokens.std() / all_tokens.mean())
    notes.append(f"learner phases: fixed and per-token parts told apart by how much the tokens per step vary "
                 f"({100 * spread:.1f} %, std / mean)" + ("; too little to separate them well: a phase's split between "
                                                          "the two is uncertain, its total at these tokens is not"
                                                          if spread < 0.02 else ""))
    if len(sizes) > 1:
        mean = float(all_tokens.mean())
        per_token = {n: p for n, p in phases.items()  # phases whose per-token part is more than a trace
                     if p.rate_s_per_token * mean > 0.05 * (p.fixed_s + p.rate_s_per_token * mean)}
        notes.append(f"learner against GPUs: logs at {', '.join(map(str, sizes))} learner GPUs identify each phase's "
                     f"serial share: " + ", ".join(f"{n} {p.serial_share:.2f}" for n, p in per_token.items()))
    return phases, residuals


def _mean_sync(logs: list[RunLog], notes: list[str]) -> float:
    value = _pooled(logs, "sync_s")
    if value is None:
        notes.append(f"weight sync: not logged ({missing_reason(logs[0], 'sync_s')}); taken as 0 s")
        return 0.0
    return value


def _simulate(cal: Calibration, layout: Layout, corner: Corner, steps: int, scale: float | None = None,
              bookkeeping: bool = True):
    """Trace of the calibrated workload on `layout` in sync mode, with `corner`'s costs (without the learner's
    bookkeeping unless `bookkeeping`)."""
    from sim.engine.pipeline import Simulation
    from sim.hardware.cost import build_cost_model
    from sim.metrics import METRIC_COLUMNS

    cfg = cal.config(layout, "sync", steps)
    profile = cal.profile(layout.learner_gpus, corner, scale)
    cost = build_cost_model(cfg, profile if bookkeeping else replace(profile, learner_bookkeeping_s=0.0))
    return Simulation(cfg, cost, trace_columns=METRIC_COLUMNS).run()


def _sim_steps(log: RunLog, opts: Options) -> int:
    # a run's own groups replay in order: simulate exactly its steps
    return len(log.steps) if log.groups is not None else opts.sim_steps


def _fit_generation(cal: Calibration, logs: list[RunLog], layouts: list[Layout], opts: Options) -> list[tuple]:
    """Each decode-compute end's scale: the log's mean generation time over the simulator's at scale 1, pooled over
    logs (weighted by their steps), the learner's bookkeeping left out (in a sync run it overlaps generation: the
    learner's wait is the generation where that is the longer). Residuals per step against the average decode step x
    the step's longest response (prefill included in the average)."""
    from sim.metrics import learner_wait_s

    residuals = []
    for key in cal.decode_scale:
        num = den = 0.0
        for i, (log, layout) in enumerate(zip(logs, layouts)):
            trace = _simulate(cal, layout, Corner(key, key, 0.0), _sim_steps(log, opts), scale=1.0,
                              bookkeeping=False)
            ratio = float(log.steps["gen_s"].mean()) / float(learner_wait_s(trace.steps).mean())
            num, den = num + ratio * len(log.steps), den + len(log.steps)
            if key == "point":
                cal.logs[i]["decode_scale"] = ratio
        cal.decode_scale[key] = num / den
    for log in logs:
        gen = log.steps["gen_s"].to_numpy(np.float64)
        decode_steps = (log.steps["response_max"].to_numpy(np.float64) if log.has("response_max")
                        else np.full(len(gen), np.nan))
        known = np.isfinite(decode_steps)
        per_step = float(gen[known].sum() / decode_steps[known].sum()) if known.any() else math.nan
        cal.decode_step_mean_s.append(per_step)
        fitted = np.where(known, per_step * decode_steps, gen.mean())
        residuals += [(str(log.path), int(s), "gen_s", float(a), float(b))
                      for s, a, b in zip(log.steps.index, gen, fitted)]
    return residuals


def _decode_compute_note(cal: Calibration) -> str:
    """What the unidentified decode compute factor does. Ends whose fitted decode table is the point's (decode stays
    memory-bound up to the engines' concurrency, so the factor never acts) would only repeat the point's runs: they
    are dropped."""
    lo, hi = cal.decode_compute["low"], cal.decode_compute["high"]
    point = np.asarray(cal.profile(cal.reference_gpus, cal.corners()[0]).decode.seconds)
    ends = [np.asarray(cal.profile(cal.reference_gpus, Corner(k, k, 0.0)).decode.seconds) for k in ("low", "high")]
    if all(np.allclose(end, point, rtol=1e-9, atol=0.0) for end in ends):
        for table in (cal.decode_compute, cal.decode_scale):
            del table["low"], table["high"]
        return (f"decode compute against memory time: not identified, and not acting: over the range x{lo:g} to "
                f"x{hi:g} of the roofline's compute time (--decode-compute-range), decode stays memory-bound up to "
                f"{cal.cluster['max_concurrency']} sequences per engine")
    return (f"decode compute against memory time: not identified; the roofline's compute time taken x{lo:g} to x{hi:g} "
            f"(--decode-compute-range; each end refitted: scale x{cal.decode_scale['low']:.3f} / "
            f"x{cal.decode_scale['high']:.3f})")


def _reproduce(cal: Calibration, logs: list[RunLog], layouts: list[Layout], opts: Options) -> None:
    """The logged sync step time against the simulator's with the point estimate, per log."""
    from sim.metrics import compute_metrics

    for i, (log, layout) in enumerate(zip(logs, layouts)):
        predicted = compute_metrics(_simulate(cal, layout, cal.corners()[0], _sim_steps(log, opts)))["time/step_s"]
        if log.has("step_s"):
            logged = float(log.steps["step_s"].mean())
        else:
            logged = float(sum(log.steps[p].fillna(0.0).mean() for p in ("gen_s", *LEARNER_PHASES, "sync_s")
                               if log.has(p)))
        cal.logs[i].update(step_s_logged=logged, step_s_reproduced=predicted,
                           step_s_source="its step times" if log.has("step_s") else "the sum of the logged phases")


def _describe_unidentified(cal: Calibration, layouts: list[Layout]) -> None:
    hw = cal.hardware
    model = hw["model"] if isinstance(hw["model"], str) else "the inline model"
    workers = sorted({layout.rollout_workers for layout in layouts})
    cal.notes.append(
        f"decode cost: only its average is identified (generation per decode step, prefill included: "
        + ", ".join(f"{c * 1e3:.2f} ms" for c in cal.decode_step_mean_s)
        + f"; one batch size per log, {', '.join(map(str, workers))} engine(s)); how it varies with active sequences "
          f"and context falls back to the {hw['gpu']} / {model} roofline (sim/hardware/cost.py), scaled x"
          f"{cal.decode_scale['point']:.3f} to generate the logged batches in the logged time")
    if "low" in cal.decode_scale:
        cal.notes.append(_decode_compute_note(cal))
    cal.notes.append("prefill: not separable from decode in a per-step log; the roofline's, scaled with decode")
    if not cal.serial_identified:
        cal.notes.append(
            f"learner against GPUs: one learner size logged ({cal.reference_gpus} GPUs), so the per-token time's "
            f"serial share is not identified: the analytic model's (0: it divides by the learner GPUs), range "
            f"{cal.serial_share_range[0]:g} to {cal.serial_share_range[1]:g} (--serial-share-range); give logs of two "
            f"learner sizes to fit it")
    cal.notes.append(f"weight sync: {cal.sync_s:.3f} s, as logged ({layouts[0].describe()}); charged the same on "
                     f"every layout (its time on another is not identified)")
    if cal.bookkeeping_s:
        cal.notes.append(f"learner bookkeeping: {cal.bookkeeping_s:.3f} s a step, as logged (its work after "
                         f"publishing: metrics, logging, checkpoints), charged beside generation on every layout; a "
                         f"learner-bound async run pays it at every step. Where the logged run's learner shared a "
                         f"processor with generation, it reads longer than it would alone")
    else:
        cal.notes.append(f"learner bookkeeping: not logged apart ({FORMATS[cal.format].name}: work outside the timed "
                         f"phases is in the step's `other` part where the log gives a step time); taken as 0 s")


def write_profile(cal: Calibration, out: Path, force: bool) -> Path:
    """Write the point profile at `out` and the calibration beside it; refuse to replace a file that is not a
    calibrated profile unless `force`."""
    if out.exists() and not sidecar(out).exists() and not force:
        raise ConfigError(f"--out {out}: exists and is not a calibrated profile (no {sidecar(out).name} beside it); "
                          f"name another file or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    return cal.save(out)


def policy_of(fmt: str) -> str:
    """The staleness control of the system whose log it is."""
    return FORMATS[fmt].policy
