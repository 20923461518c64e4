"""GRPO with an explicit behavior policy (AReaL style): advantages, log-probs, the surrogate, the lr schedule.

Pure functions of tensors. Three policies meet in the surrogate:
  behavior  π_behav: the policy (version) that sampled each token; its log-probs come with the rollout.
  proximal  π_prox:  the policy at the start of the learner step (decoupled form only). With one optimizer update
                     per batch it is the current policy (r = 1, nothing to clip); with several (`real.ppo_epochs`,
                     `real.mini_batches`) the current policy moves away from it within the step and the clip acts.
  current   π_θ:     the policy being optimised; `logp` carries the gradient.

  coupled:    r = π_θ/π_behav,  loss = -min(r·A, clip(r, 1±ε)·A)
  decoupled:  r = π_θ/π_prox,   loss = -w · min(r·A, clip(r, 1±ε)·A),  w = π_prox/π_behav (detached), capped:
              clamp: min(w, behav_cap); drop: 0 above behav_cap (the token leaves the loss, as AReaL's
              `ppo_actor_loss_fn` in areal/utils/functional.py does; it still counts in the token mean)

Ratio levels. token: each token its own r and w. sequence: one r per sequence, exp of the summed log-ratio (and one
w, from the summed behavior log-ratio). gspo: one r per sequence, exp of the *mean* log-ratio, the geometric mean
per token (GSPO). At the sequence levels each token carries its sequence's surrogate as its value, while the
gradient through token t is r_b·∇log π_θ(y_t) (a stop-gradient, as in GSPO-token), so the gradient is the
sequence-level importance-weighted policy gradient A_b·r_b·Σ_t ∇log π_θ(y_t).

Normalisation: the loss is the mean over all response tokens of the batch (every token weighs the same;
a long response weighs more than a short one). So when behav = prox = current, every form at every level is
plain GRPO, -Σ A·log π_θ / n_tokens: in value -mean A over tokens (r = 1), and in gradient.

Divergence of the behavior policy from the current one, KL(π_behav ‖ π_θ), estimated on the tokens π_behav sampled
with r = π_θ/π_behav: k1 = -log r (unbiased, can be negative), k2 = (log r)²/2 (biased, low variance), k3 = (r - 1) -
log r (unbiased, never negative). With r inverted k3 would estimate χ²-like mass that one token can dominate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sim.metrics import kl_estimates


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rewards [n_groups, G] -> (r - group mean) / (group std + eps), population std; equal rewards -> 0."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, correction=0)
    return (rewards - mean) / (std + eps)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """[B, T] log-prob of input_ids[:, t] given the tokens before it, at `temperature`; 0 where response_mask is 0.

    Positions follow the attention mask, so left- and right-padded batches give the same values as
    `generate`'s KV-cache decoding. Gradients flow unless called under no_grad.
    """
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)                                  # [B, T]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits[:, :-1]
    logits = logits.float() / temperature                                               # [B, T-1, V]
    target = input_ids[:, 1:, None]                                                     # [B, T-1, 1]
    logp = logits.gather(-1, target)[..., 0] - torch.logsumexp(logits, dim=-1)          # [B, T-1]
    logp = torch.cat([logp.new_zeros(len(logp), 1), logp], dim=1)                      # [B, T]
    return logp * response_mask


@dataclass(frozen=True)
class LossConfig:
    form: str = "decoupled"        # "coupled" | "decoupled"
    ratio_level: str = "token"     # "token" | "sequence" | "gspo"
    clip_eps: float = 0.2
    behav_cap: float = 5.0
    behav_cap_mode: str = "clamp"  # "clamp" | "drop"

    @classmethod
    def from_real(cls, real_cfg) -> "LossConfig":
        return cls(real_cfg.loss, real_cfg.ratio_level, real_cfg.clip_eps, real_cfg.behav_cap, real_cfg.behav_cap_mode)


def _ess(log_w: torch.Tensor) -> float:
    """Normalised ESS (Σw)²/(N Σw²) from log-weights; shifted by the max first (ESS is scale-free)."""
    if log_w.numel() == 0:
        return float("nan")
    w = torch.exp(log_w.double() - log_w.max())
    return float(w.sum() ** 2 / (len(w) * (w * w).sum()))


def _per_sequence(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """[B, T] token log-ratios (0 off the mask) -> [B, 1]: summed (sequence) or averaged (gspo) over the tokens."""
    total = log_ratio.sum(-1, keepdim=True)
    return total if level == "sequence" else total / mask.sum(-1, keepdim=True).clamp(min=1)


def grpo_loss(logp: torch.Tensor, behav_logp: torch.Tensor, prox_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """logp [B, T] (with grad), behav_logp / prox_logp [B, T], advantages [B], mask [B, T] float -> (loss, stats)."""
    if (cfg.form not in ("coupled", "decoupled") or cfg.ratio_level not in ("token", "sequence", "gspo")
            or cfg.behav_cap_mode not in ("clamp", "drop")):
        raise ValueError(f"unknown loss form/level/cap mode: {cfg.form}/{cfg.ratio_level}/{cfg.behav_cap_mode}")
    if cfg.form == "decoupled" and prox_logp is None:
        raise ValueError("the decoupled loss needs prox_logp (the policy at the start of the step)")
    ref = behav_logp if cfg.form == "coupled" else prox_logp
    log_r = (logp - ref) * mask                                                         # [B, T]
    log_w = (ref - behav_logp) * mask                                                   # [B, T], 0 when coupled
    if cfg.ratio_level != "token":  # value: the sequence's log-ratio on each token; gradient: the token's own
        log_r = _per_sequence(log_r, mask, cfg.ratio_level).detach() + log_r - log_r.detach()
        log_w = _per_sequence(log_w, mask, cfg.ratio_level).expand_as(mask)
    ratio = torch.exp(log_r)                                                            # [B, T]
    w = torch.exp(log_w).detach()                                                       # [B, T], 1 when coupled
    over_cap = w > cfg.behav_cap
    w = w.clamp(max=cfg.behav_cap) if cfg.behav_cap_mode == "clamp" else torch.where(over_cap, 0.0, w)
    adv = advantages[:, None].to(ratio.dtype)                                           # [B, 1]
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv
    n_tok = mask.sum().clamp(min=1)
    on = mask.bool()
    loss = -torch.where(on, w * torch.minimum(surr1, surr2), 0.0).sum() / n_tok  # where: no inf·0 off the mask

    with torch.no_grad():
        clipped = ((adv > 0) & (ratio > 1 + cfg.clip_eps)) | ((adv < 0) & (ratio < 1 - cfg.clip_eps))
        log_cur = (logp - behav_logp) * mask                                            # log π_θ/π_behav
        seqs = on.any(-1)
        stats = {
            "loss": loss.item(),
            "clip_frac": float((clipped & on).sum() / n_tok),
            "behav_capped_frac": float((over_cap & on).sum() / n_tok),
            "ratio_mean": float(ratio[on].double().mean()),
            "ess_token": _ess(log_cur[on]),
            "ess_seq": _ess(log_cur.sum(-1)[seqs]),
            **{f"kl_{k}": v for k, v in kl_estimates(log_cur[on].cpu().numpy()).items()},
        }
    return loss, stats


def scheduled_lr(optim_cfg, ess_ratio: float, mean_staleness: float) -> float:
    """constant: lr; ess_coupled (VCPO): lr·min(1, ess/ess_base)^p, with the ESS of the batch being trained (at
    optim.ess_level); staleness_aware: lr/(1 + α·mean staleness)."""
    if optim_cfg.schedule == "constant":
        return optim_cfg.lr
    if optim_cfg.schedule == "ess_coupled":
        return optim_cfg.lr * min(1.0, ess_ratio / optim_cfg.ess_base) ** optim_cfg.ess_power
    if optim_cfg.schedule == "staleness_aware":
        return optim_cfg.lr / (1.0 + optim_cfg.staleness_alpha * mean_staleness)
    raise ValueError(f"unknown lr schedule '{optim_cfg.schedule}'")
