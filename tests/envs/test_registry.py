"""The registry: ids, defaults, prefix adapters, entry-point plugins, helpful errors."""

import importlib.metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
from tidal.envs import registry
from tidal.envs.core import Env
from tidal.envs.wrappers import TurnLimit

from tidal import envs

EXAMPLE = Path(__file__).parents[1] / "fixtures" / "example_env"
"""A third-party suite installed as a distribution would be: its `tidal.envs` entry point returns a wrapped env."""


class Const(Env):
    def __init__(self, value: str = "a", size: int = 1):
        self.value, self.size = value, size

    def reset(self, seed=None):
        return self.value * self.size, {}


@pytest.fixture
def clean_registry(monkeypatch):
    registry._load_suites()
    monkeypatch.setattr(registry, "_specs", dict(registry._specs))
    monkeypatch.setattr(registry, "_prefixes", dict(registry._prefixes))


def test_register_make_with_defaults_and_overrides(clean_registry):
    envs.register("testsuite:Const-v0", entry_point=f"{__name__}:Const", value="x", size=2)
    env = envs.make("testsuite:Const-v0", size=3)
    assert env.reset(0)[0] == "xxx"
    assert env.id == "testsuite:Const-v0" and env.spec.suite == "testsuite"
    assert "testsuite:Const-v0" in envs.list() and envs.list("testsuite") == ["testsuite:Const-v0"]


@pytest.mark.parametrize("bad", ["Const-v0", "Suite:Const-v0", "s:Const", "s:Const-vx"])
def test_bad_ids_are_refused(clean_registry, bad):
    with pytest.raises(ValueError, match="suite:Name-vN"):
        envs.register(bad, entry_point=f"{__name__}:Const")


def test_duplicate_and_unknown_ids(clean_registry):
    envs.register("testsuite:Const-v0", entry_point=Const)
    with pytest.raises(ValueError, match="already registered"):
        envs.register("testsuite:Const-v0", entry_point=Const)
    with pytest.raises(envs.EnvNotFound, match="did you mean testsuite:Const-v0"):
        envs.make("testsuite:Const-v1")
    envs.register("testsuite:Missing-v0", entry_point="no_such_module_xyz:Env")
    with pytest.raises(envs.EnvNotFound, match="no_such_module_xyz"):
        envs.make("testsuite:Missing-v0")


def test_prefix_adapter_routes_any_rest(clean_registry):
    envs.register_prefix("pfx", lambda rest, **kw: Const(value=rest, **kw), ids=lambda: ["A", "B"])
    env = envs.make("pfx:hello", size=2)
    assert env.reset()[0] == "hellohello" and env.id == "pfx:hello"
    assert envs.list("pfx") == ["pfx:A", "pfx:B"]


def test_entry_point_plugins_register_suites(clean_registry, monkeypatch):
    calls = []

    def plugin():
        calls.append(1)
        envs.register("plugin:Const-v0", entry_point=Const)

    ep = SimpleNamespace(name="plugin", load=lambda: plugin)
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group: [ep] if group == registry.ENTRY_POINT_GROUP else []
    )
    monkeypatch.setattr(registry, "_loaded", False)
    assert "plugin:Const-v0" in envs.list() and calls == [1]
    assert envs.make("plugin:Const-v0").reset()[0] == "a"


def test_entry_point_env_that_comes_wrapped_gets_the_registered_spec(clean_registry, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setattr(registry, "_loaded", False)
    assert envs.list("example") == ["example:Countdown-v0"]
    env = envs.make("example:Countdown-v0", max_turns=2)
    assert isinstance(env, TurnLimit) and type(env.unwrapped).__name__ == "Countdown"
    assert env.id == "example:Countdown-v0" and env.spec.kwargs == {"start": 3}
    assert env.unwrapped.spec is None, "the inner env was built by the entry point, not by make"
    assert env.reset(seed=0)[0] == "3"
    assert env.step("\\boxed{2}")[1:4] == (1.0, False, False)
    assert env.step("\\boxed{9}")[1:4] == (0.0, False, True), "the shipped TurnLimit truncates at 2 turns"
    outer = TurnLimit(env, max_turns=1)  # a wrapper nobody registered still shows the inner spec
    assert outer.spec is env.spec and outer.id == "example:Countdown-v0"


def test_envs_stands_alone_without_torch_engine_or_trainer():
    import subprocess
    import sys

    code = (
        "import sys, envs; envs.list(); envs.make('games:Wordle-v0');"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'engine', 'trainer', 'transformers'});"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
