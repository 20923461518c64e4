"""The counters the staleness-control rules read (`sim.engine.policies`), one schema for both engines.

The compiled engine keeps them in the first entries of its int64 state array (fast.py); the SimPy engine keeps the
same array in `Simulation.world` and reads and writes it through `World`'s named properties; the real trainer's
`Ledger` holds the same counters in shared memory. A rule therefore reads the same numbers under the same names
wherever it runs.
"""

from __future__ import annotations

import numpy as np

# The counters, in array order.
COUNTERS = ("latest", "learner_version", "n_admitted", "live", "running", "buffered", "trained", "oldest",
            "since_sync", "gate_refusals", "routed_to")
(LATEST, LEARNER_VERSION, N_ADMITTED, LIVE, RUNNING, BUFFERED, TRAINED, OLDEST, SINCE_SYNC, GATE_REFUSALS,
 ROUTED_TO) = range(len(COUNTERS))
N_COUNTERS = len(COUNTERS)

_MEANING = {
    "latest": "the newest published version",
    "learner_version": "the learner's version (it publishes every sync_every steps: latest follows it then)",
    "n_admitted": "group ids handed out so far",
    "live": "groups admitted and not dropped (AReaL's accepted + running)",
    "running": "groups admitted and not yet generated",
    "buffered": "groups generated and waiting in the buffer",
    "trained": "groups a finished learner step trained on, and groups dropped (never to be trained)",
    "oldest": "the oldest version with a group admitted and not yet taken (kept up to date under the gate)",
    "since_sync": "groups admitted since the last weight sync (verl's staleness_samples)",
    "gate_refusals": "admissions a staleness bound refused (did the bound act?)",
    "routed_to": "the worker the last group went to (round_robin goes on from it; -1 before the first)",
}


class World:
    """Named access to the counters in `array` (int64, at least N_COUNTERS long)."""
    __slots__ = ("array",)

    def __init__(self, array: np.ndarray | None = None):
        if array is None:
            array = np.zeros(N_COUNTERS, np.int64)
            array[ROUTED_TO] = -1
        self.array = array


def _counter(index: int, name: str) -> property:
    def get(self) -> int:
        return int(self.array[index])

    def set(self, value: int) -> None:
        self.array[index] = value
    return property(get, set, doc=_MEANING[name])


for _i, _name in enumerate(COUNTERS):
    setattr(World, _name, _counter(_i, _name))
