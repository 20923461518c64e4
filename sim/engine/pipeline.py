"""The SimPy model of an async GRPO pipeline: rollout workers, the buffer, the learner and weight sync.

`simulate(cfg)` runs one replication and returns its trace. The `Simulation` object is the shared world
the actors consult: versions published, the admission rules of each mode, the group ledger. It runs the
SimPy processes below (worker.py, `learn`) with engine="simpy"; by default, where numba is installed, it
runs the same model compiled (fast.py: the same events in the same order, the same trace, about 10x faster).
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import simpy

from sim.config import ConfigError, RunConfig
from sim.engine import fast
from sim.engine import kernel as K
from sim.engine.buffer import Buffer
from sim.engine.control import ADMIT, GATED, Control, block_reason, oldest_unconsumed
from sim.engine.routers import ROUTERS, choose
from sim.engine.state import World
from sim.engine.worker import Worker
from sim.hardware.cost import CostModel, build_cost_model, crowd_curve, crowded, generation_slowdown
from sim.hardware.measured import IdleCurve, load_profile, slowdown_at
from sim.hardware.memory import KVCapacity, kv_capacity
from sim.resources import check_simulation_memory, ledger_groups
from sim.trace import SAMPLE_COLUMNS, STEP_COLUMNS, Trace, provenance
from sim.workload import GroupStream


ENGINES = ("fast", "simpy")
# The ledger: (name, dtype, one entry per sample rather than per group, value it holds until the run sets it;
# None for the workload, which comes from the stream)
LEDGER = [("g_worker", np.int32, False, -1), ("g_t_admit", np.float64, False, np.nan),
          ("g_t_start", np.float64, False, np.nan), ("g_t_consumed", np.float64, False, np.nan),
          ("g_v_start", np.int32, False, -1), ("g_v_consumed", np.int32, False, -1), ("g_step", np.int32, False, -1),
          ("g_dropped", np.bool_, False, False), ("t_end", np.float64, True, np.nan), ("v_end", np.int32, True, -1),
          ("v_mean", np.float64, True, np.nan), ("n_preempt", np.int32, True, 0),
          # the workload, from the stream
          ("g_prompt", np.int32, False, None), ("g_tokens", np.int64, False, None),
          ("g_prefill", np.float64, False, None), ("response_len", np.int32, True, None)]
# A multi-turn workload's ledger, per sample and turn (entry sid*turns + j): each turn's length, and the tool tokens
# and seconds of the environment call after it (empty for one turn)
TURN_LEDGER = [("turn_len", np.int32), ("turn_tool", np.int32), ("turn_env", np.float64)]
# The trace's sample columns read off the ledger: a group column repeats for each of the group's samples, a
# per-sample column is a view (sample_id, group_id and reward are made: ids in order, no reward).
GROUP_COLUMNS = {"worker_id": "g_worker", "prompt_len": "g_prompt", "t_admit": "g_t_admit", "t_start": "g_t_start",
                 "t_consumed": "g_t_consumed", "version_start": "g_v_start", "version_consumed": "g_v_consumed",
                 "learner_step": "g_step", "dropped": "g_dropped"}
PER_SAMPLE_COLUMNS = {"response_len": "response_len", "t_end": "t_end", "version_end": "v_end",
                      "version_mean": "v_mean", "preemptions": "n_preempt"}
# hardware.memory.kv_policy -> the kernel's KV_* code
KV_POLICY_CODES = {"unlimited": K.KV_UNLIMITED, "preempt_recompute": K.KV_RECOMPUTE, "preempt_swap": K.KV_SWAP,
                   "admit_reserve": K.KV_RESERVE}


class SampleTable:
    """The samples table of a finished run, built from its ledger on demand: any of its columns, for any range of
    groups. Holding a few columns, or building the table a chunk at a time to write it, needs a fraction of the
    whole table's memory (16 columns, 89 bytes a sample: 3.7 GB for 41 million rollouts)."""

    CHUNK_GROUPS = 1 << 16  # 2**16 groups of 16 samples: about a million rows, pyarrow's default row group

    def __init__(self, sim: "Simulation"):
        n, g = sim.n_groups, sim.group_size
        self.n_groups, self.group_size = n, g
        self._ledger = {**{col: getattr(sim, name)[:n] for col, name in GROUP_COLUMNS.items()},
                        **{col: getattr(sim, name)[:n * g] for col, name in PER_SAMPLE_COLUMNS.items()}}

    def frame(self, columns=tuple(SAMPLE_COLUMNS), lo: int = 0, hi: int | None = None) -> pd.DataFrame:
        """`columns` of the samples of groups lo..hi-1 (default: all), in the schema's dtypes."""
        hi, g = self.n_groups if hi is None else hi, self.group_size

        def column(name: str) -> np.ndarray:
            if name == "sample_id":
                return np.arange(lo * g, hi * g, dtype=np.int64)
            if name == "group_id":
                return np.repeat(np.arange(lo, hi, dtype=np.int64), g)
            if name == "reward":
                return np.full((hi - lo) * g, np.nan, np.float32)
            if name in GROUP_COLUMNS:
                return np.repeat(self._ledger[name][lo:hi], g)
            return self._ledger[name][lo * g:hi * g]
        # The ledger has the schema's dtypes: no copy beyond the repeats.
        return pd.DataFrame({c: column(c).astype(SAMPLE_COLUMNS[c], copy=False) for c in columns}, copy=False)

    def chunks(self):
        """The whole table, CHUNK_GROUPS groups at a time (one empty frame for a run that admitted nothing)."""
        for lo in range(0, max(self.n_groups, 1), self.CHUNK_GROUPS):
            yield self.frame(lo=lo, hi=min(lo + self.CHUNK_GROUPS, self.n_groups))


class Simulation:
    def __init__(self, cfg: RunConfig, cost: CostModel | None = None, engine: str | None = None,
                 stream: GroupStream | None = None, trace_columns: tuple[str, ...] | None = None):
        """engine: "fast" or "simpy" (default: fast where numba is installed). stream: the seeded workload of
        cfg (a study passes one it already drew: group n's lengths depend only on seed and workload).
        trace_columns: the sample columns `trace()` holds in memory (default: all); with fewer, the trace writes its
        whole table straight from the ledger, a chunk at a time. Raises ConfigError if the run would not fit in
        memory."""
        if engine not in (None, *ENGINES):
            raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
        self.trace_columns = tuple(SAMPLE_COLUMNS if trace_columns is None else trace_columns)
        unknown = [c for c in self.trace_columns if c not in SAMPLE_COLUMNS]
        if unknown:
            raise ValueError(f"trace_columns: not sample columns: {', '.join(unknown)}")
        check_simulation_memory(cfg, self.trace_columns)
        self.cost = cost if cost is not None else settled_cost_model(cfg, engine, stream)
        self.engine = engine or ("fast" if K.COMPILED else "simpy")
        self.cfg = cfg
        wl, pl = cfg.workload, cfg.pipeline
        self.env = simpy.Environment()
        self.decode_x, self.decode_y = (np.ascontiguousarray(a, dtype=np.float64) for a in self.cost.decode_table())
        # A weight sync's phases (config.WeightSync): the learner waits for the pause and the transfer, a worker
        # loading new weights is busy with all three
        ws = cfg.pipeline.weight_sync
        pause = ws.pause_s if cfg.pipeline.mode != "sync" else 0.0
        transfer = ws.transfer_s if ws.transfer_s is not None else float(self.cost.sync_s())
        self.publish_s, self.load_s = pause + transfer, pause + transfer + ws.resume_s
        self.bookkeeping_s = float(self.cost.bookkeeping_s)  # the learner's, after each publish
        self.B, self.group_size = wl.batch_prompts, wl.group_size
        self.control = Control.from_config(cfg)
        self.router = ROUTERS[cfg.cluster.router]
        self.lag, self.interruptible = self.control.lag, self.control.interruptible
        self.stream = stream if stream is not None else GroupStream(cfg, np.random.SeedSequence(cfg.seed))

        self.world = World()           # the counters the rules read (state.py): versions, groups admitted, ...
        self.learner_step = 0          # the step the learner collects or trains
        self.unconsumed = [0] * 1024  # count of unconsumed groups per version_start
        self.now = 0.0                 # simulated time; at the end of a run, when its last step ended
        cl = cfg.cluster
        # Room for the groups a run usually admits (consumed, in flight, a few batches waiting; twice that where groups
        # are dropped, which are generated too), in whole stream blocks plus one (prepare_ledger goes a block at a
        # time); more grows it, a copy of the whole ledger. Room a run never reaches costs no memory.
        expected = ledger_groups(cfg) * (2 if self.control.drops else 1)
        self._grow((expected // self.stream.BLOCK + 2) * self.stream.BLOCK)
        self.ready = 0                 # groups whose ledger entries are prepared (prepare_ledger)
        self._prefill = np.zeros(0)    # prefill seconds by prompt length (NaN: not asked yet)
        self.buffer = Buffer(pl.queue_order, self.B if self.lag is not None else None)
        self.data_event: simpy.Event | None = None
        self.activity_event: simpy.Event | None = None  # a training learner's: how many workers generate changed
        self.steps: list[tuple] = []
        self.on_step = None  # optional callback(step) after each learner step, for progress bars
        self.kv = kv_capacity_of(cfg)
        self.worker_state = K.new_state(cl.rollout_workers, cl.max_concurrency, wl.max_new_tokens,
                                        self.kv.budget_tokens or 0, KV_POLICY_CODES[self.kv.policy],
                                        self.kv.swap_s_per_token, cl.admission == "per_sample", wl.n_turns,
                                        wl.turns is not None and wl.turns.kv == "release")
        # Copies of a group's prompt its admission prefills (cluster.group_prefill): each sample's, or one
        self.prefill_copies = self.group_size if cl.prefills_every_copy else 1
        # Free slots a continuous worker waits for before it asks to admit again: a group's, or one (per_sample)
        self.admit_slots = 1 if cl.admission == "per_sample" else self.group_size
        self.prefill_table = self.cost.prefill_table()  # what a recomputed (evicted) sequence's prefill costs
        self.workers = [Worker(self, w) for w in range(cfg.cluster.rollout_workers)]
        self.learner = self.env.process(self.learn())

    # ------------------------------------------------------------------ ledger
    def _grow(self, n_groups: int) -> None:
        """Room for n_groups in the ledger, unfilled: prepare_ledger fills entries as a run reaches them, so
        pages a run never reaches cost nothing."""
        old = getattr(self, "g_worker", None)
        turns = self.cfg.workload.n_turns
        per_turn = self.group_size * turns if turns > 1 else 0
        for name, dtype, k in [(name, dtype, self.group_size if per_sample else 1) for name, dtype, per_sample, _ in
                               LEDGER] + [(name, dtype, per_turn) for name, dtype in TURN_LEDGER]:
            arr = np.empty(n_groups * k, dtype)
            if old is not None:
                arr[: len(old) * k] = getattr(self, name)
            setattr(self, name, arr)

    def prepare_ledger(self) -> None:
        """Prepare the ledger entries of the next stream block of groups: their workload (prompt and response
        lengths, tokens, prefill seconds) and the values they hold until admitted, generated and consumed."""
        g, lo = self.group_size, self.ready
        prompts, responses, tokens = self.stream.block(lo // self.stream.BLOCK)  # `ready` moves block by block
        hi = lo + len(prompts)
        if hi > len(self.g_worker):
            self._grow(max(hi, len(self.g_worker) * 5 // 4))
        self.g_prompt[lo:hi], self.g_tokens[lo:hi] = prompts, tokens
        self.response_len[lo * g:hi * g] = responses.ravel()
        if self.stream.n_turns > 1:
            k = g * self.stream.n_turns
            for (name, _), values in zip(TURN_LEDGER, self.stream.turn_block(lo // self.stream.BLOCK)):
                getattr(self, name)[lo * k:hi * k] = values
        if prompts.max() >= len(self._prefill):
            self._prefill = np.concatenate([self._prefill, np.full(prompts.max() + 1 - len(self._prefill), np.nan)])
        for p in np.unique(prompts[np.isnan(self._prefill[prompts])]).tolist():  # the cost model is Python
            self._prefill[p] = self.cost.prefill_s(p * self.prefill_copies)
        self.g_prefill[lo:hi] = self._prefill[prompts]
        for name, _, per_sample, until_set in LEDGER:
            if until_set is not None:
                k = g if per_sample else 1
                getattr(self, name)[lo * k:hi * k] = until_set
        self.ready = hi

    def next_prompt(self) -> int:
        """The prompt length of the group to be admitted next (its ledger entries prepared)."""
        gid = self.world.n_admitted
        if gid >= self.ready:
            self.prepare_ledger()
        return int(self.g_prompt[gid])

    def next_group(self) -> int:
        """A new group's id; its ledger entries are prepared."""
        gid = self.world.n_admitted
        if gid >= self.ready:
            self.prepare_ledger()
        self.world.n_admitted += 1
        return gid

    @property
    def n_groups(self) -> int:
        """Groups admitted so far (ids 0..n_groups-1)."""
        return self.world.n_admitted

    @property
    def gate_refusals(self) -> int:
        """Admissions a staleness bound refused (a study's "did the bound act")."""
        return self.world.gate_refusals

    def group_admitted(self, gid: int, worker: Worker, t_start: float) -> None:
        v = worker.version
        self.g_worker[gid], self.g_t_admit[gid], self.g_t_start[gid], self.g_v_start[gid] = (
            worker.worker_id, self.env.now, t_start, v)
        if v >= len(self.unconsumed):
            self.unconsumed.extend([0] * len(self.unconsumed))
        self.unconsumed[v] += 1
        world = self.world
        world.oldest = min(world.oldest, v)
        world.live += 1
        world.running += 1
        world.since_sync += 1

    def restamp(self, gid: int, version: int) -> None:
        """A group whose first token comes after an immediate weight load starts at the new version."""
        self.unconsumed[self.g_v_start[gid]] -= 1
        self.unconsumed[version] += 1
        self.g_v_start[gid] = version

    def train_tokens(self, batch) -> int:
        """Tokens the learner step over `batch` (group ids) is charged for (hardware.train_tokens)."""
        if self.cfg.hardware.train_tokens == "packed":
            return int(self.g_tokens[batch].sum())
        context = self.response_len.reshape(-1, self.group_size)[batch]
        if self.stream.n_turns > 1:  # tool outputs are in the context too
            context = context + self.turn_tool.reshape(-1, self.group_size, self.stream.n_turns)[batch].sum(axis=2)
        longest = self.g_prompt[batch] + context.max(axis=1)
        return len(batch) * self.group_size * int(longest.max())

    def activity_changed(self) -> None:
        """A worker's batch emptied or filled: a co-located learner's speed changes."""
        if self.activity_event is not None and not self.activity_event.triggered:
            self.activity_event.succeed()

    def _train(self, seconds: float):
        """A learner step of `seconds` alone, slowed by 1 + (train_slowdown - 1) * k / W while k of the W
        workers generate (the profile measures the factor with all W generating)."""
        env, extra = self.env, self.cost.train_slowdown - 1.0
        W = len(self.workers)
        while True:
            slow = 1.0 + extra * sum(w.generating for w in self.workers) / W
            self.activity_event = env.event()
            t0, end = env.now, env.timeout(seconds * slow)
            fired = yield end | self.activity_event
            if end in fired:
                break
            seconds = max(0.0, seconds - (env.now - t0) / slow)
        self.activity_event = None

    def group_done(self, gid: int, t: float) -> None:
        world = self.world
        world.running -= 1
        if self.control.evicts(world.buffered):  # queue_drop: the oldest waiting group makes room
            self._retire(self._take(self.learner_step), self.learner_step, dropped=True)
        self.buffer.put(gid, int(self.g_v_start[gid]))
        world.buffered += 1
        if self.data_event is not None and not self.data_event.triggered:
            self.data_event.succeed()

    def _take(self, step: int) -> int | None:
        """The next group out of the buffer for learner step `step` (None if none waits)."""
        gid = self.buffer.pop(step)
        self.world.buffered -= gid is not None
        return gid

    def _retire(self, gid: int, step: int, dropped: bool) -> None:
        """A group taken out of the buffer is consumed by the learner's step `step`, or dropped."""
        world = self.world
        self.g_t_consumed[gid], self.g_v_consumed[gid], self.g_step[gid] = self.env.now, world.learner_version, step
        self.unconsumed[self.g_v_start[gid]] -= 1
        if dropped:
            world.trained += 1  # never to be trained
            self.g_dropped[gid] = True
            world.live -= 1

    # ------------------------------------------------------------------ admission rules
    def oldest_unconsumed(self) -> int:
        world = self.world
        world.oldest = oldest_unconsumed(self.unconsumed, world.oldest, world.latest)
        return world.oldest

    def _admission_code(self, worker: Worker) -> int:
        control, world = self.control, self.world
        return control.admission_code(version=worker.version, latest=world.latest, n_admitted=world.n_admitted,
                                      live=world.live, running=world.running, buffered=world.buffered,
                                      trained=world.trained, oldest=world.oldest, since_sync=world.since_sync)

    def admission_block(self, worker: Worker) -> str | None:
        """None if `worker` may start the next group now, else why not (control.BLOCKED or control.DRAIN)."""
        if self.control.gating:
            self.oldest_unconsumed()
        code = self._admission_code(worker)
        if code == GATED:
            self.world.gate_refusals += 1
        return block_reason(code)

    def route(self, asking: Worker, asking_may: bool) -> Worker | None:
        """The worker the next group goes to (routers.choose) among those that could take it now, `asking` among
        them if `asking_may`; None if no one can. A worker could if it is listening (its batch committed up to now)
        or coming (not started yet, or loading weights: it admits when it comes), has room (a static worker: its
        batch ended), and the rules admit at its version. A worker waiting for its next event without listening
        has committed its batch up to then: it admits then, by itself."""
        g, si = self.group_size, self.worker_state[0]
        free, prompt = si[:, K.N_FREE], self.next_prompt()
        eligible = np.array([asking_may if w is asking else (
            (w.listening or w.coming) and K.can_admit(si, w.worker_id, g, prompt)
            and not (w.static and w.in_flight > 0) and self._admission_code(w) == ADMIT) for w in self.workers],
            np.int64)
        chosen = choose(self.router, free, eligible, self.world.routed_to)
        return self.workers[chosen] if chosen >= 0 else None

    def load_target(self, worker: Worker) -> int | None:
        """The version an idle worker should load now, or None."""
        return self.control.load_target(version=worker.version, latest=self.world.latest,
                                        n_admitted=self.world.n_admitted)

    # ------------------------------------------------------------------ the learner
    def _poke_workers(self) -> None:
        for w in self.workers:
            w.poke()

    def learn(self):
        """The learner: a batch of B groups per step; every `sync_every` steps (verl's trigger_parameter_sync_step,
        else 1) it publishes a new version and pays the weight sync; then its bookkeeping before the next step
        (none after the last: the run ends with the last step's sync)."""
        env, B, world = self.env, self.B, self.world
        sync_every = self.control.sync_every
        for step in range(self.cfg.run.steps):
            self.learner_step = step
            batch: list[int] = []
            queue_len = len(self.buffer)
            while len(batch) < B:
                gid = self._take(step)
                if gid is None:
                    self.data_event = env.event()
                    yield self.data_event
                    self.data_event = None
                    continue
                if self.control.drop(world.learner_version, int(self.g_v_start[gid])):
                    self._retire(gid, step, dropped=True)
                    if self.control.drop_may_admit:  # buffer space or gate budget just opened
                        self._poke_workers()
                    continue
                batch.append(gid)
            t_start = env.now
            for gid in batch:
                self._retire(gid, step, dropped=False)
            self._poke_workers()  # buffer space, gate (oldest version, drops) may have opened
            tokens = int(self.g_tokens[batch].sum())
            train_s = self.cost.train_s(self.train_tokens(batch))
            yield env.process(self._train(train_s)) if self.cost.train_slowdown != 1.0 else env.timeout(train_s)
            t_end = env.now
            world.trained += B
            publish = (step + 1) % sync_every == 0
            self.steps.append((step, t_start, t_end, world.learner_version, B * self.group_size, tokens,
                               queue_len, self.publish_s if publish else 0.0))
            if publish:
                world.learner_version += 1
                world.latest = world.learner_version
                world.since_sync = world.running + world.buffered  # verl: the groups outstanding at the sync
                self._poke_workers()
                yield env.timeout(self.publish_s)
            if self.on_step is not None:
                self.on_step(step)
            if self.bookkeeping_s > 0 and step + 1 < self.cfg.run.steps:
                yield env.timeout(self.bookkeeping_s)  # its own work, while the workers generate

    # ------------------------------------------------------------------ running and the trace
    def run(self) -> Trace:
        self.run_to_end()
        return self.trace()

    def run_to_end(self) -> None:
        """Simulate every learner step (once per Simulation); the trace is then `trace()`, or the arrays."""
        if self.engine == "fast":
            fast.run(self)
            return
        try:
            self.env.run(until=self.learner)
        except RuntimeError as exc:
            self.now = self.env.now
            if self.learner.is_alive and not self.env._queue:  # nothing left to happen: a stuck pipeline
                raise self.stalled() from exc
            raise
        self.now = self.env.now

    def stalled(self) -> RuntimeError:
        return RuntimeError(f"the pipeline stalled at t={self.now:.3f} s after {len(self.steps)} learner steps: "
                            f"the learner waits for data no worker may generate")

    def kv_summary(self) -> dict:
        """The workers' KV cache over the run (trace header "kv"): policy and budget per worker, evictions, the
        most tokens a worker's decode step held, and the time-average share of the budget in use (each worker's
        decoding is integrated up to its last event, over the run's wall time)."""
        kv = self.kv
        if kv.budget_tokens is None:
            return {"policy": kv.policy, "budget_tokens": None}
        si, sf = self.worker_state[:2]
        peak = int(si[:, K.KV_PEAK].max())
        mean = float(sf[:, K.KV_AREA].sum()) / (len(self.workers) * kv.budget_tokens * self.now) if self.now > 0 else 0.0
        return {"policy": kv.policy, "budget_tokens": kv.budget_tokens, "source": kv.source,
                "preemptions": int(si[:, K.N_PREEMPT].sum()), "peak_tokens": peak,
                "peak_occupancy": peak / kv.budget_tokens, "mean_occupancy": mean}

    def trace(self) -> Trace:
        """The run's trace: the `trace_columns` of its samples in memory, and the whole table, when that holds
        fewer columns, as chunks built from the ledger when the trace is written."""
        ns = self.n_groups * self.group_size
        # A worker may have committed its batch up to its next event, past the end of the run.
        late = self.t_end[:ns] > self.now
        self.t_end[:ns][late], self.v_end[:ns][late], self.v_mean[:ns][late] = np.nan, -1, np.nan
        table = SampleTable(self)
        samples = table.frame(self.trace_columns)
        whole = set(self.trace_columns) == set(SAMPLE_COLUMNS)
        steps = pd.DataFrame(self.steps, columns=["step", "t_start", "t_end", "version", "n_samples", "n_tokens",
                                                  "queue_len", "weight_sync_s"])
        for col in ("lr", "grad_norm", "kl", "ess_token", "ess_seq", "reward_mean", "clip_frac"):
            steps[col] = np.nan
        header = {"schema": "stalecast.trace/1", **provenance("sim"), "config": self.cfg.model_dump(mode="json"),
                  "rollout_workers": self.cfg.cluster.rollout_workers, "cost_sources": getattr(self.cost, "sources", None),
                  "generation_slowdown": self.cost.gen_slowdown, "worker_idle_charged": self.cost.worker_idle,
                  "beside_charged": self.cost.beside,
                  "kv": self.kv_summary()}
        return Trace(samples, steps[list(STEP_COLUMNS)].astype(STEP_COLUMNS), header,
                     sample_chunks=None if whole else table.chunks)


def kv_capacity_of(cfg: RunConfig) -> KVCapacity:
    """The KV budget the workers of cfg hold (sim.hardware.memory.kv_capacity); a ConfigError when it cannot work."""
    try:
        return kv_capacity(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def simulate(cfg: RunConfig, cost: CostModel | None = None, engine: str | None = None) -> Trace:
    """Run one replication of `cfg` and return its trace."""
    return Simulation(cfg, cost, engine).run()


def settled_cost_model(cfg: RunConfig, engine: str | None = None, stream: GroupStream | None = None,
                       tolerance: float = 0.01) -> CostModel:
    """The cost model of `cfg`, its generation slowdown taken at the run's rhythm that its own simulation produces.
    A profile may measure that slowdown against the workers' idle fraction (`IdleCurve`: on the 2-core VM a worker
    generating in bursts ran slower per batch than one generating back to back) and, in sync mode, against how many
    other workers generate at once (`sync_gen_beside`). The rhythm is an output of the pipeline, so the factor f is
    searched for: the factor a simulation charging f produces, F(f), lies within the curves' range [lo, hi], so
    f - F(f) is <= 0 at lo and >= 0 at hi, and bisection narrows a sign change to `tolerance` (about 7 simulations).
    The model returned charges F at the midpoint, with the idle fraction and crowd it was taken at. Costs without
    such curves need no search."""
    from sim.metrics import generating_beside, rollout_idle

    profile = load_profile(cfg.hardware.profile) if cfg.hardware.profile else None
    factor, curve = generation_slowdown(cfg, profile), crowd_curve(cfg, profile)
    idle_curve = isinstance(factor, IdleCurve) and len(set(factor.slowdown)) > 1
    if not idle_curve and (curve is None or len(set(curve)) == 1):
        return build_cost_model(cfg, profile)

    def settled(charged: float) -> CostModel:
        """The model at the rhythm of a simulation charging `charged`."""
        trace = Simulation(cfg, build_cost_model(cfg, profile, gen_factor=charged), engine, stream).run()
        return build_cost_model(cfg, profile, rollout_idle(trace), None if curve is None else generating_beside(trace))

    idle = factor.idle if isinstance(factor, IdleCurve) else (0.0,)  # the curve's extremes lie at its knots
    levels = [crowded(factor, c, u) for c in curve for u in idle] if curve is not None else [
        slowdown_at(factor, u) for u in idle]
    lo, hi = min(levels), max(levels)
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if settled(mid).gen_slowdown > mid else (lo, mid)
    return settled((lo + hi) / 2)
