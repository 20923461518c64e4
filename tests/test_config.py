"""Run config: the examples load, every bad input is one ConfigError naming file, field and reason."""

import builtins
import pathlib

import pytest
import yaml
from pydantic import ValidationError

import sim.hardware.specs  # noqa: F401 - imported up front so the no-I/O test sees only parse_config's work
from sim.config import ConfigError, RunConfig, load_config, parse_config


def write_yaml(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def assert_subset(expected, actual, where=""):
    """Every value the YAML gives survives loading (defaults may add more)."""
    if isinstance(expected, dict):
        for key, value in expected.items():
            assert_subset(value, actual[key], f"{where}.{key}")
    else:
        assert actual == expected, where


def test_example_loads(example):
    cfg = load_config(example)
    assert isinstance(cfg, RunConfig)
    assert_subset(yaml.safe_load(example.read_text()), cfg.model_dump())


# (id, change to the small config, fragments the message must contain: the dotted field first)
BAD = [
    ("unknown-field", lambda d: d["workload"].update(batch_prompt=8),
     ["workload.batch_prompt", "unknown field", "did you mean 'batch_prompts'"]),
    ("unknown-nested", lambda d: d["hardware"]["constant"].update(sync=1.0),
     ["hardware.constant.sync", "unknown field", "did you mean 'sync_s'"]),
    ("unknown-in-dist", lambda d: d["workload"].update(response_len={"kind": "lognormal", "median": 5, "sigmaa": 1}),
     ["workload.response_len.sigmaa", "unknown field", "did you mean 'sigma'"]),
    ("wrong-type", lambda d: d["workload"].update(group_size="four"),
     ["workload.group_size", "valid integer", "'four'"]),
    ("impossible", lambda d: d["workload"].update(group_size=0),
     ["workload.group_size", "greater than or equal to 1", "got 0"]),
    ("bad-nested-value", lambda d: d["hardware"]["constant"].update(decode_step_s=-1),
     ["hardware.constant.decode_step_s", "greater than or equal to 0"]),
    ("unknown-gpu", lambda d: d["hardware"].update(gpu="H900"),
     ["hardware.gpu", "unknown GPU 'H900'", "H100-SXM"]),
    ("unknown-model", lambda d: d["hardware"].update(model="qwen-9000"),
     ["hardware.model", "unknown model preset 'qwen-9000'"]),
    ("lognormal-both", lambda d: d["workload"].update(response_len={"kind": "lognormal", "median": 5, "sigma": 1,
                                                                     "p99": 20}),
     ["workload.response_len", "exactly one of sigma or p99"]),
    ("empirical-neither", lambda d: d["workload"].update(prompt_len={"kind": "empirical"}),
     ["workload.prompt_len", "exactly one of values or trace"]),
    ("missing-profile", lambda d: d["hardware"].update(profile="nope.yaml"),
     ["hardware.profile", "file not found", "nope.yaml"]),
    ("concurrency-below-group", lambda d: d["cluster"].update(max_concurrency=1),
     ["cluster.max_concurrency", "must be at least", "workload.group_size"]),
    ("interruptible-sync", lambda d: d["pipeline"].update(mode="sync", interruptible=True),
     ["pipeline", "interruptible", "mode: async"]),
    ("no-lengths", lambda d: d["workload"].pop("response_len"),
     ["workload", "give prompt_len and response_len, or groups"]),
    ("groups-and-lengths", lambda d: d["workload"].update(groups=[[3] * (1 + d["workload"]["group_size"])]),
     ["workload", "not both"]),
    ("group-of-wrong-size", lambda d: [d["workload"].pop(k) for k in ("prompt_len", "response_len")]
     and d["workload"].update(groups=[[3, 4]]),
     ["workload", "[prompt length,", "found 2 numbers"]),
]


@pytest.mark.parametrize("change, fragments", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_field_is_one_error_naming_file_field_and_reason(tmp_path, config_data, change, fragments):
    change(config_data)
    path = write_yaml(tmp_path, config_data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert err.value.__cause__ is None
    assert len(text.splitlines()) == 1, text
    assert text.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in text


def test_each_problem_gets_its_own_line(tmp_path, config_data):
    config_data["workload"].update(batch_prompts=0, group_size=0)
    path = write_yaml(tmp_path, config_data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}: workload.batch_prompts: ")
    assert lines[1].startswith(f"{path}: workload.group_size: ")


@pytest.mark.parametrize("text, reason", [
    ("workload: [1, 2\n", "not valid YAML"),
    ("- workload\n- cluster\n", "must hold a mapping of sections, not list"),
], ids=["invalid-yaml", "not-a-mapping"])
def test_bad_file(tmp_path, text, reason):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=reason) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")


def test_missing_config_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="no such config file") as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")


def test_relative_profile_path_resolves_against_config_folder(tmp_path, config_data):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "prof.yaml").write_text("sync_s: 0.5\n")  # one table: the rest from hardware.constant
    config_data["hardware"]["profile"] = "prof.yaml"
    cfg = load_config(write_yaml(tmp_path / "sub", config_data))
    assert cfg.hardware.profile == str((tmp_path / "sub" / "prof.yaml").resolve())


def test_with_overrides_applies_and_revalidates(config_data):
    cfg = parse_config(config_data)
    new = cfg.with_overrides({"pipeline.mode": "sync", "workload.group_size": 4, "seed": 7})
    assert (new.pipeline.mode, new.workload.group_size, new.seed) == ("sync", 4, 7)
    assert (cfg.pipeline.mode, cfg.workload.group_size, cfg.seed) == ("async", 2, 0)  # original untouched
    assert new.workload.batch_prompts == cfg.workload.batch_prompts
    with pytest.raises(ValidationError):
        cfg.with_overrides({"workload.group_size": 0})
    with pytest.raises(ValidationError):
        cfg.with_overrides({"workload.group_size": 8})  # above max_concurrency 4
    with pytest.raises(ValidationError):
        cfg.with_overrides({"pipeline.mode": "sync", "pipeline.interruptible": True})


def test_load_config_overrides_errors_name_file(tmp_path, config_data):
    path = write_yaml(tmp_path, config_data)
    assert load_config(path, {"pipeline.max_staleness": 3}).pipeline.max_staleness == 3
    with pytest.raises(ConfigError, match=r"\(override\): pipeline.mode: ") as err:
        load_config(path, {"pipeline.mode": "bogus"})
    assert str(err.value).startswith(str(path))
    with pytest.raises(ConfigError, match="does not exist") as err:
        load_config(path, {"pipelin.mode": "sync"})
    assert str(err.value).startswith(str(path))


def test_config_is_frozen(config_data):
    cfg = parse_config(config_data)
    with pytest.raises(ValidationError):
        cfg.workload.group_size = 3
    with pytest.raises(ValidationError):
        cfg.seed = 1
    assert cfg.workload.group_size == 2 and cfg.seed == 0


def test_building_a_config_does_no_file_io(config_data, monkeypatch):
    config_data["hardware"]["profile"] = "nope.yaml"
    config_data["workload"]["response_len"] = {"kind": "empirical", "trace": "no/such/trace"}

    def no_io(*args, **kwargs):
        raise AssertionError("parse_config touched the file system")

    for name in ("open", "read_text", "read_bytes", "is_file", "exists", "stat"):
        monkeypatch.setattr(pathlib.Path, name, no_io)
    monkeypatch.setattr(builtins, "open", no_io)
    cfg = parse_config(config_data)
    assert cfg.hardware.profile == "nope.yaml"
    assert cfg.workload.response_len.trace == "no/such/trace"


def test_parse_config_rejects_non_mapping():
    with pytest.raises(ConfigError, match="^<config>: the file must hold a mapping"):
        parse_config(["workload"])


# --------------------------------------------------------------------------- strict types, files, references
@pytest.mark.parametrize("change, fragments", [
    (lambda d: d["cluster"].update(rollout_workers=True), ["cluster.rollout_workers", "not a boolean", "got true"]),
    (lambda d: d.update(optim={"lr": False}), ["optim.lr", "not a boolean"]),
    (lambda d: d["cluster"].update(colocated=1), ["cluster.colocated", "expected true or false", "got 1"]),
    (lambda d: d["pipeline"].update(interruptible="no"), ["pipeline.interruptible", "expected true or false"]),
    (lambda d: d["workload"].update(response_len={"kind": "exponential", "mean": float("inf")}),
     ["workload.response_len.mean", "finite number"]),
    (lambda d: d["hardware"]["constant"].update(sync_s=float("nan")), ["hardware.constant.sync_s", "finite number"]),
    (lambda d: d["workload"].update(prompt_len={"kind": "empirical", "values": [4, True]}),
     ["workload.prompt_len.values.1", "not a boolean"]),
    (lambda d: d["hardware"].update(model=7), ["hardware.model", "expected a model preset name or a mapping"]),
    (lambda d: d.update(name="runs/x"), ["name", "must be a plain name"]),
], ids=["int-true", "float-false", "bool-1", "bool-string", "inf", "nan", "list-item-bool", "model-number",
        "name-path"])
def test_values_pydantic_would_coerce_are_rejected(tmp_path, config_data, change, fragments):
    change(config_data)
    path = write_yaml(tmp_path, config_data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert len(text.splitlines()) == 1 and text.startswith(f"{path}: "), text
    for fragment in fragments:
        assert fragment in text, text


def test_yaml_numbers_still_read_as_floats(tmp_path, config_data):
    # PyYAML reads 1e-3 (no dot) as a string and 5 as an int: float fields keep taking both.
    text = yaml.safe_dump(config_data) + "optim:\n  lr: 1e-3\n"
    cfg = load_config(write_yaml(tmp_path, text))
    assert cfg.optim.lr == 1e-3 and cfg.workload.response_len.mean == 5.0
    assert isinstance(cfg.workload.response_len.mean, float)


@pytest.mark.parametrize("content, reason", [
    (b"", "the file is empty; a config needs at least workload, cluster and run"),
    (b"name: caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 9); save the config file as UTF-8"),
    (b"run:\n  steps: 3\n  steps: 1000\n",
     "not valid YAML: key 'steps' is given twice in one mapping (line 3, column 3)"),
    (b"run:\n\tsteps: 3\n", "found character a tab that cannot start any token (YAML indents with spaces)"),
], ids=["empty", "not-utf8", "duplicate-key", "tab"])
def test_unreadable_config_file_is_one_line(tmp_path, content, reason):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and reason in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_config_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_config(tmp_path)


def test_profile_is_checked_when_the_config_loads(tmp_path, config_data):
    config_data["hardware"] = {"gpu": None, "profile": "prof.yaml"}
    path = write_yaml(tmp_path, config_data)
    (tmp_path / "prof.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"hardware.profile: .*prof.yaml: the profile is empty") as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")
    (tmp_path / "prof.yaml").write_text("sync_s: 0.5\n")  # the only cost source, but without decode, prefill, train
    with pytest.raises(ConfigError, match="the profile lacks decode, prefill, train"):
        load_config(path)
    config_data["hardware"]["gpu"] = "H100-SXM"  # the GPU's analytic model gives the rest
    assert load_config(write_yaml(tmp_path, config_data)).hardware.profile == str((tmp_path / "prof.yaml").resolve())


def test_checkpoint_path_resolves_against_config_folder(tmp_path, config_data, monkeypatch):
    (tmp_path / "sub" / "ckpt").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    config_data["real"] = {"model": "ckpt"}
    path = write_yaml(tmp_path / "sub", config_data)
    with pytest.raises(ConfigError, match="has no config.json, so it is not a checkpoint folder"):
        load_config(path)
    (tmp_path / "sub" / "ckpt" / "config.json").write_text("{}")
    assert load_config(path).real.model == str((tmp_path / "sub" / "ckpt").resolve())
    config_data["real"] = {"model": "no-such-ckpt"}
    with pytest.raises(ConfigError, match="'no-such-ckpt' is neither a model preset .* nor a checkpoint folder"):
        load_config(write_yaml(tmp_path / "sub", config_data))
    config_data["real"] = {"model": "qwen2.5-0.5b"}  # a preset stays a name
    assert load_config(write_yaml(tmp_path / "sub", config_data)).real.model == "qwen2.5-0.5b"


def test_override_paths_are_taken_from_the_current_folder(tmp_path, config_data, monkeypatch):
    (tmp_path / "sub").mkdir()
    path = write_yaml(tmp_path / "sub", config_data)
    (tmp_path / "prof.yaml").write_text("sync_s: 0.5\n")
    monkeypatch.chdir(tmp_path)  # as `stalecast profile` suggests: --set hardware.profile=PATH from here
    cfg = load_config(path, {"hardware.profile": "prof.yaml"})
    assert cfg.hardware.profile == str((tmp_path / "prof.yaml").resolve())
    with pytest.raises(ConfigError, match=r"\(override\): hardware.profile: file not found: sub/prof.yaml"):
        load_config(path, {"hardware.profile": "sub/prof.yaml"})


@pytest.mark.parametrize("overrides, message", [
    ({"pipelin.mode": "sync"}, "pipelin.mode: field 'pipelin' does not exist (did you mean 'pipeline'?)"),
    ({"run.steps.max": 3}, "run.steps.max: run.steps is a value (3), not a section with fields"),
    ({"hardware.constant.sync_s": 1}, None),  # the small config sets hardware.constant: this one is fine
    ({"hardware.gpu": "H900"}, "hardware.gpu: unknown GPU 'H900'"),
], ids=["unknown-section", "through-a-value", "into-a-set-section", "names-checked-again"])
def test_override_problems_name_the_key(tmp_path, config_data, overrides, message):
    path = write_yaml(tmp_path, config_data)
    if message is None:
        assert load_config(path, overrides).hardware.constant.sync_s == 1.0
        return
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert str(err.value).startswith(f"{path} (override): ") and message in str(err.value)


def test_an_empirical_trace_is_read_once_per_version_of_its_files(config_data, tiny_trace, tmp_path, monkeypatch):
    import sim.trace
    from sim.workload import workload_lengths

    folder = tiny_trace.write(tmp_path / "lengths")
    config_data["workload"]["response_len"] = {"kind": "empirical", "trace": str(folder)}
    wl = parse_config(config_data).workload
    reads = []
    real_read = sim.trace.read_trace
    monkeypatch.setattr(sim.trace, "read_trace", lambda f: reads.append(f) or real_read(f))
    first = workload_lengths(wl)
    assert workload_lengths(wl) == first and len(reads) == 1
    longer = tiny_trace.samples.assign(response_len=tiny_trace.samples["response_len"] + 3)
    type(tiny_trace)(longer, tiny_trace.steps, tiny_trace.header).write(folder)
    assert workload_lengths(wl).response_mean > first.response_mean and len(reads) == 2
