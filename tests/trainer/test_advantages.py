"""Advantage estimators against hand-worked cases and plain Python loops."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tidal.protocol.messages import Trajectory, Turn
from tidal.trainer.advantages import (
    GAEConfig,
    GRPOConfig,
    ReBNConfig,
    ReinforcePPConfig,
    compute_advantages,
    discount_cumsum,
    gae,
    grpo,
    rloo,
    token_rewards,
)


def make(mask, turns, reward=None, group="g", tid="t", terminated=True, truncated=False):
    """A trajectory; its final reward is the sum of the turn rewards unless `reward` says otherwise."""
    n = len(mask)
    mask = np.asarray(mask, dtype=np.uint8)
    turns = [Turn(*t) for t in turns]
    return Trajectory.build(
        id=tid, group_id=group, env_id="test", task_seed=0, tokens=np.arange(n) + 10, loss_mask=mask,
        behav_logp=np.where(mask == 1, -1.0, 0.0), versions=np.where(mask == 1, 0, -1),
        turns=turns, reward=sum((t.reward for t in turns), 0.0) if reward is None else reward, terminated=terminated,
        truncated=truncated,
    )


def loop_discount(x, gamma):
    out, running = [0.0] * len(x), 0.0
    for t in reversed(range(len(x))):
        running = x[t] + gamma * running
        out[t] = running
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-10, 10), max_size=300), st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]))
def test_discount_cumsum_matches_loop(xs, gamma):
    np.testing.assert_allclose(discount_cumsum(np.array(xs), gamma), loop_discount(xs, gamma), rtol=1e-9, atol=1e-9)


def test_grpo_hand_worked():
    # group g0 scores [1, 0, 1, 1]: mean 0.75, unbiased std sqrt((3 * 0.25^2 + 0.75^2) / 3) = 0.5
    # -> A = [0.5, -1.5, 0.5, 0.5]; group g1 has one member -> A = 0
    scores = np.array([1.0, 0.0, 1.0, 1.0, 5.0])
    groups = np.array([0, 0, 0, 0, 1])
    np.testing.assert_allclose(grpo(scores, groups, GRPOConfig()), [0.5, -1.5, 0.5, 0.5, 0.0], atol=1e-5)
    # Dr. GRPO: centred only
    np.testing.assert_allclose(grpo(scores, groups, GRPOConfig(norm_std=False)), [0.25, -0.75, 0.25, 0.25, 0.0])
    # all-equal group: no signal, no NaN
    assert np.all(grpo(np.ones(3), np.zeros(3, int), GRPOConfig()) == 0.0)


def test_rloo_hand_worked():
    # A_i = s_i - mean of the others: 1 - 2/3, 0 - 1, 1 - 2/3, 1 - 2/3
    scores = np.array([1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(rloo(scores, np.zeros(4, int)), [1 / 3, -1.0, 1 / 3, 1 / 3])


def test_group_advantages_on_generated_tokens_only():
    batch = [make([0, 1, 1, 0], [(1, 3, 1.0)], tid="a"), make([0, 1, 1, 0], [(1, 3, 0.0)], tid="b")]
    adv, returns, metrics = compute_advantages(GRPOConfig(norm_std=False), batch)
    np.testing.assert_allclose(adv[0], [0, 0.5, 0.5, 0])
    np.testing.assert_allclose(adv[1], [0, -0.5, -0.5, 0])
    assert returns is None and metrics["trainer/reward_mean"] == 0.5


def test_rebn_hand_worked():
    # episode 1 turn rewards [0, 1], episode 2 [1]; gamma 0.5 -> G = [0.5, 1] and [1]
    # over all turns: mean 2.5/3, population std sqrt(2.25/3 - (2.5/3)^2) = sqrt(1/18)
    ep1 = make([0, 1, 1, 0, 1, 0], [(1, 3, 0.0), (4, 5, 1.0)], tid="1")
    ep2 = make([0, 1, 1], [(1, 3, 1.0)], tid="2")
    adv, _, _ = compute_advantages(ReBNConfig(gamma=0.5), [ep1, ep2])
    mean, std = 2.5 / 3, math.sqrt(1 / 18)
    a = [(g - mean) / std for g in (0.5, 1.0, 1.0)]
    np.testing.assert_allclose(adv[0], [0, a[0], a[0], 0, a[1], 0], atol=1e-7)
    np.testing.assert_allclose(adv[1], [0, a[2], a[2]], atol=1e-7)


def test_turn_reward_sits_on_last_generated_token_not_observation():
    # the second turn's span runs into an observation token (index 8, mask 0): reward stays on 7
    traj = make([0, 0, 1, 1, 0, 0, 1, 1, 0], [(2, 4, 0.5), (6, 9, 1.0)])
    rewards, lost = token_rewards(traj)
    np.testing.assert_array_equal(rewards, [0, 0, 0, 0.5, 0, 0, 0, 1.0, 0])
    assert lost == 0


@pytest.mark.parametrize("cfg", [GAEConfig(gamma=1.0, lam=1.0, normalize=False),
                                 ReinforcePPConfig(gamma=1.0, kl_coef=0.0)])
def test_final_reward_reaches_tokens_when_episode_ends_with_observation(cfg):
    # The peer bug: the outcome placed on a trailing mask-0 token and then multiplied by the mask is
    # lost. Here the episode ends with two observation tokens; the reward must still drive every
    # generated token (gamma = lam = 1, values 0: A_t = sum of later rewards = 1).
    traj = make([0, 1, 1, 0, 1, 1, 0, 0], [(1, 3, 0.0), (4, 6, 1.0)], reward=1.0)
    other = make([0, 1, 1, 0], [(1, 3, 0.0)], reward=0.0, tid="o")
    batch = [traj, other]
    if isinstance(cfg, GAEConfig):
        adv, returns, _ = compute_advantages(cfg, batch, values=[np.zeros(8), np.zeros(4)], bootstrap=[0.0, 0.0])
        np.testing.assert_allclose(adv[0], [0, 1, 1, 0, 1, 1, 0, 0])
        np.testing.assert_allclose(returns[0], adv[0])
    else:
        adv, _, _ = compute_advantages(cfg, batch, kl=[np.zeros(8), np.zeros(4)])
        # returns [1, 1, 1, 1] and [0, 0]; whitened (unbiased std over 6 tokens): positive vs negative
        assert np.all(adv[0][[1, 2, 4, 5]] > 0) and np.all(adv[1][[1, 2]] < 0)
        assert np.all(adv[0][[0, 3, 6, 7]] == 0)


def loop_gae(rewards, values, mask, bootstrap, gamma, lam):
    """cleanrl-style backwards loop over the generated tokens only."""
    idx = [i for i in range(len(mask)) if mask[i]]
    adv = [0.0] * len(mask)
    last, next_value = 0.0, bootstrap
    for i in reversed(idx):
        delta = rewards[i] + gamma * next_value - values[i]
        last = delta + gamma * lam * last
        adv[i] = last
        next_value = values[i]
    return adv


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(-2, 2), st.floats(-2, 2)), min_size=1, max_size=150),
       st.floats(0, 1), st.floats(0, 1), st.floats(-1, 1))
def test_gae_matches_loop(rows, gamma, lam, bootstrap):
    mask = np.array([m for m, _, _ in rows], dtype=float)
    rewards = np.array([r for _, r, _ in rows]) * mask
    values = np.array([v for _, _, v in rows])
    adv, ret = gae(rewards, values, mask, bootstrap, gamma, lam)
    np.testing.assert_allclose(adv, loop_gae(rewards, values, mask, bootstrap, gamma, lam), atol=1e-9)
    np.testing.assert_allclose(ret, (adv + values) * mask, atol=1e-12)


def test_reinforce_pp_hand_worked():
    # generated tokens 1..3, reward 1 on token 3, KL [0.1, 0.2, 0.3], kl_coef 1, gamma 1:
    # token rewards [-0.1, -0.2, 0.7] -> returns [0.4, 0.5, 0.7]; whitened with the unbiased std
    traj = make([0, 1, 1, 1], [(1, 4, 1.0)], reward=1.0)
    adv, _, _ = compute_advantages(ReinforcePPConfig(kl_coef=1.0), [traj], kl=[np.array([0, 0.1, 0.2, 0.3])])
    g = np.array([0.4, 0.5, 0.7])
    expected = (g - g.mean()) / (g.std(ddof=1) + 1e-8)
    np.testing.assert_allclose(adv[0], [0, *expected], atol=1e-7)
    np.testing.assert_allclose(expected, [-0.8729, -0.2182, 1.0911], atol=1e-4)


def test_gae_truncated_bootstrap_and_whitening():
    # one generated token, reward 0, value 0.5; truncated: bootstrap V = 2 -> delta = 0 + 2 - 0.5 = 1.5
    traj = make([0, 1], [(1, 2, 0.0)], terminated=False, truncated=True)
    adv, returns, _ = compute_advantages(GAEConfig(normalize=False), [traj], values=[np.array([0, 0.5])],
                                         bootstrap=[2.0])
    np.testing.assert_allclose(adv[0], [0, 1.5])
    np.testing.assert_allclose(returns[0], [0, 2.0])


def test_unplaceable_reward_is_counted():
    # a turn with an empty span before any generated token: its reward cannot be placed
    traj = make([0, 0, 1], [(1, 1, 1.0), (2, 3, 0.0)])
    _, _, metrics = compute_advantages(GAEConfig(), [traj], values=[np.zeros(3)], bootstrap=[0.0])
    assert metrics["trainer/rewards_unplaced"] == 1.0


def test_group_and_per_turn_estimators_read_one_reward():
    # the outcome sits on the last turn, so Trajectory.reward (GRPO) and the turns' sum (ReBN) agree;
    # a trajectory whose final reward disagrees with its turns cannot be built (nor decoded)
    won = make([0, 1, 0, 1], [(1, 2, 0.0), (3, 4, 1.0)], tid="won")
    lost = make([0, 1, 0, 1], [(1, 2, 0.0), (3, 4, 0.0)], tid="lost")
    grpo_adv, _, _ = compute_advantages(GRPOConfig(norm_std=False), [won, lost])
    rebn_adv, _, _ = compute_advantages(ReBNConfig(gamma=1.0, normalize=False), [won, lost])
    assert [grpo_adv[0][1], grpo_adv[1][1]] == [0.5, -0.5]  # the group sees 1 vs 0
    assert [rebn_adv[0][1], rebn_adv[1][1]] == [won.reward, lost.reward]  # first turn's return = the total
    with pytest.raises(ValueError, match=r"trajectory bad: reward 1.0 is not the sum of its 2 turn rewards \(0.0\)"):
        make([0, 1, 0, 1], [(1, 2, 0.0), (3, 4, 0.0)], reward=1.0, tid="bad")
