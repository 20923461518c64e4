"""Markdown tables from the four validate reports: predicted / measured (error) for the judged numbers; the in-run
costs against the profile (post hoc); and the machine's own repeatability: the two cells with one worker count
share their sync run's config (a sync pipeline has no staleness bound), so their sync runs are one run made twice."""
import json
from pathlib import Path

from sim.metrics import compute_metrics
from sim.trace import read_trace

HERE = Path(__file__).parent
METRICS = [("staleness/mean", "mean staleness"), ("staleness/p90", "p90"), ("throughput/samples_per_s", "samples/s"),
           ("speedup/vs_sync", "speedup over sync"), ("time/step_s", "s/step")]
cells = sorted(HERE.glob("w*-s*/report.json"))
reports = {p.parent.name: json.loads(p.read_text()) for p in cells}

print("| workers | bound | " + " | ".join(name for _, name in METRICS) + " | all judged rows pass |")
print("|---|---|" + "---|" * (len(METRICS) + 1))
for name, data in reports.items():
    rows = {r["metric"]: r for r in data["rows"]}
    w, s = name[1:].split("-s")
    out = []
    for key, _ in METRICS:
        r = rows[key]
        rel = f"{100 * r['rel_error']:+.0f}%" if r["rel_error"] is not None else f"{r['error']:+.2f}"
        out.append(f"{r['predicted']:.3g} / {r['measured']:.3g} ({rel}){'' if r['ok'] else ' ✗'}")
    print(f"| {w} | {s} | " + " | ".join(out) + f" | {'yes' if data['pass'] else 'no'} |")

print()
print("In-run costs against the profile (post hoc, medians of measured / charged; async run, sync run):")
print()
print("| workers | bound | learner step | generation batch |")
print("|---|---|---|---|")
for name, data in reports.items():
    w, s = name[1:].split("-s")
    runs = list(data["costs"].values())
    print(f"| {w} | {s} | " + " | ".join(", ".join(f"x{c[k]:.2f}" for c in runs)
                                         for k in ("learner_step", "generation_batch")) + " |")

print()
print("| workers | measured sync s/step, the same run made twice (in the cells with bound) | difference |")
print("|---|---|---|")
for w in sorted({name.split("-")[0] for name in reports}):
    runs = sorted(HERE.glob(f"{w}-s*/measured_sync/trace"))
    if len(runs) < 2:
        continue
    steps = [compute_metrics(read_trace(r))["time/step_s"] for r in runs]
    names = ", ".join(r.parent.parent.name.split("-")[1] for r in runs)
    print(f"| {w[1:]} | " + " / ".join(f"{x:.3f}" for x in steps) + f" ({names}) | "
          f"{100 * (max(steps) / min(steps) - 1):.1f} % |")
