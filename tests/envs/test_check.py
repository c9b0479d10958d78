"""check_env over every registered env (and GEM envs that work offline), and on broken envs."""

import importlib.util
import random
import time

import pytest
from tidal.envs.check import EnvCheckError, check_env
from tidal.envs.core import Env

from tidal import envs

GEM_IDS = ["game:GuessTheNumber-v0-easy", "game:Mastermind-v0-easy", "game:Minesweeper-v0-easy",
           "game:Sokoban-v0-easy", "rg:letter_counting"]
ALL = envs.list() + ([f"gem:{i}" for i in GEM_IDS] if importlib.util.find_spec("gem") else [])


@pytest.mark.parametrize("env_id", ALL)
def test_every_registered_env_passes(env_id):
    warnings = check_env(envs.make(env_id))
    assert all("blocking" in w for w in warnings)


class Sloppy(Env):
    """Breaks every rule check_env knows."""

    instructions = "x"

    def reset(self, seed=None):
        return "", {}

    def step(self, action):
        if not action:
            raise KeyError("empty action")
        return 42, True, "no", 0, []


class Nondeterministic(Env):
    def reset(self, seed=None):
        return str(random.random()), {}

    def step(self, action):
        return "ok", 0.0, True, False, {}


class SlowInline(Env):
    def reset(self, seed=None):
        return "go", {}

    def step(self, action):
        time.sleep(0.01)
        return "ok", 0.0, False, False, {}


def test_broken_env_gets_every_problem_named():
    with pytest.raises(EnvCheckError) as err:
        check_env(Sloppy())
    msg = str(err.value)
    for expected in ("observation must be str", "reward must be a finite float", "terminated/truncated must be bool",
                     "info must be a dict", "empty observation", "raised KeyError: 'empty action'"):
        assert expected in msg


def test_nondeterminism_is_caught():
    with pytest.raises(EnvCheckError, match="not deterministic: seed 0"):
        check_env(Nondeterministic())


def test_slow_inline_step_is_warned_not_failed():
    warnings = check_env(SlowInline(), steps=3)
    assert len(warnings) == 1 and "declare `blocking = True`" in warnings[0]
