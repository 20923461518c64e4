"""A cell's in-run costs against its profile (validate/costs.py) recomputed with the current code from the run
folders the cell kept (git ignores them): for reports written before a fix to that diagnostic.

    python3 results/validate-tiny-cpu/costs_now.py continuous-w3-s4 [--set KEY=VALUE ...]

The cell's config is the one its first measured run trained with (its run folder's config.yaml: the example and
the overrides of the cell's script); --set overrides go on top.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from real.runfolder import RunFolder  # noqa: E402
from sim.trace import read_trace  # noqa: E402
from validate.costs import costs_table, in_run_costs  # noqa: E402
from validate.loop import SYNC, end_to_end, prediction_config, run_dir  # noqa: E402


def read_cell(argv: list[str]):
    """(the cell's folder, its config, the config its prediction used) from `NAME [--set KEY=VALUE ...]`."""
    name, rest = argv[0], argv[1:]
    overrides = dict(pair.split("=", 1) for flag, pair in zip(rest[::2], rest[1::2]) if flag == "--set")
    cell = HERE / name
    first = RunFolder(cell / run_dir("measured", 0))
    if not (first.path / "config.yaml").is_file():
        sys.exit(f"{first.path}: missing (the script that drew the cell leaves its run folders; git does not keep "
                 "them)")
    cfg = first.read_config().with_overrides(overrides)
    return cell, cfg, prediction_config(cfg, cell / "profile.yaml")


def main(argv: list[str]) -> None:
    cell, cfg, pred = read_cell(argv)
    costs = {}
    for mode_cfg, kind in ((pred, "measured"), (pred.with_overrides(SYNC), "measured_sync")):
        folders = [RunFolder(cell / run_dir(kind, r)) for r in range(3) if (cell / run_dir(kind, r)).is_dir()]
        if not folders:
            sys.exit(f"{cell}: no {kind}/ run folder (the script that drew the cell leaves them; git does not keep "
                     "them)")
        runs = [(read_trace(f.trace_dir), f.read_engine_steps()) for f in folders]
        label = f"{mode_cfg.pipeline.mode} ({', '.join(f.path.name + '/' for f in folders)})"
        costs[label] = in_run_costs(mode_cfg, end_to_end([t for t, _ in runs]), runs,
                                    cfg.cluster.batching == "static")
    print("\n".join(costs_table(costs)))


if __name__ == "__main__":
    main(sys.argv[1:])
