"""The co-location factor of a worker's decode steps at several occupancies of its own, timed as `stalecast profile`
times it (real/profile.py `slowdown`: alone, then beside the learner training and the other workers generating full
batches, in alternating blocks), on the long-tail example: does the factor the simulation applies at every
occupancy depend on the worker's own batch? (continuous.md, "Which groups make an async batch").

    python3 results/validate-tiny-cpu/coloc_by_occupancy.py 4 32 4 32   (about 30 s a figure on 2 cores)
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from real.model import LEARNER, build_policy, resolve_device  # noqa: E402
from real.profile import DecodeTimer, _timed, colocation_call, plan_for, slowdown  # noqa: E402
from sim.config import load_config  # noqa: E402


def main(occupancies: list[int]) -> None:
    cfg = load_config(ROOT / "examples" / "tiny_cpu_longtail.yaml", {})
    torch.set_num_threads(1)  # as each process of a run
    device = resolve_device(cfg)
    plan = dataclasses.replace(plan_for(cfg, quick=True), colocation_blocks=3, colocation_warm_s=1.0,
                               colocation_phase_s=1.5)
    model, tok = build_policy(cfg, device)
    model.eval()
    decoder = DecodeTimer(model, tok, cfg, plan.prompt_lengths)
    _, context, steps = colocation_call(cfg, plan)  # the profile's call, but at each occupancy asked for
    others = [("train", LEARNER)] + [("generate", i) for i in range(1, cfg.cluster.rollout_workers)]
    for n in occupancies:
        factor, = slowdown(0, others, cfg, lambda: _timed(lambda: decoder.point(n, context, steps), device), plan)
        print(f"{n} sequences: x{factor:.2f}", flush=True)


if __name__ == "__main__":  # the co-location processes are spawned: they import this file
    main([int(a) for a in sys.argv[1:]])
