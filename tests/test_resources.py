"""Bounded resources: sizes checked before anything large is allocated, and large traces streamed to disk."""

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from sim import resources
from sim.cli import main
from sim.config import ConfigError, load_config, parse_config
from sim.engine.pipeline import SampleTable, Simulation
from sim.metrics import METRIC_COLUMNS, compute_metrics, staleness_histogram
from sim.report import FIGURE_COLUMNS
from sim.trace import SAMPLE_COLUMNS, read_trace

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CLUSTER, TINY = EXAMPLES / "cluster_7b_64xh100.yaml", EXAMPLES / "tiny_cpu.yaml"
HELD = tuple(c for c in SAMPLE_COLUMNS if c in {*METRIC_COLUMNS, *FIGURE_COLUMNS})


# --------------------------------------------------------------------------- the simulation's memory
def test_estimate_by_hand(config_data):
    cfg = parse_config(config_data)  # B=2 prompts x g=2 samples, S=1, 2 workers x 4 slots, 3 steps
    groups = (3 + 1 + 2) * 2 + 2 * (4 // 2)  # consumed + in flight under the bound, and a full batch per worker
    ledger_group = 4 + 8 + 8 + 8 + 4 + 4 + 4 + 1 + 4 + 8 + 8  # worker, 3 times, 3 versions/step, dropped, workload
    ledger_sample = 8 + 4 + 8 + 4 + 4  # t_end, version_end, version_mean, response_len, preemptions
    workload_group, workload_sample = 8 + 8, 8  # the stream's int64 prompt length, token total; response length
    engine_group = 8
    all_columns = 8 + 8 + 4 + 4 + 8 + 8 + 8 + 4 + 4 + 4 + 1 + 4  # every sample column but the ledger's views
    metrics_sample = 16
    slots = 2 * (4 * 22 * 8 + 2 * 1024 * 8)  # 15 slot rows, its 2 float rows, 4 group rows, a done entry
    expected = (groups * (ledger_group + workload_group + engine_group)
                + groups * 2 * (ledger_sample + workload_sample + all_columns + metrics_sample) + 3 * 512 + slots)
    assert resources.simulation_footprint(cfg).total == expected
    # Held columns that are views of the ledger cost nothing more; others their dtype's size per sample.
    views = ("response_len", "t_end", "version_end", "version_mean", "preemptions")
    assert resources.simulation_footprint(cfg, views).total == expected - groups * 2 * all_columns
    assert (resources.simulation_footprint(cfg, ("group_id", "dropped")).total
            == expected - groups * 2 * (all_columns - 8 - 1))
    # Multi-turn: per sample and turn, the ledger's length, tool tokens (int32) and seconds, and the stream's copies
    # (int64, int64, float64).
    turns = parse_config({**config_data, "workload": {**config_data["workload"], "turns": {"count": 3, "env_s": 1.0}}})
    assert resources.simulation_footprint(turns).total == expected + groups * 2 * 3 * (4 + 4 + 8 + 24)
    # The estimate counts the groups the Simulation makes room for (it rounds up to whole workload blocks).
    sim = Simulation(cfg)
    block = sim.stream.BLOCK
    assert len(sim.g_worker) == (groups // block + 2) * block and resources.ledger_groups(cfg) == groups


def test_refusal_names_how_many_steps_fit():
    cfg = load_config(CLUSTER, {"run.steps": 1000})
    fits = resources.simulation_footprint(load_config(CLUSTER, {"run.steps": 100})).total
    assert resources.check_simulation_memory(cfg, available=10 * fits).total > fits
    need, have = (re.escape(resources.format_bytes(n)) for n in (resources.simulation_footprint(cfg).total, fits))
    with pytest.raises(ConfigError, match=rf"^run\.steps: 1000 learner steps x 512 prompts x 16 samples would need "
                                          rf"about {need} for the simulation .*; this machine has {have} available, "
                                          rf"enough for about 100 steps \(lower run\.steps: "):
        resources.check_simulation_memory(cfg, available=fits)
    with pytest.raises(ConfigError, match=r"^pipeline\.max_staleness: 512 prompts x 16 samples per learner step, "
                                          r"pipeline\.max_staleness 1000000 .* even for one learner step"):
        resources.check_simulation_memory(load_config(CLUSTER, {"pipeline.max_staleness": 10**6}), available=fits)


@pytest.mark.parametrize("override, field, what", [
    (["--steps", "1000000000000"], "run.steps", "1000000000000 learner steps x 512 prompts x 16 samples"),
    (["--set", "run.steps=1.0e+12"], "run.steps", "1000000000000 learner steps x 512 prompts x 16 samples"),
    (["--set", "workload.batch_prompts=1000000000"], "workload.batch_prompts",
     "1000000000 prompts x 16 samples per learner step, pipeline.max_staleness 2"),
    (["--set", "cluster.rollout_workers=100000000"], "cluster.rollout_workers",
     "100000000 rollout workers x 256 sequences in flight"),
])
def test_simulate_refuses_what_does_not_fit(tmp_path, capsys, override, field, what):
    out = tmp_path / "out"
    assert main(["simulate", str(CLUSTER), *override, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {field}: {what}"), err
    assert " would need about " in err[0] and " available" in err[0] and f"lower {field}" in err[0]
    assert not out.exists()


# --------------------------------------------------------------------------- streaming the trace
@pytest.mark.parametrize("config, overrides", [
    (CLUSTER, {"run.steps": 6, "cluster.rollout_workers": 4}),  # the compiled engine
    (CLUSTER, {"run.steps": 6, "cluster.rollout_workers": 4, "pipeline.interruptible": True,
               "pipeline.staleness_control": "drop"}),
    (TINY, {"run.steps": 5}),  # static batching: the SimPy engine
])
def test_streamed_trace_is_the_in_memory_one(tmp_path, monkeypatch, config, overrides):
    cfg = load_config(config, overrides)
    whole = Simulation(cfg).run()
    monkeypatch.setattr(SampleTable, "CHUNK_GROUPS", 7)  # several chunks, the last one short
    streamed = Simulation(cfg, trace_columns=HELD).run()
    assert list(streamed.samples.columns) == list(HELD) and streamed.sample_chunks is not None
    assert whole.sample_chunks is None
    pd.testing.assert_frame_equal(streamed.samples, whole.samples[list(HELD)])
    assert compute_metrics(streamed, 1.0) == compute_metrics(whole, 1.0)
    assert staleness_histogram(streamed.samples) == staleness_histogram(whole.samples)

    for fmt in ("parquet", "csv"):
        whole.write(tmp_path / f"whole-{fmt}", fmt)
        streamed.write(tmp_path / f"streamed-{fmt}", fmt)
        a, b = read_trace(tmp_path / f"whole-{fmt}"), read_trace(tmp_path / f"streamed-{fmt}")
        pd.testing.assert_frame_equal(a.samples, b.samples)
        pd.testing.assert_frame_equal(a.steps, b.steps)
        assert compute_metrics(a) == compute_metrics(b) == compute_metrics(whole)
    assert len(whole.samples) > 7 * cfg.workload.group_size  # more than one chunk was written
    # CSV chunks append to the same bytes; Parquet has a row group per chunk, the same table
    assert (tmp_path / "whole-csv/samples.csv").read_bytes() == (tmp_path / "streamed-csv/samples.csv").read_bytes()
    import pyarrow.parquet as pq
    groups = -(-len(whole.samples) // (7 * cfg.workload.group_size))
    assert pq.ParquetFile(tmp_path / "streamed-parquet/samples.parquet").num_row_groups == groups


def test_simulate_command_reports_the_in_memory_numbers(tmp_path):
    """`stalecast simulate` streams its trace and runs the sync baseline first: the same trace and numbers as
    simulating in memory."""
    out = tmp_path / "out"
    assert main(["simulate", str(CLUSTER), "--steps", "6", "--set", "cluster.rollout_workers=4", "--sync-steps", "3",
                 "--out", str(out)]) == 0
    cfg = load_config(CLUSTER, {"run.steps": 6, "cluster.rollout_workers": 4})
    sync = compute_metrics(Simulation(cfg.with_overrides({"pipeline.mode": "sync", "pipeline.interruptible": False,
                                                          "run.steps": 3})).run())
    trace = Simulation(cfg).run()
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["sync_baseline"] == sync
    assert payload["metrics"] == compute_metrics(trace, sync_step_s=sync["time/step_s"])
    assert payload["staleness_histogram"] == {str(k): v for k, v in staleness_histogram(trace.samples).items()}
    pd.testing.assert_frame_equal(read_trace(out / "trace").samples, trace.samples)


def test_failed_streamed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    trace = Simulation(load_config(CLUSTER, {"run.steps": 3, "cluster.rollout_workers": 4}), trace_columns=HELD).run()
    monkeypatch.setattr(SampleTable, "CHUNK_GROUPS", 5)
    chunks = trace.sample_chunks

    def fail_after_two():
        for i, frame in enumerate(chunks()):
            if i == 2:
                raise OSError("disk full")
            yield frame
    trace.sample_chunks = fail_after_two
    with pytest.raises(OSError, match="disk full"):
        trace.write(tmp_path / "trace")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the trainer's shared memory
class _Statvfs:
    def __init__(self, free: int):
        self.f_bavail, self.f_frsize = free // 4096, 4096


def test_shared_memory_estimate_by_hand(config_data):
    config_data["real"] = {"dtype": "bfloat16"}
    cfg = parse_config(config_data)  # 3 steps, 2 workers
    need = resources.shared_memory_footprint(cfg, n_params=1000)
    assert (need.weights, need.ledger) == (3 * 1000 * 2, 8 * (1 + 2 + 4 * 2))  # S = 1: a ring of 3 versions


def test_shared_memory_check_refuses_what_does_not_fit(monkeypatch, config_data):
    monkeypatch.setattr(os, "statvfs", lambda path: _Statvfs(64 << 20))  # a 64 MiB /dev/shm
    cfg = parse_config(config_data)
    assert resources.check_shared_memory(cfg, n_params=1_000_000).total == 3 * 4_000_000 + 8 * (1 + 2 + 8)
    with pytest.raises(ConfigError, match=r"^real\.model: 3 weight slots of 10,000,000 float32 parameters would need "
                                          r"114 MiB of shared memory; /dev/shm has 64\.0 MiB free \(a smaller "
                                          r"real\.model, real\.dtype bfloat16"):
        resources.check_shared_memory(cfg, n_params=10_000_000)
    config_data["real"] = {"dtype": "bfloat16"}  # half the bytes: 57.2 MiB fits
    assert resources.check_shared_memory(parse_config(config_data), n_params=10_000_000).weights == 60_000_000
    config_data["run"]["steps"] = 10_000_000  # the run's length does not enter shared memory
    assert resources.check_shared_memory(parse_config(config_data), n_params=1000).ledger == 8 * (1 + 2 + 8)


def test_available_memory_reads_the_machine():
    free = resources.available_memory()
    assert 0 < free <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert resources.format_bytes(1023) == "1023 B" and resources.format_bytes(21.3 * 2 ** 30) == "21.3 GiB"
    assert resources.format_bytes(58 * 2 ** 40) == "58.0 TiB" and resources.format_bytes(2 ** 70) == "1,024 EiB"
