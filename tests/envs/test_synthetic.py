"""`synthetic:Turns-v0`: fixed turns, a latency awaited off the loop, a reproducible reward that varies."""

import asyncio
import doctest
import time

import pytest
import tidal.envs.synthetic
from tidal.envs.check import check_env

from tidal import envs


async def _play(env, seed: int, actions: list[str]) -> list[tuple]:
    out = [await env.areset(seed)]
    for action in actions:
        out.append(await env.astep(action))
    return out


async def test_an_episode_lasts_exactly_its_turns_and_pays_once():
    env = envs.make("synthetic:Turns-v0", turns=4, obs_chars=40)
    steps = (await _play(env, 7, ["a", "b", "c", "d"]))[1:]
    assert [s[2] for s in steps] == [False, False, False, True]  # terminated on the 4th step only
    assert [s[1] for s in steps[:3]] == [0.0, 0.0, 0.0] and 0.0 <= steps[3][1] < 1.0
    assert all(len(s[0]) <= 40 for s in steps[:3]) and steps[0][0].startswith("Turn 2 of 4.")


async def test_reward_is_reproducible_by_seed_and_actions_and_varies_across_a_group():
    env = envs.make("synthetic:Turns-v0", turns=2)
    again = envs.make("synthetic:Turns-v0", turns=2)
    assert await _play(env, 5, ["x", "y"]) == await _play(again, 5, ["x", "y"])
    rewards = {(await _play(env, 5, [f"answer {i}", "y"]))[-1][1] for i in range(8)}
    assert len(rewards) > 1  # members of a group act differently, so advantages are not all zero


async def test_latency_is_awaited_off_the_loop():
    env = envs.make("synthetic:Turns-v0", turns=2, latency_s=0.2, latency_sigma=0.0)
    start = time.monotonic()
    await _play(env, 1, ["a", "b"])
    assert time.monotonic() - start >= 0.6 - 0.05  # reset + 2 steps, 0.2 s each (sigma 0: the median)
    slow = envs.make("synthetic:Turns-v0", latency_s=3600.0, latency_sigma=0.0)
    assert slow.inline_calls() is None  # natively async: the engine awaits it
    pending = asyncio.create_task(slow.areset(0))
    await asyncio.sleep(0.01)
    assert not pending.done()  # the hour-long reset waits on the loop without holding it: we ran meanwhile
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="turns must be >= 1"):
        envs.make("synthetic:Turns-v0", turns=0)
    with pytest.raises(ValueError, match="latency_s"):
        envs.make("synthetic:Turns-v0", latency_s=-1.0)


def test_checker_passes_with_latency_and_docstring_runs():
    assert check_env(envs.make("synthetic:Turns-v0", latency_s=0.001, latency_sigma=0.0)) is not None
    failed, tried = doctest.testmod(tidal.envs.synthetic)
    assert tried > 0 and failed == 0
