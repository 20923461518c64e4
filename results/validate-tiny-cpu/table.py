"""Markdown tables from validate reports: predicted / measured (error) for the judged numbers; the in-run costs
against the profile (post hoc); and the measured runs one by one (the machine's and the seeds' repeatability: the
two cells with one worker count share their sync runs' configs, as a sync pipeline has no staleness bound).

    python3 table.py                   the static-batching cells (w*-s*, policy-*) of the README's table
    python3 table.py 'continuous-*'    the continuous-batching cells, with the staleness distribution's W1 and the
                                       measured staleness values beside
    python3 table.py 'per-sample-*'    the long-tail cell admitted by sample, likewise
    python3 table.py 'shared-init-*'   the long-tail cell with every run starting from one policy, likewise
    python3 table.py 'kv*'             the small-KV-budget cell (kv-w1-s4-160: 160 KV tokens a worker) and the same
                                       cell without a budget (kvbase-w1-s4), with W1 and the share of samples evicted
"""
import json
import re
import sys
from pathlib import Path


HERE = Path(__file__).parent
METRICS = [("staleness/mean", "mean staleness"), ("staleness/p90", "p90"), ("throughput/samples_per_s", "samples/s"),
           ("speedup/vs_sync", "speedup over sync"), ("time/step_s", "s/step"), ("idle/rollout", "rollout idle")]
patterns = sys.argv[1:] or ["w*-s*", "policy-*"]
distribution = bool(sys.argv[1:])
if distribution:
    METRICS.insert(2, ("staleness/wasserstein1", "W1 (versions)"))
if any(p.startswith("kv") for p in patterns):
    METRICS.insert(3, ("kv/preempted_share", "share evicted"))
cells = [p for pattern in patterns for p in sorted(HERE.glob(f"{pattern}/report.json"))]
reports = {p.parent.name: json.loads(p.read_text()) for p in cells}


def cell(name: str) -> tuple[str, str]:
    """(workers, bound) of a cell: w1-s4 is stalecast's rule; policy-NAME is another system's, one worker;
    continuous-w3-s4 as w3-s4, batching continuously (per-sample-w3-s4: admitting by sample, shared-init-w3-s4: every
    run from one starting policy); kv-w3-s4-400 with a KV budget of 400 tokens a worker."""
    if name.startswith("kv"):  # kv-w1-s4-160: a KV budget of 160 tokens; kvbase-w1-s4: the same cell without one
        w, s, budget = re.fullmatch(r"kv(?:base)?-w(\d+)-s(\d+)-?(\d*)", name).groups()
        return w, f"{s}, KV {budget} tokens" if budget else f"{s}, no KV budget"
    name = name.removeprefix("continuous-").removeprefix("per-sample-").removeprefix("shared-init-")
    return ("1", name.removeprefix("policy-")) if name.startswith("policy-") else tuple(name[1:].split("-s"))

print("| workers | bound (or policy) | " + " | ".join(name for _, name in METRICS) + " | all judged rows pass |")
print("|---|---|" + "---|" * (len(METRICS) + 1))
for name, data in reports.items():
    rows = {r["metric"]: r for r in data["rows"]}
    w, s = cell(name)
    out = []
    for key, _ in METRICS:
        if key not in rows:  # a row the report has not (the evictions of a cell without a KV budget)
            out.append("—")
            continue
        r = rows[key]
        if r["predicted"] is None:  # a distance: one number, judged against its bound
            out.append(f"{r['error']:.3f}{'' if r['ok'] else ' ✗'}")
            continue
        rel = f"{100 * r['rel_error']:+.0f}%" if r["rel_error"] is not None else f"{r['error']:+.2f}"
        out.append(f"{r['predicted']:.3g} / {r['measured']:.3g} ({rel}){'' if r['ok'] else ' ✗'}")
    print(f"| {w} | {s} | " + " | ".join(out) + f" | {'yes' if data.get('verdict', 'PASS' if data['pass'] else 'FAIL') == 'PASS' else 'no'} |")

print()
print("The generation factor the prediction charged (the profile's co-location curve at the idle fraction the "
      "simulated run settled at, and in sync mode beside the mean number of other workers generating, where the "
      "profile measured that curve), and the in-run costs against the profile (post hoc, medians of measured / charged "
      "at the run's own idle fraction); async, sync:")
print()
print("| workers | bound | generation factor charged | learner step, in run | generation batch (static) or decode "
      "step (continuous), in run | busy worker time outside engine steps |")
print("|---|---|---|---|---|---|")
for name, data in reports.items():
    w, s = cell(name)
    runs = list(data["costs"].values())
    note = next(n for n in data["notes"] if n.startswith("generation charged at"))
    charged = ", ".join(f"x{x} at {u} %" + (f" beside {b}" if b else "") for x, u, b in re.findall(
        r"x([0-9.]+) at ([0-9]+) % idle(?:, beside ([0-9.]+) other workers)?", note))
    generation = ", ".join(f"x{c['generation_batch']:.2f}" if c["batches"] or "decode_step" not in c
                           else f"x{c['decode_step']:.2f}" for c in runs)
    outside = ", ".join(f"{c['outside_steps']:.0%}" if "outside_steps" in c else "—" for c in runs)
    print(f"| {w} | {s} | {charged} | " + ", ".join(f"x{c['learner_step']:.2f}" for c in runs)
          + f" | {generation} | {outside} |")

print()
print("The measured runs one by one (each cell's judged numbers are of its 3 runs end to end):")
print()
print("| workers | bound | samples/s, async runs | s/step, sync runs | speedup, pair by pair | largest / smallest async, sync |")
print("|---|---|---|---|---|---|")
for name, data in reports.items():
    w, s = cell(name)
    runs = data.get("runs") or []
    if len(runs) < 2:
        continue
    col = lambda key, fmt: " / ".join(format(r[key], fmt) for r in runs)  # noqa: E731
    spread = lambda key: 100 * (max(r[key] for r in runs) / min(r[key] for r in runs) - 1)  # noqa: E731
    print(f"| {w} | {s} | {col('samples_per_s', '.0f')} | {col('sync_step_s', '.3f')} | "
          f"{col('speedup_vs_sync', '.2f')} | +{spread('samples_per_s'):.0f} %, +{spread('sync_step_s'):.0f} % |")
