"""Measured hardware profiles: timing tables written by `stalecast profile`, read back as YAML.

The tables: `decode` (a grid), `prefill` and `train` (curves), `sync_s` (a number), `colocation` (slowdown
factors) and `learner_bookkeeping_s` (a number: the learner's work per step after publishing, which `stalecast
calibrate` times and `stalecast profile` does not; without it the efficiency section's applies). A profile must
hold at least one of them; which ones a config needs depends on its other hardware settings, as
`sim.hardware.cost.build_cost_model` takes each cost from the profile, else from `hardware.constant`, else from the
analytic model of `hardware.gpu`:
- with `hardware.gpu` or `hardware.constant` set, any non-empty subset: the costs a profile lacks come from them;
- with neither (`hardware.gpu: null`), the profile must give every cost: decode, prefill, train and sync_s
  (colocation stays optional: without it the efficiency section's factors apply).
`stalecast profile` measures the first five. `load_config` reads the profile and checks both rules, so a bad or
incomplete profile is a config error naming the file, not a silent fall-back.

Tables are used as measured (per worker for decode and prefill, for the learner as it ran for train): nothing
is rescaled to the configured tensor-parallel degree or learner GPU count.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import yaml


@dataclass(frozen=True)
class Curve:
    """Seconds against token count; piecewise-linear, extended linearly beyond both ends, floored at 0."""
    tokens: tuple[float, ...]
    seconds: tuple[float, ...]

    def __call__(self, tokens: float) -> float:
        return max(0.0, float(interp_linear(self.tokens, self.seconds, tokens)))


@dataclass(frozen=True)
class DecodeGrid:
    """Seconds of one decode step: seconds[i][j] with active[i] sequences of mean context[j] tokens each."""
    active: tuple[int, ...]
    context: tuple[float, ...]
    seconds: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class IdleCurve:
    """A slowdown against the fraction of time a worker idles between its batches: piecewise-linear, flat beyond
    both ends. On the 2-core VM a worker that generates in bursts ran x1.15-1.4 slower per batch than one
    generating back to back (more so with the other core busy), so the factor a run sees depends on its rhythm."""
    idle: tuple[float, ...]      # fractions of wall time idle, ascending, in [0, 1)
    slowdown: tuple[float, ...]  # batch time at that idle fraction over batch time back to back and alone

    def __call__(self, idle: float) -> float:
        return float(np.interp(idle, self.idle, self.slowdown))


def slowdown_at(factor: "float | IdleCurve", idle: float) -> float:
    """A co-location factor at a worker idle fraction: a plain number is the same at any."""
    return factor(idle) if isinstance(factor, IdleCurve) else float(factor)


def describe_factor(factor: "float | IdleCurve") -> str:
    """'x1.20', or 'x1.04 / x1.25 / x1.31 at 0 / 30 / 60 % idle'."""
    if not isinstance(factor, IdleCurve):
        return f"x{factor:.2f}"
    return (" / ".join(f"x{v:.2f}" for v in factor.slowdown) + " at "
            + " / ".join(f"{100 * u:.0f}" for u in factor.idle) + " % idle")


@dataclass(frozen=True)
class Colocation:
    gen_slowdown: float | IdleCurve  # a worker's generation while the learner trains and the other workers generate
    train_slowdown: float            # a learner step while every worker generates
    sync_gen_slowdown: float | IdleCurve = 1.0  # a worker's generation while only the other workers generate (sync)
    # Sync mode: a worker generating back to back beside k = 0, 1, ... other workers doing the same, over alone
    # (entry 0 is 1). The last entry is the crowd `sync_gen_slowdown` was measured in; a run where fewer generate
    # at once (a long tail draining) is charged less (`sim.hardware.cost.crowding`). None: not measured.
    sync_gen_beside: tuple[float, ...] | None = None


TABLES = ("decode", "prefill", "train", "sync_s", "colocation", "learner_bookkeeping_s")
TIMINGS = ("decode", "prefill", "train", "sync_s")  # what a profile must give when it is the only source of costs


@dataclass(frozen=True)
class MeasuredProfile:
    machine: dict = field(default_factory=dict)  # free-form: hostname, device, torch version, date
    model: str | None = None
    decode: DecodeGrid | None = None
    prefill: Curve | None = None
    train: Curve | None = None
    sync_s: float | None = None
    colocation: Colocation | None = None
    learner_bookkeeping_s: float | None = None  # the learner's work per step after publishing (config.Efficiency)

    def __post_init__(self):
        # Validated on construction, so a profile the `profile` command builds is checked like a loaded one.
        if all(getattr(self, name) is None for name in TABLES):
            raise ValueError(f"no tables: a profile needs at least one of {', '.join(TABLES)} (`stalecast profile` "
                             f"measures them all)")
        if self.decode is not None:
            d = self.decode
            _check_axis("decode.active", d.active, positive=True)
            _check_axis("decode.context", d.context, positive=True)
            if len(d.seconds) != len(d.active):
                raise ValueError(f"decode.seconds: {len(d.seconds)} rows, expected one per decode.active "
                                 f"value ({len(d.active)})")
            for i, row in enumerate(d.seconds):
                if len(row) != len(d.context):
                    raise ValueError(f"decode.seconds: row {i} has {len(row)} values, expected one per "
                                     f"decode.context value ({len(d.context)})")
                _check_nonneg(f"decode.seconds[{i}]", row)
        for name in ("prefill", "train"):
            curve = getattr(self, name)
            if curve is not None:
                _check_axis(f"{name}.tokens", curve.tokens, positive=False)
                if len(curve.seconds) != len(curve.tokens):
                    raise ValueError(f"{name}.seconds: {len(curve.seconds)} values, expected one per "
                                     f"{name}.tokens value ({len(curve.tokens)})")
                _check_nonneg(f"{name}.seconds", curve.seconds)
        for name in ("sync_s", "learner_bookkeeping_s"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < math.inf:
                raise ValueError(f"{name}: must be a finite number >= 0 (got {value})")
        if self.colocation is not None:
            for name in ("gen_slowdown", "train_slowdown", "sync_gen_slowdown"):
                value = getattr(self.colocation, name)
                if isinstance(value, IdleCurve):
                    _check_idle_curve(f"colocation.{name}", value)
                elif not 0 < value < math.inf:
                    raise ValueError(f"colocation.{name}: must be a finite number > 0 (got {value})")
            beside = self.colocation.sync_gen_beside
            if beside is not None:
                if not beside:
                    raise ValueError("colocation.sync_gen_beside: needs at least 1 value (entry k: beside k others)")
                bad = [v for v in beside if not 0 < v < math.inf]
                if bad:
                    raise ValueError(f"colocation.sync_gen_beside: values must be finite numbers > 0 (got {bad[0]})")

    @classmethod
    def from_dict(cls, data: dict) -> "MeasuredProfile":
        """Build from parsed YAML; ValueError names the field and the reason."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a mapping of tables, not {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown field")
        kw = {"machine": data.get("machine") or {}, "model": data.get("model")}
        if not isinstance(kw["machine"], dict):
            raise ValueError("machine: expected a mapping")
        if data.get("decode") is not None:
            d = _section(data, "decode", ("active", "context", "seconds"))
            rows = d["seconds"]
            if not isinstance(rows, list):
                raise ValueError("decode.seconds: expected a list of rows")
            active = _numbers("decode.active", d["active"])
            if any(v != int(v) for v in active):
                raise ValueError(f"decode.active: must be whole numbers of sequences (got {list(active)})")
            kw["decode"] = DecodeGrid(
                active=tuple(int(v) for v in active),
                context=_numbers("decode.context", d["context"]),
                seconds=tuple(_numbers(f"decode.seconds[{i}]", r) for i, r in enumerate(rows)))
        for name in ("prefill", "train"):
            if data.get(name) is not None:
                c = _section(data, name, ("tokens", "seconds"))
                kw[name] = Curve(_numbers(f"{name}.tokens", c["tokens"]), _numbers(f"{name}.seconds", c["seconds"]))
        for name in ("sync_s", "learner_bookkeeping_s"):
            if data.get(name) is not None:
                kw[name] = _numbers(name, [data[name]])[0]
        if data.get("colocation") is not None:
            c = dict(_section(data, "colocation", ("gen_slowdown", "train_slowdown"),
                              optional=("sync_gen_slowdown", "sync_gen_beside")))
            beside = c.pop("sync_gen_beside", None)
            kw["colocation"] = Colocation(**{k: _factor(f"colocation.{k}", v) for k, v in c.items()},
                                          sync_gen_beside=None if beside is None else _numbers(
                                              "colocation.sync_gen_beside", beside))
        return cls(**kw)

    def to_dict(self) -> dict:
        """Plain lists and numbers, absent tables left out."""
        def plain(v):
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = {k: plain(v) for k, v in asdict(value).items() if v is not None} if f.name in (
                "decode", "prefill", "train", "colocation") else value
        return out


def load_profile(path: str | Path) -> MeasuredProfile:
    """Read a profile YAML; any problem is a ValueError `path: field: reason`."""
    from sim.config import read_yaml  # missing, unreadable, non-UTF-8, malformed: `path: reason`

    path = Path(path)
    data = read_yaml(path, "profile file")
    if data is None:
        raise ValueError(f"{path}: the profile is empty; it needs at least one of {', '.join(TABLES)} (write one "
                         f"with `stalecast profile`)")
    try:
        return MeasuredProfile.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def save_profile(profile: MeasuredProfile, path: str | Path) -> None:
    """Write atomically (a scratch file renamed over `path`): a reader never sees half a profile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(profile.to_dict(), sort_keys=False))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def interp_linear(xs, ys, x) -> np.ndarray:
    """Piecewise-linear through (xs[i], ys[i]), extended linearly from the end segments.
    xs strictly ascending with at least 2 points; ys may be 2-D (one row per xs), x a scalar or 1-D array."""
    xs, ys, x = np.asarray(xs, float), np.asarray(ys, float), np.asarray(x, float)
    i = np.clip(np.searchsorted(xs, x), 1, len(xs) - 1)
    t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    if ys.ndim == 2:
        t = t[..., None]
    return ys[i - 1] + t * (ys[i] - ys[i - 1])


# --------------------------------------------------------------------------- parsing helpers
def _section(data: dict, name: str, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    sec = data[name]
    if not isinstance(sec, dict):
        raise ValueError(f"{name}: expected a mapping with {', '.join(keys)}")
    for key in keys:
        if key not in sec:
            raise ValueError(f"{name}.{key}: missing")
    extra = set(sec) - set(keys) - set(optional)
    if extra:
        raise ValueError(f"{name}.{sorted(extra)[0]}: unknown field")
    return sec


def _factor(name: str, value) -> "float | IdleCurve":
    """A number, or a mapping {idle: [...], slowdown: [...]} (an IdleCurve)."""
    if isinstance(value, dict):
        c = _section({name: value}, name, ("idle", "slowdown"))
        return IdleCurve(_numbers(f"{name}.idle", c["idle"]), _numbers(f"{name}.slowdown", c["slowdown"]))
    return _numbers(name, [value])[0]


def _check_idle_curve(name: str, curve: IdleCurve) -> None:
    if not curve.idle:
        raise ValueError(f"{name}.idle: needs at least 1 value")
    if any(b <= a for a, b in zip(curve.idle, curve.idle[1:])):
        raise ValueError(f"{name}.idle: must be strictly ascending (got {list(curve.idle)})")
    if not all(0 <= u < 1 for u in curve.idle):
        raise ValueError(f"{name}.idle: fractions must lie in [0, 1) (got {list(curve.idle)})")
    if len(curve.slowdown) != len(curve.idle):
        raise ValueError(f"{name}.slowdown: {len(curve.slowdown)} values, expected one per {name}.idle value "
                         f"({len(curve.idle)})")
    bad = [v for v in curve.slowdown if not 0 < v < math.inf]
    if bad:
        raise ValueError(f"{name}.slowdown: values must be finite numbers > 0 (got {bad[0]})")


def _numbers(name: str, values) -> tuple[float, ...]:
    if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name}: expected a list of numbers (got {values!r})")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name}: values must be finite numbers (got {bad[0]})")
    return tuple(float(v) for v in values)


def _check_axis(name: str, values, positive: bool) -> None:
    # At least two points, so every table has an end segment to extrapolate along.
    if len(values) < 2:
        raise ValueError(f"{name}: needs at least 2 values (got {len(values)})")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name}: must be strictly ascending (got {list(values)})")
    if positive and values[0] <= 0:
        raise ValueError(f"{name}: values must be > 0 (got {values[0]})")
    _check_nonneg(name, values)


def _check_nonneg(name: str, values) -> None:
    bad = [v for v in values if not 0 <= v < math.inf]  # also catches NaN
    if bad:
        raise ValueError(f"{name}: values must be finite numbers >= 0 (got {bad[0]})")
