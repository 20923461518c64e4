"""The learner: collects whole groups from the workers' queue, trains one GRPO step on each batch, publishes.

It runs in the trainer's (main) process. Per step it

1. receives messages into its own buffer until `batch_prompts` groups can be taken in the configured
   order (fifo / freshest; by batch in sync modes), dropping groups staler than the bound when the
   control says so; while it waits it checks that every worker is alive and that the run is on time;
2. computes rewards and group advantages;
3. makes real.ppo_epochs x real.mini_batches AdamW updates on it (one by default) at the scheduled lr (the ESS
   and mean staleness of this batch), each accumulating the gradient in micro-batches grouped by sample
   staleness (the first update's gradient of each staleness range is the difference of two snapshots:
   per-range grad norms cost no extra backward), grad norm clipped at 1.0 (the logged norm is the first
   update's, before clipping);
4. bumps the version once and publishes.

Every admitted group is kept as a `GroupRecord`: the trace is written from them, so in-flight, waiting,
dropped and consumed groups all appear.
"""

from __future__ import annotations

import math
import queue as queue_mod
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from real.loss import LossConfig, group_advantages, grpo_loss, scheduled_lr, token_logprobs
from real.worker import Admitted, EngineSteps, GroupDone, Ledger, Loaded, WorkerFailed, prompt_for
from sim.engine.buffer import Buffer
from sim.engine.control import Control
from sim.stability import InstabilityDetector

CLIP_NORM = 1.0


class WorkerError(RuntimeError):
    """A rollout worker died or raised: names the worker and its exit code or traceback."""


# --------------------------------------------------------------------------- the group ledger
@dataclass
class GroupRecord:
    gid: int
    worker_id: int
    prompt_len: int
    t_admit: float
    version_start: int
    done: GroupDone | None = None
    t_consumed: float = math.nan
    version_consumed: int = -1
    step: int = -1
    dropped: bool = False
    rewards: list[float] | None = None


@dataclass
class StepResult:
    row: dict                                   # the trace's step row
    metrics: dict                               # slash-named, for metrics.jsonl
    records: list[GroupRecord] = field(default_factory=list)  # the groups trained on
    dropped: list[GroupRecord] = field(default_factory=list)  # the groups dropped while the batch was collected


# --------------------------------------------------------------------------- the learner
class Learner:
    def __init__(self, cfg, model, tokenizer, channel, ledger: Ledger, queue, check_workers: Callable[[], None],
                 deadline: float, version: int = 0, history: list[dict] = ()):
        """version: the policy version to start from (a resumed run's checkpoint); history: the metrics lines of
        the steps before it, replayed into the instability detector's state."""
        from real.task import DigitTask

        self.cfg, self.model, self.tok, self.channel, self.ledger, self.queue = (
            cfg, model, tokenizer, channel, ledger, queue)
        self.check_workers, self.deadline = check_workers, deadline
        self.task = DigitTask(cfg.real, tokenizer)
        self.control = Control.from_config(cfg)
        self.loss_cfg = LossConfig.from_real(cfg.real)
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters()]
        self.B, self.G = cfg.workload.batch_prompts, cfg.workload.group_size
        self.buffer = Buffer(cfg.pipeline.queue_order, self.B if self.control.lag is not None else None)
        self.records: dict[int, GroupRecord] = {}
        self.loads: list[Loaded] = []
        self.engine_steps: list[EngineSteps] = []
        self.failures: dict[int, str] = {}  # worker id -> traceback it reported
        self.evicted: list[GroupRecord] = []  # queue_drop: groups pushed out of the full buffer since the last step
        self.step_now = 0                     # the step being collected (evictions are counted under it)
        self.version = version
        self.updating = False
        self.instability = InstabilityDetector(cfg.real.instability)
        for m in history:
            self.instability.update_row(m)

    def now(self) -> float:
        return time.monotonic() - self.ledger.t0.value

    def health(self) -> None:
        self.check_workers()
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"the run passed its time limit at learner step {self.version} "
                               f"({len(self.buffer)} of {self.B} groups ready); " + self.describe_workers())

    def describe_workers(self) -> str:
        return "; ".join(self.ledger.describe(i)
                         for i in range(self.cfg.cluster.rollout_workers))

    # ------------------------------------------------------------------ start
    def warm_start(self, steps: int, seed: int, lr: float) -> list[float]:
        """Supervised steps on correct answers (answer + EOS), before any rollout; returns the losses."""
        rng = np.random.default_rng([seed, 2**31 - 1])  # a stream apart from the groups' prompts
        self.opt = opt = torch.optim.AdamW(self.params, lr=lr)
        losses = []
        self.model.train()
        for _ in range(steps):
            self.check_workers()  # a stop asked for (Ctrl-C) is taken between steps
            prompts = self.task.sample(rng, self.B * self.G)
            ids, attn, resp = self._pack([p.ids for p in prompts], [self.task.sft_example(p) for p in prompts])
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for lo in range(0, len(ids), self.cfg.real.micro_batch):  # token-mean cross-entropy, accumulated
                rows = slice(lo, lo + self.cfg.real.micro_batch)
                part = -token_logprobs(self.model, ids[rows], attn[rows], resp[rows]).sum() / resp.sum()
                part.backward()
                loss += part.item()
            torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
            opt.step()
            losses.append(loss)
        return losses

    def start_optimizer(self) -> None:
        # One AdamW for the whole run: GRPO continues the warm start's moments (fresh moments make the first
        # GRPO steps full-size, sign-like updates; on the tiny CPU example they undid part of the warm start).
        if getattr(self, "opt", None) is None:
            self.opt = torch.optim.AdamW(self.params, lr=self.cfg.optim.lr)

    def publish(self) -> float:
        seconds = self.channel.publish(self.model, self.version)
        with self.ledger.locked(self.health):  # verl counts admissions from here, the groups outstanding included
            self.ledger.since_sync.value = self.ledger.running.value + self.ledger.buffered.value
        self.ledger.wake_workers()  # workers waiting for these weights
        return seconds

    # ------------------------------------------------------------------ messages
    def receive(self, timeout: float, strict: bool = True) -> None:
        """Take every message waiting (the first one waiting up to `timeout`). strict: a failed worker raises."""
        try:
            msg = self.queue.get(timeout=timeout)
        except queue_mod.Empty:
            return
        while True:
            self._handle(msg, strict)
            try:
                msg = self.queue.get_nowait()
            except queue_mod.Empty:
                return

    def _handle(self, msg, strict: bool) -> None:
        if isinstance(msg, Admitted):
            self.records[msg.gid] = GroupRecord(msg.gid, msg.worker_id, msg.prompt_len, msg.t_admit,
                                                msg.version_start)
        elif isinstance(msg, GroupDone):
            rec = self.records[msg.gid]
            rec.done = msg
            if self.control.evicts(len(self.buffer)):  # queue_drop: the oldest waiting group makes room
                evicted = self.records[self.buffer.pop(self.step_now)]
                self._retire([evicted], self.step_now, dropped=True)
                self.evicted.append(evicted)
            self.buffer.put(msg.gid, rec.version_start)
        elif isinstance(msg, Loaded):
            self.loads.append(msg)
        elif isinstance(msg, EngineSteps):
            self.engine_steps.append(msg)
        elif isinstance(msg, WorkerFailed):
            self.failures[msg.worker_id] = msg.message
            if strict:
                raise WorkerError(f"rollout worker {msg.worker_id} failed:\n{msg.message}")

    def _retire(self, recs: list[GroupRecord], step: int, dropped: bool) -> None:
        t = self.now()
        with self.ledger.locked(self.health):
            for rec in recs:
                self.ledger.count(rec.version_start, -1)
                self.ledger.buffered.value -= 1
                self.ledger.n_dropped.value += dropped
                self.ledger.trained.value += dropped  # a dropped group will never be trained
        self.ledger.wake_workers()  # the gate and the buffer have room again
        for rec in recs:
            rec.t_consumed, rec.version_consumed, rec.step, rec.dropped = t, self.version, step, dropped

    def collect(self, step: int) -> tuple[list[GroupRecord], int, list[GroupRecord]]:
        """Wait for a batch; returns (groups, groups waiting when the step began, groups dropped meanwhile)."""
        self.step_now = step
        self.health()
        self.receive(0.0)
        queue_len = int(self.ledger.buffered.value)
        batch: list[GroupRecord] = []
        dropped: list[GroupRecord] = []
        while len(batch) < self.B:
            gid = self.buffer.pop(step)
            if gid is None:
                self.receive(0.05)
                self.health()
                continue
            rec = self.records[gid]
            if self.control.drop(self.version, rec.version_start):
                self._retire([rec], step, dropped=True)
                dropped.append(rec)
                continue
            batch.append(rec)
        self._retire(batch, step, dropped=False)  # the gate and the buffer open as the batch is taken
        dropped, self.evicted = self.evicted + dropped, []
        # In id order: which groups make a batch may depend on timing, their order in the learner's sums does not.
        return sorted(batch, key=lambda rec: rec.gid), queue_len, dropped

    # ------------------------------------------------------------------ tensors
    def _pack(self, prompts: list, responses: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded prompt+response rows: ids [N, T] long, attention [N, T] long, response mask [N, T] float."""
        T = max(len(p) + len(r) for p, r in zip(prompts, responses))
        N = len(prompts)
        ids = torch.full((N, T), self.tok.pad_id, dtype=torch.long)
        attn = torch.zeros((N, T), dtype=torch.long)
        resp = torch.zeros((N, T))
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids[i, :len(p) + len(r)] = torch.as_tensor([*p, *r])
            attn[i, :len(p) + len(r)] = 1
            resp[i, len(p):len(p) + len(r)] = 1
        return ids.to(self.device), attn.to(self.device), resp.to(self.device)

    def _flat_grad(self) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in self.params])

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> StepResult:
        t_wait = self.now()
        batch, queue_len, dropped = self.collect(step)
        result = self.train_on(step, batch, t_wait, queue_len, len(dropped))
        result.dropped = dropped
        return result

    def train_on(self, step: int, batch: list[GroupRecord], t_wait: float, queue_len: int = 0,
                 n_dropped: int = 0) -> StepResult:
        """One GRPO step on `batch` (generated groups), then publish: all of a step but the wait for data.
        `stalecast profile` times exactly this on synthetic groups. While it runs `updating` is true: an error
        raised meanwhile may leave the weights half-updated, so no checkpoint is taken from them.

        The step makes real.ppo_epochs passes over the batch, each in real.mini_batches optimizer updates (whole
        groups per mini-batch, in id order), and bumps the version once. The first update's gradient is also taken
        apart by staleness range: each range's gradient is a snapshot difference, so per-range grad norms cost no
        extra backward (with several mini-batches, of the ranges in the first)."""
        self.updating = True
        t_start = self.now()
        G, cfg = self.G, self.cfg
        prompts = [prompt_for(self.task, cfg.seed, rec.gid) for rec in batch]
        for rec, p in zip(batch, prompts):
            rec.rewards = [self.task.reward(p, toks) for toks in rec.done.tokens]
        rewards = torch.tensor([rec.rewards for rec in batch], dtype=torch.float32)            # [B, G]
        adv = group_advantages(rewards).reshape(-1).to(self.device)                            # [N], N = B*G
        resp_tokens = [t for rec in batch for t in rec.done.tokens]
        ids, attn, mask = self._pack([p.ids for p in prompts for _ in range(G)], resp_tokens)  # [N, T] each
        behav = torch.zeros(mask.shape, device=self.device)                                   # [N, T]
        for i, (p_ids, lps) in enumerate(zip((p.ids for p in prompts for _ in range(G)),
                                             (lp for rec in batch for lp in rec.done.logprobs))):
            behav[i, len(p_ids):len(p_ids) + len(lps)] = torch.as_tensor(lps)
        version = self.version  # the version the batch is consumed and trained at
        stale = torch.tensor([version - rec.version_start for rec in batch]).repeat_interleave(G)  # [N]
        batch_t = _Batch(ids, attn, mask, behav, adv, stale)

        # The proximal policy is the weights at the step's start. With one update they stay so during its
        # accumulation (no dropout), and its log-probs are the forward's own; with several they move, so the
        # proximal log-probs come first, from a pass without gradients.
        n_updates = cfg.real.ppo_epochs * cfg.real.mini_batches
        prox = self._logprobs(batch_t) if n_updates > 1 else None                              # [N, T] or None
        start_logp = prox if prox is not None else torch.zeros_like(behav)                     # filled below
        mini = torch.arange(len(batch), device=self.device).tensor_split(cfg.real.mini_batches)  # groups per update
        self.model.train()
        before = [p.detach().clone() for p in self.params]
        clipped = tokens_seen = 0.0
        for update in range(n_updates):
            rows = (mini[update % cfg.real.mini_batches][:, None] * G + torch.arange(G, device=self.device)).reshape(-1)
            first = update == 0
            self.opt.zero_grad(set_to_none=True)
            range_grad, seen = self._accumulate(batch_t, rows, prox, start_logp if first and prox is None else None,
                                                by_range=first)
            clipped, tokens_seen = clipped + seen[0], tokens_seen + seen[1]
            if first:  # the batch at the step's start: what the schedule, the stats and the detector read
                with torch.no_grad():
                    loss, stats = grpo_loss(start_logp, behav, start_logp, adv, mask, self.loss_cfg)
                ess = stats["ess_seq"] if cfg.optim.ess_level == "sequence" else stats["ess_token"]
                lr = scheduled_lr(cfg.optim, ess, float(stale.float().mean()))
                for group in self.opt.param_groups:
                    group["lr"] = lr
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM))
                if len(range_grad) == 1:  # one range: its gradient is the update's
                    range_grad = {s: grad_norm for s in range_grad}
                first_range_grad = range_grad
            else:
                torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
            self.opt.step()
        with torch.no_grad():  # ||Δθ|| over the step: what the stability rule's G_upd bounds per unit lr
            update_norm = float(torch.sqrt(sum(((p - b).float() ** 2).sum() for p, b in zip(self.params, before))))
        del before
        t_end = self.now()
        stats["clip_frac"] = clipped / max(tokens_seen, 1.0)  # over every update's tokens: 0 with one update

        with self.ledger.locked(self.health):
            self.ledger.trained.value += len(batch)
        sync_s = 0.0
        if (step + 1) % self.control.sync_every == 0:  # a new version every sync_every steps (verl); else every step
            self.version += 1
            sync_s = self.publish()
        self.updating = False

        self.instability.update(step, float(rewards.mean()), stats["kl_k3"], stats["loss"])
        resp_len = mask.sum(-1).cpu()                                                          # [N]
        metrics = self._metrics(step, version, batch, batch_t, stats, first_range_grad, start_logp)
        metrics.update({
            "lr": lr, "grad_norm": grad_norm, "update_norm": update_norm, "updates": n_updates,
            "reward/mean": float(rewards.mean()), "len/mean": float(resp_len.mean()),
            "time/weight_sync_s": sync_s, "time/queue_wait_s": t_start - t_wait, "time/train_s": t_end - t_start,
            "queue_len": queue_len, "dropped/groups_step": n_dropped,
            "dropped/groups": int(self.ledger.n_dropped.value), "instability/collapsed": self.instability.step is not None,
        })
        recent = [ld.seconds for ld in self.loads if ld.t >= t_wait]
        metrics["time/weight_load_s"] = float(np.mean(recent)) if recent else None
        row = {"step": step, "t_start": t_start, "t_end": t_end, "version": version, "n_samples": len(batch) * G,
               "n_tokens": int(attn.sum()), "queue_len": queue_len, "lr": lr, "grad_norm": grad_norm,
               "kl": stats["kl_k3"], "ess_token": stats["ess_token"], "ess_seq": stats["ess_seq"],
               "reward_mean": float(rewards.mean()), "clip_frac": stats["clip_frac"], "weight_sync_s": sync_s}
        return StepResult(row, metrics, batch)

    def _logprobs(self, b: "_Batch") -> torch.Tensor:
        """[N, T] log-probs of the whole batch under the current weights, without gradients."""
        out = torch.zeros_like(b.behav)
        mb = self.cfg.real.micro_batch
        with torch.no_grad():
            for lo in range(0, len(out), mb):
                rows = slice(lo, lo + mb)
                out[rows] = token_logprobs(self.model, b.ids[rows], b.attn[rows], b.mask[rows], self.cfg.real.temperature)
        return out

    def _accumulate(self, b: "_Batch", rows: torch.Tensor, prox: torch.Tensor | None, record: torch.Tensor | None,
                    by_range: bool) -> tuple[dict[int, float], tuple[float, float]]:
        """Accumulate the token-mean loss gradient over `rows` in micro-batches, grouped by staleness range. prox:
        the proximal log-probs (None: the forward's own, one update per step). record: where to keep the forward's
        log-probs. Returns (range -> grad norm of the range's own token-mean loss when by_range, (tokens clipped,
        tokens))."""
        mb, stale = self.cfg.real.micro_batch, b.stale.to(self.device)[rows]
        n_tok = b.mask[rows].sum()
        ranges = sorted(set(stale.tolist()))
        range_grad: dict[int, float] = {}
        clipped = 0.0
        for s in ranges:
            rows_s = rows[stale == s]
            snapshot = self._flat_grad() if by_range and len(ranges) > 1 else None
            for lo in range(0, len(rows_s), mb):
                r = rows_s[lo:lo + mb]
                logp = token_logprobs(self.model, b.ids[r], b.attn[r], b.mask[r], self.cfg.real.temperature)
                ref = prox[r] if prox is not None else logp.detach()
                loss_mb, st = grpo_loss(logp, b.behav[r], ref, b.adv[r], b.mask[r], self.loss_cfg)
                (loss_mb * b.mask[r].sum() / n_tok).backward()  # micro-batch token share of the update's mean
                clipped += st["clip_frac"] * float(b.mask[r].sum())
                if record is not None:
                    record[r] = logp.detach()
            if snapshot is not None:  # the range's own token-mean loss gradient
                range_grad[s] = float((self._flat_grad() - snapshot).norm() * n_tok / b.mask[rows_s].sum())
            elif by_range:
                range_grad[s] = math.nan  # one range: the caller takes the update's own norm
        return range_grad, (clipped, float(n_tok))

    def _metrics(self, step, v_cons, batch, b: "_Batch", stats, range_grad, logp) -> dict:
        """Staleness (per sample and per token, in-flight / in-queue split, histogram) and per-range stats, of the
        batch at the step's start (`logp`: its log-probs under the step's starting weights)."""
        versions = [v for rec in batch for v in rec.done.versions]                             # N lists
        v_end = torch.tensor([v[-1] for v in versions], dtype=torch.float32)                  # [N]
        v_start = v_cons - b.stale.float()                                                     # [N]
        n_tokens = sum(len(v) for v in versions)
        hist = torch.bincount(b.stale)
        out = {"step": step, "version": v_cons, "staleness/mean": float(b.stale.float().mean()),
               "staleness/max": int(b.stale.max()),
               "staleness/token_mean": sum(len(v) * v_cons - sum(v) for v in versions) / n_tokens,
               "staleness/hist": {str(s): int(c) for s, c in enumerate(hist) if c},
               "off_policy/in_flight/mean": float((v_end - v_start).mean()),
               "off_policy/in_queue/mean": float((v_cons - v_end).mean()),
               "ess/token": stats["ess_token"], "ess/seq": stats["ess_seq"], "kl/k1": stats["kl_k1"],
               "kl/k2": stats["kl_k2"], "kl/k3": stats["kl_k3"], "clip_frac": stats["clip_frac"],
               "behav_capped_frac": stats["behav_capped_frac"], "loss": stats["loss"], "ratio_mean": stats["ratio_mean"]}
        for s in sorted(range_grad):  # the batch's samples of staleness s, measured on their own
            rows = torch.nonzero(b.stale == s)[:, 0].to(self.device)
            with torch.no_grad():
                _, st = grpo_loss(logp[rows], b.behav[rows], logp[rows], b.adv[rows], b.mask[rows], self.loss_cfg)
            key = f"by_staleness/{s}"
            out.update({f"{key}/n_samples": len(rows), f"{key}/grad_norm": range_grad[s],
                        **{f"{key}/kl/{k}": st[f"kl_{k}"] for k in ("k1", "k2", "k3")},
                        f"{key}/ess/token": st["ess_token"], f"{key}/ess/seq": st["ess_seq"]})
        return out


@dataclass
class _Batch:
    """A step's tensors: ids, attention, response mask, behavior log-probs [N, T]; advantages, staleness [N]."""
    ids: torch.Tensor
    attn: torch.Tensor
    mask: torch.Tensor
    behav: torch.Tensor
    adv: torch.Tensor
    stale: torch.Tensor
