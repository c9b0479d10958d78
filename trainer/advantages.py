"""Advantage estimators: from a batch's rewards (and, for some, values or KL) to one advantage per token.

Invariant (tidal.protocol.messages.Turn): a turn's reward belongs to that turn's last *generated* token
(loss mask 1), never to an observation token. Estimators that walk tokens (GAE, REINFORCE++) run
over the generated tokens only, so observation tokens neither receive reward nor break the
discounting chain. (AgentGym-RL's verl fork places the outcome score on a mask-0 token and then
multiplies rewards by the response mask, which loses it for GAE and REINFORCE++; see
docs/architecture.md, Advantages.)

Arrays are numpy float64 and aligned with a trajectory's tokens, shape (n,), zero where the loss
mask is 0. One reward: GRPO and RLOO read `Trajectory.reward`, the per-turn estimators (ReBN,
REINFORCE++, GAE) read `Turn.reward`, and the two agree because `Trajectory.reward` must be the sum
of the turn rewards (checked when a trajectory is built or decoded, tidal.protocol.messages): an
outcome-only env puts its score on the last turn, so every estimator sees it.

Every estimator config is one member of the tagged union `AdvantageConfig`, picked by `type`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Annotated

import numpy as np
from msgspec import Meta
from tidal.protocol.config import Strict
from tidal.protocol.messages import Trajectory

__all__ = [
    "GRPOConfig",
    "RLOOConfig",
    "ReBNConfig",
    "ReinforcePPConfig",
    "GAEConfig",
    "AdvantageConfig",
    "discount_cumsum",
    "group_ids",
    "grpo",
    "rloo",
    "turn_returns",
    "token_rewards",
    "rebn",
    "reinforce_pp",
    "gae",
    "whiten",
    "compute_advantages",
]

Gamma = Annotated[float, Meta(ge=0.0, le=1.0)]


class GRPOConfig(Strict, tag="grpo", tag_field="type"):
    """Group-relative advantages: A_i = (s_i - mean_g s) / (std_g s + eps), arXiv:2402.03300, section 4.1.2.

    Departures: the std is the unbiased sample std (as TRL and verl), and a group of one gets A = 0
    (no baseline exists). `norm_std = false` is Dr. GRPO (arXiv:2503.20783), which argues the std
    division biases towards too-easy and too-hard prompts.
    """

    norm_std: bool = True
    """Divide by the group's reward std."""
    eps: Annotated[float, Meta(gt=0)] = 1e-6
    """Added to the std so an all-equal group gives A = 0, not NaN."""


class RLOOConfig(Strict, tag="rloo", tag_field="type"):
    """REINFORCE leave-one-out: A_i = s_i - mean_{j != i} s_j (arXiv:2402.14740 eq. 6).

    Departure: a group of one gets A = 0 (no other sample to form the baseline).
    """


class ReBNConfig(Strict, tag="rebn", tag_field="type"):
    """REINFORCE with return batch normalisation, as GEM's oat example (examples/train_oat in GEM).

    G_t = r_t + gamma * G_{t+1} over the turns of an episode; A = (G - mean) / (std + 1e-9) with the
    population mean and std over all turns of the batch; each turn's A is given to all its tokens.
    Departure: GEM trains one sample per turn; we keep the episode as one sequence, which is the
    same loss when aggregated per token (each turn's tokens carry that turn's advantage).
    """

    gamma: Gamma = 1.0
    """Discount per turn (GEM uses 0.9 for games, 1.0 elsewhere)."""
    normalize: bool = True
    """Normalise returns over the batch (false: plain REINFORCE with returns, no baseline)."""


class ReinforcePPConfig(Strict, tag="reinforce_pp", tag_field="type"):
    """REINFORCE++ (arXiv:2501.03262), as AgentGym-RL's verl offers.

    Token reward = step reward at each turn's last generated token - kl_coef * KL_t on every
    generated token, KL_t = log pi_prox - log pi_ref (the k1 estimate on the sampled token);
    returns discounted per generated token; A = returns whitened over all generated tokens of the
    batch. Departure: pi_prox stands in for pi_old (they are the same policy in our step), and
    observation tokens are skipped instead of reset or carried by masking arithmetic.
    """

    gamma: Gamma = 1.0
    """Discount per generated token."""
    kl_coef: Annotated[float, Meta(ge=0)] = 0.01
    """Weight of the per-token KL penalty to the reference model folded into the reward."""


class GAEConfig(Strict, tag="gae", tag_field="type"):
    """PPO with generalised advantage estimation (arXiv:1506.02438 eq. 16) and a value head.

    Time steps are the generated tokens; V_t is the value head at the position that predicts the
    token (the state before it is emitted). The value after the last token is 0 when the episode
    terminated, and the value of the final state when it was truncated (Gymnasium's distinction).
    Departures from RLHF PPO (verl, OpenRLHF): a truncated episode bootstraps instead of ending at 0,
    and observation tokens are not time steps (verl's multi-turn fork carries values through them by
    mask arithmetic; same result). Advantages are whitened over the batch by default, as they do.
    The critic is a linear head on the policy's last hidden state (shared backbone), so the value
    loss also trains the backbone, scaled by `value_coef`.
    """

    gamma: Gamma = 1.0
    lam: Gamma = 0.95
    """GAE lambda."""
    normalize: bool = True
    """Whiten advantages over all generated tokens of the batch."""
    value_coef: Annotated[float, Meta(ge=0)] = 0.5
    """Weight of the value loss 0.5 * (V - R)^2 in the step's loss."""
    value_clip: Annotated[float, Meta(ge=0)] = 0.2
    """Clip the value update to old V +- value_clip (PPO2); 0 disables clipping."""


AdvantageConfig = GRPOConfig | RLOOConfig | ReBNConfig | ReinforcePPConfig | GAEConfig


# --- building blocks -------------------------------------------------------------------------------

_BLOCK = 64


def discount_cumsum(x: np.ndarray, gamma: float) -> np.ndarray:
    """y[t] = x[t] + gamma * y[t+1], y[T] = 0, for x of shape (T,).

    Fast path: blocks of 64 are discounted by one matrix product, then block tails are carried
    backwards (T/64 Python steps instead of T); every power of gamma is <= 1, so nothing overflows.
    Tested against the plain loop.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n == 0:
        return x.copy()
    nb = -(-n // _BLOCK)
    xb = np.zeros(nb * _BLOCK)
    xb[:n] = x
    xb = xb.reshape(nb, _BLOCK)
    k = np.arange(_BLOCK)
    expo = k[None, :] - k[:, None]                                          # j - i
    disc = np.where(expo >= 0, gamma ** np.maximum(expo, 0), 0.0)           # (64, 64), upper triangular
    yb = xb @ disc.T                                                        # within-block sums
    tail = gamma ** (_BLOCK - k)                                            # gamma^(64 - i)
    for b in range(nb - 2, -1, -1):
        yb[b] += tail * yb[b + 1, 0]
    return yb.reshape(-1)[:n]


def group_ids(batch: Sequence[Trajectory]) -> np.ndarray:
    """(N,) int index of each trajectory's group, in order of first appearance."""
    index: dict[str, int] = {}
    return np.array([index.setdefault(t.group_id, len(index)) for t in batch], dtype=np.int64)


def grpo(scores: np.ndarray, groups: np.ndarray, cfg: GRPOConfig) -> np.ndarray:
    """(N,) scores and group indices -> (N,) GRPO advantages (see GRPOConfig)."""
    adv = np.zeros(len(scores))
    for g in np.unique(groups):
        idx = groups == g
        s = scores[idx]
        if len(s) < 2:
            continue
        centred = s - s.mean()
        adv[idx] = centred / (s.std(ddof=1) + cfg.eps) if cfg.norm_std else centred
    return adv


def rloo(scores: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(N,) scores and group indices -> (N,) leave-one-out advantages: n/(n-1) * (s_i - mean)."""
    adv = np.zeros(len(scores))
    for g in np.unique(groups):
        idx = groups == g
        n = int(idx.sum())
        if n >= 2:
            adv[idx] = n / (n - 1) * (scores[idx] - scores[idx].mean())
    return adv


def turn_returns(rewards: Sequence[float], gamma: float) -> np.ndarray:
    """(K,) per-turn rewards -> (K,) returns G_t = r_t + gamma * G_{t+1}."""
    return discount_cumsum(np.asarray(rewards, dtype=np.float64), gamma)


def _last_generated(mask: np.ndarray, end: int) -> int:
    """Index of the last mask-1 token before `end`, or -1."""
    hits = np.flatnonzero(mask[:end])
    return int(hits[-1]) if len(hits) else -1


def token_rewards(traj: Trajectory) -> tuple[np.ndarray, int]:
    """(n,) rewards with each turn's reward on its last generated token; and the count of turn
    rewards that found no generated token at or before the turn's end (lost, reported by the caller).

    A turn's span normally ends with a generated token; if it ends on an observation token the
    reward moves back to the last generated token before it, never onto the observation.
    """
    mask = traj.mask()
    out = np.zeros(len(mask))
    lost = 0
    for turn in traj.turns:
        i = _last_generated(mask, turn.end)
        if i < 0:
            lost += turn.reward != 0.0
            continue
        out[i] += turn.reward
    return out, lost


def whiten(values: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, ddof: int = 0,
           eps: float = 1e-8, reduce: Callable[[np.ndarray], np.ndarray] | None = None) -> list[np.ndarray]:
    """(x - mean) / (std + eps) over the masked entries of all arrays; zero where the mask is 0.

    `reduce` sums a (3,) array [sum, sum of squares, count] across data-parallel ranks.
    """
    stats = np.zeros(3)
    for x, m in zip(values, masks, strict=True):
        sel = x[m.astype(bool)]
        stats += (sel.sum(), (sel * sel).sum(), len(sel))
    if reduce is not None:
        stats = reduce(stats)
    total, sq, count = stats
    if count == 0:
        return [np.zeros_like(x) for x in values]
    mean = total / count
    var = max(sq / count - mean * mean, 0.0) * count / max(count - ddof, 1)
    std = math.sqrt(var)
    return [np.where(m.astype(bool), (x - mean) / (std + eps), 0.0) for x, m in zip(values, masks, strict=True)]


# --- estimators over a batch ---------------------------------------------------------------------

def rebn(batch: Sequence[Trajectory], cfg: ReBNConfig, reduce=None) -> list[np.ndarray]:
    """Per-token ReBN advantages: each turn's normalised return on its generated tokens."""
    returns = [turn_returns([t.reward for t in traj.turns], cfg.gamma) for traj in batch]
    if cfg.normalize:
        returns = whiten(returns, [np.ones(len(g)) for g in returns], eps=1e-9, reduce=reduce)
    out = []
    for traj, g in zip(batch, returns, strict=True):
        mask = traj.mask()
        adv = np.zeros(len(mask))
        for turn, a in zip(traj.turns, g, strict=True):
            adv[turn.start:turn.end] = a
        out.append(adv * mask)
    return out


def _over_generated(mask: np.ndarray, fn) -> np.ndarray:
    """Apply `fn(indices of generated tokens)` -> values on them, scattered back to (n,)."""
    idx = np.flatnonzero(mask)
    out = np.zeros(len(mask))
    if len(idx):
        out[idx] = fn(idx)
    return out


def reinforce_pp(rewards: Sequence[np.ndarray], kl: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                 cfg: ReinforcePPConfig, reduce=None) -> list[np.ndarray]:
    """REINFORCE++ per-token advantages from (n,) token rewards, (n,) KL_t and (n,) masks per trajectory."""
    returns = [
        _over_generated(m, lambda idx, r=r, k=k: discount_cumsum(r[idx] - cfg.kl_coef * k[idx], cfg.gamma))
        for r, k, m in zip(rewards, kl, masks, strict=True)
    ]
    return whiten(returns, masks, ddof=1, reduce=reduce)


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, bootstrap: float,
        gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """One trajectory's GAE over its generated tokens: (n,) rewards, values, mask -> (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last generated token = `bootstrap`);
    A_t = sum_k (gamma * lam)^k delta_{t+k}; R_t = A_t + V_t. Zero on observation tokens.
    """
    def adv_on(idx):
        v = values[idx]
        v_next = np.append(v[1:], bootstrap)
        delta = rewards[idx] + gamma * v_next - v
        return discount_cumsum(delta, gamma * lam)

    adv = _over_generated(mask, adv_on)
    return adv, (adv + values) * mask


def compute_advantages(cfg: AdvantageConfig, batch: Sequence[Trajectory], *,
                       values: Sequence[np.ndarray] | None = None, bootstrap: Sequence[float] | None = None,
                       kl: Sequence[np.ndarray] | None = None,
                       reduce=None) -> tuple[list[np.ndarray], list[np.ndarray] | None, dict[str, float]]:
    """Per-token advantages (and GAE returns) for a batch, with the estimator's metrics.

    `values` and `bootstrap` (GAE) and `kl` (REINFORCE++) come from the learner's no-grad passes.
    """
    masks = [traj.mask() for traj in batch]
    returns = None
    lost = 0
    match cfg:
        case GRPOConfig() | RLOOConfig():
            scores = np.array([t.reward for t in batch], dtype=np.float64)
            groups = group_ids(batch)
            per_traj = grpo(scores, groups, cfg) if isinstance(cfg, GRPOConfig) else rloo(scores, groups)
            adv = [a * m for a, m in zip(per_traj, masks, strict=True)]
        case ReBNConfig():
            adv = rebn(batch, cfg, reduce)
        case ReinforcePPConfig():
            placed = [token_rewards(t) for t in batch]
            lost = sum(n for _, n in placed)
            adv = reinforce_pp([r for r, _ in placed], kl, masks, cfg, reduce)
        case GAEConfig():
            placed = [token_rewards(t) for t in batch]
            lost = sum(n for _, n in placed)
            pairs = [gae(r, v, m, b, cfg.gamma, cfg.lam)
                     for (r, _), v, m, b in zip(placed, values, masks, bootstrap, strict=True)]
            adv = [a for a, _ in pairs]
            returns = [r for _, r in pairs]
            if cfg.normalize:
                adv = whiten(adv, masks, ddof=1, reduce=reduce)
        case _:
            raise TypeError(f"unknown advantage config {type(cfg).__name__}")
    flat = np.concatenate([a[m.astype(bool)] for a, m in zip(adv, masks, strict=True)] or [np.zeros(0)])
    metrics = {
        "trainer/adv_mean": float(flat.mean()) if len(flat) else 0.0,
        "trainer/adv_std": float(flat.std()) if len(flat) else 0.0,
        "trainer/adv_zero_frac": float((flat == 0).mean()) if len(flat) else 0.0,
        "trainer/reward_mean": float(np.mean([t.reward for t in batch])) if batch else 0.0,
        "trainer/rewards_unplaced": float(lost),
    }
    return adv, returns, metrics

