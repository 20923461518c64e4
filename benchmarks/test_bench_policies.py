"""Every staleness-control policy on the 64-GPU what-if (not part of the default test run):

    pytest benchmarks/test_bench_policies.py --benchmark-only

The bar: 1,000 learner steps inside the simulator in under 5 s, and `stalecast plan` on the 64-GPU example in
under 20 s, whatever the policy (each at the matched bound of `stalecast study policies`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.config import load_config
from sim.engine.pipeline import Simulation
from sim.engine.policies import POLICIES
from studies.named import matched_policy

CLUSTER = Path(__file__).resolve().parents[1] / "examples" / "cluster_7b_64xh100.yaml"


def _cfg(policy: str, steps: int):
    base = load_config(CLUSTER, {"run.steps": steps})
    return base.with_overrides(matched_policy(policy, base.pipeline.max_staleness, base.workload.batch_prompts))


@pytest.mark.parametrize("policy", list(POLICIES))
def test_cluster_1000_steps_per_policy(benchmark, policy):
    Simulation(_cfg(policy, 2)).run_to_end()  # compile / load the kernel cache outside the timing
    cfg = _cfg(policy, 1000)
    sim = benchmark.pedantic(lambda: _run(cfg), rounds=1, iterations=1)
    assert len(sim.steps) == 1000
    assert benchmark.stats.stats.max < 5.0


def _run(cfg):
    sim = Simulation(cfg)
    sim.run_to_end()
    return sim


@pytest.mark.parametrize("policy", list(POLICIES))
def test_plan_per_policy(benchmark, policy, tmp_path):
    from studies.plan import PlanSpec, plan
    from studies.sweep import Backend

    cfg = _cfg(policy, 40)
    with Backend(jobs=2) as backend:
        result = benchmark.pedantic(lambda: plan(PlanSpec(), cfg, tmp_path / policy, backend), rounds=1,
                                    iterations=1)
    assert result.best is not None
    assert benchmark.stats.stats.max < 20.0
