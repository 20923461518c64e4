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
def candidate(router, i, n, last):
    """The i-th of n workers the router considers: round_robin from the one after `last` (the worker the previous
    group went to, -1 before the first), the others from worker 0."""
    return (last + 1 + i) % n if router == ROUND_ROBIN else i


@njit(cache=True, _nrt=False)
def prefers(router, free, w, best):
    """Whether the router takes worker w (if w could take the group) over `best`, its choice among the workers
    considered before w (-1: none yet): the first one for round_robin and fill_first, else one with more free slots
    (free[w]). Whether a worker could take the group is asked only where this holds, so the compiled engine, where
    asking costs, asks no more than it must."""
    return best < 0 or (router == LEAST_LOADED and free[w] > free[best])


@njit(cache=True, _nrt=False)
def choose(router, free, eligible, last):
    """The worker the next group goes to among those with eligible[w] != 0, or -1 if none. free[w]: its free
    slots; last: the worker the previous group went to (-1 before the first)."""
    best = -1
    for i in range(free.shape[0]):
        w = candidate(router, i, free.shape[0], last)
        if prefers(router, free, w, best) and eligible[w]:
            best = w
    return best
