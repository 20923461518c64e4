"""Compiled core of a rollout worker: its continuous batch, advanced analytically between events.

All active sequences advance one token per decode step, so in *step space* a sample admitted at step k
with L tokens ends at step k + L: the samples sorted by (end step, slot) give the completions in order. The
wall time of a run of decode steps with n sequences active is a closed-form sum, because the step time is
piecewise linear in the batch's total context x = n*k + ksum (ksum = Σ prompt_i - start_i) and x grows
linearly in k. No step is simulated one by one and nothing is approximated.

The samples wait in a calendar: bucket (end >> BSHIFT) mod NBUCKETS, each a list sorted by (end, slot).
Every active end lies in (k, k + max_new_tokens], a window shorter than the calendar, so the first non-empty
bucket after step k holds the next completion, and a dry run (a peek) can read ahead without changing it.

State lives in small arrays, every worker's stacked in one block (worker w at index w), so the functions
compile with numba (`cache=True`) and run without it, and take (arrays, w) rather than per-worker views.
They are compiled without numba's reference counting (`_nrt=False`: they never allocate), which the
whole-simulation loop (fast.py) would otherwise pay on every array it passes down.
"""

from __future__ import annotations

import math

import numpy as np

try:  # numba makes the per-sample work ~50x cheaper; the code is identical without it.
    from numba import njit
    COMPILED = True
except ImportError:  # pragma: no cover
    COMPILED = False

    def njit(*args, **kwargs):
        return args[0] if args and callable(args[0]) else (lambda f: f)

# Integer scalars (si)
K_STEP, N_ACTIVE, KSUM, VER, VBASE_STEP, N_FREE, N_GS_FREE, PAUSE_STEP, PAUSE_VER, N_DONE, BSHIFT, NBUCKETS = range(12)
SI_LEN = 12
# Float scalars (sf)
T, VBASE, PAUSE_S, EVT_T = range(4)
SF_LEN = 4
# Rows of the per-slot integer table (slot: END is the end step, NXT the next slot in its bucket), of the
# per-group-slot table (gs; a dry run counts down LEFT_DRY) and of the calendar (cal: bucket heads, and
# room for the slots that end at one step).
SID, LEN, KOFF, GS, FREE, END, NXT = range(7)
LEFT, GID, GS_FREE, LEFT_DRY = range(4)
HEADS, DUE = range(2)
NO_STEP = 1 << 62
# Event flags returned by advance()
GROUPS_DONE, SLOTS_FREE = 1, 2


def new_state(n_workers: int, max_concurrency: int, max_len: int):
    """Fresh state of n workers whose samples have at most max_len tokens: (si, sf, cal, slot, slot_vstart,
    gs, done), worker w's at index w of each."""
    w, c = n_workers, max_concurrency
    n_buckets = 1 << min(10, max_len.bit_length())
    bshift = 0  # the calendar spans max_len + one bucket, so the window never wraps onto its first bucket
    while n_buckets << bshift < max_len + 1 + (1 << bshift):
        bshift += 1
    si = np.zeros((w, SI_LEN), np.int64)
    sf = np.zeros((w, SF_LEN), np.float64)
    si[:, N_FREE] = c
    si[:, N_GS_FREE] = c
    si[:, PAUSE_STEP] = -1
    si[:, BSHIFT] = bshift
    si[:, NBUCKETS] = n_buckets
    slot = np.zeros((w, 7, c), np.int64)
    slot[:, FREE] = np.arange(c)
    gs = np.zeros((w, 4, c), np.int64)
    gs[:, GS_FREE] = np.arange(c)
    cal = np.full((w, 2, max(n_buckets, c)), -1, np.int64)
    return si, sf, cal, slot, np.zeros((w, c), np.float64), gs, np.zeros((w, c), np.int64)


@njit(cache=True, _nrt=False)
def span_time(xs, ys, row, n, ksum, k1, k2):
    """Σ_{k=k1}^{k2-1} h(n*k + ksum) for h piecewise linear through (xs[row], ys[row]), extrapolated past the
    ends."""
    if k2 <= k1:
        return 0.0
    total = 0.0
    m = xs.shape[1]
    for j in range(m - 1):
        x0, x1 = xs[row, j], xs[row, j + 1]
        lo = k1 if j == 0 else max(k1, math.ceil((x0 - ksum) / n))
        hi = k2 if j == m - 2 else min(k2, math.ceil((x1 - ksum) / n))
        if hi <= lo:
            continue
        slope = (ys[row, j + 1] - ys[row, j]) / (x1 - x0)
        cnt = hi - lo
        total += cnt * (ys[row, j] + slope * (ksum - x0)) + slope * n * (lo + hi - 1) * cnt / 2.0
    return total


@njit(cache=True, _nrt=False)
def _version_sum(vbase, ver, vbase_step, step):
    """Σ of token versions over decode steps before `step` (VBASE up to VBASE_STEP, then VER per step)."""
    return vbase + ver * (step - vbase_step)


@njit(cache=True, _nrt=False)
def _next_end(si, cal, slot, w, k):
    """The first end step after step k among worker w's samples (NO_STEP if none)."""
    n_buckets, bshift = si[w, NBUCKETS], si[w, BSHIFT]
    b = ((k + 1) >> bshift) & (n_buckets - 1)
    for _ in range(n_buckets):
        s = cal[w, HEADS, b]
        while s >= 0:
            if slot[w, END, s] > k:  # (a dry run reads past samples it counts as ended)
                return slot[w, END, s]
            s = slot[w, NXT, s]
        b = (b + 1) & (n_buckets - 1)
    return NO_STEP


@njit(cache=True, _nrt=False)
def advance(si, sf, cal, slot, slot_vstart, gs, done, w, xs, ys, t_end, v_end, v_mean, until, want_free, dry):
    """Decode worker w until its first event: a group completes (GROUPS_DONE, ids in done[w, :si[w, N_DONE]])
    or at least `want_free` slots are free (SLOTS_FREE; 0 disables it). Returns the flags, or 0 if the batch
    empties or the next completion lies beyond `until`. The event time is sf[w, EVT_T]. With `dry`, nothing
    else is written (group counts are worked on in a copy): a peek at when the next event is."""
    n, k, ksum, ver, vbase_step = si[w, N_ACTIVE], si[w, K_STEP], si[w, KSUM], si[w, VER], si[w, VBASE_STEP]
    n_free, n_gs_free, pause = si[w, N_FREE], si[w, N_GS_FREE], si[w, PAUSE_STEP]
    t, vbase = sf[w, T], sf[w, VBASE]
    bucket_mask, bshift = si[w, NBUCKETS] - 1, si[w, BSHIFT]
    left = LEFT_DRY if dry else LEFT
    if dry:
        for i in range(gs.shape[2]):
            gs[w, LEFT_DRY, i] = gs[w, LEFT, i]
    sf[w, EVT_T] = np.inf
    flags = n_done = 0
    while n > 0:
        k_next = _next_end(si, cal, slot, w, k)
        target = pause if 0 <= pause < k_next else k_next
        t_new = t + span_time(xs, ys, n, n, ksum, k, target)
        if t_new > until:
            sf[w, EVT_T] = t_new
            break
        t, k = t_new, target
        if target == k_next:
            vsum = _version_sum(vbase, ver, vbase_step, k_next)
            # The samples ending now lead their bucket, in slot order: take them off (for real) in that order.
            b = (k_next >> bshift) & bucket_mask
            m = 0
            s = cal[w, HEADS, b]
            while s >= 0 and slot[w, END, s] <= k_next:
                if slot[w, END, s] == k_next:
                    cal[w, DUE, m] = s
                    m += 1
                s = slot[w, NXT, s]
            if not dry:
                cal[w, HEADS, b] = s
            for i in range(m):
                s = cal[w, DUE, i]
                n -= 1
                if not dry:
                    sid = slot[w, SID, s]
                    t_end[sid] = t
                    v_end[sid] = ver
                    v_mean[sid] = (vsum - slot_vstart[w, s]) / slot[w, LEN, s]
                    slot[w, FREE, n_free] = s
                ksum -= slot[w, KOFF, s]
                n_free += 1
                g = slot[w, GS, s]
                gs[w, left, g] -= 1
                if gs[w, left, g] == 0:
                    if not dry:
                        done[w, n_done] = gs[w, GID, g]
                        gs[w, GS_FREE, n_gs_free] = g
                    n_done += 1
                    n_gs_free += 1
                    flags |= GROUPS_DONE
            if want_free > 0 and n_free >= want_free:
                flags |= SLOTS_FREE
        if target == pause:  # an interruptible worker loads new weights at this step boundary
            vbase = _version_sum(vbase, ver, vbase_step, pause)
            vbase_step, ver = pause, si[w, PAUSE_VER]
            t += sf[w, PAUSE_S]
            pause = -1
        if flags:
            sf[w, EVT_T] = t_new  # the completions' time (a load at this boundary comes after)
            break
    if not dry:
        si[w, N_ACTIVE], si[w, K_STEP], si[w, KSUM], si[w, VER], si[w, VBASE_STEP] = n, k, ksum, ver, vbase_step
        si[w, N_FREE], si[w, N_GS_FREE], si[w, PAUSE_STEP], si[w, N_DONE] = n_free, n_gs_free, pause, n_done
        sf[w, T], sf[w, VBASE] = t, vbase
    return flags


@njit(cache=True, _nrt=False)
def catch_up(si, sf, cal, slot, w, xs, ys, now):
    """Commit worker w's batch, committed at its last event, up to `now` in whole decode steps: to the first step
    boundary at or after now, so that a group admitted (or weights loaded) now joins at the next step while the
    sequences in flight keep the steps they decoded meanwhile. It stops short of the next completion (an event of
    its own) and of a pending pause; a group admitted there waits for the remaining part of a step."""
    n = si[w, N_ACTIVE]
    if n == 0 or sf[w, T] >= now:
        return
    k, ksum, t = si[w, K_STEP], si[w, KSUM], sf[w, T]
    limit = _next_end(si, cal, slot, w, k) - 1
    if si[w, PAUSE_STEP] >= 0:
        limit = min(limit, si[w, PAUSE_STEP])
    if limit <= k:
        return
    if t + span_time(xs, ys, n, n, ksum, k, limit) < now:
        lo = limit  # every step before the limit ends before now
    else:  # the smallest k' in (k, limit] whose boundary is at or after now
        lo, hi = k + 1, limit
        while lo < hi:
            mid = (lo + hi) // 2
            if t + span_time(xs, ys, n, n, ksum, k, mid) >= now:
                hi = mid
            else:
                lo = mid + 1
    sf[w, T] = t + span_time(xs, ys, n, n, ksum, k, lo)
    si[w, K_STEP] = lo


@njit(cache=True, _nrt=False)
def admit(si, sf, cal, slot, slot_vstart, gs, w, gid, group_size, lens, prompt_len, now, prefill_s):
    """Add group gid to worker w's batch: group_size samples sharing a prompt, sample ids gid*group_size + j,
    response lengths lens[sample id]. Returns its start time."""
    sf[w, T] = max(sf[w, T], now)  # an idle worker's clock catches up with the world
    t_start = sf[w, T]
    sf[w, T] += prefill_s
    k = si[w, K_STEP]
    si[w, N_GS_FREE] -= 1
    g = gs[w, GS_FREE, si[w, N_GS_FREE]]
    gs[w, LEFT, g] = group_size
    gs[w, GID, g] = gid
    vsum = _version_sum(sf[w, VBASE], si[w, VER], si[w, VBASE_STEP], k)
    bucket_mask, bshift = si[w, NBUCKETS] - 1, si[w, BSHIFT]
    for sid in range(gid * group_size, (gid + 1) * group_size):
        si[w, N_FREE] -= 1
        s = slot[w, FREE, si[w, N_FREE]]
        slot[w, SID, s] = sid
        slot[w, LEN, s] = lens[sid]
        slot[w, KOFF, s] = prompt_len - k
        slot[w, GS, s] = g
        slot_vstart[w, s] = vsum
        si[w, KSUM] += prompt_len - k
        si[w, N_ACTIVE] += 1
        end = k + lens[sid]
        slot[w, END, s] = end
        b = (end >> bshift) & bucket_mask
        prev, nxt = -1, cal[w, HEADS, b]
        while nxt >= 0 and (slot[w, END, nxt] < end or (slot[w, END, nxt] == end and nxt < s)):
            prev, nxt = nxt, slot[w, NXT, nxt]
        slot[w, NXT, s] = nxt
        if prev < 0:
            cal[w, HEADS, b] = s
        else:
            slot[w, NXT, prev] = s
    return t_start


@njit(cache=True, _nrt=False)
def load_now(si, sf, w, version, pause_s, now):
    """Worker w loads weights at its current step boundary: a pause, then tokens carry `version`."""
    sf[w, VBASE] = _version_sum(sf[w, VBASE], si[w, VER], si[w, VBASE_STEP], si[w, K_STEP])
    si[w, VBASE_STEP] = si[w, K_STEP]
    si[w, VER] = version
    sf[w, T] = max(sf[w, T], now) + pause_s


# Prefill parameters (pf): seconds = (LINEAR·p + QUADRATIC·p(p+1)/2) / RATE, or the measured curve when it has points,
# times SLOWDOWN (the generation co-location factor)
PF_LINEAR, PF_QUADRATIC, PF_RATE, PF_SLOWDOWN = range(4)


@njit(cache=True, _nrt=False)
def prefill_time(pf, xs, ys, tokens):
    """Seconds to prefill `tokens` prompt tokens (cost.PrefillCurve): one compiled function, so that the SimPy
    engine (through CostModel.prefill_s) and the compiled loop charge the same float. A measured curve (xs, ys) is
    piecewise-linear, extended linearly beyond both ends (measured.interp_linear) and floored at 0."""
    p = float(tokens)
    n = xs.shape[0]
    if n == 0:
        s = (pf[PF_LINEAR] * p + pf[PF_QUADRATIC] * p * (p + 1.0) / 2.0) / pf[PF_RATE]
    else:
        i = 1
        while i < n - 1 and xs[i] < p:  # the first point at or above p, kept within the end segments
            i += 1
        t = (p - xs[i - 1]) / (xs[i] - xs[i - 1])
        s = max(0.0, ys[i - 1] + t * (ys[i] - ys[i - 1]))
    return s * pf[PF_SLOWDOWN]
