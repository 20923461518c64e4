"""Compiled core of a rollout worker: its continuous batch, advanced analytically between events.

All active sequences advance one token per decode step, so in *step space* a sample admitted at step k
with L tokens ends at step k + L: the samples sorted by (end step, slot) give the completions in order. The
wall time of a run of decode steps with n sequences active is a closed-form sum, because the step time is
piecewise linear in the batch's total context x = n*k + ksum (ksum = Σ prompt_i - start_i) and x grows
linearly in k. No step is simulated one by one and nothing is approximated.

The samples wait in a calendar: bucket (end >> BSHIFT) mod NBUCKETS, each a list sorted by (end, slot).
Every active end lies in (k, k + max_new_tokens], a window shorter than the calendar, so the first non-empty
bucket after step k holds the next completion, and a dry run (a peek) can read ahead without changing it.

KV-cache capacity (`hardware.memory.kv_policy`, docs/design.md "KV-cache admission and preemption"): a worker holds
a budget of KV tokens. Its running sequences hold their context, x = n*k + ksum tokens at step k, and decode step k
writes one more per sequence, so it needs x + n <= budget. Under `preempt_recompute` / `preempt_swap` a group is
admitted when its prompts (plus the first token each) fit beside that, and when a step would outgrow the budget the
newest running sequence is evicted until it fits, as vLLM's V1 scheduler does under FCFS
(vllm/v1/core/sched/scheduler.py: `preempted_req = self.running.pop()`, then `waiting.prepend_request`): evicted
sequences wait, newest first, ahead of any new group, and resume when completions make room, re-prefilling their
prompt and generated tokens (recompute) or copying their KV back from host memory (swap, as vLLM V0's
PreemptionMode.SWAP, vllm/core/scheduler.py; each way costs the worker context x SWAP_S). Under `admit_reserve` a
sequence reserves prompt + max_new_tokens at admission and nothing is ever evicted. The overflow step is a closed
form too (the first k with n*(k+1) + ksum > budget), so capacity costs no per-step work. A peek stops where a
preemption or a resumption would happen (flag BATCH_EVENT): they change the batch, which only a commit may do.

Admission by sample (`cluster.admission: per_sample`, as vLLM and SGLang expand a request of n samples into n
sequences): a group is admitted when one slot (and KV room for one sequence) is free; its samples start while slots
and room last, and the rest wait, ahead of any new group but behind evicted sequences, to start one by one at later
step boundaries where completions free slots. The group's prompt is prefilled once, at admission (later samples
reuse it, as a prefix cache does).

Multi-turn samples (`workload.turns`, docs/design.md "Multi-turn samples"): a turn that ends leaves the batch at its
step boundary but keeps its slot, its version sum set aside as an evicted sequence's is, and waits in a heap of
environment calls ordered by return time (its cache kept, counted in HELD, or released). It joins the batch at the
first step boundary at or after its return (found like catch_up's boundary), charged the prefill of its tool output
(kept cache) or of its whole context, and decodes its next turn. Kept caches give way before any eviction.

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
# PER_SAMPLE (cluster.admission per_sample): a group is admitted with one free slot; its samples that find no slot
# (or no KV room) wait, N_PEND of them from sample id PEND_SID on, of group slot PEND_GS, and start as room frees.
# Multi-turn (workload.turns): TURNS per sample; N_TOOL samples in environment calls (a heap, TOOLQ[:N_TOOL]); HELD
# KV tokens their kept caches hold; TOOL_RELEASE: they free their cache instead.
(K_STEP, N_ACTIVE, KSUM, VER, VBASE_STEP, N_FREE, N_GS_FREE, PAUSE_STEP, PAUSE_VER, N_DONE, BSHIFT, NBUCKETS,
 KV_BUDGET, KV_POLICY, MAX_NEW, RESERVED, N_WAIT, ADMIT_SEQ, N_PREEMPT, KV_PEAK, WANT_ROOM, PER_SAMPLE, N_PEND,
 PEND_SID, PEND_GS, PEND_PROMPT, TURNS, TOOL_RELEASE, N_TOOL, HELD) = range(30)
SI_LEN = 30
# Float scalars (sf): KV_AREA is the integral of KV tokens in use over decode time (token-seconds)
T, VBASE, PAUSE_S, EVT_T, SWAP_S, KV_AREA = range(6)
SF_LEN = 6
# KV policies (KV_POLICY): `hardware.memory.kv_policy`, in config order
KV_UNLIMITED, KV_RECOMPUTE, KV_SWAP, KV_RESERVE = range(4)
# Rows of the per-slot integer table (slot: END is the end step, NXT the next slot in its bucket), of the
# per-group-slot table (gs; a dry run counts LEFT down too and lists in UNDO the group slots it restores) and of the
# calendar (cal: bucket heads, and room for the slots that end at one step). KV: ORDER stamps a running sequence's
# (re)admission (-1: not running), RES its reservation (admit_reserve); an evicted one keeps its context CTX and
# tokens still to come REMAIN, and WAITQ stacks the evicted slots (the last evicted on top). Multi-turn: TURN is the
# turn a sample is in (or returns to from its environment call, with its context CTX, its cache held while KEPT),
# TOOLQ is a heap of the slots in calls (the first to return at its root).
SID, LEN, KOFF, GS, FREE, END, NXT, ORDER, RES, CTX, REMAIN, WAITQ, TURN, TOOLQ, KEPT = range(15)
SLOT_ROWS = 15
# Rows of the per-slot float table (slot_f): the version sum its tokens started from (while out of the batch, the
# sum of its tokens' versions so far), and when its environment call returns
VSTART, T_RET = range(2)
LEFT, GID, GS_FREE, UNDO = range(4)
HEADS, DUE = range(2)
NO_STEP = 1 << 62
# Event flags returned by advance(); BATCH_EVENT: a peek stopped where sequences would be evicted, resumed or started
GROUPS_DONE, SLOTS_FREE, BATCH_EVENT = 1, 2, 4


def new_state(n_workers: int, max_concurrency: int, max_len: int, kv_budget: int = 0, kv_policy: int = KV_UNLIMITED,
              swap_s: float = 0.0, per_sample: bool = False, turns: int = 1, tool_release: bool = False):
    """Fresh state of n workers whose samples (each turn of a sample) have at most max_len tokens: (si, sf, cal,
    slot, slot_f, gs, done), worker w's at index w of each. kv_budget: KV tokens a worker holds (with kv_policy;
    swap_s: seconds to copy one token's KV between device and host). per_sample: admission by sample rather than
    by group. turns: generation turns per sample; tool_release: a sample in an environment call frees its cache."""
    w, c = n_workers, max_concurrency
    n_buckets = 1 << min(10, max_len.bit_length())
    bshift = 0  # the calendar spans max_len + one bucket, so the window never wraps onto its first bucket
    while n_buckets << bshift < max_len + 1 + (1 << bshift):
        bshift += 1
    si = np.zeros((w, SI_LEN), np.int64)
    sf = np.zeros((w, SF_LEN), np.float64)
    si[:, N_FREE] = c
    si[:, N_GS_FREE] = c + 1  # groups in flight: one per held slot, and per_sample a last one whose samples wait
    si[:, PAUSE_STEP] = -1
    si[:, BSHIFT] = bshift
    si[:, NBUCKETS] = n_buckets
    si[:, KV_BUDGET], si[:, KV_POLICY], si[:, MAX_NEW], si[:, PER_SAMPLE] = kv_budget, kv_policy, max_len, per_sample
    si[:, TURNS], si[:, TOOL_RELEASE] = turns, tool_release
    sf[:, SWAP_S] = swap_s
    slot = np.zeros((w, SLOT_ROWS, c), np.int64)
    slot[:, FREE] = np.arange(c)
    slot[:, ORDER] = -1
    gs = np.zeros((w, 4, c + 1), np.int64)
    gs[:, GS_FREE] = np.arange(c + 1)
    cal = np.full((w, 2, max(n_buckets, c)), -1, np.int64)
    return si, sf, cal, slot, np.zeros((w, 2, c), np.float64), gs, np.zeros((w, c + 1), np.int64)


@njit(cache=True, _nrt=False)
def span_time_area(xs, ys, row, n, ksum, k1, k2, with_area):
    """(Σ_{k=k1}^{k2-1} h(n*k + ksum), Σ_{k=k1}^{k2-1} (n*k + ksum + n) * h(n*k + ksum)) for h piecewise linear
    through (xs[row], ys[row]), extrapolated past the ends: the steps' seconds and, `with_area`, the KV tokens each
    step holds (its context and the token it writes) times its seconds (else 0). The area's sums run over j = k - lo
    from each segment's first step, so that nothing cancels at large k."""
    if k2 <= k1:
        return 0.0, 0.0
    total = area = 0.0
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
        if with_area:
            a = ys[row, j] - slope * x0  # h(u) = a + slope*u
            c = float(cnt)
            u0 = float(n * lo + ksum)  # u = u0 + n*j over the segment's steps
            j1, j2 = c * (c - 1.0) / 2.0, (c - 1.0) * c * (2.0 * c - 1.0) / 6.0
            su = c * u0 + n * j1
            su2 = c * u0 * u0 + 2.0 * u0 * n * j1 + n * n * j2
            area += a * su + a * n * c + slope * su2 + slope * n * su
    return total, area


@njit(cache=True, _nrt=False)
def span_time(xs, ys, row, n, ksum, k1, k2):
    """The seconds of decode steps k1..k2-1 (span_time_area's first sum)."""
    return span_time_area(xs, ys, row, n, ksum, k1, k2, False)[0]


@njit(cache=True, _nrt=False)
def _first_boundary_at(xs, ys, n, ksum, k, hi, t, when):
    """The first step boundary k' in (k, hi] that n sequences decoding from step k at time t reach at or after
    `when` (the caller knows boundary hi does)."""
    lo = k + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if t + span_time(xs, ys, n, n, ksum, k, mid) >= when:
            hi = mid
        else:
            lo = mid + 1
    return lo


@njit(cache=True, _nrt=False)
def _version_sum(vbase, ver, vbase_step, step):
    """Σ of token versions over decode steps before `step` (VBASE up to VBASE_STEP, then VER per step)."""
    return vbase + ver * (step - vbase_step)


@njit(cache=True, _nrt=False)
def in_flight(si, w):
    """Worker w's samples not yet complete: decoding, evicted, waiting for a slot, or in an environment call."""
    return si[w, N_ACTIVE] + si[w, N_WAIT] + si[w, N_PEND] + si[w, N_TOOL]


@njit(cache=True, _nrt=False)
def _returns_before(slot_f, w, a, b):
    """Whether slot a's environment call returns before slot b's (ties: the lower slot first)."""
    ra, rb = slot_f[w, T_RET, a], slot_f[w, T_RET, b]
    return ra < rb or (ra == rb and a < b)


@njit(cache=True, _nrt=False)
def _push_call(slot, slot_f, w, n_tool, s):
    """Put slot s into worker w's heap of environment calls (TOOLQ[:n_tool], the first to return at the root)."""
    i = n_tool
    while i > 0:
        parent = (i - 1) // 2
        if not _returns_before(slot_f, w, s, slot[w, TOOLQ, parent]):
            break
        slot[w, TOOLQ, i] = slot[w, TOOLQ, parent]
        i = parent
    slot[w, TOOLQ, i] = s


@njit(cache=True, _nrt=False)
def _pop_call(slot, slot_f, w, n_tool):
    """Take the first call to return off the heap of n_tool calls; returns its slot."""
    first, n = slot[w, TOOLQ, 0], n_tool - 1
    last, i = slot[w, TOOLQ, n], 0
    while 2 * i + 1 < n:
        child = 2 * i + 1
        if child + 1 < n and _returns_before(slot_f, w, slot[w, TOOLQ, child + 1], slot[w, TOOLQ, child]):
            child += 1
        if not _returns_before(slot_f, w, slot[w, TOOLQ, child], last):
            break
        slot[w, TOOLQ, i] = slot[w, TOOLQ, child]
        i = child
    slot[w, TOOLQ, i] = last
    return first


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
def _insert(si, cal, slot, w, s):
    """Put slot s into its end step's bucket, kept in (end, slot) order."""
    end = slot[w, END, s]
    b = (end >> si[w, BSHIFT]) & (si[w, NBUCKETS] - 1)
    prev, nxt = -1, cal[w, HEADS, b]
    while nxt >= 0 and (slot[w, END, nxt] < end or (slot[w, END, nxt] == end and nxt < s)):
        prev, nxt = nxt, slot[w, NXT, nxt]
    slot[w, NXT, s] = nxt
    if prev < 0:
        cal[w, HEADS, b] = s
    else:
        slot[w, NXT, prev] = s


@njit(cache=True, _nrt=False)
def _unlink(si, cal, slot, w, s):
    """Take slot s (not ended) out of its bucket."""
    b = (slot[w, END, s] >> si[w, BSHIFT]) & (si[w, NBUCKETS] - 1)
    prev, cur = -1, cal[w, HEADS, b]
    while cur != s:
        prev, cur = cur, slot[w, NXT, cur]
    if prev < 0:
        cal[w, HEADS, b] = slot[w, NXT, s]
    else:
        slot[w, NXT, prev] = slot[w, NXT, s]


@njit(cache=True, _nrt=False)
def _free_kv(policy, budget, n, k, ksum, reserved):
    """KV tokens free at step k: the budget less the reservations (admit_reserve), or less what the next decode step
    needs (the n running contexts, n*k + ksum tokens, and one token each)."""
    if policy == KV_RESERVE:
        return budget - reserved
    return budget - (n * k + ksum + n)


@njit(cache=True, _nrt=False)
def _overflow_step(budget, n, k, ksum):
    """The first step at or after k whose decode would outgrow the budget: the first k' with n*(k'+1) + ksum >
    budget (an evicting worker stops there to evict)."""
    return max(k, (budget - ksum) // n)


@njit(cache=True, _nrt=False)
def _seq_need(si, w, prompt_len):
    """KV tokens one more sequence needs to start: its prompt and first token, or (admit_reserve) its prompt and
    max_new_tokens."""
    return prompt_len + (si[w, MAX_NEW] if si[w, KV_POLICY] == KV_RESERVE else 1)


@njit(cache=True, _nrt=False)
def kv_need(si, w, group_size, prompt_len):
    """KV tokens worker w must see free to admit a group of prompt_len-token prompts: the whole group's, or
    (per_sample) one sequence's; 0 without a budget."""
    if si[w, KV_POLICY] == KV_UNLIMITED:
        return 0
    return (1 if si[w, PER_SAMPLE] else group_size) * _seq_need(si, w, prompt_len)


@njit(cache=True, _nrt=False)
def can_admit(si, w, group_size, prompt_len):
    """Whether worker w may admit a group of prompt_len-token prompts now: no evicted or waiting sample goes first,
    and the slots and KV room (beside the caches kept through environment calls) are free for the whole group, or
    (per_sample) for one sequence. A worker decoding nothing takes any group (the config check refuses a KV budget
    below one group at its longest; kept caches give way)."""
    if si[w, N_WAIT] > 0 or si[w, N_PEND] > 0 or si[w, N_FREE] < (1 if si[w, PER_SAMPLE] else group_size):
        return False
    n = si[w, N_ACTIVE]
    return si[w, KV_POLICY] == KV_UNLIMITED or n == 0 or _free_kv(
        si[w, KV_POLICY], si[w, KV_BUDGET] - si[w, HELD], n, si[w, K_STEP], si[w, KSUM], si[w, RESERVED]) >= kv_need(
        si, w, group_size, prompt_len)


@njit(cache=True, _nrt=False)
def _first_turn(si, w, sid, lens, turn_len):
    """Tokens sample sid generates before its first environment call: its whole response in a one-turn workload."""
    return lens[sid] if si[w, TURNS] == 1 else turn_len[sid * si[w, TURNS]]


@njit(cache=True, _nrt=False)
def _place(si, cal, slot, slot_f, w, s, sid, length, first, prompt_len, gslot, k, vsum, reserve):
    """Sample sid (of group slot gslot; `length` tokens in all, `first` in its first turn) starts in free slot s at
    step k; the caller counts it in."""
    slot[w, SID, s] = sid
    slot[w, LEN, s] = length
    slot[w, KOFF, s] = prompt_len - k
    slot[w, GS, s] = gslot
    slot[w, TURN, s] = 0
    slot_f[w, VSTART, s] = vsum
    slot[w, END, s] = k + first
    slot[w, ORDER, s] = si[w, ADMIT_SEQ]
    si[w, ADMIT_SEQ] += 1
    slot[w, RES, s] = reserve
    _insert(si, cal, slot, w, s)


@njit(cache=True, _nrt=False)
def _rejoin(si, cal, slot, slot_f, w, s, ctx, remaining, k, vsum):
    """Slot s, out of the batch (evicted, or back from an environment call) with a context of ctx tokens, decodes
    again from step k (version sum vsum) for `remaining` tokens; the caller counts it in (n, ksum += ctx - k)."""
    slot[w, KOFF, s] = ctx - k
    slot[w, END, s] = k + remaining
    _insert(si, cal, slot, w, s)
    slot[w, ORDER, s] = si[w, ADMIT_SEQ]
    si[w, ADMIT_SEQ] += 1
    slot_f[w, VSTART, s] = vsum - slot_f[w, VSTART, s]  # from the sum of its tokens' versions so far


@njit(cache=True, _nrt=False)
def advance(si, sf, cal, slot, slot_f, gs, done, w, xs, ys, lens, turn_len, turn_tool, turn_env, t_end, v_end, v_mean,
            preempts, pre, until, want_free, dry):
    """Decode worker w until its first event: a group completes (GROUPS_DONE, ids in done[w, :si[w, N_DONE]])
    or at least `want_free` slots are free, nothing waits and the KV budget has si[w, WANT_ROOM] tokens free
    (SLOTS_FREE; 0 disables it). Returns the flags, or 0 if nothing is left in flight or the next event lies beyond
    `until`. The event time is sf[w, EVT_T]. With `dry`, nothing else is written (group counts it counts down are
    restored before it returns): a peek at when the next event is, which also stops where sequences would be evicted, resumed, started,
    leave for an environment call or come back from one (BATCH_EVENT). lens: response lengths per sample id
    (turn_len, turn_tool, turn_env: multi-turn, per sample id and turn, each turn's length and the tool tokens and
    seconds of the call after it); preempts: evictions per sample id; pre: the prefill table (prefill_time) that
    recomputation and returns from environment calls are charged by."""
    n, k, ksum, ver, vbase_step = si[w, N_ACTIVE], si[w, K_STEP], si[w, KSUM], si[w, VER], si[w, VBASE_STEP]
    n_free, n_gs_free, pause = si[w, N_FREE], si[w, N_GS_FREE], si[w, PAUSE_STEP]
    t, vbase = sf[w, T], sf[w, VBASE]
    policy, budget = si[w, KV_POLICY], si[w, KV_BUDGET]
    evicts = policy == KV_RECOMPUTE or policy == KV_SWAP
    reserved, n_wait, peak, area = si[w, RESERVED], si[w, N_WAIT], si[w, KV_PEAK], sf[w, KV_AREA]
    n_pend, pend_prompt = si[w, N_PEND], si[w, PEND_PROMPT]
    turns, n_tool, held = si[w, TURNS], si[w, N_TOOL], si[w, HELD]
    bucket_mask, bshift = si[w, NBUCKETS] - 1, si[w, BSHIFT]
    n_undo = 0  # a dry run's completions so far, whose group counts it restores at the end
    sf[w, EVT_T] = np.inf
    flags = n_done = 0
    while n > 0 or n_tool > 0:
        # The next return from an environment call joins at the first step boundary at or after it.
        t_ret = np.inf
        if n_tool > 0:
            t_ret = slot_f[w, T_RET, slot[w, TOOLQ, 0]]
        span_s = span_kv = 0.0
        k_next = NO_STEP
        if n == 0:  # nothing decodes: the worker waits for the environment
            target, t_new = k, max(t, t_ret)
        else:
            k_next = _next_end(si, cal, slot, w, k)
            target = pause if 0 <= pause < k_next else k_next
            if evicts and (n > 1 or held > 0):  # the first step that would outgrow the budget (the last sequence
                target = min(target, _overflow_step(budget - held, n, k, ksum))  # always runs, kept caches give way)
            timed = False  # span_s holds the span to target
            if t_ret <= t:
                target = k
            elif n_tool > 0:
                span_s, timed = span_time(xs, ys, n, n, ksum, k, target), True
                if t_ret <= t + span_s:
                    target, timed = _first_boundary_at(xs, ys, n, ksum, k, target, t, t_ret), False
            if policy != KV_UNLIMITED and not dry:
                span_s, span_kv = span_time_area(xs, ys, n, n, ksum, k, target, True)
            elif not timed:
                span_s = span_time(xs, ys, n, n, ksum, k, target)
            t_new = t + span_s
        if t_new > until:
            sf[w, EVT_T] = t_new
            break
        if policy != KV_UNLIMITED and not dry and target > k:
            area += span_kv + held * span_s
            peak = max(peak, n * target + ksum + held)  # at the segment's last step, n*(target-1) + ksum + n
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
                ksum -= slot[w, KOFF, s]
                reserved -= slot[w, RES, s]
                sid, turn = slot[w, SID, s], slot[w, TURN, s]
                if turn + 1 < turns:  # the turn ends, not the sample: it leaves for an environment call
                    if dry:
                        flags |= BATCH_EVENT
                        continue
                    ctx = k + slot[w, KOFF, s]
                    slot[w, CTX, s], slot[w, TURN, s], slot[w, ORDER, s] = ctx, turn + 1, -1
                    slot_f[w, VSTART, s] = vsum - slot_f[w, VSTART, s]  # its tokens' versions so far
                    slot_f[w, T_RET, s] = t + turn_env[sid * turns + turn]
                    slot[w, KEPT, s] = 1 - si[w, TOOL_RELEASE]
                    held += ctx * slot[w, KEPT, s]
                    _push_call(slot, slot_f, w, n_tool, s)
                    n_tool += 1
                    continue
                if not dry:
                    t_end[sid] = t
                    v_end[sid] = ver
                    v_mean[sid] = (vsum - slot_f[w, VSTART, s]) / slot[w, LEN, s]
                    slot[w, FREE, n_free] = s
                    slot[w, ORDER, s] = -1
                n_free += 1
                g = slot[w, GS, s]
                gs[w, LEFT, g] -= 1
                if dry:
                    gs[w, UNDO, n_undo] = g
                    n_undo += 1
                if gs[w, LEFT, g] == 0:
                    if not dry:
                        done[w, n_done] = gs[w, GID, g]
                        gs[w, GS_FREE, n_gs_free] = g
                    n_done += 1
                    n_gs_free += 1
                    flags |= GROUPS_DONE
            # Completions made room: the evicted resume, the last evicted first, while their context fits (or the
            # batch is empty), re-prefilled or swapped back in.
            while evicts and n_wait > 0:
                s = slot[w, WAITQ, n_wait - 1]
                ctx = slot[w, CTX, s]
                if n > 0 and _free_kv(policy, budget - held, n, k, ksum, reserved) < ctx + 1:
                    break
                if dry:
                    flags |= BATCH_EVENT
                    break
                n_wait -= 1
                _rejoin(si, cal, slot, slot_f, w, s, ctx, slot[w, REMAIN, s], k,
                        _version_sum(vbase, ver, vbase_step, k))
                ksum += ctx - k
                n += 1
                t += prefill_time(pre[0], pre[1], pre[2], ctx) if policy == KV_RECOMPUTE else ctx * sf[w, SWAP_S]
            # ... then a group's waiting samples (per_sample) start, one per free slot while KV room lasts.
            while n_pend > 0 and n_wait == 0 and n_free > 0 and (policy == KV_UNLIMITED or n == 0 or _free_kv(
                    policy, budget - held, n, k, ksum, reserved) >= _seq_need(si, w, pend_prompt)):
                if dry:
                    flags |= BATCH_EVENT
                    break
                sid = si[w, PEND_SID]
                reserve = pend_prompt + si[w, MAX_NEW] if policy == KV_RESERVE else 0
                n_free -= 1
                _place(si, cal, slot, slot_f, w, slot[w, FREE, n_free], sid, lens[sid],
                       _first_turn(si, w, sid, lens, turn_len), pend_prompt, si[w, PEND_GS], k,
                       _version_sum(vbase, ver, vbase_step, k), reserve)
                n += 1
                ksum += pend_prompt - k
                reserved += reserve
                n_pend -= 1
                si[w, PEND_SID] += 1
        # Samples back from their environment calls by now join the batch, the earliest first, with the tool output
        # prefilled onto their kept cache, or their whole context re-prefilled.
        while n_tool > 0 and slot_f[w, T_RET, slot[w, TOOLQ, 0]] <= t:
            if dry:
                flags |= BATCH_EVENT
                break
            s = _pop_call(slot, slot_f, w, n_tool)
            n_tool -= 1
            sid, turn = slot[w, SID, s], slot[w, TURN, s]
            before = slot[w, CTX, s]
            ctx = before + turn_tool[sid * turns + turn - 1]
            cost = prefill_time(pre[0], pre[1], pre[2], ctx)
            if slot[w, KEPT, s]:
                held -= before
                cost = max(0.0, cost - prefill_time(pre[0], pre[1], pre[2], before))
            _rejoin(si, cal, slot, slot_f, w, s, ctx, turn_len[sid * turns + turn], k,
                    _version_sum(vbase, ver, vbase_step, k))
            ksum += ctx - k
            n += 1
            t += cost
        # The next step would outgrow the budget: drop the kept caches of samples in environment calls, the one
        # back last first (they re-prefill on return), then evict the newest running sequences until it fits.
        while evicts and (n > 1 or held > 0) and _free_kv(policy, budget - held, n, k, ksum, reserved) < 0:
            if dry:
                flags |= BATCH_EVENT
                break
            if held > 0:
                s = -1
                for i in range(n_tool):
                    c = slot[w, TOOLQ, i]
                    if slot[w, KEPT, c] and (s < 0 or slot_f[w, T_RET, c] > slot_f[w, T_RET, s] or (
                            slot_f[w, T_RET, c] == slot_f[w, T_RET, s] and c < s)):
                        s = c
                slot[w, KEPT, s] = 0
                held -= slot[w, CTX, s]
                continue
            s, newest = -1, -1
            for i in range(slot.shape[2]):
                if slot[w, ORDER, i] > newest:
                    s, newest = i, slot[w, ORDER, i]
            _unlink(si, cal, slot, w, s)
            ctx = k + slot[w, KOFF, s]
            slot[w, CTX, s], slot[w, REMAIN, s], slot[w, ORDER, s] = ctx, slot[w, END, s] - k, -1
            slot_f[w, VSTART, s] = _version_sum(vbase, ver, vbase_step, k) - slot_f[w, VSTART, s]  # its tokens' versions
            n -= 1
            ksum -= slot[w, KOFF, s]
            slot[w, WAITQ, n_wait] = s
            n_wait += 1
            preempts[slot[w, SID, s]] += 1
            si[w, N_PREEMPT] += 1
            if policy == KV_SWAP:
                t += ctx * sf[w, SWAP_S]
        if target == k_next and want_free > 0 and n_free >= want_free and n_wait == 0 and n_pend == 0 and (
                policy == KV_UNLIMITED or n == 0 or _free_kv(policy, budget - held, n, k, ksum, reserved) >= si[
                    w, WANT_ROOM]):
            flags |= SLOTS_FREE
        if target == pause:  # an interruptible worker loads new weights at this step boundary
            vbase = _version_sum(vbase, ver, vbase_step, pause)
            vbase_step, ver = pause, si[w, PAUSE_VER]
            t += sf[w, PAUSE_S]
            pause = -1
        if flags:
            sf[w, EVT_T] = t_new  # the completions' time (a load at this boundary comes after)
            break
    for i in range(n_undo):
        gs[w, LEFT, gs[w, UNDO, i]] += 1
    if not dry:
        si[w, N_ACTIVE], si[w, K_STEP], si[w, KSUM], si[w, VER], si[w, VBASE_STEP] = n, k, ksum, ver, vbase_step
        si[w, N_FREE], si[w, N_GS_FREE], si[w, PAUSE_STEP], si[w, N_DONE] = n_free, n_gs_free, pause, n_done
        si[w, RESERVED], si[w, N_WAIT], si[w, KV_PEAK], si[w, N_PEND] = reserved, n_wait, peak, n_pend
        si[w, N_TOOL], si[w, HELD] = n_tool, held
        sf[w, T], sf[w, VBASE], sf[w, KV_AREA] = t, vbase, area
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
    policy, held = si[w, KV_POLICY], si[w, HELD]
    if (policy == KV_RECOMPUTE or policy == KV_SWAP) and (n > 1 or held > 0):  # and short of an eviction
        limit = min(limit, _overflow_step(si[w, KV_BUDGET] - held, n, k, ksum))
    if limit <= k:
        return
    if t + span_time(xs, ys, n, n, ksum, k, limit) < now:
        lo = limit  # every step before the limit ends before now
    else:
        lo = _first_boundary_at(xs, ys, n, ksum, k, limit, t, now)
    si[w, K_STEP] = lo
    if policy == KV_UNLIMITED:
        sf[w, T] = t + span_time(xs, ys, n, n, ksum, k, lo)
        return
    span_s, span_kv = span_time_area(xs, ys, n, n, ksum, k, lo, True)
    sf[w, T] = t + span_s
    sf[w, KV_AREA] += span_kv + held * span_s
    si[w, KV_PEAK] = max(si[w, KV_PEAK], n * lo + ksum + held)


@njit(cache=True, _nrt=False)
def admit(si, sf, cal, slot, slot_f, gs, w, gid, group_size, lens, turn_len, prompt_len, now, prefill_s):
    """Add group gid to worker w's batch: group_size samples sharing a prompt, sample ids gid*group_size + j,
    response lengths lens[sample id] (turn_len: of each turn, multi-turn); per_sample, those that find no free slot
    or KV room wait (N_PEND). Returns its start time."""
    sf[w, T] = max(sf[w, T], now)  # an idle worker's clock catches up with the world
    t_start = sf[w, T]
    sf[w, T] += prefill_s
    k = si[w, K_STEP]
    si[w, N_GS_FREE] -= 1
    g = gs[w, GS_FREE, si[w, N_GS_FREE]]
    gs[w, LEFT, g] = group_size
    gs[w, GID, g] = gid
    vsum = _version_sum(sf[w, VBASE], si[w, VER], si[w, VBASE_STEP], k)
    policy = si[w, KV_POLICY]
    reserve = prompt_len + si[w, MAX_NEW] if policy == KV_RESERVE else 0
    for sid in range(gid * group_size, (gid + 1) * group_size):
        if sid > gid * group_size and si[w, PER_SAMPLE] and (si[w, N_FREE] == 0 or (
                policy != KV_UNLIMITED and _free_kv(policy, si[w, KV_BUDGET] - si[w, HELD], si[w, N_ACTIVE], k,
                                                    si[w, KSUM], si[w, RESERVED]) < _seq_need(si, w, prompt_len))):
            si[w, N_PEND], si[w, PEND_SID] = (gid + 1) * group_size - sid, sid
            si[w, PEND_GS], si[w, PEND_PROMPT] = g, prompt_len
            break
        si[w, N_FREE] -= 1
        _place(si, cal, slot, slot_f, w, slot[w, FREE, si[w, N_FREE]], sid, lens[sid],
               _first_turn(si, w, sid, lens, turn_len), prompt_len, g, k, vsum, reserve)
        si[w, KSUM] += prompt_len - k
        si[w, N_ACTIVE] += 1
        si[w, RESERVED] += reserve
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
