"""Hardware specs, model shapes and the cost model (analytic, constant, measured, colocation)."""

import numpy as np
import pytest

from sim.config import ConfigError, parse_config
from sim.hardware import GPUS, MODELS, build_cost_model
from sim.hardware.cost import cost_model_for, crowding
from sim.hardware.measured import (Colocation, Curve, DecodeGrid, IdleCurve, MeasuredProfile, load_profile,
                                   save_profile)
from sim.hardware.specs import resolve_model


def make_cfg(hardware=None, **sections):
    data = {
        "workload": {"batch_prompts": 4, "group_size": 2, "prompt_len": {"kind": "constant", "value": 100},
                     "response_len": {"kind": "constant", "value": 50}, "max_new_tokens": 64},
        "cluster": {"rollout_workers": 2, "max_concurrency": 16},
        "run": {"steps": 3},
    }
    data.update(sections)
    if hardware is not None:
        data["hardware"] = hardware
    return parse_config(data)


def analytic_step(n, x, gpu, m, tp=1, dm=0.8, dc=0.5, overhead=0.004):
    mem = (m.params * 2 + 2 * m.layers * m.kv_heads * m.head_dim * 2 * x) / (tp * gpu.hbm_gbps * 1e9 * dm)
    comp = (2 * m.params * n + 4 * m.layers * m.heads * m.head_dim * x) / (tp * gpu.bf16_tflops * 1e12 * dc)
    # TP > 1: two all-reduces per layer of n x hidden bf16 activations, latency + ring bytes at 0.13 of NVLink
    allreduce = 0 if tp == 1 else 2 * m.layers * (gpu.allreduce_latency_us * 1e-6 + 2 * (tp - 1) / tp * n * m.hidden
                                                  * 2 / (gpu.intra_node_gbps * 1e9 * 0.13))
    return overhead + max(mem, comp) + allreduce, mem, comp


def row_value(x_row, y_row, x):
    """The table contract, evaluated independently: interpolate, extend the last segment."""
    if x <= x_row[-1]:
        return np.interp(x, x_row, y_row)
    return y_row[-1] + (x - x_row[-1]) * (y_row[-1] - y_row[-2]) / (x_row[-1] - x_row[-2])


# --------------------------------------------------------------------------- presets
@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_preset_builds(gpu, model):
    cost = build_cost_model(make_cfg({"gpu": gpu, "model": model}))
    x, y = cost.decode_table()
    assert x.shape == y.shape == (17, 3)
    assert np.all(np.diff(x, axis=1) > 0) and np.all(x[:, 0] == 0) and np.all(y > 0)
    assert cost.prefill_s(100) > 0 and cost.train_s(1000) > 0 and cost.sync_s() > 0


def test_model_shapes():
    m = MODELS["qwen2.5-0.5b"]
    assert m.head_dim == 64 and m.kv_bytes_per_token() == 2 * 24 * 2 * 64 * 2
    assert m.attn_flops_per_ctx_token == 4 * 24 * 14 * 64 and m.weight_bytes() == 0.494e9 * 2
    custom = resolve_model({"params": 1e9, "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 4,
                            "vocab": 10, "head_dim": 32, "name": "x"})
    assert custom.head_dim == 32 and custom.name == "x"


# --------------------------------------------------------------------------- analytic
@pytest.mark.parametrize("n", [1, 16, 256])  # 256: compute-bound up to a crossover near 1e5 tokens
def test_analytic_decode_matches_formula(n):
    cfg = make_cfg({"gpu": "H100-SXM", "model": "qwen2.5-7b"}, cluster={
        "rollout_workers": 1, "max_concurrency": 256, "gpus_per_worker": 2})
    cost = build_cost_model(cfg)
    gpu, m = GPUS["H100-SXM"], MODELS["qwen2.5-7b"]
    x_row, y_row = cost.decode_table()
    xc = x_row[n, 1]
    if n == 256:  # a real crossover: both bounds agree there
        _, mem, comp = analytic_step(n, xc, gpu, m, tp=2)
        assert xc > 1e4 and mem == pytest.approx(comp, rel=1e-9)
    for x in (0, 1, 500, 0.5 * xc, xc, 1.5 * xc, 10 * xc, 1e7, 1e9):
        want = analytic_step(n, x, gpu, m, tp=2)[0]
        assert cost.decode_step_s(n, x) == pytest.approx(want, rel=1e-9)
        assert row_value(x_row[n], y_row[n], x) == pytest.approx(want, rel=1e-9)


def test_analytic_crossover_sides():
    # Large batch of the small model: compute-bound at short context, memory-bound at long context.
    cost = build_cost_model(make_cfg({"gpu": "H100-SXM", "model": "qwen2.5-0.5b"},
                                     cluster={"rollout_workers": 1, "max_concurrency": 512}))
    gpu, m = GPUS["H100-SXM"], MODELS["qwen2.5-0.5b"]
    xc = cost.decode_table()[0][512, 1]
    _, mem, comp = analytic_step(512, 0.5 * xc, gpu, m)
    assert comp > mem
    _, mem, comp = analytic_step(512, 3 * xc, gpu, m)
    assert mem > comp
    assert cost.decode_table()[0][0].tolist() == cost.decode_table()[0][1].tolist()


def test_analytic_prefill_train_sync():
    cfg = make_cfg({"gpu": "A100-80GB", "model": "llama3.1-8b"},
                   cluster={"rollout_workers": 4, "max_concurrency": 16, "gpus_per_worker": 2, "learner_gpus": 8})
    cost = build_cost_model(cfg)
    gpu, m = GPUS["A100-80GB"], MODELS["llama3.1-8b"]
    p = 300
    allreduce = 2 * m.layers * 2 * (2 - 1) / 2 * p * m.hidden * 2 / (gpu.intra_node_gbps * 1e9 * 0.13)  # TP 2, bytes
    assert cost.prefill_s(p) == pytest.approx(
        (2 * m.params * p + m.attn_flops_per_ctx_token * p * (p + 1) / 2) / (2 * gpu.bf16_tflops * 1e12 * 0.5)
        + allreduce)
    assert cost.train_s(10_000) == pytest.approx(6 * m.params * 10_000 / (8 * 312e12 * 0.4) + 1.0)
    # 4*2 + 8 = 16 GPUs: more than one node, so the sync goes over the network.
    assert cost.sync_s() == pytest.approx(m.params * 2 / (25e9 * 0.8) + 0.5)
    one_node = build_cost_model(cfg.with_overrides({"cluster.rollout_workers": 1, "cluster.learner_gpus": 4}))
    assert one_node.sync_s() == pytest.approx(m.params * 2 / (300e9 * 0.8) + 0.5)


# --------------------------------------------------------------------------- constant
def test_constant_costs_exact():
    cost = build_cost_model(make_cfg({"gpu": None, "constant": {
        "decode_step_s": 0.02, "prefill_s_per_token": 1e-4, "train_step_s": 3.0,
        "train_s_per_token": 1e-3, "sync_s": 0.7}}))
    for n in (0, 1, 7, 16):
        for x in (0, 10, 1e6):
            assert cost.decode_step_s(n, x) == 0.02
    x, y = cost.decode_table()
    assert np.all(y == 0.02) and x.shape == (17, 3)
    assert cost.prefill_s(200) == pytest.approx(0.02)
    assert cost.train_s(1000) == pytest.approx(4.0)
    assert cost.sync_s() == 0.7


# --------------------------------------------------------------------------- measured
def grid_profile(**kw):
    decode = DecodeGrid(active=(1, 4), context=(100.0, 300.0), seconds=((0.010, 0.014), (0.020, 0.030)))
    return MeasuredProfile(machine={"hostname": "h"}, model="tiny", decode=decode,
                           prefill=Curve((100.0, 1000.0), (0.01, 0.05)), train=Curve((1000.0, 3000.0), (1.0, 2.0)),
                           sync_s=0.25, **kw)


def test_measured_grid_points_and_midpoints():
    cost = build_cost_model(make_cfg({"gpu": "H200", "model": "tiny"}), grid_profile())
    step = cost.decode_step_s
    assert step(1, 100) == pytest.approx(0.010) and step(1, 300) == pytest.approx(0.014)
    assert step(4, 400) == pytest.approx(0.020) and step(4, 1200) == pytest.approx(0.030)
    assert step(1, 200) == pytest.approx(0.012)                    # midpoint in context
    assert step(4, 800) == pytest.approx(0.025)
    assert step(1, 0) == pytest.approx(0.008)                      # first segment extended to x = 0
    assert step(1, 600) == pytest.approx(0.020)                    # last segment extended
    assert step(7, 7 * 100) == pytest.approx(0.030)                # active extended: 0.010 + 6/3 * 0.010
    # n = 2 lies a third of the way from active 1 to 4, at mean context 200 (total 400).
    assert step(2, 400) == pytest.approx(0.012 + (0.025 - 0.012) / 3)
    assert cost.prefill_s(100) == pytest.approx(0.01) and cost.prefill_s(550) == pytest.approx(0.03)
    assert cost.train_s(2000) == pytest.approx(1.5) and cost.train_s(5000) == pytest.approx(3.0)
    assert cost.prefill_s(0) == pytest.approx(0.01 - 100 * 0.04 / 900)
    assert cost.sync_s() == 0.25 and set(cost.sources.values()) == {"measured"}


def test_measured_falls_back_and_clamps():
    profile = MeasuredProfile(train=Curve((1000.0, 2000.0), (2.0, 1.0)))  # decreasing: clamp at 0
    cfg = make_cfg({"gpu": "H200", "model": "tiny"})
    cost = build_cost_model(cfg, profile)
    assert cost.train_s(5000) == 0.0 and cost.train_s(1500) == pytest.approx(1.5)
    assert cost.sources == {"decode": "analytic", "prefill": "analytic", "train": "measured", "sync": "analytic"}
    assert cost.sync_s() == build_cost_model(cfg).sync_s()
    # A profile with tables missing and no GPU to fall back on.
    with pytest.raises(ValueError, match="decode, prefill, sync"):
        build_cost_model(make_cfg({"gpu": None, "profile": "p.yaml"}), profile)


def test_measured_decode_tail_never_decreases():
    decode = DecodeGrid(active=(1, 2), context=(10.0, 20.0), seconds=((0.02, 0.01), (0.02, 0.01)))
    cost = build_cost_model(make_cfg({"gpu": "H200"}), MeasuredProfile(decode=decode))
    assert cost.decode_step_s(1, 15) == pytest.approx(0.015)
    assert cost.decode_step_s(1, 1e6) == pytest.approx(0.01)


@pytest.mark.parametrize("bad, field", [
    ({"decode": {"active": [1, 2], "context": [10, 20], "seconds": [[0.1, 0.2]]}}, "decode.seconds"),
    ({"decode": {"active": [1, 2], "context": [10, 20], "seconds": [[0.1], [0.2]]}}, "decode.seconds"),
    ({"decode": {"active": [2, 1], "context": [10, 20], "seconds": [[1, 1], [1, 1]]}}, "decode.active"),
    ({"decode": {"active": [1, 2], "context": [0, 20], "seconds": [[1, 1], [1, 1]]}}, "decode.context"),
    ({"decode": {"active": [1, 2], "context": [10, 20], "seconds": [[1, -1], [1, 1]]}}, "decode.seconds"),
    ({"prefill": {"tokens": [1, 2, 3], "seconds": [1, 2]}}, "prefill.seconds"),
    ({"train": {"tokens": [5], "seconds": [1]}}, "train.tokens"),
    ({"train": {"tokens": [1, 2]}}, "train.seconds"),
    ({"sync_s": -1}, "sync_s"),
    ({"colocation": {"gen_slowdown": 1.2}}, "colocation.train_slowdown"),
    ({"colocation": {"gen_slowdown": 1.2, "train_slowdown": 1.0, "sync_gen_slowdown": 0}},
     "colocation.sync_gen_slowdown: must be a finite number > 0"),
    ({"colocation": {"gen_slowdown": 1.2, "train_slowdown": 1.0, "sync": 1.0}}, "colocation.sync: unknown field"),
    ({"decod": {}}, "decod"),
    ({"colocation": {"gen_slowdown": {"idle": [0, 0.5]}, "train_slowdown": 1.0}}, "colocation.gen_slowdown.slowdown"),
    ({"colocation": {"gen_slowdown": {"idle": [0.5, 0], "slowdown": [1, 1]}, "train_slowdown": 1.0}},
     "colocation.gen_slowdown.idle: must be strictly ascending"),
    ({"colocation": {"gen_slowdown": {"idle": [0, 1], "slowdown": [1, 1]}, "train_slowdown": 1.0}},
     "colocation.gen_slowdown.idle: fractions must lie in [0, 1)"),
    ({"colocation": {"gen_slowdown": 1.0, "train_slowdown": 1.0,
                     "sync_gen_slowdown": {"idle": [0, 0.5], "slowdown": [1.0]}}},
     "colocation.sync_gen_slowdown.slowdown: 1 values, expected one per"),
    ({"colocation": {"gen_slowdown": {"idle": [0], "slowdown": [0]}, "train_slowdown": 1.0}},
     "colocation.gen_slowdown.slowdown: values must be finite numbers > 0"),
    ({"colocation": {"gen_slowdown": 1.0, "train_slowdown": 1.0, "sync_gen_beside": [1.0, 0]}},
     "colocation.sync_gen_beside: values must be finite numbers > 0"),
    ({"colocation": {"gen_slowdown": 1.0, "train_slowdown": 1.0, "sync_gen_beside": []}},
     "colocation.sync_gen_beside: needs at least 1 value"),
    ({"colocation": {"gen_slowdown": 1.0, "train_slowdown": 1.0, "sync_gen_beside": 2.0}},
     "colocation.sync_gen_beside: expected a list of numbers"),
    ({"machine": {"hostname": "h"}, "model": "tiny"}, "no tables: a profile needs at least one of decode"),
    ({}, "no tables"),
    ({"sync_s": float("inf")}, "sync_s: values must be finite numbers"),
    ({"train": {"tokens": [1, 2], "seconds": [1, float("nan")]}}, "train.seconds: values must be finite numbers"),
    ({"prefill": {"tokens": [1, float("inf")], "seconds": [1, 2]}}, "prefill.tokens: values must be finite"),
    ({"colocation": {"gen_slowdown": float("inf"), "train_slowdown": 1.0}}, "colocation.gen_slowdown: values must be "
                                                                            "finite"),
    ([{"sync_s": 1.0}], "expected a mapping of tables, not list"),
])
def test_bad_profile_names_file_and_field(tmp_path, bad, field):
    path = tmp_path / "prof.yaml"
    path.write_text(__import__("yaml").safe_dump(bad))
    with pytest.raises(ValueError) as info:
        load_profile(path)
    assert str(info.value).startswith(f"{path}: {field}")


@pytest.mark.parametrize("content, reason", [
    (b"", "the profile is empty; it needs at least one of decode, prefill, train, sync_s, colocation"),
    (b"# only a comment\n", "the profile is empty"),
    (b"sync_s: 0.1\nsync_s: 0.2\n", "not valid YAML: key 'sync_s' is given twice in one mapping (line 2, column 1)"),
    (b"decode: [1, 2\n", "not valid YAML: while parsing a flow sequence: expected ',' or ']'"),
    (b"sync_s: 0.1 # \xe9t\xe9\n", "not UTF-8 text (byte 0xe9 at offset 14)"),
], ids=["empty", "comment-only", "duplicate-key", "invalid-yaml", "not-utf8"])
def test_unusable_profile_file_is_one_line_naming_it(tmp_path, content, reason):
    path = tmp_path / "prof.yaml"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_profile(path)
    assert str(info.value).startswith(f"{path}: ") and reason in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_profile_folder_or_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not a profile file"):
        load_profile(tmp_path)
    with pytest.raises(ValueError, match="no such profile file"):
        load_profile(tmp_path / "absent.yaml")


def test_built_profile_is_checked_like_a_loaded_one():
    with pytest.raises(ValueError, match="no tables"):
        MeasuredProfile(machine={"hostname": "h"})
    with pytest.raises(ValueError, match="sync_s: must be a finite number >= 0"):
        MeasuredProfile(sync_s=float("inf"))
    with pytest.raises(ValueError, match="learner_bookkeeping_s: must be a finite number >= 0"):
        MeasuredProfile(learner_bookkeeping_s=-1.0)
    with pytest.raises(ValueError, match="train.seconds: values must be finite numbers >= 0"):
        MeasuredProfile(train=Curve((1.0, 2.0), (1.0, float("inf"))))
    with pytest.raises(ValueError, match="colocation.train_slowdown: must be a finite number > 0"):
        MeasuredProfile(colocation=Colocation(1.0, float("nan")))


def test_profile_roundtrip(tmp_path):
    for colocation in (Colocation(1.2, 1.1, 1.3, sync_gen_beside=(1.0, 1.15, 2.6)), Colocation(1.2, 1.1, 1.3)):
        save_profile(grid_profile(colocation=colocation), tmp_path / "p.yaml")
        assert load_profile(tmp_path / "p.yaml") == grid_profile(colocation=colocation)
    profile = grid_profile(colocation=Colocation(1.2, 1.1, 1.3))
    # A profile written before the sync-mode factor existed reads as x1 there.
    text = (tmp_path / "p.yaml").read_text().replace("  sync_gen_slowdown: 1.3\n", "")
    (tmp_path / "old.yaml").write_text(text)
    assert load_profile(tmp_path / "old.yaml").colocation == Colocation(1.2, 1.1, 1.0)
    cfg = make_cfg({"gpu": "H200", "model": "tiny", "profile": str(tmp_path / "p.yaml")})
    assert cost_model_for(cfg).decode_step_s(1, 100) == pytest.approx(0.010)


def test_learner_bookkeeping_from_the_profile_else_the_efficiency_section(tmp_path):
    const = {"gpu": None, "constant": {"decode_step_s": 0.1, "train_step_s": 1.0}}
    assert build_cost_model(make_cfg(const)).bookkeeping_s == 0.0
    cfg = make_cfg({**const, "efficiency": {"learner_bookkeeping_s": 0.3}})
    assert build_cost_model(cfg).bookkeeping_s == 0.3
    assert build_cost_model(cfg, MeasuredProfile(learner_bookkeeping_s=0.05)).bookkeeping_s == 0.05
    save_profile(MeasuredProfile(learner_bookkeeping_s=0.05), tmp_path / "p.yaml")
    assert load_profile(tmp_path / "p.yaml").learner_bookkeeping_s == 0.05


# --------------------------------------------------------------------------- colocation
def test_colocation_only_when_overlapping():
    hw = {"gpu": "H200", "model": "qwen2.5-0.5b"}
    cluster = {"rollout_workers": 1, "max_concurrency": 8, "colocated": True}
    alone = build_cost_model(make_cfg(hw, cluster={"rollout_workers": 1, "max_concurrency": 8}))
    for mode, gen, train in (("async", 1.15, 1.11), ("one_step_off", 1.15, 1.11), ("sync", 1.0, 1.0)):
        cost = build_cost_model(make_cfg(hw, cluster=cluster, pipeline={"mode": mode}))
        assert cost.decode_step_s(4, 1000) == pytest.approx(gen * alone.decode_step_s(4, 1000))
        assert cost.prefill_s(100) == pytest.approx(gen * alone.prefill_s(100))
        # The step alone; the engine slows it while workers generate (tests/test_learner_cost.py).
        assert cost.train_s(1000) == pytest.approx(alone.train_s(1000)) and cost.train_slowdown == train
        assert cost.sync_s() == pytest.approx(alone.sync_s())
    # A profile's factors override the efficiency ones, and apply to constant costs too.
    const = {"gpu": None, "constant": {"decode_step_s": 0.1, "train_step_s": 1.0}}
    cost = build_cost_model(make_cfg(const, cluster=cluster), MeasuredProfile(colocation=Colocation(2.0, 3.0, 1.5)))
    assert cost.decode_step_s(1, 0) == pytest.approx(0.2) and cost.train_slowdown == 3.0
    # In sync mode only workers run at once: their factor among themselves, the learner at full speed.
    cost = build_cost_model(make_cfg(const, cluster=cluster, pipeline={"mode": "sync"}),
                            MeasuredProfile(colocation=Colocation(2.0, 3.0, 1.5)))
    assert cost.decode_step_s(1, 0) == pytest.approx(0.15) and cost.train_slowdown == 1.0


def test_generation_slowdown_against_idle_fraction(tmp_path):
    """A profile's IdleCurve: read and written back, charged at the idle fraction asked for, flat beyond its ends."""
    curve = IdleCurve((0.0, 0.3, 0.6), (1.0, 1.3, 1.45))
    profile = MeasuredProfile(colocation=Colocation(curve, 1.1, IdleCurve((0.0, 0.3, 0.6), (1.0, 1.1, 1.2))))
    save_profile(profile, tmp_path / "p.yaml")
    assert load_profile(tmp_path / "p.yaml") == profile
    const = {"gpu": None, "constant": {"decode_step_s": 0.1, "train_step_s": 1.0}}
    cluster = {"rollout_workers": 1, "max_concurrency": 8, "colocated": True}
    for idle, factor in ((0.0, 1.0), (0.15, 1.15), (0.45, 1.375), (0.6, 1.45), (0.9, 1.45)):
        cost = build_cost_model(make_cfg(const, cluster=cluster), profile, worker_idle=idle)
        assert cost.decode_step_s(1, 0) == pytest.approx(0.1 * factor) and cost.worker_idle == idle
    sync = build_cost_model(make_cfg(const, cluster=cluster, pipeline={"mode": "sync"}), profile, worker_idle=0.45)
    assert sync.decode_step_s(1, 0) == pytest.approx(0.1 * 1.15)


def test_sync_generation_factor_against_the_crowd():
    """The sync factor: the mean of the profile's curve against the number of others generating (over the run's
    generating time), times the idle curve's rhythm effect (at the run's idle fraction over back to back)."""
    shares = np.array([2 / 7, 2 / 7, 3 / 7])  # of generating time beside 0, 1, 2 other workers
    assert crowding((1.0, 1.15, 2.6), shares) == pytest.approx(2 / 7 + 2 / 7 * 1.15 + 3 / 7 * 2.6)
    # A profile of fewer workers than the run: more others than it measured are charged at its last entry.
    assert crowding((1.0, 2.0), np.array([0.2, 0.3, 0.5])) == pytest.approx(0.2 + 0.3 * 2 + 0.5 * 2)
    assert crowding((1.0, 2.0), np.zeros(2)) == 2.0  # nothing generated: the full crowd's factor
    const = {"gpu": None, "constant": {"decode_step_s": 0.1, "train_step_s": 1.0}}
    profile = MeasuredProfile(colocation=Colocation(1.0, 1.0, IdleCurve((0.0, 0.6), (2.6, 3.2)),
                                                    sync_gen_beside=(1.0, 1.15, 2.6)))
    cluster = {"rollout_workers": 3, "max_concurrency": 8, "colocated": True}
    sync = build_cost_model(make_cfg(const, cluster=cluster, pipeline={"mode": "sync"}), profile, worker_idle=0.3,
                            beside=shares)
    assert sync.decode_step_s(1, 0) == pytest.approx(0.1 * crowding((1.0, 1.15, 2.6), shares) * 2.9 / 2.6)
    assert sync.beside == pytest.approx(2 / 7 + 2 * 3 / 7)  # the mean number of others generating
    # Async mode charges its own factor, measured beside the learner: the sync curve does not apply.
    cost = build_cost_model(make_cfg(const, cluster=cluster), profile, beside=shares)
    assert cost.decode_step_s(1, 0) == pytest.approx(0.1) and cost.beside is None


# --------------------------------------------------------------------------- check_hardware
@pytest.mark.parametrize("hardware, message", [
    ({"gpu": "H900"}, "hardware.gpu: unknown GPU 'H900' (known: A100-80GB, H100-SXM, H200, H800, H20, cpu)"),
    ({"model": "x"}, "hardware.model: unknown model preset 'x' (known: qwen2.5-0.5b,"),
    ({"model": {"params": 1e9, "hidden": 64, "heads": 4, "kv_heads": 4, "vocab": 10}},
     "hardware.model: missing key 'layers'"),
    ({"model": {"params": 1e9, "layers": 0, "hidden": 64, "heads": 4, "kv_heads": 4, "vocab": 10}},
     "hardware.model: layers: must be a positive integer"),
    ({"gpu": None}, "hardware.gpu: required unless hardware.constant is given"),
])
def test_check_hardware_errors(hardware, message):
    with pytest.raises(ConfigError) as info:
        make_cfg(hardware)
    assert message in str(info.value)


def test_constant_needs_no_gpu():
    make_cfg({"gpu": None, "constant": {"decode_step_s": 0.01}})
