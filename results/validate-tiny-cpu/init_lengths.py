"""How much a run's answer lengths depend on its starting policy: `stalecast train` on the long-tail example
(100 steps, async) for seeds 1-4, each once from its own seed's policy and once from one shared policy
(real.init_seed=0), then the mean length and the share of answers at the 48-token cap of each run.

    python3 results/validate-tiny-cpu/init_lengths.py OUT_DIR   (from the repo root; ~20 minutes on 2 cores)

Runs already in OUT_DIR (a summary.json) are read, not run again; an unfinished one is run again (stalecast
replaces a folder it wrote, and refuses one it did not).
"""
import subprocess
import sys
from pathlib import Path

import numpy as np

from sim.trace import read_trace

CONFIG, CAP = "examples/tiny_cpu_longtail.yaml", 48
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
print("| seed | start | samples | mean length | median | share at the cap |\n|---|---|---:|---:|---:|---:|")
for seed in (1, 2, 3, 4):
    for start, sets in (("own", []), ("shared", ["--set", "real.init_seed=0"])):
        run = out / f"{start}-{seed}"
        if not (run / "summary.json").exists():
            subprocess.run(["stalecast", "train", CONFIG, "--set", "run.steps=100", "--set", f"seed={seed}", *sets,
                            "--out", str(run)], check=True, stdout=subprocess.DEVNULL)
        lengths = read_trace(run / "trace").samples["response_len"].to_numpy()
        print(f"| {seed} | {start} | {len(lengths)} | {lengths.mean():.2f} | {np.median(lengths):.0f} | "
              f"{np.mean(lengths >= CAP):.1%} |")
