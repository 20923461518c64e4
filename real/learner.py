"""The learner: collects whole groups from the workers' queue, trains one GRPO step on each batch, publishes.

It runs in the trainer's (main) process. Per step it

1. receives messages into its own buffer until `batch_prompts` groups can be taken in the configured
   order (fifo / freshest; by batch in sync modes), dropping groups staler than the bound when the
   control says so; while it waits it checks that every worker is alive and that the run is on time;
2. computes rewards and group advantages;
3. accumulates the gradient in micro-batches grouped by sample staleness, so the gradient of each
   staleness range is the difference of two snapshots: per-range grad norms cost no extra backward;
4. steps AdamW at the scheduled lr (ESS of the previous step, mean staleness of this batch) with the
   grad norm clipped at 1.0 (the logged norm is the one before clipping), bumps the version, publishes.

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
from real.worker import Admitted, GroupDone, Ledger, Loaded, WorkerFailed, prompt_for
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
        the steps before it, replayed into the schedule's and the instability detector's state."""
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
        self.failures: dict[int, str] = {}  # worker id -> traceback it reported
        self.version = version
        self.updating = False
        self.prev_ess = 1.0
        self.instability = InstabilityDetector(cfg.real.instability)
        for m in history:
            self.instability.update_row(m)
            self.prev_ess = m["ess/token"]

    def now(self) -> float:
        return time.monotonic() - self.ledger.t0.value

    def health(self) -> None:
        self.check_workers()
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"the run passed its time limit at learner step {self.version} "
                               f"({len(self.buffer)} of {self.B} groups ready); " + self.describe_workers())

    def describe_workers(self) -> str:
        return "; ".join(self.ledger.describe(i, self.cfg.workload.max_new_tokens)
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
            self.buffer.put(msg.gid, rec.version_start)
        elif isinstance(msg, Loaded):
            self.loads.append(msg)
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
        self.ledger.wake_workers()  # the gate and the buffer have room again
        for rec in recs:
            rec.t_consumed, rec.version_consumed, rec.step, rec.dropped = t, self.version, step, dropped

    def collect(self, step: int) -> tuple[list[GroupRecord], int, list[GroupRecord]]:
        """Wait for a batch; returns (groups, groups waiting when the step began, groups dropped meanwhile)."""
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
        raised meanwhile may leave the weights half-updated, so no checkpoint is taken from them."""
        self.updating = True
        t_start = self.now()
        B, G, mb = self.B, self.G, self.cfg.real.micro_batch
        temp = self.cfg.real.temperature

        prompts = [prompt_for(self.task, self.cfg.seed, rec.gid) for rec in batch]
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
        stale = torch.tensor([self.version - rec.version_start for rec in batch]).repeat_interleave(G)  # [N]

        # Gradient accumulation grouped by staleness: each range's gradient is a snapshot difference. The
        # proximal policy (decoupled loss) is the weights at the step's start, which the weights still are
        # during accumulation (one optimizer step per batch, no dropout): its log-probs are the forward's own.
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        n_tok = mask.sum()
        logp_all = torch.zeros_like(behav)                                                    # [N, T]
        ranges = sorted(set(stale.tolist()))
        range_grad: dict[int, float] = {}
        for s in ranges:
            rows_s = torch.nonzero(stale == s)[:, 0]
            before = self._flat_grad() if len(ranges) > 1 else None
            for lo in range(0, len(rows_s), mb):
                rows = rows_s[lo:lo + mb].to(self.device)
                logp = token_logprobs(self.model, ids[rows], attn[rows], mask[rows], temp)
                loss_mb, _ = grpo_loss(logp, behav[rows], logp.detach(), adv[rows], mask[rows], self.loss_cfg)
                (loss_mb * mask[rows].sum() / n_tok).backward()  # micro-batch token share of the batch mean
                logp_all[rows] = logp.detach()
            if before is not None:  # the range's own token-mean loss gradient
                diff = self._flat_grad() - before
                range_grad[s] = float(diff.norm() * n_tok / mask[stale.to(self.device) == s].sum())
        with torch.no_grad():
            loss, stats = grpo_loss(logp_all, behav, logp_all, adv, mask, self.loss_cfg)
        mean_stale = float(stale.float().mean())
        lr = scheduled_lr(self.cfg.optim, self.prev_ess, mean_stale)
        for group in self.opt.param_groups:
            group["lr"] = lr
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM))
        if len(ranges) == 1:
            range_grad[ranges[0]] = grad_norm
        before = [p.detach().clone() for p in self.params]
        self.opt.step()
        with torch.no_grad():  # ||Δθ||: what the stability rule's G_upd bounds per unit lr
            update_norm = float(torch.sqrt(sum(((p - b).float() ** 2).sum() for p, b in zip(self.params, before))))
        del before
        t_end = self.now()
        self.prev_ess = stats["ess_token"]

        self.version += 1
        sync_s = self.publish()
        self.updating = False

        self.instability.update(step, float(rewards.mean()), grad_norm, stats["kl_k3"], stats["loss"])
        resp_len = mask.sum(-1).cpu()                                                          # [N]
        metrics = self._metrics(step, batch, stale, stats, range_grad, mask, behav, logp_all, adv)
        metrics.update({
            "lr": lr, "grad_norm": grad_norm, "update_norm": update_norm, "reward/mean": float(rewards.mean()),
            "len/mean": float(resp_len.mean()),
            "time/weight_sync_s": sync_s, "time/queue_wait_s": t_start - t_wait, "time/train_s": t_end - t_start,
            "queue_len": queue_len, "dropped/groups_step": n_dropped,
            "dropped/groups": int(self.ledger.n_dropped.value), "instability/collapsed": self.instability.step is not None,
        })
        recent = [ld.seconds for ld in self.loads if ld.t >= t_wait]
        metrics["time/weight_load_s"] = float(np.mean(recent)) if recent else None
        row = {"step": step, "t_start": t_start, "t_end": t_end, "version": self.version - 1, "n_samples": B * G,
               "n_tokens": int(attn.sum()), "queue_len": queue_len, "lr": lr, "grad_norm": grad_norm,
               "kl": stats["kl_k3"], "ess_token": stats["ess_token"], "ess_seq": stats["ess_seq"],
               "reward_mean": float(rewards.mean()), "clip_frac": stats["clip_frac"], "weight_sync_s": sync_s}
        return StepResult(row, metrics, batch)

    def _metrics(self, step, batch, stale, stats, range_grad, mask, behav, logp, adv) -> dict:
        """Staleness (per sample and per token, in-flight / in-queue split, histogram) and per-range stats."""
        v_cons = self.version - 1  # the version this batch was consumed (and trained) at
        versions = [v for rec in batch for v in rec.done.versions]                             # N lists
        v_end = torch.tensor([v[-1] for v in versions], dtype=torch.float32)                  # [N]
        v_start = v_cons - stale.float()                                                       # [N]
        n_tokens = sum(len(v) for v in versions)
        hist = torch.bincount(stale)
        out = {"step": step, "version": v_cons, "staleness/mean": float(stale.float().mean()),
               "staleness/max": int(stale.max()),
               "staleness/token_mean": sum(len(v) * v_cons - sum(v) for v in versions) / n_tokens,
               "staleness/hist": {str(s): int(c) for s, c in enumerate(hist) if c},
               "off_policy/in_flight/mean": float((v_end - v_start).mean()),
               "off_policy/in_queue/mean": float((v_cons - v_end).mean()),
               "ess/token": stats["ess_token"], "ess/seq": stats["ess_seq"], "kl/k3": stats["kl_k3"],
               "clip_frac": stats["clip_frac"], "loss": stats["loss"], "ratio_mean": stats["ratio_mean"]}
        for s in sorted(range_grad):  # the batch's samples of staleness s, measured on their own
            rows = torch.nonzero(stale == s)[:, 0].to(self.device)
            with torch.no_grad():
                _, st = grpo_loss(logp[rows], behav[rows], logp[rows], adv[rows], mask[rows], self.loss_cfg)
            key = f"by_staleness/{s}"
            out.update({f"{key}/n_samples": len(rows), f"{key}/grad_norm": range_grad[s], f"{key}/kl/k3": st["kl_k3"],
                        f"{key}/ess/token": st["ess_token"], f"{key}/ess/seq": st["ess_seq"]})
        return out
