"""`stalecast profile CONFIG`: measure this machine for the configured model and device, as a run uses them.

Every table is timed through the code a run executes, so the simulator is fed the real trainer's costs:

- decode[n][c]: the mean time of a decode step of the rollout engine a worker runs (`real.engine`, with the
  worker's slots) with n active sequences of mean context c. The prompts are random tokens with the spread of
  lengths the task's prompts have; EOS is disabled so none leaves the batch.
- prefill(tokens): the same call's first step (the prefill, then a sampling) less one of its decode steps,
  against the prompt tokens it prefilled (the rows' prompt lengths summed: a worker prefills each sample's copy
  of its group's prompt). Less one step because the simulator charges every token a decode step, the first
  included, while the engine samples the first token from the prefill's logits: so a batch costs the same in
  both.
- train(tokens): `Learner.train_on` on synthetic groups of the configured batch (task prompts, rewards,
  advantages, forward/backward per staleness range, AdamW, metrics), minus its weight publication, against the
  tokens the step computes: rows x the longest row (prompt + response), as the learner pads a batch.
- sync_s: the learner's weight publication plus one worker's load (`SharedMemoryChannel`).
- colocation: a worker's work (`colocation_call`: a whole batch, prefill and decode steps, under static batching;
  mostly decode steps at half occupancy under continuous batching) timed while the learner trains and the other
  workers generate in processes of their own, and (sync mode) while only the other workers generate, each at
  worker idle fractions 0, 30 and 60 % (`IdleCurve`): a worker idles between bursts of batches as a run's
  does. Learner steps timed while every worker generates. Each over its time alone and back to back, in
  alternating phases of repeated calls (the other processes pause between) so that the machine's drift falls on
  both. On a GPU that is the share of one device, on a CPU the share of its cores and of whatever they share.
  On the 2-core VM, with the other core training, a worker's batches ran x1.04 of their time alone back to back,
  but x1.17, x1.39 and x1.28 when it idled 15, 47 and 73 % of the time (x0.97, x1.15, x1.18 with nothing beside
  it); in the validation runs generation had run x1.1-1.4 of a charge measured back to back. The simulator
  charges the factor at the idle fraction the run settles at (`sim.engine.pipeline.settled_cost_model`).
  With several workers, sync generation is also timed beside k = 1 .. workers - 1 other workers generating
  back to back (`sync_gen_beside`): a sync run's long tail drains on fewer workers than it starts on, and on the
  2-core VM a worker beside one other ran x1.15, beside two x2.3-2.9; the simulator charges the curve's mean
  over the run's generating time (`sim.hardware.cost.crowding`).

A shared machine drifts: on a 2-core VM the same decode call's 5-second median wanders by ~9 % (coefficient of
variation), its 60-second mean by ~4 %. So every point is timed once per round, each round in a shuffled order,
and a point is the median over rounds: drift falls on every point alike and averages over the whole profile
instead of biasing whichever points ran in a slow spell. Decode rounds and learner rounds run in blocks, half of
each kind's rounds per block, alternating (decode, learner, decode, learner): a run's learner trains step after
step with nothing else in its process, and on the 2-core VM learner steps timed between decode calls of the
same process read ~10 % slower than steps back to back (156 vs 142 ms, 3 alternations). Nothing here writes
files: the command saves the returned profile (`sim.hardware.measured.save_profile`).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import torch

from sim.hardware.measured import Colocation, Curve, DecodeGrid, IdleCurve, MeasuredProfile

NO_EOS = -1  # an id no sampled token equals: every sequence runs to max_new_tokens
IDLE = (0.0, 0.3, 0.6)  # worker idle fractions the generation slowdown is measured at (runs idle ~0.1-0.7)
BURST_S = 0.1  # a worker idling is measured generating at least this long between gaps (runs: ~0.05-0.2 s)


@dataclass(frozen=True)
class ProfilePlan:
    """What to measure; `plan_for` derives it from a config."""
    active: tuple[int, ...]         # decode batch sizes (sequences)
    context: tuple[int, ...]        # mean context per sequence (tokens)
    train_lengths: tuple[int, ...]  # response length of every sample in a synthetic learner batch
    prompt_lengths: tuple[int, ...]  # the task's prompt lengths, one per group: their spread is the batches' padding
    decode_steps: int = 8           # decode steps timed per call (the call generates one more token)
    rounds: int = 20                # every point once per round (about 2 s a decode round and 1 s a learner round
                                    # on the tiny CPU example)
    colocation_blocks: int = 3      # co-location blocks per factor (alone, then warm-in and shared phases)
    colocation_warm_s: float = 5.0  # seconds the processes share before a block's shared phases are timed
    colocation_phase_s: float = 2.5  # seconds of each alone / shared phase (repeated calls)


def plan_for(cfg, quick: bool = False) -> ProfilePlan:
    """Batch sizes from 1 to a worker's max_concurrency (powers of two), contexts from a typical prompt to the
    longest prompt + max_new_tokens, learner batches from short to max_new_tokens responses."""
    from real.task import DigitTask
    from real.tokenizer import CharTokenizer

    task = DigitTask(cfg.real, CharTokenizer())
    prompt_lens = [len(p.ids) for p in task.sample(np.random.default_rng(0), 256)]
    top = cfg.cluster.max_concurrency
    active = sorted({*(2 ** i for i in range(int(np.log2(top)) + 1)), top})
    longest = max(prompt_lens) + cfg.workload.max_new_tokens
    context = sorted({int(round(c)) for c in np.geomspace(int(np.mean(prompt_lens)), longest, 3)})
    new = cfg.workload.max_new_tokens
    lengths = sorted({max(1, new * k // 8) for k in (1, 2, 4, 6, 8)})
    if quick:  # for tests: the ends of each axis only
        active, context, lengths = [active[0], active[-1]], [context[0], context[-1]], [lengths[0], lengths[-1]]
    short = {"rounds": 2, "colocation_blocks": 1, "colocation_warm_s": 0.25, "colocation_phase_s": 0.25} if quick else {}
    return ProfilePlan(tuple(active), tuple(context), tuple(lengths), tuple(prompt_lens), **short)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


# --------------------------------------------------------------------------- generation
class DecodeTimer:
    """Times decode calls of the rollout engine a worker runs (`real.engine`, its `cluster.max_concurrency` slots);
    used alone and inside a co-located measurement."""

    def __init__(self, model, tok, cfg, prompt_lengths: tuple[int, ...], seed: int = 0):
        from real.task import DigitTask

        self.model, self.tok, self.cfg = model, tok, cfg
        self.device = next(model.parameters()).device
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.spread = np.asarray(prompt_lengths) - int(round(np.mean(prompt_lengths)))  # per group, mean ~0
        self.engines: dict[tuple[int, int], object] = {}
        self.task_prompt_len = DigitTask(cfg.real, tok).max_prompt_len  # a worker's KV cache holds such prompts

    def engine(self, steps: int, prompt_len: int):
        """An engine whose sequences end after `steps` tokens (EOS disabled: none leaves early) and that holds
        prompts of `prompt_len`; kept for the next call that fits it. Its KV cache is as long as a worker's
        (longest prompt + max_new_tokens) unless the timed contexts need more."""
        from real.engine import Sampling, make_engine

        longest = max(prompt_len, self.task_prompt_len + max(0, self.cfg.workload.max_new_tokens - steps))
        key = (steps, longest)
        if key not in self.engines:
            sampling = Sampling(self.cfg.real.temperature, NO_EOS, steps)
            self.engines[key] = make_engine(self.cfg.real.engine, self.model, self.cfg.cluster.max_concurrency,
                                            sampling, 0, self.generator, max_prompt_len=longest)
        return self.engines[key]

    def prompts(self, n: int, prompt_len: int) -> list[list[int]]:
        """n random prompts of mean length ~prompt_len, a group's rows alike, spread as the task's prompts are."""
        G = self.cfg.workload.group_size
        lens = [max(1, prompt_len + int(self.spread[(i // G) % len(self.spread)])) for i in range(n)]
        return [self.rng.integers(4, self.tok.vocab_size, size=k).tolist() for k in lens]

    def point(self, n: int, context: int, steps: int) -> tuple[float, float, int]:
        """n sequences of mean context `context` admitted together, then `steps` decode steps: (mean seconds per
        decode step, seconds of the first step (prefill and one sampling), prompt tokens prefilled). The mean,
        not a median of steps: a process sharing a core is paused in time slices about as long as a step, so
        single steps take one or several slices and only the mean says what sharing costs."""
        prompts = self.prompts(n, max(1, context - steps // 2))  # the steps' contexts are centred on `context`
        engine = self.engine(steps + 1, max(map(len, prompts)))
        stamps: list[float] = []
        _sync(self.device)
        t0 = time.perf_counter()
        engine.admit(list(range(n)), prompts)
        for _ in range(steps + 1):  # the last step finishes every sequence: the engine is empty again
            engine.step()
            _sync(self.device)
            stamps.append(time.perf_counter())
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1), stamps[0] - t0, sum(map(len, prompts))


def colocation_call(cfg, plan: ProfilePlan) -> tuple[int, int, int]:
    """(sequences, mean context, decode steps) of the call a co-location factor is timed on: the work a run's worker
    does. Static batching: a full batch, prefill included (a prefill and a few steps of all its slots). Continuous
    batching: mostly decode steps at part occupancy (half the slots, a group at least; a response's worth of steps):
    a continuous worker's steps are decode steps of its active sequences with an occasional prefill, and on the 2-core
    VM a decode-heavy call read x4.1-4.2 beside the learner and two other workers where a full batch read x3.7."""
    c = plan.context[len(plan.context) // 2]
    if cfg.cluster.batching == "static":
        return cfg.cluster.max_concurrency, c, plan.decode_steps
    n = max(cfg.workload.group_size, cfg.cluster.max_concurrency // 2)
    return n, c, max(2, cfg.workload.max_new_tokens - 1)


# --------------------------------------------------------------------------- the learner
def synthetic_groups(cfg, task, length: int, seed: int = 0) -> list:
    """One batch of generated groups (random response tokens of `length`), as the learner receives them."""
    from real.learner import GroupRecord
    from real.worker import GroupDone, prompt_for

    rng = np.random.default_rng(seed)
    G = cfg.workload.group_size
    groups = []
    for gid in range(cfg.workload.batch_prompts):
        tokens = rng.integers(4, task.tok.vocab_size, size=(G, length)).tolist()
        done = GroupDone(gid, 0, 0.0, [0.0] * G, tokens, [[-1.0] * length for _ in range(G)],
                         [[0] * length for _ in range(G)])
        groups.append(GroupRecord(gid, 0, len(prompt_for(task, cfg.seed, gid).ids), 0.0, 0, done=done))
    return groups


def learner_step_timer(learner, cfg) -> Callable[[int], tuple[float, int, float]]:
    """time(length) -> (seconds of a learner step without its publication, the tokens it computed: rows x its
    longest row, as the learner pads, publication seconds)."""
    def time_step(length: int) -> tuple[float, int, float]:
        batch = synthetic_groups(cfg, learner.task, length)
        padded = len(batch) * cfg.workload.group_size * max(rec.prompt_len + length for rec in batch)
        _sync(learner.device)
        t = time.perf_counter()
        res = learner.train_on(learner.version, batch, t_wait=learner.now())
        _sync(learner.device)
        total = time.perf_counter() - t
        sync_s = res.metrics["time/weight_sync_s"]
        return total - sync_s, padded, sync_s
    return time_step


# --------------------------------------------------------------------------- co-location
def busy_main(kind: str, role: int, cfg_data: dict, go, idle, stop) -> None:
    """Spawned: generate (kind "generate") or train ("train") in a loop while `go` is set, until `stop` is set,
    on the core a run gives `role` (a worker id, or LEARNER). `idle` is set while no call is running, so a
    paused measurement can wait until the device is its own."""
    from real.model import build_policy, keep_to_core, resolve_device
    from sim.config import RunConfig

    cfg = RunConfig.model_validate(cfg_data)
    device = resolve_device(cfg)
    keep_to_core(role, cfg)  # as a run's processes do
    if kind == "generate":  # a worker's full batch: its slots, every sequence to max_new_tokens
        model, tok = build_policy(cfg, device)
        model.eval()
        plan, new = plan_for(cfg), cfg.workload.max_new_tokens
        timer = DecodeTimer(model, tok, cfg, plan.prompt_lengths, seed=1)
        call = lambda: timer.point(cfg.cluster.max_concurrency, plan.context[0] + new // 2, max(2, new - 1))  # noqa: E731
    else:
        learner, _ = _standalone_learner(cfg, device)
        call = lambda: learner.train_on(learner.version, synthetic_groups(cfg, learner.task, cfg.workload.max_new_tokens // 2 or 1), 0.0)  # noqa: E731
    call()
    _sync(device)
    idle.set()
    while not stop.is_set():
        if not go.wait(0.05):
            continue
        idle.clear()
        call()
        _sync(device)
        idle.set()


def _standalone_learner(cfg, device: torch.device):
    """A Learner with its own weight channel and ledger, and no workers: for timing `train_on`."""
    from real.learner import Learner
    from real.model import build_policy
    from real.weights import SharedMemoryChannel
    from real.worker import Ledger

    ctx = torch.multiprocessing.get_context("spawn")
    model, tok = build_policy(cfg, device)
    channel = SharedMemoryChannel(model, ctx)
    learner = Learner(cfg, model, tok, channel, Ledger(ctx, cfg.pipeline.max_staleness, 0), None, check_workers=lambda: None,
                      deadline=float("inf"))
    learner.start_optimizer()
    learner.publish()
    return learner, channel


class Background:
    """Spawned processes, one per (kind, role), that generate or train while running (`resume`), and stand idle
    while paused (`pause`, which returns once every current call has ended): alone and shared timings can then
    alternate within seconds, so the machine's drift falls on both alike."""

    def __init__(self, kinds: list[tuple[str, int]], cfg):
        ctx = torch.multiprocessing.get_context("spawn")
        self.go, self.stop = ctx.Event(), ctx.Event()
        self.procs, self.idle = [], []
        data = cfg.model_dump(mode="json")
        for kind, role in kinds:
            idle = ctx.Event()
            p = ctx.Process(target=busy_main, args=(kind, role, data, self.go, idle, self.stop), daemon=True)
            p.start()
            self.procs.append(p)
            self.idle.append(idle)

    def _wait(self, done: Callable[[], bool]) -> None:
        while not done():
            for p in self.procs:
                if p.exitcode is not None:
                    raise RuntimeError(f"a co-location process ({p.name}) exited with code {p.exitcode}")
            time.sleep(0.001)

    def resume(self) -> None:
        self.go.set()
        self._wait(lambda: not any(e.is_set() for e in self.idle))

    def pause(self) -> None:
        self.go.clear()
        self._wait(lambda: all(e.is_set() for e in self.idle))

    def __enter__(self) -> "Background":
        self.pause()  # every process built and warmed up
        return self

    def __exit__(self, *exc) -> None:
        self.go.clear()
        self.stop.set()
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.terminate()


def slowdown(role: int, kinds: list[tuple[str, int]], cfg, measure: Callable[[], float], plan: ProfilePlan,
             idle: tuple[float, ...] = (0.0,)) -> list[float]:
    """Per idle fraction u in `idle`: the median of `measure()` (this process in `role`) beside busy processes of
    (kind, role), this process idling a fraction u of the time, over its median alone and back to back. It idles
    as a run's worker does, in gaps after bursts of calls at least `BURST_S` long. In blocks, so that drift falls
    on both sides: a phase alone, then the others resume, a warm-in (not timed) and a phase at each fraction (in an
    order rotating by block), then they pause. The warm-in because a neighbour's effect builds up: on the 2-core VM
    a worker beside a training learner ran x1.05-1.1 of its time alone in the first 5 s and x1.2-1.35 after
    (2.5-s medians), and a run shares for minutes."""
    from real.model import pinned, resolve_device

    def phase(u: float, seconds: float) -> list[float]:
        times, end = [], time.monotonic() + seconds
        while not times or time.monotonic() < end:
            burst = time.perf_counter()
            while not times or time.perf_counter() - burst < BURST_S:
                times.append(measure())
            if u > 0:
                time.sleep((time.perf_counter() - burst) * u / (1 - u))
        return times

    alone: list[float] = []
    shared: dict[float, list[float]] = {u: [] for u in idle}
    with Background(kinds, cfg) as background, pinned(role, resolve_device(cfg), cfg):
        for block in range(plan.colocation_blocks):
            alone += phase(0.0, plan.colocation_phase_s)
            background.resume()
            order = idle[block % len(idle):] + idle[:block % len(idle)]
            phase(order[0], plan.colocation_warm_s)
            for u in order:
                shared[u] += phase(u, plan.colocation_phase_s)
            background.pause()
    return [float(np.median(shared[u]) / np.median(alone)) for u in idle]


# --------------------------------------------------------------------------- the profile
def measure_profile(cfg, plan: ProfilePlan | None = None, progress: Callable[[str], None] | None = None
                    ) -> MeasuredProfile:
    """Measure every table for `cfg` on its device; `progress(label)` is called before each stage and round. On
    a CPU each part runs on the core a run gives its role (`real.model.cpu_cores`)."""
    from real.model import LEARNER, pinned, resolve_device

    plan = plan or plan_for(cfg)
    say = progress or (lambda label: None)
    device = resolve_device(cfg)
    if device.type == "cpu":
        torch.set_num_threads(1)  # each process of a run uses one thread
    learner, channel = _standalone_learner(cfg, device)
    model, tok = learner.model, learner.tok
    decoder = DecodeTimer(model, tok, cfg, plan.prompt_lengths)
    time_step = learner_step_timer(learner, cfg)
    points = [(n, c) for n in plan.active for c in plan.context]
    step_s = {p: [] for p in points}
    prefill_s: dict[int, list[float]] = {}  # prompt tokens -> seconds
    train_s: dict[int, list[float]] = {}   # padded tokens -> seconds
    publish: list[float] = []
    order = np.random.default_rng(0)

    def decode_round(timed: bool) -> None:
        model.eval()
        with pinned(0, device, cfg):
            for i in order.permutation(len(points)):
                (n, c) = points[i]
                step, first, prompt_tokens = decoder.point(n, c, plan.decode_steps)
                if timed:
                    step_s[(n, c)].append(step)
                    prefill_s.setdefault(prompt_tokens, []).append(max(0.0, first - step))

    def learner_round(timed: bool) -> None:
        with pinned(LEARNER, device, cfg):
            for i in order.permutation(len(plan.train_lengths)):
                seconds, padded, sync = time_step(plan.train_lengths[i])
                if timed:
                    train_s.setdefault(padded, []).append(seconds)
                    publish.append(sync)

    say("warm-up: every decode point and learner batch once")
    decode_round(timed=False)
    learner_round(timed=False)
    # Two blocks of each kind, alternating (decode, learner, decode, learner), so drift falls on both; within a
    # block the learner's steps run back to back, as a run's learner trains (see the module docstring).
    half = plan.rounds - plan.rounds // 2
    for block in (range(half), range(half, plan.rounds)):
        for kind, one_round in (("decode", decode_round), ("learner", learner_round)):
            for r in block:
                say(f"{kind} round {r + 1} of {plan.rounds}")
                one_round(timed=True)
    say("weight load")
    with pinned(0, device, cfg):
        channel.load_into(model)
        load_s = float(np.median([_timed(lambda: channel.load_into(model), device) for _ in range(plan.rounds)]))
    sync_s = float(np.median(publish)) + load_s

    colocation = None
    if cfg.cluster.colocated:
        n, c, steps = colocation_call(cfg, plan)
        workers = cfg.cluster.rollout_workers
        batch = lambda: _timed(lambda: decoder.point(n, c, steps), device)  # noqa: E731
        idling = f"idling {'/'.join(f'{u:.0%}' for u in IDLE)} of the time"
        say(f"co-location: generating beside the learner and {workers - 1} other worker(s), {idling}")
        gen = slowdown(0, [("train", LEARNER)] + [("generate", i) for i in range(1, workers)], cfg, batch, plan,
                       IDLE)
        length = cfg.workload.max_new_tokens // 2 or 1
        say(f"co-location: learner steps beside {workers} generating worker(s)")
        train, = slowdown(LEARNER, [("generate", i) for i in range(workers)], cfg, lambda: time_step(length)[0],
                          plan)
        # Sync mode: the workers generate beside each other (the learner idles), then idle while it trains.
        say(f"co-location: generating beside {workers - 1} other worker(s) as in sync mode, {idling}")
        sync_cfg = cfg.with_overrides({"pipeline.mode": "sync", "pipeline.interruptible": False})
        sync_gen = slowdown(0, [("generate", i) for i in range(1, workers)], sync_cfg, batch, plan, IDLE)
        # ... and against how many of them generate at once: a sync run's tail drains on fewer workers than it
        # started on (on the 2-core VM, beside one other worker x1.15, beside two x2.3-2.9).
        beside = [1.0]
        for k in range(1, workers):
            say(f"co-location: generating beside {k} other worker(s) as in sync mode, back to back")
            beside += slowdown(0, [("generate", i) for i in range(1, k + 1)], sync_cfg, batch, plan)
        colocation = Colocation(gen_slowdown=IdleCurve(IDLE, tuple(max(1.0, g) for g in gen)),
                                train_slowdown=max(1.0, train),
                                sync_gen_slowdown=IdleCurve(IDLE, tuple(max(1.0, g) for g in sync_gen)),
                                sync_gen_beside=tuple(max(1.0, g) for g in beside) if workers > 1 else None)

    return MeasuredProfile(
        machine=machine_record(device), model=cfg.real.model,
        decode=DecodeGrid(plan.active, tuple(float(c) for c in plan.context),
                          tuple(tuple(float(np.median(step_s[(n, c)])) for c in plan.context) for n in plan.active)),
        prefill=_median_curve(prefill_s), train=_median_curve(train_s), sync_s=sync_s, colocation=colocation)


def _median_curve(timings: dict[int, list[float]]) -> Curve:
    """Tokens -> the median of their timings, in token order."""
    tokens = sorted(timings)
    return Curve(tuple(float(t) for t in tokens), tuple(float(np.median(timings[t])) for t in tokens))


def machine_record(device: torch.device) -> dict:
    import os

    import transformers

    record = {"hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
              "torch": str(torch.__version__), "transformers": str(transformers.__version__), "device": str(device),
              "cpu_count": os.cpu_count(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record
