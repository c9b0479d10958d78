"""Policy and value losses with off-policy correction (docs/architecture.md, 'Off-policy correction').

mu = behaviour policy (`behav_logp`, recorded by the server), pi_prox = the trainer's policy before
this step's update (`prox_logp`, no grad), pi_theta = the policy being optimised (`logp`).

Every loss is a pure function over flat per-token tensors of one micro-batch, shape (T,), and
returns (loss, metrics). The loss is this micro-batch's share of the step's loss: per-token terms
times `weight`, the aggregation weight the learner computes from the *whole* step (token-mean:
1 / tokens in the step; sequence-mean: 1 / (tokens in the sequence * sequences in the step)), so
summing micro-batch losses, across gradient accumulation and data-parallel ranks, gives exactly the
loss of the unpacked batch. Metrics are means over this micro-batch's trained tokens (`mask`),
except `*_max`; the learner combines them weighted by token count.

Each loss config is one member of the tagged union `LossConfig`, picked by `type`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from tidal.trainer.learner_config import DecoupledPPOConfig, LossConfig, TISConfig
from torch import Tensor

__all__ = [
    "DecoupledPPOConfig",
    "TISConfig",
    "LossConfig",
    "LossInputs",
    "decoupled_ppo",
    "tis_pg",
    "kl_k3",
    "value_loss",
    "policy_loss",
]

class LossInputs(NamedTuple):
    """One micro-batch's trained tokens, each (T,)."""

    logp: Tensor        # log pi_theta(token), with grad
    prox_logp: Tensor   # log pi_prox(token), no grad
    behav_logp: Tensor  # log mu(token), from the engine
    adv: Tensor         # advantage
    mask: Tensor        # 1.0 on trained tokens, 0.0 elsewhere
    weight: Tensor      # aggregation weight (see module docstring), 0 where mask is 0


def _mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _behaviour_weight(inp: LossInputs, cap: float, mode: str) -> tuple[Tensor, dict[str, Tensor]]:
    """min(pi_prox / mu, C) (or 0 above C in `mask` mode), no grad, and its diagnostics."""
    raw = torch.exp(inp.prox_logp - inp.behav_logp).detach()
    w = raw.clamp(max=cap) if mode == "truncate" else torch.where(raw > cap, 0.0, raw)
    log_ratio = (inp.prox_logp - inp.behav_logp).detach()                  # log pi / mu
    metrics = {
        "is_weight_mean": _mean(w, inp.mask),
        "is_weight_max": (raw * inp.mask).max() if inp.mask.numel() else raw.new_zeros(()),
        "is_capped_frac": _mean((raw > cap).float(), inp.mask),
        # KL(mu || pi) by the k3 estimator on samples from mu: E_mu[r - 1 - log r], r = pi / mu
        # (Schulman, http://joschu.net/blog/kl-approx.html); expm1 keeps r - 1 exact near r = 1.
        "kl_behav": _mean(torch.expm1(log_ratio) - log_ratio, inp.mask),
    }
    return w, metrics


def decoupled_ppo(inp: LossInputs, cfg: DecoupledPPOConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """loss_t = -min(pi_prox/mu, C) * min(r A, clip(r, 1 - eps_lo, 1 + eps_hi) A), r = pi_theta/pi_prox."""
    w, metrics = _behaviour_weight(inp, cfg.is_cap, cfg.is_mode)
    ratio = torch.exp(inp.logp - inp.prox_logp)
    surr = ratio * inp.adv
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * inp.adv
    per_token = -w * torch.minimum(surr, clipped)
    metrics["clip_frac"] = _mean((clipped < surr).float(), inp.mask)
    return (per_token * inp.weight).sum(), metrics


def tis_pg(inp: LossInputs, cfg: TISConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """loss_t = -min(pi_prox/mu, C) * A * log pi_theta (weight detached)."""
    w, metrics = _behaviour_weight(inp, cfg.is_cap, cfg.is_mode)
    per_token = -w * inp.adv * inp.logp
    return (per_token * inp.weight).sum(), metrics


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """(T,) per-token k3 estimate of KL(pi_theta || pi_ref) on samples from pi_theta:
    exp(d) - 1 - d with d = log pi_ref - log pi_theta (Schulman's k3, as GRPO arXiv:2402.03300 eq. 4)."""
    d = ref_logp - logp
    return torch.expm1(d) - d


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, weight: Tensor,
               clip: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO2 clipped value loss: 0.5 * max((V - R)^2, (old V + clip(V - old V, +-c) - R)^2); all (T,)."""
    err = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (clipped - returns) ** 2)
    mask = (weight > 0).float()
    return 0.5 * (err * weight).sum(), {"value_err": _mean((values - returns).detach() ** 2, mask)}


def policy_loss(cfg: LossConfig, inp: LossInputs, *, entropy: Tensor | None = None,
                ref_logp: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The configured policy loss plus the optional KL penalty (needs `ref_logp`) and entropy bonus."""
    match cfg:
        case DecoupledPPOConfig():
            loss, metrics = decoupled_ppo(inp, cfg)
        case TISConfig():
            loss, metrics = tis_pg(inp, cfg)
        case _:
            raise TypeError(f"unknown loss config {type(cfg).__name__}")
    metrics["pg_loss"] = loss.detach()
    if cfg.kl_coef > 0:
        kl = kl_k3(inp.logp, ref_logp)
        loss = loss + cfg.kl_coef * (kl * inp.weight).sum()
        metrics["kl_ref"] = _mean(kl.detach(), inp.mask)
    if entropy is not None:
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * (entropy * inp.weight).sum()
        metrics["entropy"] = _mean(entropy.detach(), inp.mask)
    return loss, metrics
