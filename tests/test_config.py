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
    (tmp_path / "sub" / "prof.yaml").write_text("{}\n")  # existence is all load_config checks
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
