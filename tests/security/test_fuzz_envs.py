"""Hostile actions for every env that builds offline: any action string (markup the parsers look for,
malformed or nested, absurd numbers, control characters, lone surrogates, megabytes of text) gives an
ordinary step result, never an exception, and an observation that does not grow with the action."""

from __future__ import annotations

import math

import pytest
import tidal.envs as envs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OBS_LIMIT = 8192
"""An observation of a hostile action stays this short: the action is not echoed into the context."""

pieces = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["\\boxed{", "}", "{", "\\boxed{}", "guess ", "```python\n", "```", "\n", "<answer>", "</answer>",
                     "<tool_call>", "</tool_call>", "\\frac{1}{0}", "1/0", "-", "e999", "NaN", "inf", "\x00", "\ud800",
                     "\\\\", "$", "reveal ", "flag ", "a1", "ZZZZZ", "0" * 50, "9" * 5000, "import os\n",
                     "print(1)\n", "raise SystemExit\n"]),
    st.integers().map(str),
    st.floats().map(str),
)
action = st.lists(pieces, max_size=10).map("".join)


def check_step(result, env_id: str, action: str) -> bool:
    obs, reward, terminated, truncated, info = result
    assert isinstance(obs, str), f"{env_id}: observation {type(obs)}"
    assert isinstance(reward, (int, float)) and math.isfinite(reward), f"{env_id}: reward {reward!r}"
    assert isinstance(terminated, bool) and isinstance(truncated, bool), env_id
    assert isinstance(info, dict), env_id
    assert len(obs) <= OBS_LIMIT, f"{env_id}: {len(obs)} chars of observation for a {len(action)}-char action"
    return terminated or truncated


def buildable() -> list[str]:
    out = []
    for env_id in envs.list():
        try:
            envs.make(env_id).close()
        except Exception:  # needs a network, a server or a package this machine lacks: not offline
            continue
        out.append(env_id)
    return out


ENV_IDS = buildable()


def test_the_offline_envs_are_found():
    assert {"games:GuessTheNumber-v0", "math:Arithmetic-v0", "code:Functions-v0"} <= set(ENV_IDS)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_any_action_is_an_ordinary_step(env_id):
    env = envs.make(env_id)

    @FUZZ
    @given(st.integers(0, 2 ** 32 - 1), st.lists(action, min_size=1, max_size=5))
    def run(seed, actions):
        obs, info = env.reset(seed=seed)
        assert isinstance(obs, str) and isinstance(info, dict)
        for act in actions:
            if check_step(env.step(act), env_id, act):
                break

    try:
        run()
    finally:
        env.close()


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("huge", ["x" * 4_000_000, "\\boxed{" + "9" * 1_000_000 + "}", "{" * 200_000,
                                  "```python\n" + "#" * 1_000_000 + "\n```", "\\boxed{" * 100_000],
                         ids=["4MB-text", "1M-digit-answer", "200k-braces", "1MB-code", "nested-boxed"])
def test_a_huge_action_is_handled(env_id, huge):
    env = envs.make(env_id)
    try:
        env.reset(seed=0)
        check_step(env.step(huge), env_id, huge)
    finally:
        env.close()
