"""Peak memory of the whole `stalecast simulate` command on a 1024-GPU cluster (not part of the default test run).

    pytest benchmarks/test_bench_memory.py --benchmark-only

The issue's bar: a 1024-GPU, 1,000-step simulation (about 41 million rollouts) must not need more than 4 GB, its
trace written, metrics.json and the figure included. The 64-GPU example scaled up: 512 rollout workers, 512 learner
GPUs, 2,560 prompts x 16 samples per learner step. The command runs in a fresh subprocess, which reports its own
peak resident memory, so earlier tests don't count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLUSTER = Path(__file__).resolve().parents[1] / "examples" / "cluster_7b_64xh100.yaml"
SCALE = ["--set", "cluster.rollout_workers=512", "--set", "cluster.learner_gpus=512",
         "--set", "workload.batch_prompts=2560", "--steps", "1000"]
LIMIT_BYTES = 4_000_000_000

_PEAK_SCRIPT = """
import json, resource, sys, time
from sim.cli import main
t = time.perf_counter(); rc = main(sys.argv[1:]); seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
print(json.dumps({"rc": rc, "seconds": seconds, "peak_bytes": peak}))
"""


@pytest.mark.parametrize("baseline", [False, True], ids=["no-sync-baseline", "sync-baseline"])
def test_simulate_1024_gpus_1000_steps_peak_memory(benchmark, tmp_path, baseline):
    out = tmp_path / "out"
    args = ["simulate", str(CLUSTER), *SCALE, "--out", str(out), *([] if baseline else ["--no-sync-baseline"])]

    def run():
        return subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, *args], capture_output=True, text=True, check=True)

    result = json.loads(benchmark.pedantic(run, rounds=1, iterations=1).stdout.strip().splitlines()[-1])
    benchmark.extra_info.update(result)
    assert result["rc"] == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    rollouts = metrics["samples/generated"] + metrics["samples/in_flight"]
    assert rollouts >= 1000 * 2560 * 16

    import pyarrow.parquet as pq
    assert pq.read_metadata(out / "trace" / "samples.parquet").num_rows == rollouts
    assert (out / "staleness.png").is_file()
    assert result["peak_bytes"] < LIMIT_BYTES
