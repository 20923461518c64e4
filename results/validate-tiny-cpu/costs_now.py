"""A cell's in-run costs against its profile (validate/costs.py) recomputed with the current code from the run
folders the cell kept (git ignores them): for reports written before a fix to that diagnostic.

    python3 results/validate-tiny-cpu/costs_now.py continuous-w3-s4 [CONFIG] [--set KEY=VALUE ...]

CONFIG defaults to examples/tiny_cpu_longtail.yaml; the overrides are the cell's (as in its script).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from real.runfolder import RunFolder  # noqa: E402
from sim.config import load_config  # noqa: E402
from sim.hardware.cost import cost_model_for  # noqa: E402
from sim.metrics import generating_beside, rollout_idle  # noqa: E402
from validate.costs import cost_ratios, costs_table  # noqa: E402
from validate.loop import end_to_end, prediction_config, run_dir  # noqa: E402


def main(argv: list[str]) -> None:
    name, rest = argv[0], argv[1:]
    config = rest.pop(0) if rest and not rest[0].startswith("--") else "examples/tiny_cpu_longtail.yaml"
    overrides = dict(pair.split("=", 1) for flag, pair in zip(rest[::2], rest[1::2]) if flag == "--set")
    cell = HERE / name
    cfg = load_config(HERE.parents[1] / config, overrides)
    pred = prediction_config(cfg, cell / "profile.yaml")
    static = cfg.cluster.batching == "static"
    costs = {}
    for mode, kind in ((cfg.pipeline.mode, "measured"), ("sync", "measured_sync")):
        folders = [RunFolder(cell / run_dir(kind, r)) for r in range(3) if (cell / run_dir(kind, r)).is_dir()]
        if not folders:
            sys.exit(f"{cell}: no {kind}/ run folder (the script that drew the cell leaves them; git does not keep "
                     "them)")
        runs = [(folder_trace(f), f.read_engine_steps()) for f in folders]
        together = end_to_end([t for t, _ in runs])
        mode_cfg = pred if mode != "sync" else pred.with_overrides({"pipeline.mode": "sync",
                                                                    "pipeline.interruptible": False})
        beside = generating_beside(together) if mode == "sync" else None
        cost = cost_model_for(mode_cfg, rollout_idle(together), beside)
        costs[f"{mode} ({', '.join(f.path.name + '/' for f in folders)})"] = cost_ratios(together, cost, static, runs)
    print("\n".join(costs_table(costs)))


def folder_trace(folder: RunFolder):
    from sim.trace import read_trace

    return read_trace(folder.trace_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
