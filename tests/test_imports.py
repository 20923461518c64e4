"""`stalecast simulate` imports only what a simulation needs: not the other subcommands' packages, not seaborn,
scipy, torch, transformers or ray. Each check runs in a fresh interpreter, where sys.modules starts empty."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny_cpu.yaml"
HEAVY = {"seaborn", "scipy", "studies", "validate", "real", "torch", "transformers", "ray"}

# Runs `main(argv)` behind a meta-path hook that notes, for every import of a HEAVY package or its submodules,
# the module whose code asked for it (frames of importlib and of the package itself skipped), then writes
# {package: [importers]} for each HEAVY package left in sys.modules to the file named by argv[1].
PROBE = """
import json, sys
HEAVY, report, argv = set(json.loads(sys.argv[2])), sys.argv[1], json.loads(sys.argv[3])
importers = {}

class Probe:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in HEAVY:
            frame = sys._getframe(1)
            while frame is not None:
                mod = frame.f_globals.get("__name__", "")
                if not (mod.startswith("importlib") or mod.partition(".")[0] == top):
                    break
                frame = frame.f_back
            importers.setdefault(top, set()).add(mod if frame is not None else "?")
        return None  # only watching: the usual finders import it

sys.meta_path.insert(0, Probe())
from sim.cli import main
try:
    rc = main(argv)
finally:
    present = {m.partition(".")[0] for m in list(sys.modules)} & HEAVY
    with open(report, "w") as f:
        json.dump({"rc": rc, "modules": {m: sorted(importers.get(m, ())) for m in present}}, f)
"""


def imported_heavy(argv: list[str], tmp_path: Path) -> dict[str, list[str]]:
    """HEAVY packages in sys.modules after `stalecast ARGV` in a fresh interpreter -> the modules that imported
    them."""
    report = tmp_path / "modules.json"
    done = subprocess.run([sys.executable, "-c", PROBE, str(report), json.dumps(sorted(HEAVY)), json.dumps(argv)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(report.read_text())
    assert result["rc"] == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return result["modules"]


def test_simulate_imports_nothing_heavy(tmp_path):
    out = tmp_path / "out"
    heavy = imported_heavy(["simulate", str(TINY), "--steps", "10", "--no-sync-baseline", "--out", str(out)],
                           tmp_path)
    assert (out / "staleness.png").is_file()
    # numba, which the engine compiles with, probes scipy.linalg's BLAS when it sets up its compiler (numba's
    # own import, beyond our control); scipy is allowed only through numba, and nothing else at all.
    assert set(heavy) <= {"scipy"}, heavy
    assert all(m.partition(".")[0] == "numba" for m in heavy.get("scipy", [])), heavy


def test_simulate_help_imports_nothing_heavy(tmp_path):
    assert imported_heavy(["simulate", "--help"], tmp_path) == {}
