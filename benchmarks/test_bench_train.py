"""Async against sync on the real trainer: the tiny CPU example in both modes, in one run (not part of the
default test run).

    pytest benchmarks/test_bench_train.py --benchmark-only -s

Each mode is run `ROUNDS` times, alternating, so both see the same machine; the ratio of the median seconds
per learner step (sync over async) is printed and stored in the benchmark's extra_info.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from real.trainer import Trainer
from sim.config import load_config

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny_cpu.yaml"
ROUNDS = 3


def test_async_is_faster_per_learner_step_than_sync(benchmark, tmp_path):
    def both_modes():
        per_step = {"sync": [], "async": []}
        for r in range(ROUNDS):
            for mode in per_step:
                cfg = load_config(TINY, {"pipeline.mode": mode})
                res = Trainer(cfg, tmp_path / f"{mode}{r}", timeout_s=600).run()
                per_step[mode].append(res.metrics["time/step_s"])
        return per_step

    per_step = benchmark.pedantic(both_modes, rounds=1, iterations=1)
    sync_s, async_s = (float(np.median(per_step[m])) for m in ("sync", "async"))
    benchmark.extra_info.update({"sync_step_s": per_step["sync"], "async_step_s": per_step["async"],
                                 "speedup": sync_s / async_s})
    print(f"\nseconds per learner step, median of {ROUNDS}: sync {sync_s:.3f}, async {async_s:.3f}; "
          f"async is {sync_s / async_s:.2f}x faster")
    assert async_s < sync_s
