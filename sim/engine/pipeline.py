"""The SimPy model of an async GRPO pipeline: rollout workers, the buffer, the learner and weight sync.

`simulate(cfg)` runs one replication and returns its trace. The `Simulation` object is the shared world
the actors consult: versions published, the admission rules of each mode, the group ledger.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import simpy

from sim.config import RunConfig
from sim.engine.buffer import Buffer
from sim.engine.control import Control
from sim.engine.worker import Worker
from sim.hardware.cost import CostModel, cost_model_for
from sim.trace import SAMPLE_COLUMNS, STEP_COLUMNS, Trace, provenance
from sim.workload import GroupStream


class Simulation:
    def __init__(self, cfg: RunConfig, cost: CostModel | None = None):
        self.cfg = cfg
        wl, pl = cfg.workload, cfg.pipeline
        self.env = simpy.Environment()
        self.cost = cost if cost is not None else cost_model_for(cfg)
        self.decode_x, self.decode_y = (np.ascontiguousarray(a, dtype=np.float64) for a in self.cost.decode_table())
        self.sync_s = float(self.cost.sync_s())
        self.B, self.group_size = wl.batch_prompts, wl.group_size
        self.control = Control.from_config(cfg)
        self.lag, self.interruptible, self.capacity = self.control.lag, pl.interruptible, pl.queue_capacity
        self.stream = GroupStream(cfg, np.random.SeedSequence(cfg.seed))

        self.latest_version = 0      # newest weights published by the learner
        self.learner_version = 0
        self.n_groups = 0            # groups admitted so far (ids 0..n_groups-1)
        self.live = 0                # admitted, not dropped: "accepted + running" of the gate
        self.unconsumed = [0] * 1024  # count of unconsumed groups per version_start
        self._oldest = 0               # lowest version with unconsumed groups (or the latest version)
        self._grow(4096)
        self.buffer = Buffer(pl.queue_order, self.B if self.lag is not None else None)
        self.data_event: simpy.Event | None = None
        self.steps: list[tuple] = []
        self.on_step = None  # optional callback(step) after each learner step, for progress bars
        self.workers = [Worker(self, w) for w in range(cfg.cluster.rollout_workers)]
        self.learner = self.env.process(self.learn())

    # ------------------------------------------------------------------ ledger
    def _grow(self, n_groups: int) -> None:
        g = self.group_size
        old = getattr(self, "g_worker", None)
        fields = {"g_worker": (np.int32, -1), "g_prompt": (np.int32, 0), "g_t_admit": (np.float64, np.nan),
                  "g_t_start": (np.float64, np.nan), "g_t_consumed": (np.float64, np.nan),
                  "g_v_start": (np.int32, -1), "g_v_consumed": (np.int32, -1), "g_step": (np.int32, -1),
                  "g_dropped": (np.bool_, False), "g_tokens": (np.int64, 0)}
        sample_fields = {"response_len": (np.int32, 0), "t_end": (np.float64, np.nan),
                         "v_end": (np.int32, -1), "v_mean": (np.float64, np.nan)}
        for name, (dtype, fill) in fields.items():
            arr = np.full(n_groups, fill, dtype)
            if old is not None:
                arr[: len(old)] = getattr(self, name)
            setattr(self, name, arr)
        for name, (dtype, fill) in sample_fields.items():
            arr = np.full(n_groups * g, fill, dtype)
            if old is not None:
                arr[: len(old) * g] = getattr(self, name)
            setattr(self, name, arr)

    def next_group(self) -> tuple[int, int, np.ndarray]:
        gid = self.n_groups
        if gid >= len(self.g_worker):
            self._grow(2 * len(self.g_worker))
        self.n_groups += 1
        prompt_len, lens, tokens = self.stream.group(gid)
        g = self.group_size
        self.response_len[gid * g:(gid + 1) * g] = lens
        self.g_prompt[gid] = prompt_len
        self.g_tokens[gid] = tokens
        return gid, prompt_len, lens

    def group_admitted(self, gid: int, worker: Worker, t_start: float) -> None:
        v = worker.version
        self.g_worker[gid], self.g_t_admit[gid], self.g_t_start[gid], self.g_v_start[gid] = (
            worker.worker_id, self.env.now, t_start, v)
        if v >= len(self.unconsumed):
            self.unconsumed.extend([0] * len(self.unconsumed))
        self.unconsumed[v] += 1
        self._oldest = min(self._oldest, v)
        self.live += 1

    def restamp(self, gid: int, version: int) -> None:
        """A group whose first token comes after an immediate weight load starts at the new version."""
        self.unconsumed[self.g_v_start[gid]] -= 1
        self.unconsumed[version] += 1
        self.g_v_start[gid] = version

    def group_done(self, gid: int, t: float) -> None:
        self.buffer.put(gid, int(self.g_v_start[gid]))
        if self.data_event is not None and not self.data_event.triggered:
            self.data_event.succeed()

    def _retire(self, gid: int, step: int, dropped: bool) -> None:
        self.g_t_consumed[gid], self.g_v_consumed[gid], self.g_step[gid] = self.env.now, self.learner_version, step
        self.unconsumed[self.g_v_start[gid]] -= 1
        if dropped:
            self.g_dropped[gid] = True
            self.live -= 1

    # ------------------------------------------------------------------ admission rules
    def oldest_unconsumed(self) -> int:
        counts, v = self.unconsumed, self._oldest
        while v < self.latest_version and counts[v] == 0:
            v += 1
        self._oldest = v
        return v

    def admission_block(self, worker: Worker) -> str | None:
        """None if `worker` may start the next group now, else why not (control.BLOCKED or control.DRAIN)."""
        control = self.control
        return control.admission_block(version=worker.version, latest=self.latest_version, n_admitted=self.n_groups,
                                       live=self.live, buffered=len(self.buffer),
                                       oldest=self.oldest_unconsumed() if control.gating else 0)

    def load_target(self, worker: Worker) -> int | None:
        """The version an idle worker should load now, or None."""
        return self.control.load_target(version=worker.version, latest=self.latest_version, n_admitted=self.n_groups)

    # ------------------------------------------------------------------ the learner
    def _poke_workers(self) -> None:
        for w in self.workers:
            w.poke()

    def learn(self):
        env, B = self.env, self.B
        for step in range(self.cfg.run.steps):
            batch: list[int] = []
            queue_len = len(self.buffer)
            while len(batch) < B:
                gid = self.buffer.pop(step)
                if gid is None:
                    self.data_event = env.event()
                    yield self.data_event
                    self.data_event = None
                    continue
                if self.control.drop(self.learner_version, int(self.g_v_start[gid])):
                    self._retire(gid, step, dropped=True)
                    self._poke_workers()  # buffer space and gate budget just opened
                    continue
                batch.append(gid)
            t_start = env.now
            for gid in batch:
                self._retire(gid, step, dropped=False)
            self._poke_workers()  # buffer space, gate (oldest version, drops) may have opened
            tokens = int(self.g_tokens[batch].sum())
            yield env.timeout(self.cost.train_s(tokens))
            t_end = env.now
            self.steps.append((step, t_start, t_end, self.learner_version, B * self.group_size, tokens,
                               queue_len, self.sync_s))
            self.learner_version += 1
            self.latest_version = self.learner_version
            self._poke_workers()
            yield env.timeout(self.sync_s)
            if self.on_step is not None:
                self.on_step(step)

    # ------------------------------------------------------------------ running and the trace
    def run(self) -> Trace:
        try:
            self.env.run(until=self.learner)
        except RuntimeError as exc:
            if self.learner.is_alive and not self.env._queue:  # nothing left to happen: a stuck pipeline
                raise RuntimeError(f"the pipeline stalled at t={self.env.now:.3f} s after {len(self.steps)} learner "
                                   f"steps: the learner waits for data no worker may generate") from exc
            raise
        return self.trace()

    def trace(self) -> Trace:
        n, g = self.n_groups, self.group_size
        ns = n * g
        rep = lambda a: np.repeat(a[:n], g)  # noqa: E731 - group column -> sample column
        # A worker may have committed its batch up to its next event, past the end of the run.
        late = self.t_end[:ns] > self.env.now
        self.t_end[:ns][late], self.v_end[:ns][late], self.v_mean[:ns][late] = np.nan, -1, np.nan
        columns = {
            "sample_id": np.arange(ns, dtype=np.int64), "group_id": np.repeat(np.arange(n, dtype=np.int64), g),
            "worker_id": rep(self.g_worker), "prompt_len": rep(self.g_prompt), "response_len": self.response_len[:ns],
            "t_admit": rep(self.g_t_admit), "t_start": rep(self.g_t_start), "t_end": self.t_end[:ns],
            "t_consumed": rep(self.g_t_consumed), "version_start": rep(self.g_v_start),
            "version_end": self.v_end[:ns], "version_mean": self.v_mean[:ns],
            "version_consumed": rep(self.g_v_consumed), "learner_step": rep(self.g_step),
            "dropped": rep(self.g_dropped), "reward": np.full(ns, np.nan, np.float32),
        }
        # Columns already have the schema's dtypes: no copy beyond the repeats.
        samples = pd.DataFrame({c: columns[c].astype(SAMPLE_COLUMNS[c], copy=False) for c in SAMPLE_COLUMNS},
                               copy=False)
        steps = pd.DataFrame(self.steps, columns=["step", "t_start", "t_end", "version", "n_samples", "n_tokens",
                                                  "queue_len", "weight_sync_s"])
        for col in ("lr", "grad_norm", "kl", "ess_token", "ess_seq", "reward_mean", "clip_frac"):
            steps[col] = np.nan
        header = {"schema": "stalecast.trace/1", **provenance("sim"), "config": self.cfg.model_dump(mode="json"),
                  "rollout_workers": self.cfg.cluster.rollout_workers, "cost_sources": getattr(self.cost, "sources", None)}
        return Trace(samples, steps[list(STEP_COLUMNS)].astype(STEP_COLUMNS), header)


def simulate(cfg: RunConfig, cost: CostModel | None = None) -> Trace:
    """Run one replication of `cfg` and return its trace."""
    return Simulation(cfg, cost).run()
