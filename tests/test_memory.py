"""GPU memory (sim/hardware/memory.py) and tensor parallelism in the cost model: known answers computed by hand, the
feasibility refusal of `stalecast simulate`, and `stalecast plan` on a policy that does not fit one GPU."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from sim.cli import main
from sim.config import parse_config
from sim.hardware import GPUS, MODELS, build_cost_model
from sim.hardware.memory import (Lengths, activation_bytes_per_token, kv_bytes_per_token, memory_report, paged,
                                 state_bytes_per_param)
from sim.workload import workload_lengths

Q7 = MODELS["qwen2.5-7b"]


def make_cfg(model="qwen2.5-7b", memory=None, efficiency=None, **cluster):
    data = {
        "workload": {"batch_prompts": 4, "group_size": 4, "prompt_len": {"kind": "constant", "value": 256},
                     "response_len": {"kind": "constant", "value": 1024}, "max_new_tokens": 4096},
        "cluster": {"rollout_workers": 2, "max_concurrency": 16, "learner_gpus": 8, **cluster},
        "hardware": {"gpu": "H100-SXM", "model": model, "memory": memory or {}, "efficiency": efficiency or {}},
        "run": {"steps": 2},
    }
    return parse_config(data)


# --------------------------------------------------------------------------- sizes by hand
@pytest.mark.parametrize("model, layers_kv_dim, expected", [
    ("qwen2.5-0.5b", (24, 2, 64), 12_288),      # 24 layers x 2 (K, V) x 2 kv heads x 64 x 2 bytes
    ("qwen2.5-7b", (28, 4, 128), 57_344),       # the known answer
    ("llama3.1-8b", (32, 8, 128), 131_072),
    ("qwen2.5-32b", (64, 8, 128), 262_144),
    ("llama3.1-70b", (80, 8, 128), 327_680),
])
def test_kv_bytes_per_token_of_presets(model, layers_kv_dim, expected):
    m = MODELS[model]
    layers, kv, dim = layers_kv_dim
    assert (m.layers, m.kv_heads, m.head_dim) == (layers, kv, dim)
    assert kv_bytes_per_token(m) == layers * 2 * kv * dim * 2 == expected
    assert kv_bytes_per_token(m, kv_dtype="fp8") == expected // 2
    assert kv_bytes_per_token(m, tp=2) == expected  # split over 2 GPUs, same total
    # TP above the kv heads replicates them: each of the 16 GPUs holds one head of every layer
    assert kv_bytes_per_token(m, tp=16) == 16 * layers * 2 * 1 * dim * 2


def test_paged_blocks_and_state_bytes():
    assert paged(1, 16) == 16 and paged(16, 16) == 16 and paged(17, 16) == 32 and paged(16.2, 16) == 32
    assert state_bytes_per_param("bf16_mixed", "adamw") == 2 + 2 + 4 + 4 + 4 == 16
    assert state_bytes_per_param("bf16_mixed", "sgd") == 12
    assert state_bytes_per_param("fp32", "adamw") == 16 and state_bytes_per_param("bf16", "adamw") == 8


def test_rollout_memory_of_a_7b_worker_by_hand():
    """One H100: 0.9 x 80 = 72 GB; weights 2 x 7.62e9 = 15.24 GB; reserve 3 GB; KV 53.76 GB in blocks of 16 tokens
    of 57,344 B: floor(53.76e9 / 917,504) = 58,593 blocks = 937,488 tokens."""
    cfg = make_cfg()
    r = memory_report(cfg, workload_lengths(cfg.workload)).rollout
    assert r.usable_gb == pytest.approx(72.0) and r.weights_gb == pytest.approx(15.24)
    assert r.kv_budget_gb == pytest.approx(53.76)
    assert (r.kv_blocks, r.kv_tokens) == (58_593, 937_488)
    assert r.min_kv_tokens == 4 * 4352  # one group: 4 sequences of 256 + 4096 tokens (whole blocks)
    assert r.seqs_mean == 937_488 // 1280 and r.seqs_long == 937_488 // 4352  # 732 and 215
    assert r.feasible


def test_learner_memory_of_a_7b_preset_by_hand():
    """qwen2.5-7b on 8 H100s, bf16 mixed precision AdamW: 16 B x 7.62e9 = 121.92 GB, 15.24 GB per GPU. Activations
    with checkpointing: 28 x 2 x 3584 + 34 x 3584 + 4 x 3584 + 4 x 152064 = 945,152 B per token; 72 - 15.24 =
    56.76 GB leave 60,053 tokens per micro-batch per GPU. A step of 4 x 4 x 1280 = 20,480 tokens: 1 micro-batch."""
    cfg = make_cfg()
    lm = memory_report(cfg, workload_lengths(cfg.workload)).learner
    assert lm.states_gb == pytest.approx(121.92) and lm.states_per_gpu_gb == pytest.approx(15.24)
    assert activation_bytes_per_token(Q7) == 945_152 == lm.activation_bytes_per_token
    assert activation_bytes_per_token(Q7, checkpointing=False) == 28 * 34 * 3584 + 4 * 3584 + 4 * 152064 == 4_034_560
    assert lm.max_micro_tokens == lm.micro_tokens == 60_053
    assert lm.step_tokens == 20_480 and lm.micro_batches == 1 and lm.feasible
    # per GPU: 15.24 GB states + 60,053 tokens x 945,152 B = 72.0 GB, within the 72 GB usable
    assert 15.24 + 60_053 * 945_152 / 1e9 <= 72.0 < 15.24 + 60_054 * 945_152 / 1e9
    assert lm.micro_batches_for(10 * 8 * 60_053) == 10 and lm.micro_batches_for(10 * 8 * 60_053 + 1) == 11


def test_learner_that_does_not_fit_says_why():
    cfg = make_cfg(learner_gpus=1)  # 121.92 GB of states on one 80 GB GPU
    report = memory_report(cfg, workload_lengths(cfg.workload))
    assert report.rollout.feasible and not report.feasible and report.learner.max_micro_tokens == 0
    assert report.reason == ("learner: states 121.9 GB per GPU (16 B/param, bf16_mixed adamw, 121.9 GB over 1 GPU) + "
                             "activations of one 4,352-token sequence 4.1 GB > 72.0 GB usable per GPU on H100-SXM "
                             "(learner_memory_utilization 0.9 x 80 GB)")
    small = make_cfg(memory={"micro_batch_tokens": 1000})
    assert "micro_batch_tokens 1,000 cannot hold the longest sequence, 4,352 tokens" in \
        memory_report(small, workload_lengths(small.workload)).reason


def test_a_32b_policy_does_not_fit_one_h100():
    """Weights 65.6 GB + reserve 3 GB + one group of 4 sequences of 4,352 tokens at 262,144 B (4.6 GB) > 72 GB; on
    two GPUs the worker has 144 GB."""
    cfg = make_cfg("qwen2.5-32b", learner_gpus=16)
    lengths = workload_lengths(cfg.workload)
    one = memory_report(cfg, lengths).rollout
    assert one.problem == ("rollout worker: weights 65.6 GB + reserve 3.0 GB + minimum KV 4.6 GB (one group: 4 "
                           "sequences of 4,352 tokens at 262,144 B/token) > 72.0 GB usable on H100-SXM "
                           "(gpu_memory_utilization 0.9 x 80 GB)")
    two = memory_report(cfg, lengths, tp=2).rollout
    assert two.feasible and two.kv_budget_gb == pytest.approx(144 - 65.6 - 6)


def test_heads_must_divide_over_tp():
    cfg = make_cfg(gpus_per_worker=8)  # 28 attention heads
    assert "its 28 attention heads do not divide over TP 8" in memory_report(cfg, workload_lengths(cfg.workload)).reason


def test_colocated_sides_share_the_pool():
    lengths = Lengths(256, 256, 1024, 4096, 4, 4)
    cfg = make_cfg("qwen2.5-0.5b", rollout_workers=1, learner_gpus=1, colocated=True)
    report = memory_report(cfg, lengths)
    learner_min = 16 * 0.494e9 + 4352 * activation_bytes_per_token(MODELS["qwen2.5-0.5b"])
    assert report.feasible and report.rollout.usable_gb == pytest.approx((72e9 - learner_min) / 1e9)
    rollout_min = 2 * 0.494e9 + 3e9 + 4 * 4352 * 12_288
    assert report.learner.usable_gb == pytest.approx((72e9 - rollout_min) / 1e9)
    assert not memory_report(make_cfg(rollout_workers=1, learner_gpus=1, colocated=True), lengths).feasible


def test_workload_lengths():
    wl = make_cfg().workload
    assert workload_lengths(wl) == Lengths(256.0, 256, 1024.0, 4096, 4, 4)
    data = make_cfg().model_dump()
    data["workload"].update(prompt_len={"kind": "exponential", "mean": 10},
                            response_len={"kind": "lognormal", "median": 500, "p99": 8000}, max_new_tokens=2000)
    lengths = workload_lengths(parse_config(data).workload)
    assert lengths.prompt_long == math.ceil(10 * math.log(100))  # 47
    q = math.exp(-1 / 10)
    assert lengths.prompt_mean == pytest.approx(1 / (1 - q))  # mean of ceil(Exp(10))
    rng = np.random.default_rng(0)
    sigma = math.log(16) / 2.3263478740408408
    draws = np.minimum(rng.lognormal(math.log(500), sigma, 400_000), 2000)
    assert lengths.response_mean == pytest.approx(draws.mean(), rel=0.01)


# --------------------------------------------------------------------------- tensor parallelism in the cost model
def old_analytic_decode(cfg):
    """The decode table as it was before tensor-parallel communication (a copy of the old code)."""
    hw, cl, eff = cfg.hardware, cfg.cluster, cfg.hardware.efficiency
    gpu, m = GPUS[hw.gpu], MODELS[hw.model]
    tp, peak = cl.gpus_per_worker, gpu.bf16_tflops * 1e12
    mem_bw = tp * gpu.hbm_gbps * 1e9 * eff.decode_mem
    flops = tp * peak * eff.decode_compute
    n = np.maximum(np.arange(cl.max_concurrency + 1), 1).astype(np.float64)
    a_mem, b_mem = m.weight_bytes() / mem_bw, m.kv_bytes_per_token() / mem_bw
    a_comp, b_comp = 2 * m.params * n / flops, m.attn_flops_per_ctx_token / flops
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = (a_comp - a_mem) / (b_mem - b_comp)
    xc = np.where(np.isfinite(xc) & (xc > 0), xc, 1.0)
    x = np.column_stack([np.zeros_like(xc), xc, 2 * xc])
    return x, eff.decode_step_overhead_s + np.maximum(a_mem + b_mem * x, a_comp[:, None] + b_comp * x)


@pytest.mark.parametrize("model", ["qwen2.5-0.5b", "qwen2.5-7b", "llama3.1-70b"])
def test_tp1_costs_are_exactly_the_old_ones(model):
    cfg = make_cfg(model, max_concurrency=64)
    cost = build_cost_model(cfg)
    x, y = old_analytic_decode(cfg)
    assert np.array_equal(cost.decode_table()[0], x) and np.array_equal(cost.decode_table()[1], y)
    m, peak = MODELS[model], 989e12
    p = 300
    assert cost.prefill_s(p) == (2.0 * m.params * p + m.attn_flops_per_ctx_token * p * (p + 1.0) / 2.0) / (peak * 0.5)
    assert cost.train_s(50_000) == 6 * m.params * 50_000 / (8 * peak * 0.4) + 1.0


def test_tp2_halves_the_weight_read_and_adds_the_allreduce():
    """n = 1, x = 0: weight-read bound (2 x 7.62e9 B at 0.8 x 3,350 GB/s: 5.69 ms at TP 1). At TP 2 the read
    halves and 2 all-reduces per layer are added: 56 x (8 us + 2(2-1)/2 x 1 x 3584 x 2 B / (0.13 x 450 GB/s))."""
    one, two = (build_cost_model(make_cfg(gpus_per_worker=tp)) for tp in (1, 2))
    read = Q7.params * 2 / (3350e9 * 0.8)
    assert one.decode_step_s(1, 0) == pytest.approx(0.004 + read, rel=1e-12)
    allreduce = 2 * 28 * (8e-6 + 1 * 3584 * 2 / (0.13 * 450e9))
    assert two.decode_step_s(1, 0) == pytest.approx(0.004 + read / 2 + allreduce, rel=1e-12)
    # at 64 sequences the all-reduce bytes grow with the tokens of the step
    n, x = 16, 16 * 2000
    allreduce_n = 2 * 28 * (8e-6 + n * 3584 * 2 / (0.13 * 450e9))
    mem = (Q7.params * 2 + 57_344 * x) / (2 * 3350e9 * 0.8)
    assert two.decode_step_s(n, x) == pytest.approx(0.004 + mem + allreduce_n, rel=1e-12)
    # prefill: the FLOPs over 2 GPUs plus the all-reduce bytes of its p tokens
    p = 512
    flops = (2 * Q7.params * p + Q7.attn_flops_per_ctx_token * p * (p + 1) / 2) / (2 * 989e12 * 0.5)
    assert two.prefill_s(p) == pytest.approx(flops + 2 * 28 * p * 3584 * 2 / (0.13 * 450e9), rel=1e-12)


def test_tp_beyond_the_kv_heads_reads_the_replicated_kv():
    """qwen2.5-7b at TP 8 (not a vLLM shape, 28 heads; the cost model still prices it): each GPU reads one kv head
    per layer, 28 x 2 x 128 x 2 = 14,336 B per token, twice the even split of 57,344 B."""
    cost = build_cost_model(make_cfg(gpus_per_worker=8))
    x0, x1 = 1e6, 2e6
    slope = (cost.decode_step_s(1, x1) - cost.decode_step_s(1, x0)) / (x1 - x0)
    assert slope == pytest.approx(14_336 / (3350e9 * 0.8), rel=1e-9)


def test_micro_batches_cost_their_overhead():
    """7B on 8 GPUs with micro-batches of at most 60,053 tokens per GPU: 1,000,000 tokens need
    ceil(1e6 / (8 x 60,053)) = 3 micro-batches, 2 beyond the first at 0.25 s."""
    base = build_cost_model(make_cfg())
    cost = build_cost_model(make_cfg(efficiency={"micro_batch_overhead_s": 0.25}))
    assert cost.train_s(1_000_000) == pytest.approx(base.train_s(1_000_000) + 2 * 0.25, rel=1e-12)
    assert cost.train_s(8 * 60_053) == base.train_s(8 * 60_053)  # exactly one micro-batch
    given = build_cost_model(make_cfg(memory={"micro_batch_tokens": 10_000}, efficiency={"micro_batch_overhead_s": 1}))
    assert given.train_s(1_000_000) == pytest.approx(base.train_s(1_000_000) + 12, rel=1e-12)  # 13 micro-batches


# --------------------------------------------------------------------------- the commands
BIG = {"name": "big", "seed": 0,
       "workload": {"batch_prompts": 2, "group_size": 4, "prompt_len": {"kind": "constant", "value": 256},
                    "response_len": {"kind": "constant", "value": 64}, "max_new_tokens": 4096},
       "cluster": {"rollout_workers": 2, "max_concurrency": 8, "learner_gpus": 14},
       "pipeline": {"mode": "async", "max_staleness": 1},
       "hardware": {"gpu": "H100-SXM", "model": "qwen2.5-32b"}, "run": {"steps": 2}}


def test_simulate_refuses_what_does_not_fit_unless_allowed(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(BIG))
    out = tmp_path / "out"
    assert main(["simulate", str(path), "--out", str(out), "--no-sync-baseline"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "does not fit in GPU memory: rollout worker: weights 65.6 GB" in err
    assert "> 72.0 GB usable on H100-SXM" in err and "--allow-infeasible" in err and not out.exists()
    assert main(["simulate", str(path), "--out", str(out), "--no-sync-baseline", "--allow-infeasible"]) == 0
    printed = capsys.readouterr().out
    assert "warning: the configuration does not fit in GPU memory" in printed
    memory = json.loads((out / "metrics.json").read_text())["memory"]
    assert memory["feasible"] is False and memory["reason"].startswith("rollout worker: weights 65.6 GB")
    data = copy.deepcopy(BIG)
    data["cluster"]["gpus_per_worker"] = 2  # two 2-GPU workers, 14 learner GPUs: fits
    path.write_text(yaml.safe_dump(data))
    assert main(["simulate", str(path), "--out", str(out), "--no-sync-baseline", "--force"]) == 0
    assert "memory: rollout worker (TP 2 on H100-SXM)" in capsys.readouterr().out


def test_plan_proposes_tp_when_one_gpu_cannot_hold_the_policy(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(BIG))
    out = tmp_path / "plan"
    assert main(["plan", str(path), "--gpus", "16", "--bounds", "1", "--steps", "3", "--coarse", "2", "--refine", "1",
                 "--jobs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    plan = pd.read_csv(out / "plan.csv")
    top = plan[plan["rank"] == 1].iloc[0]
    assert top["tp"] >= 2 and top["learner_gpus"] >= 8  # 525 GB of learner states need 8 GPUs
    excluded = plan[plan["status"] == "infeasible"]
    assert set(excluded.loc[excluded["tp"] == 1, "rollout_workers"]) == set(range(1, 16))  # every TP-1 split
    assert excluded.loc[excluded["tp"] == 1, "memory"].str.startswith("rollout worker: weights 65.6 GB").all()
    assert excluded.loc[excluded["tp"] == 2, "memory"].str.startswith("learner: states").all()
    assert set(excluded.loc[excluded["tp"] == 2, "rollout_workers"]) == {5, 6, 7}  # 6, 4 or 2 learner GPUs
    assert not (excluded["feasible"]).any() and excluded["rank"].isna().all()
    simulated = plan[plan["status"] == "ok"]
    assert not set(zip(simulated["tp"], simulated["rollout_workers"])) & set(zip(excluded["tp"],
                                                                                  excluded["rollout_workers"]))
    assert "1, 2, 4 and 8 GPUs per worker were searched" in printed
    assert "Left out (GPU memory), 1 GPU(s) per worker, every split: rollout worker: weights 65.6 GB" in printed
    assert "Left out (GPU memory), 2 GPU(s) per worker, 5-7 workers (2-6 learner GPUs): learner: states" in printed
    assert "Left out (GPU memory)" in (out / "plan.md").read_text()


def test_help_config_lists_the_memory_fields(capsys):
    from sim.config import Efficiency, Memory

    assert main(["simulate", "--help-config"]) == 0
    lines = {line.strip() for line in capsys.readouterr().out.splitlines()}
    for name, field in [*Memory.model_fields.items(), *((k, Efficiency.model_fields[k])
                                                        for k in ("tp_allreduce", "micro_batch_overhead_s"))]:
        assert f"{name}: {field.description}" in lines, name
    assert any(line.startswith("memory: GPU memory") for line in lines)
