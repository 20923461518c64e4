"""The compiled engine: the SimPy model's actors and event queue in one numba loop, event for event.

SimPy processes events in order of (time, priority, id): a process start or an interrupt is urgent, every
other event normal, and ids count up as events are scheduled. This loop keeps such a queue with the same
keys, and between two events each actor does what Worker.run (worker.py) and Simulation.learn (pipeline.py)
do between two yields, with the same kernel calls (kernel.py) and the same rules (control.py's functions,
compiled here), writing the Simulation's own ledger. A run therefore gives the SimPy engine's trace exactly
(tests compare the two on random configurations) without a Python call per group or per event.

The loop returns to Python for what only Python has: the learner step time (the cost model is Python), ledger
room (prepared a stream block at a time) and the end of the run. Only the loop is cached, and numba keys a
cached function by its own file alone, so the loop closes over a digest of the other sources it compiles in
(kernel.py, control.py): editing them recompiles it (cached helpers would keep stale copies of the kernel).
Like the kernel, everything here is compiled without reference counting (`_nrt=False`; nothing allocates).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sim.engine import kernel as K
from sim.engine import policies as R
from sim.engine import routers as RT
from sim.engine import state as W_

if TYPE_CHECKING:
    from sim.engine.pipeline import Simulation

njit = K.njit(_nrt=False)
oldest_unconsumed = njit(R.oldest_unconsumed)

# The ledger arrays the loop writes, in this order (Simulation attributes).
LEDGER = ("g_worker", "g_prompt", "g_t_admit", "g_t_start", "g_t_consumed", "g_v_start", "g_v_consumed", "g_step",
          "g_dropped", "g_tokens", "response_len", "t_end", "v_end", "v_mean", "g_prefill", "n_preempt", "turn_len",
          "turn_tool", "turn_env")
(WORKER, PROMPT, T_ADMIT, T_START, T_CONSUMED, V_START, V_CONSUMED, STEP, DROPPED, TOKENS, RESPONSE_LEN, T_END,
 V_END, V_MEAN, PREFILL, PREEMPTS, TURN_LEN, TURN_TOOL, TURN_ENV) = range(len(LEDGER))
# Events: what = kind << 32 | actor (worker id; the learner is actor W at its start)
URGENT, NORMAL = 0, 1
EV_START, EV_WAKE, EV_INTERRUPT, EV_LEARNER, EV_END, EV_TRAIN = range(6)
# A co-located learner's step (Simulation._train, a process of its own): its start, its timeout, the event that the
# number of generating workers changed, and the condition (either of the two) it waits on
T_INIT, T_TIMEOUT, T_ACTIVITY, T_COND = range(4)
# Why a worker stopped admitting (Worker._admit's answer)
R_SLOTS, R_BLOCKED, R_DRAIN = range(3)
# The yield a worker waits at
P_START, P_LOAD, P_DONE, P_FREE, P_LISTEN = range(5)
# Per-worker integers (wi): the yield it waits at, the id of the timeout it waits for (-1: none), listening,
# want_free of its pending commit, the step its fresh groups (no token yet) were admitted at, how many, and how many
# completed groups of its static batch it holds (Worker.held), whether it generates (Worker.generating).
W_PC, W_TARGET, W_LISTENING, W_WANT, W_FRESH_STEP, W_N_FRESH, W_N_HELD, W_GEN = range(8)
WI_LEN = 8
# The yield the learner waits at
L_START, L_DATA, L_TRAIN_TIME, L_TRAIN, L_SYNC, L_BOOKKEEPING, L_DONE = range(7)
# World integers (st): first the counters the rules read (state.py's schema, shared with the SimPy engine), then the
# loop's own; and floats (ft)
(S_LATEST, S_LVER, S_NGROUPS, S_LIVE, S_RUNNING, S_BUFLEN, S_TRAINED, S_OLDEST, S_SINCE_SYNC, S_GATED,
 S_ROUTED) = (W_.LATEST, W_.LEARNER_VERSION, W_.N_ADMITTED, W_.LIVE, W_.RUNNING, W_.BUFFERED, W_.TRAINED, W_.OLDEST,
              W_.SINCE_SYNC, W_.GATE_REFUSALS, W_.ROUTED_TO)
# A co-located learner's step: the id of its current timeout, whether that timeout has been processed, its activity
# event (0: none, 1: waiting, 2: triggered), whether its condition has been triggered.
(S_EID, S_NEV, S_FIFO_HEAD, S_FIFO_TAIL, S_NFRESHEST, S_LPC, S_STEP, S_NBATCH, S_QLEN, S_DATA, S_TOKENS,
 S_ROOM, S_TIMEOUT_EID, S_END_DONE, S_ACTIVITY, S_COND) = range(W_.N_COUNTERS, W_.N_COUNTERS + 16)
ST_LEN = W_.N_COUNTERS + 16
# F_QUIET: while the learner trains, the end of training: it pokes every listening worker then, and not before.
# A co-located learner's step: train_slowdown - 1, the seconds left at full speed, when the current wait began,
# the slowdown it runs at.
F_NOW, F_TRAIN_S, F_STEP_START, F_QUIET, F_EXTRA, F_REMAIN, F_T0, F_SLOW = range(8)
# The loop's parameters (pi); the rules' are policies.P_* (pp)
(P_B, P_G, P_GATING, P_INTERRUPTIBLE, P_ORDER, P_STEPS, P_W, P_C, P_SYNC_EVERY, P_ROUTER, P_STATIC,
 P_SHARED, P_ADMIT_SLOTS, P_PREFILL_COPIES) = range(14)
ORDER_FIFO, ORDER_FRESHEST, ORDER_BATCH = range(3)
# The learner's data event: none, waited for, triggered (scheduled)
D_NONE, D_WAIT, D_TRIGGERED = range(3)
# What the loop returns
DONE, NEED_TRAIN_TIME, NEED_ROOM, STALLED = range(4)
_VBITS = 32  # freshest-first keys: (steps + 1 - version_start) << 32 | gid, smallest first
_EID_BITS = 52  # event keys: priority << 52 | id


# --------------------------------------------------------------------------- the event queue (a binary heap)
@njit
def _before(ev_t, ev_key, a, b):
    return ev_t[a] < ev_t[b] or (ev_t[a] == ev_t[b] and ev_key[a] < ev_key[b])


@njit
def _schedule(st, ev, t, priority, what):
    """Schedule an event at time t; returns its id (SimPy's eid)."""
    ev_t, ev_key, ev_what = ev[0], ev[1], ev[2]
    eid = st[S_EID]
    st[S_EID] += 1
    pos = st[S_NEV]
    st[S_NEV] += 1
    key = (priority << _EID_BITS) | eid
    while pos > 0:
        parent = (pos - 1) // 2
        if ev_t[parent] < t or (ev_t[parent] == t and ev_key[parent] < key):
            break
        ev_t[pos], ev_key[pos], ev_what[pos] = ev_t[parent], ev_key[parent], ev_what[parent]
        pos = parent
    ev_t[pos], ev_key[pos], ev_what[pos] = t, key, what
    return eid


@njit
def _pop(st, ev):
    """Take the first event off the queue: (time, id, what)."""
    ev_t, ev_key, ev_what = ev[0], ev[1], ev[2]
    t, eid, what = ev_t[0], ev_key[0] & ((1 << _EID_BITS) - 1), ev_what[0]
    size = st[S_NEV] - 1
    st[S_NEV] = size
    pos = 0  # sift the last entry down from the root
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and _before(ev_t, ev_key, child + 1, child):
            child += 1
        if not _before(ev_t, ev_key, child, size):
            break
        ev_t[pos], ev_key[pos], ev_what[pos] = ev_t[child], ev_key[child], ev_what[child]
        pos = child
    ev_t[pos], ev_key[pos], ev_what[pos] = ev_t[size], ev_key[size], ev_what[size]
    return t, eid, what


# --------------------------------------------------------------------------- the buffer (buffer.Buffer's orders)
@njit
def _sift_down(heap, size, pos):
    item = heap[pos]
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and heap[child + 1] < heap[child]:
            child += 1
        if heap[child] >= item:
            break
        heap[pos] = heap[child]
        pos = child
    heap[pos] = item


@njit
def _push(heap, size, item):
    pos = size
    while pos > 0:
        parent = (pos - 1) // 2
        if heap[parent] <= item:
            break
        heap[pos] = heap[parent]
        pos = parent
    heap[pos] = item


@njit
def _buf_put(pi, st, q, gid, version_start):
    fifo, freshest, batch_head, batch_next = q
    st[S_BUFLEN] += 1
    if pi[P_ORDER] == ORDER_FRESHEST:  # Buffer's heap of (-version_start, gid)
        _push(freshest, st[S_NFRESHEST], ((pi[P_STEPS] + 1 - version_start) << _VBITS) | gid)
        st[S_NFRESHEST] += 1
    elif pi[P_ORDER] == ORDER_BATCH:  # a stack per batch: the last in is the first out, as Buffer's list.pop()
        b = gid // pi[P_B]
        batch_next[gid] = batch_head[b]
        batch_head[b] = gid
    else:
        fifo[st[S_FIFO_TAIL]] = gid  # each group enters once: no wrap-around
        st[S_FIFO_TAIL] += 1


@njit
def _buf_pop(pi, st, q, step):
    """The next group for learner step `step`, or -1 (Buffer.pop)."""
    fifo, freshest, batch_head, batch_next = q
    gid = -1
    if pi[P_ORDER] == ORDER_FRESHEST:
        n = st[S_NFRESHEST]
        if n > 0:
            gid = freshest[0] & ((1 << _VBITS) - 1)
            freshest[0] = freshest[n - 1]
            st[S_NFRESHEST] = n - 1
            _sift_down(freshest, n - 1, 0)
    elif pi[P_ORDER] == ORDER_BATCH:
        if step < batch_head.shape[0] and batch_head[step] >= 0:
            gid = batch_head[step]
            batch_head[step] = batch_next[gid]
    elif st[S_FIFO_HEAD] < st[S_FIFO_TAIL]:
        gid = fifo[st[S_FIFO_HEAD]]
        st[S_FIFO_HEAD] += 1
    if gid >= 0:
        st[S_BUFLEN] -= 1
    return gid


# --------------------------------------------------------------------------- the workers (worker.py)
@njit
def _until(st, ev, w, t):
    """Worker._until: worker w waits until time t, never earlier despite rounding; returns the timeout's id."""
    now = ev[3][F_NOW]
    delay = max(0.0, t - now)
    if now + delay < t:
        delay = np.nextafter(delay, np.inf)
    return _schedule(st, ev, now + delay, NORMAL, (EV_WAKE << 32) | w)


@njit
def _group_done(pi, pp, st, ev, q, ledger, unconsumed, gid):
    """Simulation.group_done: into the buffer (queue_drop: the oldest waiting group out of a full one); the
    learner's data event succeeds (once)."""
    st[S_RUNNING] -= 1
    if R.evicts_oldest(pp, st[S_BUFLEN]):
        _retire(st, ev, ledger, unconsumed, _buf_pop(pi, st, q, st[S_STEP]), st[S_STEP], True)
    _buf_put(pi, st, q, gid, ledger[V_START][gid])
    if st[S_DATA] == D_WAIT:
        st[S_DATA] = D_TRIGGERED
        _schedule(st, ev, ev[3][F_NOW], NORMAL, EV_LEARNER << 32)


@njit
def _set_generating(st, ev, wi, w, on):
    """Worker._set_generating: a co-located learner's step waiting on the workers' activity wakes."""
    if wi[w, W_GEN] != on:
        wi[w, W_GEN] = on
        if st[S_ACTIVITY] == 1:  # Simulation.activity_changed
            st[S_ACTIVITY] = 2
            _schedule(st, ev, ev[3][F_NOW], NORMAL, (EV_TRAIN << 32) | T_ACTIVITY)


@njit
def _advance(ws, ledger, pre, xs, ys, w, until, want_free, dry):
    """kernel.advance of worker w over the ledger's workload and results."""
    return K.advance(*ws, w, xs, ys, ledger[RESPONSE_LEN], ledger[TURN_LEN], ledger[TURN_TOOL], ledger[TURN_ENV],
                     ledger[T_END], ledger[V_END], ledger[V_MEAN], ledger[PREEMPTS], pre, until, want_free, dry)


@njit
def _completed(pi, pp, st, ev, q, ledger, unconsumed, ws, wi, held, w):
    """Worker._completed: the groups the kernel just completed go to the buffer (static: once their whole batch
    has ended, in the order they completed)."""
    done = ws[6]
    if K.in_flight(ws[0], w) == 0:
        _set_generating(st, ev, wi, w, 0)
    if not pi[P_STATIC]:
        for i in range(ws[0][w, K.N_DONE]):
            _group_done(pi, pp, st, ev, q, ledger, unconsumed, done[w, i])
        return
    for i in range(ws[0][w, K.N_DONE]):
        held[w, wi[w, W_N_HELD]] = done[w, i]
        wi[w, W_N_HELD] += 1
    if K.in_flight(ws[0], w) > 0:
        return
    for i in range(wi[w, W_N_HELD]):
        _group_done(pi, pp, st, ev, q, ledger, unconsumed, held[w, i])
    wi[w, W_N_HELD] = 0


@njit
def _commit(pi, pp, st, ev, q, ledger, unconsumed, ws, wi, held, pre, xs, ys, w, until, want_free):
    """Worker._commit: advance for real up to `until`, handing every completed group to the buffer."""
    while True:
        flags = _advance(ws, ledger, pre, xs, ys, w, until, want_free, False)
        if flags & K.GROUPS_DONE:
            _completed(pi, pp, st, ev, q, ledger, unconsumed, ws, wi, held, w)
        if flags == 0 or flags & K.SLOTS_FREE:
            return


@njit
def _route(pi, pp, st, ledger, ws, wi, w, oldest, asking_may):
    """Simulation.route: the worker the next group goes to among those that could take it now (-1: none). The loop
    of routers.choose, asking whether a worker could take the group only where the router would prefer it."""
    si, n = ws[0], pi[P_W]
    free = si[:, K.N_FREE]
    prompt = ledger[PROMPT][st[S_NGROUPS]]
    best = -1
    for i in range(n):
        v = RT.candidate(pi[P_ROUTER], i, n, st[S_ROUTED])
        if not RT.prefers(pi[P_ROUTER], free, v, best):
            continue
        if v == w:
            eligible = asking_may
        else:
            coming = wi[v, W_PC] == P_START or wi[v, W_PC] == P_LOAD  # not started, or loading: Worker.coming
            eligible = (wi[v, W_LISTENING] != 0 or coming) and K.can_admit(si, v, pi[P_G], prompt) and not (
                pi[P_STATIC] and K.in_flight(si, v) > 0) and R.admission(
                pp, si[v, K.VER], st[S_LATEST], st[S_NGROUPS], st[S_LIVE], st[S_RUNNING], st[S_BUFLEN],
                st[S_TRAINED], oldest, st[S_SINCE_SYNC]) == R.ADMIT
        if eligible:
            best = v
    return best


@njit
def _admit(pi, pp, st, ev, ledger, ws, wi, fresh, unconsumed, pre, w):
    """Worker._admit: the groups the router sends here, then wake the router's choice for the next one."""
    reason = _admit_groups(pi, pp, st, ev, ledger, ws, wi, fresh, unconsumed, pre, w)
    chosen = _route(pi, pp, st, ledger, ws, wi, w, st[S_OLDEST] if pi[P_GATING] else 0, False)
    if chosen >= 0 and wi[chosen, W_LISTENING]:  # Worker.poke
        wi[chosen, W_LISTENING] = 0
        _schedule(st, ev, ev[3][F_NOW], URGENT, (EV_INTERRUPT << 32) | chosen)
    return reason


@njit
def _admit_groups(pi, pp, st, ev, ledger, ws, wi, fresh, unconsumed, pre, w):
    """Worker._admit_groups: admit whole groups while slots, the rules and the router allow; returns why it
    stopped."""
    si = ws[0]
    g = pi[P_G]
    now = ev[3][F_NOW]
    static = pi[P_STATIC] != 0
    if static and K.in_flight(si, w) > 0:
        return R_SLOTS  # the running batch goes on to its end
    batch_tokens = 0  # static: prompt tokens prefilled so far in this batch (cluster.group_prefill's copies)
    while True:
        prompt = ledger[PROMPT][st[S_NGROUPS]]
        if not K.can_admit(si, w, g, prompt):
            si[w, K.WANT_ROOM] = K.kv_need(si, w, g, prompt)
            return R_SLOTS
        oldest = 0
        if pi[P_GATING]:  # Simulation.oldest_unconsumed
            oldest = oldest_unconsumed(unconsumed, st[S_OLDEST], st[S_LATEST])
            st[S_OLDEST] = oldest
        code = R.admission(pp, si[w, K.VER], st[S_LATEST], st[S_NGROUPS], st[S_LIVE], st[S_RUNNING], st[S_BUFLEN],
                           st[S_TRAINED], oldest, st[S_SINCE_SYNC])
        if code == R.GATED:
            st[S_GATED] += 1
        if code == R.MUST_DRAIN:
            return R_DRAIN
        if code != R.ADMIT:
            return R_BLOCKED
        if _route(pi, pp, st, ledger, ws, wi, w, oldest, True) != w:  # another worker's turn: listen for ours
            return R_BLOCKED
        gid = st[S_NGROUPS]
        st[S_NGROUPS] += 1
        st[S_ROUTED] = w
        if wi[w, W_FRESH_STEP] != si[w, K.K_STEP]:
            wi[w, W_FRESH_STEP], wi[w, W_N_FRESH] = si[w, K.K_STEP], 0
        fresh[w, wi[w, W_N_FRESH]] = gid
        wi[w, W_N_FRESH] += 1
        prefill = ledger[PREFILL][gid]
        if static:  # one prefill call for the batch: each group adds its share of the call's time
            before = batch_tokens
            batch_tokens += pi[P_PREFILL_COPIES] * ledger[PROMPT][gid]
            prefill = K.prefill_time(pre[0], pre[1], pre[2], batch_tokens) - (
                K.prefill_time(pre[0], pre[1], pre[2], before) if before else 0.0)
        t_start = K.admit(ws[0], ws[1], ws[2], ws[3], ws[4], ws[5], w, gid, g, ledger[RESPONSE_LEN],
                          ledger[TURN_LEN], prompt, now, prefill)
        v = si[w, K.VER]  # Simulation.group_admitted
        ledger[WORKER][gid], ledger[T_ADMIT][gid], ledger[T_START][gid], ledger[V_START][gid] = w, now, t_start, v
        unconsumed[v] += 1
        st[S_OLDEST] = min(st[S_OLDEST], v)
        st[S_LIVE] += 1
        st[S_RUNNING] += 1
        st[S_SINCE_SYNC] += 1
        _set_generating(st, ev, wi, w, 1)
    return R_SLOTS


@njit
def _on_new_weights(st, ev, ledger, ws, wi, fresh, unconsumed, load_s, w):
    """Worker._on_new_weights (interruptible): load now at a step boundary, or pause at the next one."""
    si, sf = ws[0], ws[1]
    latest = st[S_LATEST]
    if latest <= si[w, K.VER]:
        return
    now = ev[3][F_NOW]
    if si[w, K.N_ACTIVE] == 0 or sf[w, K.T] >= now:
        K.load_now(si, sf, w, latest, load_s, now)
        si[w, K.PAUSE_STEP] = -1
        if wi[w, W_FRESH_STEP] == si[w, K.K_STEP]:
            for i in range(wi[w, W_N_FRESH]):  # Simulation.restamp
                gid = fresh[w, i]
                unconsumed[ledger[V_START][gid]] -= 1
                unconsumed[latest] += 1
                ledger[V_START][gid] = latest
    else:
        si[w, K.PAUSE_STEP] = si[w, K.K_STEP] + 1
        si[w, K.PAUSE_VER] = latest
        sf[w, K.PAUSE_S] = load_s


@njit
def _worker(pi, pp, st, ev, q, ledger, ws, wi, wt, fresh, held, unconsumed, pre, xs, ys, load_s, w,
            interrupted):
    """Worker.run of worker w, from the yield it waits at to its next yield."""
    si, sf = ws[0], ws[1]
    now = ev[3][F_NOW]
    pc = wi[w, W_PC]
    if pc == P_DONE:
        _completed(pi, pp, st, ev, q, ledger, unconsumed, ws, wi, held, w)
    elif pc == P_LISTEN:
        if interrupted:
            _commit(pi, pp, st, ev, q, ledger, unconsumed, ws, wi, held, pre, xs, ys, w, now, 0)
            K.catch_up(ws[0], ws[1], ws[2], ws[3], w, xs, ys, now)
            if pi[P_INTERRUPTIBLE]:
                _on_new_weights(st, ev, ledger, ws, wi, fresh, unconsumed, load_s, w)
        else:
            wi[w, W_LISTENING] = 0
            _commit(pi, pp, st, ev, q, ledger, unconsumed, ws, wi, held, pre, xs, ys, w, wt[w], wi[w, W_WANT])
    while True:
        if K.in_flight(si, w) == 0:
            target = R.load_target(pp, si[w, K.VER], st[S_LATEST], st[S_NGROUPS])
            if target >= 0:
                K.load_now(si, sf, w, target, load_s, now)
                wi[w, W_PC], wi[w, W_TARGET] = P_LOAD, _until(st, ev, w, sf[w, K.T])
                return
        reason = _admit(pi, pp, st, ev, ledger, ws, wi, fresh, unconsumed, pre, w)
        want_free = 0 if reason != R_SLOTS else pi[P_C] if pi[P_STATIC] else pi[P_ADMIT_SLOTS]
        listen = reason == R_BLOCKED or pi[P_INTERRUPTIBLE] != 0
        batch_moves = (si[w, K.KV_POLICY] == K.KV_RECOMPUTE or si[w, K.KV_POLICY] == K.KV_SWAP
                       or si[w, K.PER_SAMPLE] != 0 or si[w, K.TURNS] > 1)
        if listen and not pi[P_INTERRUPTIBLE] and pi[P_W] == 1 and ev[3][F_QUIET] > now and not batch_moves:
            # Blocked, Worker.run peeks at its next event and listens for the learner; but the learner pokes no
            # one while it trains, and pokes every listener when it is done (and a worker alone has no peer to
            # route a group to it). Decoding for real up to then changes nothing anyone sees before the event or
            # the poke, whose commit would decode the same steps: if the event comes first, the worker waits for
            # it as a non-listening one would (no poke can come first); else it peeks at the event from there.
            # (Not where the batch changes between events, by evictions, a group's waiting samples starting or
            # environment calls: a peek stops there, and the worker wakes and asks again, which a gate counts as one
            # more refusal.)
            flags = _advance(ws, ledger, pre, xs, ys, w, np.nextafter(ev[3][F_QUIET], -np.inf), want_free, False)
            if flags:
                wi[w, W_PC] = P_DONE if flags & K.GROUPS_DONE else P_FREE
                wi[w, W_TARGET] = _until(st, ev, w, sf[w, K.EVT_T])
                return
        flags = _advance(ws, ledger, pre, xs, ys, w, np.inf, want_free, listen)
        t_event = sf[w, K.EVT_T]
        if not listen:
            if flags & K.GROUPS_DONE:
                wi[w, W_PC], wi[w, W_TARGET] = P_DONE, _until(st, ev, w, t_event)
                return
            if flags:
                wi[w, W_PC], wi[w, W_TARGET] = P_FREE, _until(st, ev, w, t_event)
                return
            # Drained: load at the top. (Worker.run's "nothing to wait for" cannot happen: a batch this empty
            # has every slot free, and max_concurrency >= group_size.)
            continue
        wi[w, W_PC], wi[w, W_LISTENING], wi[w, W_WANT], wt[w] = P_LISTEN, 1, want_free, t_event
        wi[w, W_TARGET] = _until(st, ev, w, t_event) if math.isfinite(t_event) else -1
        return


# --------------------------------------------------------------------------- the learner (pipeline.py)
@njit
def _poke(st, ev, wi):
    """Simulation._poke_workers: interrupt every listening worker, in worker order."""
    for w in range(wi.shape[0]):
        if wi[w, W_LISTENING]:
            wi[w, W_LISTENING] = 0
            _schedule(st, ev, ev[3][F_NOW], URGENT, (EV_INTERRUPT << 32) | w)


@njit
def _train_wait(pi, st, ev, wi):
    """Simulation._train, one turn of its loop: the seconds left, slowed by 1 + extra·k/W while k of the W workers
    generate, until that ends or k changes."""
    ft = ev[3]
    k = 0
    for w in range(pi[P_W]):
        k += wi[w, W_GEN]
    ft[F_SLOW] = 1.0 + ft[F_EXTRA] * k / pi[P_W]
    ft[F_T0] = ft[F_NOW]
    st[S_ACTIVITY], st[S_COND], st[S_END_DONE] = 1, 0, 0
    st[S_TIMEOUT_EID] = _schedule(st, ev, ft[F_NOW] + ft[F_REMAIN] * ft[F_SLOW], NORMAL, (EV_TRAIN << 32) | T_TIMEOUT)


@njit
def _train_event(pi, st, ev, wi, sub, eid):
    """A co-located learner's step, event by event as SimPy runs Simulation._train: its process starts; its
    timeout or its activity event triggers the condition it waits on (once); the condition, processed, ends the
    step if the timeout has been processed by then (the process ends: the learner resumes), else it waits again
    for the rest. A timeout of an earlier turn does nothing."""
    now = ev[3][F_NOW]
    if sub == T_INIT:
        _train_wait(pi, st, ev, wi)
    elif sub == T_COND:
        if st[S_END_DONE]:
            st[S_ACTIVITY] = 0
            _schedule(st, ev, now, NORMAL, EV_LEARNER << 32)
        else:
            ev[3][F_REMAIN] = max(0.0, ev[3][F_REMAIN] - (now - ev[3][F_T0]) / ev[3][F_SLOW])
            _train_wait(pi, st, ev, wi)
    elif sub == T_ACTIVITY or eid == st[S_TIMEOUT_EID]:
        if sub == T_TIMEOUT:
            st[S_END_DONE] = 1
        if st[S_COND] == 0:
            st[S_COND] = 1
            _schedule(st, ev, now, NORMAL, (EV_TRAIN << 32) | T_COND)


@njit
def _retire(st, ev, ledger, unconsumed, gid, step, dropped):
    """Simulation._retire."""
    ledger[T_CONSUMED][gid], ledger[V_CONSUMED][gid], ledger[STEP][gid] = ev[3][F_NOW], st[S_LVER], step
    unconsumed[ledger[V_START][gid]] -= 1
    if dropped:
        ledger[DROPPED][gid] = True
        st[S_LIVE] -= 1
        st[S_TRAINED] += 1  # never to be trained


@njit
def _learner(pi, pp, st, ev, q, ledger, wi, unconsumed, batch, steps_i, steps_f, publish_s, bookkeeping_s):
    """Simulation.learn, from the yield it waits at to its next; NEED_TRAIN_TIME when it needs the cost model."""
    now = ev[3][F_NOW]
    ev[3][F_QUIET] = now
    pc = st[S_LPC]
    if pc == L_TRAIN:
        step = st[S_STEP]
        steps_i[step, 0], steps_i[step, 1], steps_i[step, 2], steps_i[step, 3] = (
            st[S_LVER], pi[P_B] * pi[P_G], st[S_TOKENS], st[S_QLEN])
        steps_f[step, 0], steps_f[step, 1], steps_f[step, 2] = ev[3][F_STEP_START], now, 0.0
        st[S_TRAINED] += pi[P_B]
        if (step + 1) % pi[P_SYNC_EVERY] == 0:  # publish: a new version, and the weight sync
            steps_f[step, 2] = publish_s
            st[S_LVER] += 1
            st[S_LATEST] = st[S_LVER]
            st[S_SINCE_SYNC] = st[S_RUNNING] + st[S_BUFLEN]
            _poke(st, ev, wi)
            st[S_LPC] = L_SYNC
            _schedule(st, ev, now + publish_s, NORMAL, EV_LEARNER << 32)
            return 0
        pc = L_SYNC  # no sync this step: on to the next at once
    if pc == L_SYNC:
        # Its own work before the next step; still the step just trained (a group the queue drops meanwhile is
        # dropped at it), as Simulation.learn's learner_step.
        if bookkeeping_s > 0.0 and st[S_STEP] + 1 < pi[P_STEPS]:
            st[S_LPC] = L_BOOKKEEPING
            _schedule(st, ev, now + bookkeeping_s, NORMAL, EV_LEARNER << 32)
            return 0
        pc = L_BOOKKEEPING
    if pc == L_BOOKKEEPING:
        st[S_STEP] += 1
        pc = L_START
    if pc == L_START:
        if st[S_STEP] >= pi[P_STEPS]:  # the learner returns: SimPy schedules its process event
            st[S_LPC] = L_DONE
            _schedule(st, ev, now, NORMAL, EV_END << 32)
            return 0
        st[S_NBATCH], st[S_QLEN] = 0, st[S_BUFLEN]
    elif pc == L_DATA:
        st[S_DATA] = D_NONE
    step = st[S_STEP]
    while st[S_NBATCH] < pi[P_B]:
        gid = _buf_pop(pi, st, q, step)
        if gid < 0:
            st[S_DATA], st[S_LPC] = D_WAIT, L_DATA
            return 0
        if R.dropped(pp, st[S_LVER], ledger[V_START][gid]):
            _retire(st, ev, ledger, unconsumed, gid, step, True)
            if R.drop_may_admit(pp):
                _poke(st, ev, wi)
            continue
        batch[st[S_NBATCH]] = gid
        st[S_NBATCH] += 1
    ev[3][F_STEP_START] = now
    tokens = 0
    for i in range(pi[P_B]):
        _retire(st, ev, ledger, unconsumed, batch[i], step, False)
        tokens += ledger[TOKENS][batch[i]]
    _poke(st, ev, wi)
    st[S_TOKENS] = tokens
    st[S_LPC] = L_TRAIN_TIME
    return NEED_TRAIN_TIME


# --------------------------------------------------------------------------- the loop
def _build_loop(digest: str):
    def loop(pi, pp, st, ev, q, ledger, ws, wi, wt, fresh, held, unconsumed, batch, steps_i, steps_f, pre, xs, ys,
             publish_s, load_s, bookkeeping_s):
        """Process events until the run ends or Python must act: DONE, NEED_TRAIN_TIME, NEED_ROOM, STALLED."""
        digest  # noqa: B018 - part of the cache key (module docstring)
        if st[S_EID] == 0:  # SimPy starts each process with an urgent event: the workers, then the learner
            for w in range(pi[P_W] + 1):
                _schedule(st, ev, 0.0, URGENT, (EV_START << 32) | w)
        if st[S_LPC] == L_TRAIN_TIME:  # back with the step time: the learner yields its timeout
            st[S_LPC] = L_TRAIN
            if pi[P_SHARED]:  # or a process of its own, whose end comes back as a learner event
                ev[3][F_REMAIN] = ev[3][F_TRAIN_S]
                _schedule(st, ev, ev[3][F_NOW], URGENT, (EV_TRAIN << 32) | T_INIT)
            else:
                ev[3][F_QUIET] = ev[3][F_NOW] + ev[3][F_TRAIN_S]
                _schedule(st, ev, ev[3][F_QUIET], NORMAL, EV_LEARNER << 32)
        while True:
            # One event schedules at most W interrupts and three more events, and admits at most c // g groups
            # (per_sample: one more).
            if st[S_NGROUPS] > st[S_ROOM] or st[S_NEV] + pi[P_W] + 3 > ev[0].shape[0]:
                return NEED_ROOM
            if st[S_NEV] == 0:
                return STALLED
            t, eid, what = _pop(st, ev)
            ev[3][F_NOW] = t
            kind, w = what >> 32, what & 0xFFFFFFFF
            if kind == EV_WAKE:
                if wi[w, W_TARGET] == eid:  # else an interrupt cancelled this wait
                    _worker(pi, pp, st, ev, q, ledger, ws, wi, wt, fresh, held, unconsumed, pre, xs, ys, load_s, w,
                            False)
            elif kind == EV_INTERRUPT:
                wi[w, W_TARGET] = -1
                _worker(pi, pp, st, ev, q, ledger, ws, wi, wt, fresh, held, unconsumed, pre, xs, ys, load_s, w,
                        True)
            elif kind == EV_START and w < pi[P_W]:
                _worker(pi, pp, st, ev, q, ledger, ws, wi, wt, fresh, held, unconsumed, pre, xs, ys, load_s, w,
                            False)
            elif kind == EV_END:
                return DONE
            elif kind == EV_TRAIN:
                _train_event(pi, st, ev, wi, w, eid)
            elif _learner(pi, pp, st, ev, q, ledger, wi, unconsumed, batch, steps_i, steps_f,
                          publish_s, bookkeeping_s) == NEED_TRAIN_TIME:
                return NEED_TRAIN_TIME
    return K.njit(cache=True, _nrt=False)(loop)


_loop = _build_loop(hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (K, R, RT, W_))).hexdigest())


# --------------------------------------------------------------------------- driving it from Python
def _extend(a: np.ndarray, n: int, fill=None) -> np.ndarray:
    """a with n entries; the new ones `fill`, or uninitialised."""
    if n <= len(a):
        return a
    out = np.empty(n, a.dtype) if fill is None else np.full(n, fill, a.dtype)
    out[:len(a)] = a
    return out


class _Run:
    """The loop's own arrays for one run (the ledger and the workers' kernel state are the Simulation's)."""

    def __init__(self, sim: "Simulation"):
        cfg, ctl = sim.cfg, sim.control
        W, c = cfg.cluster.rollout_workers, cfg.cluster.max_concurrency
        order = {"fifo": ORDER_FIFO, "freshest": ORDER_FRESHEST, "batch": ORDER_BATCH}[sim.buffer.order]
        self.sim = sim
        self.pi = np.array([sim.B, sim.group_size, ctl.gating, ctl.interruptible, order, cfg.run.steps, W, c,
                            ctl.sync_every, sim.router, cfg.cluster.batching == "static",
                            sim.cost.train_slowdown != 1.0, sim.admit_slots, sim.prefill_copies], np.int64)
        self.pp = ctl.p
        self.st = np.zeros(ST_LEN, np.int64)
        self.st[:W_.N_COUNTERS] = sim.world.array
        self.st[S_LPC] = L_START
        self.wi = np.zeros((W, WI_LEN), np.int64)
        self.wi[:, W_FRESH_STEP] = -1
        self.wt = np.zeros(W)  # the event time a listening worker's pending commit runs to
        # groups admitted at one step boundary: whole ones, and per_sample one more whose samples partly wait
        self.fresh = np.zeros((W, c // sim.group_size + 1), np.int64)
        self.held = np.zeros((W, c // sim.group_size), np.int64)  # static: a batch's completed groups
        self.unconsumed = np.zeros(cfg.run.steps + 2, np.int64)  # versions never pass the step count
        self.batch = np.zeros(sim.B, np.int64)
        self.steps_i = np.zeros((cfg.run.steps, 4), np.int64)  # version, samples, tokens, queue length
        self.steps_f = np.zeros((cfg.run.steps, 3))              # t_start, t_end, weight sync
        n_events = 4 * (W + 3)
        self.ev = (np.zeros(n_events), np.zeros(n_events, np.int64), np.zeros(n_events, np.int64), np.zeros(8))
        self.ev[3][F_EXTRA] = sim.cost.train_slowdown - 1.0
        self.q = (np.zeros(0, np.int64),) * 4  # fifo, freshest heap, batch stack heads, batch stack links
        self._make_room()

    def _make_room(self) -> None:
        """Room for the loop to go on: in the event queue, and prepared ledger entries (and buffer room) for
        more groups than one worker wake admits, and the one after them (its prompt decides KV room)."""
        sim, st = self.sim, self.st
        if st[S_NEV] + sim.cfg.cluster.rollout_workers + 3 > len(self.ev[0]):
            n = 2 * len(self.ev[0])
            self.ev = (*(_extend(a, n) for a in self.ev[:3]), self.ev[3])
        # groups one wake admits (c // g, and per_sample one more partly started) and the next, which routing reads
        wake = sim.cfg.cluster.max_concurrency // sim.group_size + 2
        while sim.ready - wake <= st[S_NGROUPS]:
            sim.prepare_ledger()
        n = len(sim.g_worker)
        fifo, freshest, head, nxt = self.q
        self.q = (_extend(fifo, n), _extend(freshest, n), _extend(head, n // sim.B + 2, -1), _extend(nxt, n))
        st[S_ROOM] = sim.ready - wake

    def run(self) -> None:
        sim, st, ft = self.sim, self.st, self.ev[3]
        while True:
            code = _loop(self.pi, self.pp, st, self.ev, self.q, tuple(getattr(sim, name) for name in LEDGER),
                         sim.worker_state, self.wi, self.wt, self.fresh, self.held, self.unconsumed,
                         self.batch, self.steps_i, self.steps_f, sim.cost.prefill_table(), sim.decode_x, sim.decode_y,
                         sim.publish_s, sim.load_s, sim.bookkeeping_s)
            if code == NEED_TRAIN_TIME:
                ft[F_TRAIN_S] = sim.cost.train_s(sim.train_tokens(self.batch))
                # Progress callbacks run here, after the previous step's sync: they change nothing simulated.
                if sim.on_step is not None and st[S_STEP] > 0:
                    sim.on_step(int(st[S_STEP]) - 1)
            elif code == NEED_ROOM:
                self._make_room()
            else:
                break
        self._write_back()
        if code == STALLED:
            raise sim.stalled()
        if sim.on_step is not None:
            sim.on_step(sim.cfg.run.steps - 1)

    def _write_back(self) -> None:
        """Leave the Simulation as the SimPy engine would: counters, steps, clock, buffer."""
        sim, st = self.sim, self.st
        n_steps = sim.cfg.run.steps if st[S_LPC] == L_DONE else int(st[S_STEP])
        sim.steps = [(k, t_start, t_end, version, n_samples, tokens, queue_len, sync)
                     for k, ((version, n_samples, tokens, queue_len), (t_start, t_end, sync))
                     in enumerate(zip(self.steps_i[:n_steps].tolist(), self.steps_f[:n_steps].tolist()))]
        sim.now = float(self.ev[3][F_NOW])
        sim.world.array[:] = st[:W_.N_COUNTERS]
        sim.unconsumed = self.unconsumed.tolist()
        fifo, freshest, head, nxt = self.q
        waiting = fifo[st[S_FIFO_HEAD]:st[S_FIFO_TAIL]].tolist()
        waiting += [key & ((1 << _VBITS) - 1) for key in freshest[:st[S_NFRESHEST]].tolist()]
        for gid in head.tolist():  # each batch's stack, bottom first
            stack = []
            while gid >= 0:
                stack.append(gid)
                gid = int(nxt[gid])
            waiting += stack[::-1]
        for gid in waiting:  # the SimPy engine's buffer, unused so far: as that engine would have filled it
            sim.buffer.put(gid, int(sim.g_v_start[gid]))


def run(sim: "Simulation") -> None:
    """Run `sim` (not run before) to its end with the compiled engine; raises as Simulation.run does."""
    _Run(sim).run()
