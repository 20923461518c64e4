"""Bad config and command-line input, end to end through `sim.cli.main` in-process (issue 18, items 4 and 8).

Every case asserts: the exit code; the words of the error; no traceback anywhere in the output (and no crash log);
one `error:` line for a single problem; and that the working folder is exactly as before, so nothing was written
to --out (nor to a default output folder) and no scratch folder is left beside it. Cases fail before a simulation
runs, except the simulate --out ones, which simulate the 3-step small config (tests/conftest.py).

Every numeric field of every config section gets generated cases: below its lower bound (above its upper one),
inf, NaN and a boolean. Each case runs in a fresh folder `work/` (the current folder), the config in `work/cfg/`
(the folder relative paths in it are taken from), the output `work/out`.
"""

from __future__ import annotations

import copy
import hashlib
import os
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable

import pytest
import yaml
from annotated_types import Ge, Gt, Le

from conftest import _SMALL_CONFIG
from sim.cli import main
from sim.config import RunConfig, _section_model
from sim.outputs import MARKER

SMALL = _SMALL_CONFIG
# Analytic costs (a GPU and a model), for the profile cases: hardware.constant would hide what a profile lacks.
ANALYTIC = {**SMALL, "hardware": {"gpu": "H100-SXM", "model": "qwen2.5-0.5b"}}
# The real trainer's settings kept tiny, for train: 1-step run of the tiny preset on one worker.
TINY_TRAIN = {**SMALL, "cluster": {"rollout_workers": 1, "max_concurrency": 4, "colocated": True},
              "hardware": {"gpu": "cpu", "model": "tiny"}, "run": {"steps": 1},
              "real": {"model": "tiny", "min_digits": 1, "max_digits": 2, "micro_batch": 4}}
PROFILE = {"decode": {"active": [1, 4], "context": [100, 300], "seconds": [[0.01, 0.014], [0.02, 0.03]]},
           "prefill": {"tokens": [100, 1000], "seconds": [0.01, 0.05]},
           "train": {"tokens": [1000, 3000], "seconds": [1.0, 2.0]}, "sync_s": 0.25}


@dataclass
class Case:
    argv: list[str]                    # {cfg}: the config file, {out}: work/out, {work}: the current folder
    code: int = 2
    words: tuple[str, ...] = ()        # all in the output
    config: object = None              # the config: a dict (YAML-dumped), or str/bytes as they are; None: SMALL
    change: Callable | None = None     # mutates a deep copy of a dict config
    files: dict = field(default_factory=dict)  # more files under work/cfg/: name -> dict | str | bytes | DIR
    setup: Callable | None = None      # setup(work, monkeypatch) before the call
    single: bool = True                # one problem: exactly one `error:` line


DIR = object()


def case(id_: str, argv: str | list[str], words=(), code=2, xfail: str | None = None, **kw):
    argv = argv.split() if isinstance(argv, str) else argv
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(Case(argv, code, tuple(words), **kw), id=id_, marks=marks)


def sim(change=None, words=(), id_="", **kw):
    """`simulate CONFIG --out OUT` with the small config changed by `change`."""
    return case(id_, "simulate {cfg} --out {out}", words, change=change, **kw)


def put(data: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[leaf] = value


def setting(dotted: str, value) -> Callable:
    return lambda d: put(d, dotted, value)


def without(dotted: str) -> Callable:
    def change(d):
        *parents, leaf = dotted.split(".")
        for key in parents:
            d = d[key]
        del d[leaf]
    return change


def both(*changes) -> Callable:
    return lambda d: [c(d) for c in changes]


# --------------------------------------------------------------------------- generated: every numeric field
def _base(annotation):
    """int or float of a field annotation (unwrapping Optional and Annotated), else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union or type(annotation).__name__ == "UnionType":
        annotation = args[0] if len(args) == 1 else annotation
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation if annotation in (int, float) else None


def numeric_fields(model=RunConfig, prefix=""):
    """(dotted path, int | float, field metadata) of every numeric field of every section (length distributions and
    list fields have their own cases below)."""
    for name, info in model.model_fields.items():
        sub = _section_model(info.annotation)
        if sub is not None and name not in ("prompt_len", "response_len"):
            yield from numeric_fields(sub, f"{prefix}{name}.")
        elif _base(info.annotation) is not None:
            yield f"{prefix}{name}", _base(info.annotation), info.metadata


NUMERIC = list(numeric_fields())
# Optional sections with required fields: a case sets the section valid first, then the field it tests.
VALID_SECTIONS = {"workload.turns": {"count": 2, "env_s": 1.0}}


def valid_setting(path: str, value) -> Callable:
    section = next((s for s in VALID_SECTIONS if path.startswith(s + ".")), None)
    if section is None:
        return setting(path, value)

    def change(d):
        put(d, section, dict(VALID_SECTIONS[section]))
        put(d, path, value)
    return change


def _generated():
    for path, kind, meta in NUMERIC:
        for m in meta:
            if isinstance(m, Ge):
                low = m.ge - 1 if kind is int else m.ge - 0.5
                yield sim(valid_setting(path, low), [path, f"greater than or equal to {m.ge}", f"got {low}"],
                          id_=f"{path}-below-{m.ge}")
            elif isinstance(m, Gt):
                yield sim(valid_setting(path, m.gt), [path, f"greater than {m.gt}"], id_=f"{path}-not-above-{m.gt}")
            elif isinstance(m, Le):
                yield sim(valid_setting(path, m.le + 0.5), [path, f"less than or equal to {m.le}"],
                          id_=f"{path}-above-{m.le}")
        yield sim(valid_setting(path, True), [path, "expected a number, not a boolean", "got true"], id_=f"{path}-bool")
        if kind is float:
            for value, name in ((float("inf"), "inf"), (float("-inf"), "-inf"), (float("nan"), "nan")):
                yield sim(valid_setting(path, value), [path, "finite number"], id_=f"{path}-{name}")
        else:
            yield sim(valid_setting(path, 2.5), [path, "valid integer", "fractional part"], id_=f"{path}-fraction")


def test_every_numeric_field_has_cases():
    # The generator found the sections' numeric fields (it would pass vacuously if it found none).
    paths = {p for p, _, _ in NUMERIC}
    assert len(paths) >= 45
    assert {"seed", "run.steps", "cluster.rollout_workers", "hardware.efficiency.decode_mem",
            "hardware.constant.sync_s", "real.instability.kl_max", "stability.horizon", "optim.lr"} <= paths
    assert all(any(isinstance(m, (Ge, Gt)) for m in meta) for _, _, meta in NUMERIC)


# --------------------------------------------------------------------------- config files
def _ro_folder(work, monkeypatch):
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(ro, os.W_OK):
        ro.chmod(0o755)
        pytest.skip("running as a user who may write into a read-only folder (root)")


def _existing_out(work, monkeypatch):
    (work / "out").mkdir()
    (work / "out" / "notes.txt").write_text("mine\n")


def _out_file(work, monkeypatch):
    (work / "out").write_text("mine\n")


def _no_cuda(work, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _checkpoint_without_config(work, monkeypatch):
    (work / "cfg" / "ckpt").mkdir()
    (work / "cfg" / "ckpt" / "weights.bin").write_bytes(b"\0")


FILES = [
    case("missing-file", "simulate {work}/absent.yaml --out {out}", ["absent.yaml", "no such config file"]),
    case("config-is-a-folder", "simulate {work}/cfg --out {out}", ["cfg: is a folder, not a config file"]),
    case("no-config-given", "simulate --out {out}", ["a config file is required"]),
    case("empty-file", "simulate {cfg} --out {out}", ["run.yaml: the file is empty", "workload, cluster and run"],
         config=""),
    case("comment-only", "simulate {cfg} --out {out}", ["the file is empty"], config="# nothing yet\n"),
    case("a-list", "simulate {cfg} --out {out}", ["must hold a mapping of sections, not list"],
         config="- workload\n- cluster\n"),
    case("a-string", "simulate {cfg} --out {out}", ["must hold a mapping of sections, not str"],
         config="hello\n"),
    case("not-utf8", "simulate {cfg} --out {out}", ["run.yaml: not UTF-8 text", "byte 0xe9", "save the config file "
                                                    "as UTF-8"],
         config=yaml.safe_dump(SMALL).replace("small", "caf\xe9").encode("latin-1")),
    case("utf16", "simulate {cfg} --out {out}", ["not UTF-8 text", "byte 0xff at offset 0"],
         config=yaml.safe_dump(SMALL).encode("utf-16")),
    case("invalid-yaml", "simulate {cfg} --out {out}", ["not valid YAML", "expected ',' or ']'", "(line 2, column 1)"],
         config="workload: [1, 2\n"),
    case("bad-indentation", "simulate {cfg} --out {out}", ["not valid YAML", "line 3"],
         config="run:\n  steps: 3\n    extra: 1\n"),
    case("tab-indent", "simulate {cfg} --out {out}", ["not valid YAML", "found character a tab", "indents with spaces"],
         config="run:\n\tsteps: 3\n"),
    case("nul-byte", "simulate {cfg} --out {out}", ["not valid YAML: special characters are not allowed: "
                                                    "character #x0000 at offset 15"],
         config="run: {steps: 3}\x00\n"),
    case("duplicate-key", "simulate {cfg} --out {out}", ["not valid YAML", "key 'steps' is given twice",
                                                         "(line 3, column 3)"],
         config="run:\n  steps: 3\n  steps: 1000\n"),
    case("two-documents", "simulate {cfg} --out {out}", ["not valid YAML", "single document"],
         config="run: {steps: 3}\n---\nrun: {steps: 4}\n"),
]

SECTIONS = [
    sim(setting("workload", 5), ["workload: expected a mapping of fields, not a number", "(got 5)"], id_="workload-5"),
    sim(setting("cluster", [1, 2]), ["cluster: expected a mapping of fields, not a list"], id_="cluster-list"),
    sim(setting("pipeline", "async"), ["pipeline: expected a mapping of fields, not a string"], id_="pipeline-str"),
    sim(setting("hardware", 3), ["hardware: expected a mapping of fields"], id_="hardware-number"),
    sim(setting("optim", True), ["optim: expected a mapping of fields, not a boolean"], id_="optim-bool"),
    sim(setting("real", "tiny"), ["real: expected a mapping of fields"], id_="real-str"),
    sim(setting("stability", 1), ["stability: expected a mapping of fields"], id_="stability-number"),
    sim(setting("run", None), ["run: expected a mapping of fields, not null"], id_="run-null"),
    sim(setting("hardware.efficiency", 0.8), ["hardware.efficiency: expected a mapping of fields"],
        id_="efficiency-number"),
    sim(setting("hardware.constant", "fast"), ["hardware.constant: expected a mapping of fields"],
        id_="constant-str"),
    sim(setting("real.instability", [1]), ["real.instability: expected a mapping of fields"],
        id_="instability-list"),
    sim(without("run"), ["run: required field is missing"], id_="no-run"),
    sim(without("workload"), ["workload: required field is missing"], id_="no-workload"),
    sim(without("cluster.max_concurrency"), ["cluster.max_concurrency: required field is missing"],
        id_="no-max-concurrency"),
    sim(setting("workload.response_len", 5), ["workload.response_len: expected a mapping of fields", "got 5"],
        id_="length-number"),
    sim(setting("workload.response_len", {"mean": 5}), ["workload.response_len: needs kind: one of constant, "
                                                        "exponential, lognormal, empirical"], id_="length-no-kind"),
    sim(setting("workload.response_len", {"kind": "normal", "mean": 5}),
        ["workload.response_len: kind 'normal' is not one of constant"], id_="length-unknown-kind"),
    sim(setting("hardware.model", 5), ["hardware.model: expected a model preset name or a mapping", "got 5"],
        id_="model-number"),
    sim(setting("hardware.model", {"params": 1e9}), ["hardware.model: missing key 'layers'"],
        id_="model-shape-incomplete"),
    sim(setting("hardware.model", {"params": float("inf"), "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 4,
                                   "vocab": 10}), ["hardware.model: params: must be a finite number"],
        id_="model-shape-inf"),
    sim(setting("hardware.model", "qwen-9000"), ["hardware.model: unknown model preset 'qwen-9000'"],
        id_="unknown-model"),
    sim(setting("hardware.gpu", "H900"), ["hardware.gpu: unknown GPU 'H900'", "H100-SXM"], id_="unknown-gpu"),
    sim(setting("hardware", {"gpu": None}), ["hardware.gpu: required unless hardware.constant is given"],
        id_="no-costs"),
    sim(setting("pipeline.mode", "asynch"), ["pipeline.mode: Input should be 'sync', 'one_step_off', 'fixed_lag' or 'async'",
                                             "'asynch'"], id_="unknown-mode"),
    sim(setting("real.device", "gpu"), ["real.device: Input should be 'auto', 'cpu' or 'cuda'"], id_="unknown-device"),
    sim(setting("name", ""), ["name: must be a plain name"], id_="empty-name"),
    sim(setting("name", "../elsewhere"), ["name: must be a plain name", "no /"], id_="name-with-slash"),
    sim(setting("name", 5), ["name: Input should be a valid string"], id_="name-number"),
    sim(setting("seed", "seven"), ["seed: Input should be a valid integer", "'seven'"], id_="seed-string"),
    sim(setting("workload.groups", 5), ["workload.groups: Input should be a valid list", "got 5"],
        id_="groups-number"),
    sim(setting("cluster.colocated", 1), ["cluster.colocated: expected true or false", "got 1"], id_="bool-is-1"),
    sim(setting("pipeline.interruptible", "yes"), ["pipeline.interruptible: expected true or false", "'yes'"],
        id_="bool-is-string"),
    sim(setting("workload.groups_in_order", 0), ["workload.groups_in_order: expected true or false"],
        id_="bool-is-0"),
    sim(setting("cluster.rollout_workers", True), ["cluster.rollout_workers: expected a number, not a boolean"],
        id_="rollout-workers-true"),  # the reported one: pydantic read it as 1
    sim(setting("workload.response_len", {"kind": "exponential", "mean": float("inf")}),
        ["workload.response_len.mean: Input should be a finite number"], id_="exponential-mean-inf"),  # reported
    sim(setting("workload.response_len", {"kind": "exponential", "mean": 0}),
        ["workload.response_len.mean: Input should be greater than 0"], id_="exponential-mean-0"),
    sim(setting("workload.response_len", {"kind": "exponential", "mean": False}),
        ["workload.response_len.mean: expected a number, not a boolean"], id_="exponential-mean-bool"),
    sim(setting("workload.prompt_len", {"kind": "constant", "value": 0}),
        ["workload.prompt_len.value: Input should be greater than or equal to 1"], id_="constant-value-0"),
    sim(setting("workload.prompt_len", {"kind": "constant", "value": True}),
        ["workload.prompt_len.value: expected a number, not a boolean"], id_="constant-value-bool"),
    sim(setting("workload.response_len", {"kind": "lognormal", "median": 0, "sigma": 1}),
        ["workload.response_len.median: Input should be greater than 0"], id_="lognormal-median-0"),
    sim(setting("workload.response_len", {"kind": "lognormal", "median": 5, "sigma": 0}),
        ["workload.response_len.sigma: Input should be greater than 0"], id_="lognormal-sigma-0"),
    sim(setting("workload.response_len", {"kind": "lognormal", "median": 5, "sigma": float("nan")}),
        ["workload.response_len.sigma: Input should be a finite number"], id_="lognormal-sigma-nan"),
    sim(setting("workload.response_len", {"kind": "lognormal", "median": 5, "p99": -1}),
        ["workload.response_len.p99: Input should be greater than 0"], id_="lognormal-p99-negative"),
    sim(setting("workload.response_len", {"kind": "empirical", "values": [3, 0]}),
        ["workload.response_len.values.1: Input should be greater than or equal to 1"], id_="empirical-value-0"),
    sim(setting("workload.response_len", {"kind": "empirical", "values": [3, True]}),
        ["workload.response_len.values.1: expected a number, not a boolean"], id_="empirical-value-bool"),
    sim(both(without("workload.prompt_len"), without("workload.response_len"),
             setting("workload.groups", [[4, 0, 3]])),
        ["workload.groups.0.1: Input should be greater than or equal to 1"], id_="group-length-0"),
]

UNKNOWN = [
    sim(setting("pipline", {"mode": "sync"}), ["pipline: unknown field", "did you mean 'pipeline'?"],
        id_="unknown-section"),
    sim(setting("workload.batch_prompt", 8), ["workload.batch_prompt: unknown field", "did you mean 'batch_prompts'?"],
        id_="unknown-workload-field"),
    sim(setting("hardware.constant.sync", 1.0), ["hardware.constant.sync: unknown field", "did you mean 'sync_s'?"],
        id_="unknown-constant-field"),
    sim(setting("workload.response_len", {"kind": "lognormal", "median": 5, "sigmaa": 1}),
        ["workload.response_len.sigmaa: unknown field", "did you mean 'sigma'?"], id_="unknown-dist-field"),
    sim(setting("real.instability.kl", 1.0), ["real.instability.kl: unknown field", "did you mean 'kl_max'?"],
        id_="unknown-instability-field"),
    sim(setting("stability.rbatch", 1.0), ["stability.rbatch: unknown field", "did you mean 'r_batch'?"],
        id_="unknown-stability-field"),
    sim(setting("cluster.zzz", 1), ["cluster.zzz: unknown field"], id_="unknown-no-suggestion"),
]

COMBINATIONS = [
    sim(setting("pipeline.queue_capacity", 1), ["pipeline.queue_capacity (1) must be at least workload.batch_prompts "
                                                "(2)"], id_="queue-below-batch"),
    sim(setting("cluster.max_concurrency", 1), ["cluster.max_concurrency (1) must be at least workload.group_size "
                                                "(2)"], id_="concurrency-below-group"),
    sim(setting("pipeline", {"mode": "sync", "interruptible": True}),
        ["pipeline: interruptible workers only apply to mode: async"], id_="interruptible-sync"),
    sim(setting("pipeline", {"mode": "one_step_off", "interruptible": True}),
        ["pipeline: interruptible workers only apply to mode: async"], id_="interruptible-one-step-off"),
    sim(setting("workload.response_len", {"kind": "lognormal", "median": 5}),
        ["workload.response_len: give exactly one of sigma or p99"], id_="lognormal-no-spread"),
    sim(setting("workload.response_len", {"kind": "lognormal", "median": 5, "sigma": 1, "p99": 20}),
        ["workload.response_len: give exactly one of sigma or p99"], id_="lognormal-both-spreads"),
    sim(setting("workload.response_len", {"kind": "lognormal", "median": 5, "p99": 4}),
        ["workload.response_len: p99 (4.0) must exceed median (5.0)"], id_="lognormal-p99-below-median"),
    sim(setting("workload.prompt_len", {"kind": "empirical"}),
        ["workload.prompt_len: give exactly one of values or trace"], id_="empirical-neither"),
    sim(setting("workload.prompt_len", {"kind": "empirical", "values": [3], "trace": "t.parquet"}),
        ["workload.prompt_len: give exactly one of values or trace"], id_="empirical-both"),
    sim(setting("workload.prompt_len", {"kind": "empirical", "values": []}),
        ["workload.prompt_len: values must not be empty"], id_="empirical-empty"),
    sim(both(without("workload.prompt_len"), without("workload.response_len"), setting("workload.groups", [[4, 5]])),
        ["workload: each of groups is [prompt length, 2 response lengths]", "found 2 numbers"],
        id_="group-of-wrong-length"),
    sim(setting("workload.groups", [[4, 5, 6]]), ["workload: give groups or prompt_len / response_len, not both"],
        id_="groups-and-lengths"),
    sim(without("workload.response_len"), ["workload: give prompt_len and response_len, or groups"],
        id_="no-response-len"),
    sim(both(without("workload.prompt_len"), without("workload.response_len"), setting("workload.groups", [])),
        ["workload: groups must not be empty"], id_="groups-empty"),
    sim(setting("real", {"min_digits": 5, "max_digits": 3}), ["real: max_digits (3) must be at least min_digits (5)"],
        id_="digits-reversed"),
    sim(setting("stability", {"r_batch": 1.0}), ["stability: give all of r_batch, g_upd and r_crit (only r_batch "
                                                 "given)"], id_="stability-constants-partial"),
    sim(setting("workload", {"batch_prompts": 0, "group_size": 0}), ["workload.batch_prompts", "workload.group_size",
                                                                     "workload.max_new_tokens"],
        single=False, id_="several-problems"),
]

REFERENCED = [
    sim(setting("hardware.profile", "nope.yaml"), ["run.yaml: hardware.profile: file not found: nope.yaml",
                                                   "looked for"], id_="profile-missing"),
    sim(setting("hardware.profile", "."), ["hardware.profile: is a folder, not a file"], id_="profile-is-a-folder"),
    sim(setting("workload.response_len", {"kind": "empirical", "trace": "runs/t/trace"}),
        ["workload.response_len.trace: file not found: runs/t/trace"], id_="empirical-trace-missing"),
    sim(setting("stability.fit", "fit.json"), ["stability.fit: file not found: fit.json"], id_="stability-fit-missing"),
    sim(setting("real.digits", {"kind": "empirical", "trace": "digits.parquet"}),
        ["real.digits.trace: file not found: digits.parquet"], id_="digits-trace-missing"),
    sim(setting("real.model", "checkpoints/step-80"), ["real.model: 'checkpoints/step-80' is neither a model preset",
                                                       "nor a checkpoint folder", "cfg/checkpoints/step-80"],
        id_="checkpoint-missing"),
    sim(setting("real.model", "ckpt"), ["real.model:", "ckpt has no config.json", "not a checkpoint folder"],
        setup=_checkpoint_without_config, id_="checkpoint-without-config"),
]


def profile_case(id_, profile, words, base=ANALYTIC, **kw):
    return case(id_, "simulate {cfg} --out {out}", ["run.yaml: hardware.profile: ", *words],
                config=base, change=setting("hardware.profile", "prof.yaml"), files={"prof.yaml": profile}, **kw)


def _prof(**changes):
    data = copy.deepcopy(PROFILE)
    for dotted, value in changes.items():
        put(data, dotted, value)
    return data


PROFILES = [
    profile_case("profile-empty", "", ["prof.yaml: the profile is empty", "needs at least one of decode"]),
    profile_case("profile-no-tables", {"machine": {"hostname": "h"}, "model": "tiny"},
                 ["prof.yaml: no tables: a profile needs at least one of decode, prefill, train, sync_s, colocation"]),
    profile_case("profile-empty-mapping", "{}\n", ["prof.yaml: no tables"]),
    profile_case("profile-a-list", "- decode\n", ["prof.yaml: expected a mapping of tables, not list"]),
    profile_case("profile-invalid-yaml", "decode: [1\n", ["prof.yaml: not valid YAML"]),
    profile_case("profile-not-utf8", b"sync_s: 0.1 # \xe9\n", ["prof.yaml: not UTF-8 text"]),
    profile_case("profile-unknown-table", _prof(decodes={}), ["prof.yaml: decodes: unknown field"]),
    profile_case("profile-table-not-mapping", _prof(decode=5), ["prof.yaml: decode: expected a mapping with active"]),
    profile_case("profile-missing-key", _prof(**{"train": {"tokens": [1, 2]}}), ["prof.yaml: train.seconds: missing"]),
    profile_case("profile-not-numbers", _prof(**{"prefill.seconds": ["a", "b"]}),
                 ["prof.yaml: prefill.seconds: expected a list of numbers"]),
    profile_case("profile-negative", _prof(**{"train.seconds": [1.0, -2.0]}),
                 ["prof.yaml: train.seconds: values must be finite numbers >= 0", "-2.0"]),
    profile_case("profile-nan", _prof(**{"decode.seconds": [[0.01, float("nan")], [0.02, 0.03]]}),
                 ["prof.yaml: decode.seconds[0]: values must be finite numbers"]),
    profile_case("profile-inf", _prof(sync_s=float("inf")), ["prof.yaml: sync_s: values must be finite numbers"]),
    profile_case("profile-unsorted", _prof(**{"prefill.tokens": [1000, 100]}),
                 ["prof.yaml: prefill.tokens: must be strictly ascending"]),
    profile_case("profile-one-point", _prof(**{"train": {"tokens": [1000], "seconds": [1.0]}}),
                 ["prof.yaml: train.tokens: needs at least 2 values"]),
    profile_case("profile-rows-mismatch", _prof(**{"decode.seconds": [[0.01, 0.014]]}),
                 ["prof.yaml: decode.seconds: 1 rows, expected one per decode.active value (2)"]),
    profile_case("profile-bookkeeping-negative", _prof(learner_bookkeeping_s=-0.1),
                 ["prof.yaml: learner_bookkeeping_s: must be a finite number >= 0 (got -0.1)"]),
    profile_case("profile-colocation-zero", _prof(colocation={"gen_slowdown": 0, "train_slowdown": 1.0}),
                 ["prof.yaml: colocation.gen_slowdown: must be a finite number > 0"]),
    profile_case("profile-incomplete-without-gpu", {"sync_s": 0.25},
                 ["prof.yaml: the profile lacks decode, prefill, train", "hardware.gpu null", "set hardware.gpu"],
                 base={**SMALL, "hardware": {"gpu": None}}),
]

OVERRIDES = [
    case("set-without-equals", "simulate {cfg} --out {out} --set run.steps", ["--set 'run.steps': expected "
                                                                             "key.path=value"]),
    case("set-without-key", "simulate {cfg} --out {out} --set =5", ["--set '=5': expected key.path=value"]),
    case("set-unknown-section", "simulate {cfg} --out {out} --set pipelin.mode=sync",
         ["(override): pipelin.mode: field 'pipelin' does not exist", "did you mean 'pipeline'?"]),
    case("set-unknown-leaf", "simulate {cfg} --out {out} --set pipeline.mod=sync",
         ["(override): pipeline.mod: unknown field", "did you mean 'mode'?"]),
    case("set-unknown-top", "simulate {cfg} --out {out} --set seeds=3", ["(override): seeds: unknown field",
                                                                         "did you mean 'seed'?"]),
    case("set-yaml-error", ["simulate", "{cfg}", "--out", "{out}", "--set", "workload.groups=[[1, 2]"],
         ["--set 'workload.groups=[[1, 2]': the value is not valid YAML"]),
    case("set-wrong-type", "simulate {cfg} --out {out} --set run.steps=abc",
         ["(override): run.steps: Input should be a valid integer", "'abc'"]),
    case("set-out-of-range", "simulate {cfg} --out {out} --set pipeline.max_staleness=-1",
         ["(override): pipeline.max_staleness: Input should be greater than or equal to 0"]),
    case("set-through-a-number", "simulate {cfg} --out {out} --set run.steps.max=3",
         ["(override): run.steps.max: run.steps is a value (3), not a section with fields"]),
    case("set-through-null-value", "simulate {cfg} --out {out} --set stability.fit.path=x",
         ["(override): stability.fit.path: stability.fit is a value (null), not a section with fields"]),
    case("set-second-of-two-bad", "simulate {cfg} --out {out} --set run.steps=2 --set real.x.y=1",
         ["(override): real.x.y: field 'real.x' does not exist"]),
    case("set-into-null-section", "simulate {cfg} --out {out} --set hardware.constant.sync_s=1",
         ["(override): hardware.constant.sync_s: hardware.constant is not set; give the whole section, e.g. "
          "--set 'hardware.constant={decode_step_s: ...}'"], config=ANALYTIC),
    case("set-bool-as-int", "simulate {cfg} --out {out} --set cluster.rollout_workers=true",
         ["(override): cluster.rollout_workers: expected a number, not a boolean"]),
    case("set-inf", "simulate {cfg} --out {out} --set optim.lr=.inf", ["(override): optim.lr: Input should be a "
                                                                       "finite number"]),
    case("set-nan-string", "simulate {cfg} --out {out} --set optim.lr=nan", ["(override): optim.lr: Input should be "
                                                                             "a finite number"]),
    case("set-unknown-gpu", "simulate {cfg} --out {out} --set hardware.gpu=H900",
         ["(override): hardware.gpu: unknown GPU 'H900'"]),
    case("set-breaks-a-rule", "simulate {cfg} --out {out} --set workload.group_size=8",
         ["(override): cluster.max_concurrency (4) must be at least workload.group_size (8)"]),
    case("set-profile-from-current-folder", "simulate {cfg} --out {out} --set hardware.profile=prof.yaml",
         ["(override): hardware.profile: file not found: prof.yaml", "work/prof.yaml"],
         files={"prof.yaml": PROFILE}),  # the config's folder has it, but a --set path is from the current folder
]

OPTIONS = [
    case("simulate-steps-0", "simulate {cfg} --out {out} --steps 0", ["argument --steps: must be at least 1"]),
    case("simulate-steps-negative", "simulate {cfg} --out {out} --steps -3", ["--steps: must be at least 1"]),
    case("simulate-steps-word", "simulate {cfg} --out {out} --steps ten", ["--steps: expected a whole number"]),
    case("simulate-sync-steps-0", "simulate {cfg} --out {out} --sync-steps 0", ["--sync-steps: must be at least 1"]),
    case("simulate-seed-negative", "simulate {cfg} --out {out} --seed -1",
         ["(override): seed: Input should be greater than or equal to 0"]),
    case("simulate-format", "simulate {cfg} --out {out} --format xml", ["--format: invalid choice: 'xml'"]),
    case("simulate-unknown-option", "simulate {cfg} --out {out} --stepz 3", ["unrecognized arguments: --stepz"]),
    case("unknown-command", "simulat {cfg}", ["invalid choice: 'simulat'"]),
    case("study-unknown", "study ratios {cfg} --out {out}", ["invalid choice: 'ratios'"]),
    case("ratio-reps-0", "study ratio {cfg} --out {out} --reps 0", ["--reps 0: must be at least 1"]),
    case("ratio-steps-0", "study ratio {cfg} --out {out} --steps 0", ["--steps 0: must be at least 1"]),
    case("ratio-sync-steps-0", "study ratio {cfg} --out {out} --sync-steps 0", ["--sync-steps 0: must be at least 1"]),
    case("ratio-bound-negative", "study ratio {cfg} --out {out} --bounds 1,-1",
         ["--bounds 1,-1: each value must be at least 0 (got -1)"]),
    case("ratio-bounds-empty", ["study", "ratio", "{cfg}", "--out", "{out}", "--bounds", ","],
         ["--bounds: needs at least one value"]),
    case("ratio-bounds-twice", "study ratio {cfg} --out {out} --bounds 1,2,1", ["--bounds 1,2,1: 1 is given twice"]),
    case("ratio-bounds-word", "study ratio {cfg} --out {out} --bounds 1,x",
         ["argument --bounds: expected comma-separated whole numbers, got '1,x'"]),
    case("ratio-workers-0", "study ratio {cfg} --out {out} --rollout-workers 0,2",
         ["--rollout-workers 0,2: each value must be at least 1 (got 0)"]),
    case("ratio-jobs-0", "study ratio {cfg} --out {out} --jobs 0", ["argument --jobs: must be at least 1"]),
    case("bound-negative", "study bound {cfg} --out {out} --bounds -1", ["--bounds -1: each value must be at least 0"]),
    case("tail-ratio-1", "study tail {cfg} --out {out} --tail-ratios 1,4",
         ["--tail-ratios 1.0,4.0: each value must be greater than 1: the p99 must exceed the median (got 1.0)"]),
    case("tail-median-0", "study tail {cfg} --out {out} --median 0", ["--median 0.0: must be greater than 0"]),
    case("tail-median-nan", "study tail {cfg} --out {out} --median nan", ["--median nan: must be a finite number"]),
    case("sync-vs-async-model", "study sync-vs-async {cfg} --out {out} --models qwen2.5-0.5b,gpt5",
         ["--models qwen2.5-0.5b,gpt5: unknown 'gpt5' (known: qwen2.5-0.5b"]),
    case("sync-vs-async-scale-0", "study sync-vs-async {cfg} --out {out} --scales 0,1",
         ["--scales 0.0,1.0: each value must be greater than 0"]),
    case("sync-vs-async-scale-inf", "study sync-vs-async {cfg} --out {out} --scales 1,inf",
         ["--scales 1.0,inf: each value must be a finite number (got inf)"]),
    case("plan-gpus-0", "plan {cfg} --out {out} --gpus 0", ["--gpus 0: must be at least 2: one for the learner, one "
                                                            "for a rollout worker"]),
    case("plan-gpus-1", "plan {cfg} --out {out} --gpus 1", ["--gpus 1: must be at least 2"]),
    case("plan-steps-0", "plan {cfg} --out {out} --steps 0", ["--steps 0: must be at least 1"]),
    case("plan-top-0", "plan {cfg} --out {out} --top 0", ["--top 0: must be at least 1"]),
    case("plan-coarse-1", "plan {cfg} --out {out} --coarse 1", ["--coarse 1: must be at least 2"]),
    case("plan-refine-0", "plan {cfg} --out {out} --refine 0", ["--refine 0: must be at least 1"]),
    case("plan-tolerance-1", "plan {cfg} --out {out} --tolerance 1", ["--tolerance 1.0: must be less than 1"]),
    case("plan-tolerance-negative", "plan {cfg} --out {out} --tolerance -0.1",
         ["--tolerance -0.1: must be at least 0"]),
    case("plan-keep-0", "plan {cfg} --out {out} --keep 0", ["--keep 0.0: must be greater than 0"]),
    case("plan-keep-above-1", "plan {cfg} --out {out} --keep 1.5", ["--keep 1.5: must be at most 1"]),
    case("plan-lr-0", "plan {cfg} --out {out} --lr 0", ["--lr 0.0: must be greater than 0"]),
    case("plan-lr-inf", "plan {cfg} --out {out} --lr inf", ["--lr inf: must be a finite number"]),
    case("plan-max-mean-negative", "plan {cfg} --out {out} --max-mean-staleness -1",
         ["--max-mean-staleness -1.0: must be at least 0"]),
    case("plan-max-p99-nan", "plan {cfg} --out {out} --max-p99-staleness nan",
         ["--max-p99-staleness nan: must be a finite number"]),
    case("plan-tp-0", "plan {cfg} --out {out} --tp 0", ["--tp 0: each value must be at least 1"]),
    case("plan-concurrency-0", "plan {cfg} --out {out} --concurrency 8,0",
         ["--concurrency 8,0: each value must be at least 1 (got 0)"]),
    case("plan-bounds-negative", "plan {cfg} --out {out} --bounds -2", ["--bounds -2: each value must be at least 0"]),
    case("plan-fit-without-lr", "plan {cfg} --out {out} --stability-fit fit.json",
         ["--stability-fit fit.json: only used with --lr"]),
    case("plan-fit-missing", "plan {cfg} --out {out} --lr 1e-3 --stability-fit fit.json",
         ["--stability-fit fit.json: file not found"]),
    case("plan-jobs-0", "plan {cfg} --out {out} --jobs 0", ["argument --jobs: must be at least 1"]),
    case("stability-lr-negative", "study stability {cfg} --out {out} --lrs -1",
         ["--lrs -1.0: each value must be greater than 0", "it sets optim.lr"]),
    case("stability-lr-nan", "study stability {cfg} --out {out} --lrs 1e-3,nan",
         ["--lrs 0.001,nan: each value must be a finite number"]),
    case("stability-bound-negative", "study stability {cfg} --out {out} --bounds 0,-1",
         ["--bounds 0,-1: each value must be at least 0"]),
    case("stability-schedule", "study stability {cfg} --out {out} --schedule cosine",
         ["--schedule cosine: unknown 'cosine'"]),
    case("stability-reps-0", "study stability {cfg} --out {out} --reps 0", ["--reps 0: must be at least 1"]),
    case("stability-steps-0", "study stability {cfg} --out {out} --steps 0", ["--steps 0: must be at least 1"]),
    case("stability-timeout-0", "study stability {cfg} --out {out} --timeout 0", ["--timeout 0.0: must be greater "
                                                                                   "than 0"]),
    case("stability-timeout-inf", "study stability {cfg} --out {out} --timeout inf",
         ["--timeout inf: must be a finite number"]),
    case("validate-repeats-0", "validate {cfg} --out {out} --repeats 0", ["argument --repeats: must be at least 1"]),
    case("validate-pilot-steps-0", "validate {cfg} --out {out} --pilot-steps 0",
         ["argument --pilot-steps: must be at least 1"]),
]

OUT = [
    case("simulate-out-foreign-folder", "simulate {cfg} --out {out}",
         ["--out", "the folder exists and was not written by stalecast", "--force"], setup=_existing_out),
    case("simulate-out-current-folder", "simulate {cfg} --out .", ["--out .: is the current folder"]),
    case("simulate-out-parent-folder", "simulate {cfg} --out ..", ["--out ..: is the current folder or a folder "
                                                                   "above it"]),
    case("simulate-out-a-file", "simulate {cfg} --out {out}", ["out: exists and is not a folder"], setup=_out_file),
    case("simulate-out-under-a-file", "simulate {cfg} --out {out}/sub", ["cannot create its parent folder"],
         setup=_out_file),
    case("simulate-out-read-only", "simulate {cfg} --out {work}/ro/out", ["no permission to write in"],
         setup=_ro_folder),
    case("study-out-foreign-folder", "study ratio {cfg} --out {out} --steps 2 --reps 1",
         ["the folder exists and was not written by stalecast"], setup=_existing_out),
    case("study-out-a-file", "study bound {cfg} --out {out}", ["exists and is not a folder"], setup=_out_file),
    case("plan-out-current-folder", "plan {cfg} --out .", ["is the current folder"]),
    case("plan-out-foreign-folder", "plan {cfg} --out {out}", ["the folder exists and was not written by stalecast"],
         setup=_existing_out),
    # The study and the plan check the config against what they vary before claiming --out:
    case("study-config-it-cannot-vary", "study bound {cfg} --out {out}",
         ["pipeline.mode: the study varies the staleness bound, which only async mode has (it is sync)"],
         change=setting("pipeline.mode", "sync")),
    case("study-policy-without-a-bound", "study ratio {cfg} --out {out}",
         ["pipeline.staleness_control: none has no staleness bound to vary"],
         change=setting("pipeline.staleness_control", "none")),
    case("plan-colocated-config", "plan {cfg} --out {out}", ["the config is colocated"],
         change=setting("cluster.colocated", True)),
    case("stability-horizon-lag-not-run", "study stability {cfg} --out {out} --bounds 1 --horizon-bounds 1,8",
         ["--horizon-bounds 1,8: 8 is not one of --bounds"]),
]

TRAIN = [
    case("train-checkpoint-missing", "train {cfg} --out {out}",
         ["real.model: 'ckpt/step-1' is neither a model preset", "no folder"],
         config=TINY_TRAIN, change=setting("real.model", "ckpt/step-1")),
    case("train-cuda-without-gpu", "train {cfg} --out {out}",
         ["real.device: 'cuda', but torch sees no CUDA device", "set real.device to 'auto' or 'cpu'"],
         config=TINY_TRAIN, change=setting("real.device", "cuda"), setup=_no_cuda),
    case("train-kv-budget-below-a-group", "train {cfg} --out {out}",
         ["hardware.memory.kv_budget_tokens: 10 tokens cannot hold one group at its longest"],
         config=TINY_TRAIN, change=setting("hardware.memory.kv_budget_tokens", 10)),
    case("train-kv-swap", "train {cfg} --out {out}",
         ["hardware.memory.kv_policy: 'preempt_swap' cannot run for real"],
         config=TINY_TRAIN, change=setting("hardware.memory.kv_policy", "preempt_swap")),
    case("train-multi-turn", "train {cfg} --out {out}",
         ["workload.turns: multi-turn samples are simulated only"],
         config=TINY_TRAIN, change=setting("workload.turns", {"count": 2, "env_s": 1.0})),
]

# GPU memory (hardware.memory, sim/hardware/memory.py): its fields, and configurations that do not fit. Memory is
# checked only where a GPU is modelled (no hardware.constant): ANALYTIC, a 0.5B policy on H100s.
MEMORY = [
    sim(setting("hardware.memory", 0.9), ["hardware.memory: expected a mapping of fields, not a number"],
        id_="memory-number"),
    sim(setting("hardware.memory.gpu_memory_util", 0.8), ["hardware.memory.gpu_memory_util: unknown field",
                                                          "did you mean 'gpu_memory_utilization'?"],
        id_="memory-unknown-field"),
    sim(setting("hardware.memory.kv_dtype", "fp4"), ["hardware.memory.kv_dtype: Input should be 'bf16' or 'fp8'",
                                                     "'fp4'"], id_="memory-kv-dtype"),
    sim(setting("hardware.memory.precision", "fp16"), ["hardware.memory.precision: Input should be 'bf16_mixed', "
                                                       "'bf16' or 'fp32'"], id_="memory-precision"),
    sim(setting("hardware.memory.optimizer", "adam"), ["hardware.memory.optimizer: Input should be 'adamw' or 'sgd'"],
        id_="memory-optimizer"),
    sim(setting("hardware.memory.check", "no"), ["hardware.memory.check: expected true or false"],
        id_="memory-check-string"),
    sim(setting("hardware.memory.activation_checkpointing", 1),
        ["hardware.memory.activation_checkpointing: expected true or false"], id_="memory-checkpointing-1"),
    case("memory-policy-too-big", "simulate {cfg} --out {out}",
         ["run.yaml: the configuration does not fit in GPU memory: rollout worker: weights 141.2 GB + reserve 3.0 GB",
          "> 72.0 GB usable on H100-SXM (gpu_memory_utilization 0.9 x 80 GB)", "learner: states 1129.6 GB per GPU",
          "--allow-infeasible simulates it anyway"],
         config=ANALYTIC, change=setting("hardware.model", "llama3.1-70b")),
    case("memory-utilization-too-low", "simulate {cfg} --out {out}",
         ["rollout worker: weights 1.0 GB + reserve 3.0 GB", "> 3.2 GB usable on H100-SXM (gpu_memory_utilization "
                                                             "0.04 x 80 GB)"],
         config=ANALYTIC, change=setting("hardware.memory.gpu_memory_utilization", 0.04)),
    case("memory-tp-does-not-divide-heads", "simulate {cfg} --out {out}",
         ["rollout worker of TP 4: vLLM cannot shard qwen2.5-0.5b: its 14 attention heads do not divide over TP 4"],
         config=ANALYTIC, change=setting("cluster.gpus_per_worker", 4)),
    case("memory-micro-batch-below-a-sequence", "simulate {cfg} --out {out}",
         ["learner: micro_batch_tokens 8 cannot hold the longest sequence, 12 tokens (prompt 4 + max_new_tokens 8)"],
         config=ANALYTIC, change=setting("hardware.memory.micro_batch_tokens", 8)),
    case("memory-override", "simulate {cfg} --out {out} --set hardware.model=qwen2.5-32b",
         ["does not fit in GPU memory: learner: states 524.8 GB per GPU"], config=ANALYTIC),
    sim(setting("hardware.memory.kv_budget_tokens", 20),
        ["run.yaml: hardware.memory.kv_budget_tokens: 20 tokens cannot hold one group at its longest: 2 sequences "
         "of 12 tokens (prompt 4 at its 99th percentile + max_new_tokens 8) = 24"], id_="kv-budget-below-a-group"),
    sim(lambda d: d["hardware"].update(gpu=None, memory={"kv_policy": "preempt_swap", "kv_budget_tokens": 100}),
        ["run.yaml: hardware.memory.swap_gbps: preempt_swap copies KV to host memory and needs the link's "
         "bandwidth"], id_="kv-swap-without-a-host-link"),
    sim(lambda d: d["cluster"].update(batching="static", admission="per_sample"),
        ["cluster: admission per_sample needs batching continuous: a static batch is admitted whole"],
        id_="per-sample-static"),
    sim(setting("hardware.memory.kv_policy", "swap"),
        ["hardware.memory.kv_policy: Input should be 'preempt_recompute', 'preempt_swap', 'admit_reserve' or "
         "'unlimited'"], id_="kv-policy-unknown"),
    case("plan-nothing-fits", "plan {cfg} --out {out}",
         ["no split of 3 GPUs fits in GPU memory (hardware.memory)", "1 GPU(s) per worker: rollout worker: weights "
                                                                     "141.2 GB"],
         config=ANALYTIC, change=setting("hardware.model", "llama3.1-70b")),
]

CASES = [*FILES, *SECTIONS, *UNKNOWN, *COMBINATIONS, *REFERENCED, *PROFILES, *OVERRIDES, *OPTIONS, *OUT, *TRAIN,
         *MEMORY, *_generated()]


def _snapshot(folder: Path) -> dict:
    """Every path under `folder` with its file content's hash: what must not change."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _write(path: Path, content) -> None:
    if content is DIR:
        path.mkdir(parents=True)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(yaml.safe_dump(content))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_error(case: Case, tmp_path, capsys, monkeypatch):
    work, crashes = tmp_path / "work", tmp_path / "crashes"
    (work / "cfg").mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("STALECAST_CRASH_DIR", str(crashes))
    config = SMALL if case.config is None else case.config
    if isinstance(config, dict):
        config = copy.deepcopy(config)
        if case.change is not None:
            case.change(config)
    _write(work / "cfg" / "run.yaml", config)
    for name, content in case.files.items():
        _write(work / "cfg" / name, content)
    if case.setup is not None:
        case.setup(work, monkeypatch)
    before = _snapshot(work)
    argv = [a.format(cfg=work / "cfg" / "run.yaml", out=work / "out", work=work) for a in case.argv]

    code = main(argv)

    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == case.code, text
    assert "Traceback" not in text and not crashes.exists(), text
    for words in case.words:
        assert words in text, f"{words!r} not in:\n{text}"
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1 if case.single else len(errors) > 1, text
    assert _snapshot(work) == before, "the working folder changed: something was written"


def test_foreign_output_folder_keeps_its_file(tmp_path, monkeypatch, capsys):
    """An existing folder stalecast did not write: refused after the simulation (simulate checks --out when it
    writes), the user's file untouched, no marker added, no scratch folder left beside it."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert main(["simulate", str(config), "--out", str(out), "--no-sync-baseline"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine\n" and not (out / MARKER).exists()
    assert "--force" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "run.yaml"]  # no scratch folder left beside it


@pytest.mark.parametrize("spec, values, message", [
    ("ratio", {"reps": 0}, "--reps 0: must be at least 1"),
    ("bound", {"bounds": []}, "--bounds: needs at least one value"),
    ("sync-vs-async", {"models": ["tiny", "gpt5"]}, "--models tiny,gpt5: unknown 'gpt5'"),
    ("plan", {"coarse": 1}, "--coarse 1: must be at least 2: the refining passes search between the coarse counts"),
    ("plan", {"tolerance": float("nan")}, "--tolerance nan: must be a finite number"),
    ("stability", {"lrs": [1e-3, 0.0]}, "--lrs 0.001,0.0: each value must be greater than 0 (got 0.0; it sets "
                                        "optim.lr)"),
], ids=["ratio-reps", "bound-empty", "models", "plan-coarse", "plan-tolerance", "stability-lrs"])
def test_specs_built_in_python_are_checked_too(spec, values, message):
    from sim.config import ConfigError
    from studies.named import STUDIES
    from studies.plan import PlanSpec
    from studies.stability import StabilitySpec

    cls = {"plan": PlanSpec, "stability": StabilitySpec}.get(spec) or STUDIES[spec]
    cls()  # the defaults pass
    with pytest.raises(ConfigError) as err:
        cls(**values)
    assert str(err.value).startswith(message), str(err.value)
