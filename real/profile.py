"""`stalecast profile CONFIG`: measure this machine for the configured model and device, as a run uses them.

Every table is timed through the code a run executes, so the simulator is fed the real trainer's costs:

- decode[n][c]: one decode step of `real.generate.generate` with n active sequences of mean context c
  (random prompts, EOS disabled so none leaves the batch): (t(K+1 new tokens) - t(1 new token)) / K.
- prefill(tokens): the rest of a `generate` call with one new token, against the prompt tokens it prefilled
  (rows x prompt length; a worker prefills each sample's copy of its group's prompt).
- train(tokens): `Learner.train_on` on synthetic groups of the configured batch (rewards, advantages,
  forward/backward per staleness range, AdamW, metrics), minus its weight publication, against the
  tokens the step computes: rows x the longest row (prompt + response), as the learner pads a batch.
- sync_s: the learner's weight publication plus one worker's load (`SharedMemoryChannel`).
- colocation: decode steps timed while the learner trains and the other workers generate in processes of
  their own, and learner steps timed while every worker generates; each over its time alone, the two
  alternating (the other processes pause between) so that the machine's drift falls on both. On a GPU
  that is the share of one device, on a CPU the share of its cores.

Each point is the median of `repeats` timings after one untimed warm-up call. Nothing here writes files:
the command saves the returned profile (`sim.hardware.measured.save_profile`).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import torch

from sim.hardware.measured import Colocation, Curve, DecodeGrid, MeasuredProfile

NO_EOS = -1  # an id no sampled token equals: every sequence runs to max_new_tokens


@dataclass(frozen=True)
class ProfilePlan:
    """What to measure; `plan_for` derives it from a config."""
    active: tuple[int, ...]        # decode batch sizes (sequences)
    context: tuple[int, ...]       # mean context per sequence (tokens)
    train_lengths: tuple[int, ...]  # response length of every sample in a synthetic learner batch
    decode_steps: int = 8          # K decode steps per timing
    repeats: int = 3
    train_repeats: int = 5         # learner steps are longer and noisier than decode steps
    colocation_s: float = 4.0      # seconds each alternating co-location measurement runs at least


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
    lengths = sorted({max(1, new // 8), max(1, new // 2), new})
    if quick:  # for tests: the ends of each axis only
        active, context, lengths = [active[0], active[-1]], [context[0], context[-1]], [lengths[0], lengths[-1]]
    return ProfilePlan(tuple(active), tuple(context), tuple(lengths), repeats=2 if quick else 3,
                       train_repeats=2 if quick else 5, colocation_s=1.5 if quick else 4.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


# --------------------------------------------------------------------------- generation
class DecodeTimer:
    """Times `generate` calls of one model; used alone and inside a co-located measurement."""

    def __init__(self, model, tok, cfg, seed: int = 0):
        self.model, self.tok, self.cfg = model, tok, cfg
        self.device = next(model.parameters()).device
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def _call(self, n: int, prompt_len: int, new_tokens: int) -> Callable[[], object]:
        prompts = self.rng.integers(4, self.tok.vocab_size, size=(n, prompt_len)).tolist()

        def call():
            from real.generate import generate
            return generate(self.model, prompts, new_tokens, temperature=self.cfg.real.temperature, eos_id=NO_EOS,
                            pad_id=self.tok.pad_id, version=0, generator=self.generator)
        return call

    def point(self, n: int, context: int, steps: int, repeats: int) -> tuple[float, float]:
        """(seconds per decode step, seconds of the prefill call) for n sequences of mean context `context`."""
        prompt_len = max(1, context - steps // 2)  # the K steps' contexts are centred on `context`
        one = _median_time(self._call(n, prompt_len, 1), self.device, repeats)
        many = _median_time(self._call(n, prompt_len, steps + 1), self.device, repeats)
        return max(0.0, (many - one) / steps), one


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
    if kind == "generate":
        model, tok = build_policy(cfg, device)
        model.eval()
        call = DecodeTimer(model, tok, cfg, seed=1)._call(cfg.cluster.max_concurrency, 16, 16)
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
    learner = Learner(cfg, model, tok, channel, Ledger(ctx, 4, 0), None, check_workers=lambda: None,
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


def slowdown(role: int, kinds: list[tuple[str, int]], cfg, measure: Callable[[], float], seconds: float) -> float:
    """Median of `measure()` (this process in `role`) beside busy processes of (kind, role) over its median
    alone, the two alternating for at least `seconds` (at least 3 pairs)."""
    from real.model import pinned, resolve_device

    alone, shared = [], []
    with Background(kinds, cfg) as background, pinned(role, resolve_device(cfg), cfg.pipeline.mode):
        end = time.monotonic() + seconds
        while len(alone) < 3 or time.monotonic() < end:
            alone.append(measure())
            background.resume()
            shared.append(measure())
            background.pause()
    return float(np.median(shared) / np.median(alone))


# --------------------------------------------------------------------------- the profile
def measure_profile(cfg, plan: ProfilePlan | None = None, progress: Callable[[str], None] | None = None
                    ) -> MeasuredProfile:
    """Measure every table for `cfg` on its device; `progress(label)` is called before each measurement. On a
    CPU each part runs on the core a run gives its role (`real.model.cpu_cores`)."""
    from real.model import LEARNER, pinned, resolve_device

    plan = plan or plan_for(cfg)
    say = progress or (lambda label: None)
    device = resolve_device(cfg)
    if device.type == "cpu":
        torch.set_num_threads(1)  # each process of a run uses one thread
    learner, channel = _standalone_learner(cfg, device)
    model, tok = learner.model, learner.tok
    decoder = DecodeTimer(model, tok, cfg)

    seconds, prefill_points = [], {}
    model.eval()
    with pinned(0, device, cfg.pipeline.mode):
        for n in plan.active:
            row = []
            for c in plan.context:
                say(f"decode: {n} sequences, context {c}")
                step_s, prefill_s = decoder.point(n, c, plan.decode_steps, plan.repeats)
                row.append(step_s)
                prefill_points[n * max(1, c - plan.decode_steps // 2)] = prefill_s
            seconds.append(tuple(row))
    prefill = sorted(prefill_points.items())

    time_step = learner_step_timer(learner, cfg)
    train_points, publish = {}, []
    with pinned(LEARNER, device, cfg.pipeline.mode):
        for length in plan.train_lengths:
            say(f"learner step: {cfg.workload.batch_prompts} x {cfg.workload.group_size} samples, {length} tokens each")
            runs = [time_step(length) for _ in range(plan.train_repeats + 1)][1:]  # the first warms up
            train_points[runs[0][1]] = float(np.median([r[0] for r in runs]))
            publish += [r[2] for r in runs]
    say("weight load")
    with pinned(0, device, cfg.pipeline.mode):
        load_s = _median_time(lambda: channel.load_into(model), device, plan.repeats)
    sync_s = float(np.median(publish)) + load_s

    colocation = None
    if cfg.cluster.colocated:
        n, c = cfg.cluster.max_concurrency, plan.context[len(plan.context) // 2]
        workers = cfg.cluster.rollout_workers
        say(f"co-location: decoding beside the learner and {workers - 1} other worker(s)")
        gen = slowdown(0, [("train", LEARNER)] + [("generate", i) for i in range(1, workers)], cfg,
                       lambda: decoder.point(n, c, plan.decode_steps, 1)[0], plan.colocation_s)
        length = cfg.workload.max_new_tokens // 2 or 1
        say(f"co-location: learner steps beside {workers} generating worker(s)")
        train = slowdown(LEARNER, [("generate", i) for i in range(workers)], cfg, lambda: time_step(length)[0],
                         plan.colocation_s)
        colocation = Colocation(gen_slowdown=max(1.0, gen), train_slowdown=max(1.0, train))

    return MeasuredProfile(
        machine=machine_record(device), model=cfg.real.model,
        decode=DecodeGrid(plan.active, tuple(float(c) for c in plan.context), tuple(seconds)),
        prefill=Curve(tuple(float(t) for t, _ in prefill), tuple(s for _, s in prefill)),
        train=Curve(tuple(float(t) for t in sorted(train_points)), tuple(train_points[t] for t in sorted(train_points))),
        sync_s=sync_s, colocation=colocation)


def machine_record(device: torch.device) -> dict:
    import os

    import transformers

    record = {"hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
              "torch": str(torch.__version__), "transformers": str(transformers.__version__), "device": str(device),
              "cpu_count": os.cpu_count(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record
