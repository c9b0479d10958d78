"""The Env API: inline vs offloaded calls, error records, wrappers forwarding, answer parsing."""

import asyncio
import threading

import pytest
from tidal.envs.core import Env, EnvBroken, Wrapper
from tidal.envs.wrappers import TurnLimit

from tidal import envs


class Counter(Env):
    """Counts to `target`; records which thread ran each step."""

    instructions = r"Say \boxed{n} with the next number."

    def __init__(self, target: int = 3):
        self.target = target
        self.threads: list[str] = []

    def reset(self, seed=None):
        super().reset(seed)
        self.n = 0
        return "0", {}

    def step(self, action):
        self.threads.append(threading.current_thread().name)
        if envs.extract_boxed(action) != str(self.n + 1):
            return f"expected \\boxed{{{self.n + 1}}}", -0.1, True, False, {}
        self.n += 1
        return str(self.n), float(self.n == self.target), self.n == self.target, False, {}

    def solver(self):
        return lambda obs: f"\\boxed{{{int(obs) + 1}}}"


class BlockingCounter(Counter):
    blocking = True


class Exploding(Counter):
    def step(self, action):
        raise ZeroDivisionError("boom in step")


async def test_cheap_env_runs_inline_and_blocking_env_is_offloaded():
    cheap, slow = Counter(), BlockingCounter()
    for env in (cheap, slow):
        ep = await envs.run_episode(env, env.solver(), seed=1)
        assert ep.rewards == [0.0, 0.0, 1.0] and ep.finish_reason == "terminated"
    main = threading.current_thread().name
    assert set(cheap.threads) == {main}
    assert all(name.startswith("tidal-env") for name in slow.threads)


async def test_inline_calls_only_for_cheap_usable_envs_whose_async_methods_are_the_base():
    cheap = Counter()
    calls = cheap.inline_calls()
    assert calls == (cheap.reset, cheap.step)
    assert BlockingCounter().inline_calls() is None  # offloaded: awaited
    assert TurnLimit(Counter(), 5).inline_calls() is None  # a wrapper's logic is in astep

    class NativelyAsync(Counter):
        async def astep(self, action):
            return self.step(action)

    assert NativelyAsync().inline_calls() is None
    cheap.broken = "gone"
    assert cheap.inline_calls() is None
    # the direct calls and the awaited ones are the same episode
    direct, awaited = Counter(), Counter()
    reset, step = direct.inline_calls()
    assert reset(0) == await awaited.areset(0)
    for action in ("\\boxed{1}", "\\boxed{2}", "\\boxed{9}"):
        assert step(action) == await awaited.astep(action)


async def test_env_exception_becomes_counted_error_record():
    env = Exploding()
    before = envs.ERRORS[env.id]
    ep = await envs.run_episode(env, env.solver(), seed=0)
    assert ep.finish_reason == "env_error"
    assert ep.error.type == "ZeroDivisionError" and ep.error.message == "boom in step"
    assert ep.error.phase == "step" and "in step" in ep.error.traceback and "raise ZeroDivisionError" in ep.error.traceback
    assert envs.ERRORS[env.id] == before + 1
    ep2 = await envs.run_episode(Counter(), Counter().solver(), seed=0)  # the caller goes on
    assert ep2.error is None


async def test_async_policy_and_max_turns_cap():
    env = Counter(target=100)

    async def policy(obs):
        await asyncio.sleep(0)
        return f"\\boxed{{{int(obs) + 1}}}"

    ep = await envs.run_episode(env, policy, max_turns=5)
    assert ep.finish_reason == "max_turns" and len(ep.actions) == 5 and ep.observations[-1] == "5"


async def test_broken_env_refuses_further_calls():
    env = Counter()
    env.broken = "step timed out after 1s"
    with pytest.raises(EnvBroken, match="step timed out"):
        await env.areset(0)


def test_wrapper_forwards_and_sync_api_works_outside_a_loop():
    wrapped = Wrapper(Counter(target=2))
    assert wrapped.instructions == Counter.instructions
    assert wrapped.reset(seed=0) == ("0", {})
    assert wrapped.step(r"\boxed{1}")[:4] == ("1", 0.0, False, False)
    assert wrapped.target == 2 and isinstance(wrapped.unwrapped, Counter)


@pytest.mark.parametrize(
    ("text", "boxed", "final"),
    [
        (r"so \boxed{42}.", "42", "42"),
        (r"\boxed{1} then \boxed{ \frac{a}{b} }", r"\frac{a}{b}", r"\frac{a}{b}"),
        ("work\n\nAnswer: 7\n", None, "7"),
        (r"\boxed{unclosed", None, r"\boxed{unclosed"),
        ("", None, None),
        ("   \n ", None, None),
    ],
)
def test_answer_parsing_is_lenient(text, boxed, final):
    assert envs.extract_boxed(text) == boxed
    assert envs.final_answer(text) == final


def test_huge_action_parses_in_linear_time():
    assert envs.extract_boxed("{" * 2_000_000 + r"\boxed{3}") == "3"
    assert envs.extract_boxed(r"\boxed{" * 100_000) is None


def test_docstring_examples_run():
    import doctest

    import tidal.envs.core
    import tidal.envs.wrappers

    for module in (tidal.envs.core, tidal.envs.wrappers):
        failed, tried = doctest.testmod(module)
        assert tried > 0 and failed == 0, module.__name__


async def test_episode_endings_come_from_the_one_vocabulary():
    from tidal.protocol.messages import FINISH_REASONS

    assert envs.Episode("counter", 0).finish_reason is None  # not ended yet
    endings = [await envs.run_episode(Counter(), Counter().solver(), seed=0),
               await envs.run_episode(Exploding(), Exploding().solver(), seed=0),
               await envs.run_episode(Counter(target=100), Counter().solver(), max_turns=2)]
    assert [ep.finish_reason for ep in endings] == ["terminated", "env_error", "max_turns"]
    assert {ep.finish_reason for ep in endings} <= FINISH_REASONS
