"""Policy losses against hand-worked values; the on-policy limits; the gradients that matter."""

import math

import pytest
import torch
from tidal.trainer.losses import (
    DecoupledPPOConfig,
    LossInputs,
    TISConfig,
    decoupled_ppo,
    kl_k3,
    policy_loss,
    tis_pg,
    value_loss,
)

log = math.log


def inputs(logp, prox, behav, adv, weight=None):
    logp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    n = logp.numel()
    mask = torch.ones(n, dtype=torch.float64)
    return LossInputs(
        logp=logp, prox_logp=torch.tensor(prox, dtype=torch.float64),
        behav_logp=torch.tensor(behav, dtype=torch.float64), adv=torch.tensor(adv, dtype=torch.float64),
        mask=mask, weight=mask / n if weight is None else torch.tensor(weight, dtype=torch.float64),
    )


def test_decoupled_ppo_hand_worked():
    # token 1: r = 0.75/0.5 = 1.5, w = 0.5/0.25 = 2, A = 1: min(1.5, 1.2) = 1.2 -> -2 * 1.2 = -2.4 (clipped)
    # token 2: r = 0.25/0.5 = 0.5, w = 1, A = -1: min(-0.5, 0.8 * -1) = -0.8 -> +0.8 (clipped)
    # token 3: r = 1, raw w = 0.5/0.05 = 10 -> capped at 3, A = 2: -3 * 2 = -6
    # token mean: (-2.4 + 0.8 - 6) / 3 = -7.6/3
    inp = inputs([log(0.75), log(0.25), log(0.5)], [log(0.5)] * 3, [log(0.25), log(0.5), log(0.05)], [1.0, -1.0, 2.0])
    loss, m = decoupled_ppo(inp, DecoupledPPOConfig(clip_low=0.2, clip_high=0.2, is_cap=3.0))
    assert loss.item() == pytest.approx(-7.6 / 3)
    assert m["clip_frac"].item() == pytest.approx(2 / 3)
    assert m["is_capped_frac"].item() == pytest.approx(1 / 3)
    assert m["is_weight_mean"].item() == pytest.approx((2 + 1 + 3) / 3)
    assert m["is_weight_max"].item() == pytest.approx(10.0)
    # clipped tokens carry no gradient; token 3 (unclipped): d/dlogp = -w * r * A * weight = -3 * 1 * 2 / 3
    loss.backward()
    torch.testing.assert_close(inp.logp.grad, torch.tensor([0.0, 0.0, -2.0], dtype=torch.float64))


def test_on_policy_decoupled_equals_ppo_and_weights_are_one():
    # fresh data: mu = pi_prox, so the behaviour weight is 1 and decoupled PPO is PPO-clip
    prox = [log(0.5), log(0.2), log(0.9), log(0.3)]
    logp = [log(0.6), log(0.1), log(0.95), log(0.3)]
    adv = [1.0, 0.5, -2.0, 1.0]
    inp = inputs(logp, prox, prox, adv)
    loss, m = decoupled_ppo(inp, DecoupledPPOConfig(clip_low=0.2, clip_high=0.28))
    ppo = 0.0
    for lp, px, a in zip(logp, prox, adv, strict=True):
        r = math.exp(lp - px)
        ppo += -min(r * a, min(max(r, 0.8), 1.28) * a) / 4
    assert loss.item() == pytest.approx(ppo)
    assert m["is_weight_mean"].item() == pytest.approx(1.0)
    assert m["is_weight_max"].item() == pytest.approx(1.0)
    assert m["is_capped_frac"].item() == 0.0
    assert m["kl_behav"].item() == pytest.approx(0.0, abs=1e-12)
    _, tis_m = tis_pg(inp, TISConfig())
    assert tis_m["is_weight_mean"].item() == pytest.approx(1.0) and tis_m["is_capped_frac"].item() == 0.0


def test_tis_hand_worked_and_weight_is_detached():
    # w = min(pi_prox/mu, 2): token 1: 0.5/0.25 = 2 (not capped: raw == cap); token 2: 0.5/0.1 = 5 -> 2 (capped)
    # loss = -(2 * 1 * log 0.4 + 2 * (-1) * log 0.3) / 2
    inp = inputs([log(0.4), log(0.3)], [log(0.5)] * 2, [log(0.25), log(0.1)], [1.0, -1.0])
    loss, m = tis_pg(inp, TISConfig(is_cap=2.0))
    assert loss.item() == pytest.approx(-(2 * log(0.4) - 2 * log(0.3)) / 2)
    assert m["is_capped_frac"].item() == pytest.approx(0.5)
    loss.backward()
    # gradient -w * A * weight: the weight does not depend on logp
    torch.testing.assert_close(inp.logp.grad, torch.tensor([-1.0, 1.0], dtype=torch.float64))


def test_mask_mode_drops_tokens_above_the_cap():
    # same tokens as the TIS case: token 2's weight 5 > C = 2 -> weight 0, token 1 keeps w = 2
    inp = inputs([log(0.4), log(0.3)], [log(0.5)] * 2, [log(0.25), log(0.1)], [1.0, -1.0])
    loss, m = tis_pg(inp, TISConfig(is_cap=2.0, is_mode="mask"))
    assert loss.item() == pytest.approx(-(2 * log(0.4)) / 2)
    assert m["is_weight_mean"].item() == pytest.approx(1.0) and m["is_capped_frac"].item() == pytest.approx(0.5)


def test_kl_k3_values():
    # d = log(pi_ref / pi) = log 2: e^d - 1 - d = 1 - log 2; and 0 when the policies agree
    k = kl_k3(torch.tensor([log(0.25), log(0.5)]), torch.tensor([log(0.5), log(0.5)]))
    torch.testing.assert_close(k, torch.tensor([1 - log(2), 0.0]))


def test_policy_loss_adds_kl_and_entropy():
    inp = inputs([log(0.5)], [log(0.5)], [log(0.5)], [0.0])   # A = 0: the PG term is 0
    ref = torch.tensor([log(0.25)], dtype=torch.float64)       # k3: e^{-log 2} - 1 + log 2 = log 2 - 0.5
    entropy = torch.tensor([1.5], dtype=torch.float64)
    cfg = DecoupledPPOConfig(kl_coef=0.1, entropy_coef=0.01)
    loss, m = policy_loss(cfg, inp, entropy=entropy, ref_logp=ref)
    assert loss.item() == pytest.approx(0.1 * (log(2) - 0.5) - 0.01 * 1.5)
    assert m["kl_ref"].item() == pytest.approx(log(2) - 0.5)
    assert m["entropy"].item() == pytest.approx(1.5)


def test_value_loss_clipped_hand_worked():
    # V = 2, old V = 1, R = 3, clip 0.5: unclipped err (2-3)^2 = 1, clipped (1.5-3)^2 = 2.25 -> 0.5 * 2.25
    v = torch.tensor([2.0], requires_grad=True)
    loss, _ = value_loss(v, torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([1.0]), clip=0.5)
    assert loss.item() == pytest.approx(1.125)
    loss2, _ = value_loss(v, torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([1.0]), clip=0.0)
    assert loss2.item() == pytest.approx(0.5)


def test_weights_make_micro_batch_losses_add_up():
    # two micro-batches of one token each, weights 1/2: their sum is the token mean of both
    a = inputs([log(0.4)], [log(0.5)], [log(0.5)], [1.0], weight=[0.5])
    b = inputs([log(0.2)], [log(0.5)], [log(0.5)], [-1.0], weight=[0.5])
    whole = inputs([log(0.4), log(0.2)], [log(0.5)] * 2, [log(0.5)] * 2, [1.0, -1.0])
    cfg = DecoupledPPOConfig()
    total = decoupled_ppo(a, cfg)[0] + decoupled_ppo(b, cfg)[0]
    assert total.item() == pytest.approx(decoupled_ppo(whole, cfg)[0].item())
