"""One Markdown table from the four validate reports: predicted / measured (error) for the judged numbers."""
import json
from pathlib import Path

HERE = Path(__file__).parent
METRICS = [("staleness/mean", "mean staleness"), ("staleness/p90", "p90"), ("throughput/samples_per_s", "samples/s"),
           ("speedup/vs_sync", "speedup over sync"), ("time/step_s", "s/step")]
print("| workers | bound | " + " | ".join(name for _, name in METRICS) + " | all judged rows pass |")
print("|---|---|" + "---|" * (len(METRICS) + 1))
for report in sorted(HERE.glob("w*-s*/report.json")):
    data = json.loads(report.read_text())
    rows = {r["metric"]: r for r in data["rows"]}
    w, s = report.parent.name[1:].split("-s")
    cells = []
    for key, _ in METRICS:
        r = rows[key]
        rel = f"{100 * r['rel_error']:+.0f}%" if r["rel_error"] is not None else f"{r['error']:+.2f}"
        mark = "" if r["ok"] else " ✗"
        cells.append(f"{r['predicted']:.3g} / {r['measured']:.3g} ({rel}){mark}")
    print(f"| {w} | {s} | " + " | ".join(cells) + f" | {'yes' if data['pass'] else 'no'} |")
