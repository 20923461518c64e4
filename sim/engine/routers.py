"""Request routing: which rollout worker the next group goes to.

Workers pull groups (each admits when it has room and the staleness control allows), but a group goes only to the
router's choice among the workers that could take it now; a worker that is not the choice wakes the chosen one (if
it is listening; otherwise the chosen one is starting or loading weights and admits when it comes) and waits. One
pure function, compiled for the fast engine and called by the SimPy engine.

- least_loaded (default): the worker with the most free slots (the lowest id among equals), as the SGLang and vLLM
  routers do when load is imbalanced (sgl-router/src/policies/cache_aware.rs; vllm-project/router; prefix caching
  aside, docs/policies-sources.md);
- round_robin: the next worker after the last one a group went to;
- fill_first: the lowest-id worker with room (one engine filled before the next is used: before routers, a group
  went to whichever worker woke first, which at equal times filled the lowest ids first).
"""

from __future__ import annotations

from sim.engine.kernel import njit

LEAST_LOADED, ROUND_ROBIN, FILL_FIRST = range(3)
ROUTERS = {"least_loaded": LEAST_LOADED, "round_robin": ROUND_ROBIN, "fill_first": FILL_FIRST}


@njit(cache=True, _nrt=False)
def choose(router, free, eligible, last):
    """The worker the next group goes to among those with eligible[w] != 0, or -1 if none. free[w]: its free
    slots; last: the worker the previous group went to (-1 before the first)."""
    n = free.shape[0]
    if router == ROUND_ROBIN:
        for i in range(1, n + 1):
            w = (last + i) % n
            if eligible[w]:
                return w
        return -1
    best = -1
    for w in range(n):
        if eligible[w] and (best < 0 or (router == LEAST_LOADED and free[w] > free[best])):
            best = w
            if router == FILL_FIRST:
                return w
    return best
