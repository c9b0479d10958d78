"""Wrappers: turn limit, step timeout (threads abandoned, episode truncated), formats, tools, shaping."""

import asyncio
import re
import threading

import pytest
from tidal.envs.core import Env
from tidal.envs.wrappers import ObservationFormat, RewardShaping, StepTimeout, Tool, ToolUse, TurnLimit

from tidal import envs


class Echo(Env):
    """Echoes the action; ends when the action is 'stop'."""

    instructions = "Echo."

    def reset(self, seed=None):
        super().reset(seed)
        return "start", {"suffix": "Go on."}

    def step(self, action):
        done = action == "stop"
        return f"echo {action}", float(done), done, False, {"suffix": "Go on."}


class Hang(Echo):
    """Blocks its thread on 'hang' until released, as a stuck subprocess would."""

    blocking = True

    def __init__(self):
        self.release = threading.Event()

    def step(self, action):
        if action == "hang":
            self.release.wait(10)
        return super().step(action)


class Adder:
    """A tiny real tool: `<add>a b</add>` -> the sum; raises on non-numbers (a tool bug)."""

    name = "add"
    blocking = False

    def instruction(self):
        return "add: write <add>a b</add> to add two integers."

    def parse(self, action):
        m = re.search(r"<add>(.*?)</add>", action, re.DOTALL)
        return None if m is None else (m.group(1), action[: m.end()])

    def run(self, call):
        a, b = call.split()
        return str(int(a) + int(b))


class SlowAdder(Adder):
    name = "slowadd"
    blocking = True

    def instruction(self):
        return "slowadd: write <slowadd>a b</slowadd>."

    def parse(self, action):
        m = re.search(r"<slowadd>(.*?)</slowadd>", action)
        return None if m is None else (m.group(1), action[: m.end()])

    def run(self, call):
        assert threading.current_thread().name.startswith("tidal-env")
        return "slow " + super().run(call)


async def test_turn_limit_truncates_with_reason_and_resets():
    env = TurnLimit(Echo(), max_turns=2)
    await env.areset(0)
    assert (await env.astep("a"))[2:4] == (False, False)
    obs, _, terminated, truncated, info = await env.astep("b")
    assert (terminated, truncated, info["truncated_reason"]) == (False, True, "max_turns")
    await env.areset(1)
    assert env.turns == 0 and (await env.astep("stop"))[2:4] == (True, False)


async def test_hanging_blocking_step_truncates_and_breaks_env_without_blocking_loop():
    inner = Hang()
    env = StepTimeout(inner, timeout_s=0.2)
    await env.areset(0)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        obs, reward, terminated, truncated, info = await env.astep("hang")
    finally:
        task.cancel()
    assert (reward, terminated, truncated, info["truncated_reason"]) == (0.0, False, True, "step_timeout")
    assert "did not respond within 0.2 seconds" in obs
    assert ticks >= 3  # the loop kept running while the step hung
    assert "step did not return within 0.2s" in inner.broken
    with pytest.raises(envs.EnvBroken):
        await env.areset(1)
    inner.release.set()


async def test_step_timeout_passes_fast_steps_through():
    env = StepTimeout(Echo(), timeout_s=5)
    await env.areset(0)
    assert await env.astep("stop") == ("echo stop", 1.0, True, False, {"suffix": "Go on."})


@pytest.mark.parametrize(
    ("mode", "max_history", "expected"),
    [
        ("last", None, "echo b\nGo on."),
        ("concat", None, "start\necho a\necho b\nGo on."),
        ("concat", 2, "echo a\necho b\nGo on."),
        ("concat_with_action", None, "start\na\necho a\nb\necho b\nGo on."),
        ("concat_with_action", 2, "echo a\nb\necho b\nGo on."),
    ],
)
async def test_observation_formats(mode, max_history, expected):
    env = ObservationFormat(Echo(), mode=mode, max_history=max_history)
    assert (await env.areset(0))[0] == "start\nGo on."
    await env.astep("a")
    assert (await env.astep("b"))[0] == expected


async def test_tool_use_runs_tools_without_stepping_env():
    env = ToolUse(Echo(), [Adder(), SlowAdder()], tool_reward=0.1, tool_success_reward=0.2, max_tool_uses=3)
    assert isinstance(Adder(), Tool)
    obs, info = await env.areset(0)
    assert obs.startswith("start\nAvailable tools:\nadd:") and "slowadd" in obs and info["use_tool"] is False
    obs, reward, terminated, truncated, info = await env.astep("let me <add>2 3</add> and more text")
    assert (obs, reward, terminated, truncated) == ("5", pytest.approx(0.3), False, False)
    assert info["parsed_action"] == "let me <add>2 3</add>" and info["tool"] == "add"
    assert (await env.astep("<slowadd>1 1</slowadd>"))[0] == "slow 2"
    obs, reward, *_, info = await env.astep("<add>x y</add>")  # the tool raises: an observation, not a crash
    assert obs.startswith("Tool add failed: ValueError") and reward == pytest.approx(0.1)
    assert "maximum number of tool uses" in obs and info["tool_error"].startswith("ValueError")
    obs, reward, terminated, _, info = await env.astep("<add>1 1</add>")  # limit reached: goes to the env
    assert obs == "echo <add>1 1</add>" and info["use_tool"] is False and info["tool_uses"] == 3
    assert (await env.astep("stop"))[1:3] == (1.0, True)


async def test_reward_shaping_keeps_env_reward():
    env = RewardShaping(Echo(), lambda r, a, o, i: r - 0.01 * len(a))
    await env.areset(0)
    _, reward, _, _, info = await env.astep("stop")
    assert reward == pytest.approx(0.96) and info["env_reward"] == 1.0


class SlowAsync(Echo):
    """A natively async env (an HTTP client, say) whose step can be slow."""

    async def astep(self, action):
        if action == "slow":
            await asyncio.sleep(10)
        return self.step(action)


async def test_timed_out_async_env_is_cancelled_and_stays_usable():
    inner = SlowAsync()
    env = StepTimeout(inner, timeout_s=0.1)
    await env.areset(0)
    assert (await env.astep("slow"))[3] is True
    assert inner.broken is None  # nothing is left running: the next episode may use it
    await env.areset(1)
    assert (await env.astep("stop"))[:3] == ("echo stop", 1.0, True)
