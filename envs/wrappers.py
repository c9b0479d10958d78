"""One-hook wrappers (Gymnasium's shape): turn limit, step timeout, observation format, tools, rewards.

Each wrapper is async-first (see `tidal.envs.core.Wrapper`) and changes one thing. Order, innermost first,
as GEM's wrapper factory: tools, then reward shaping, then observation format, then turn limit and
step timeout outermost so that every turn, tool turns included, counts and is bounded.

    env = StepTimeout(TurnLimit(ToolUse(envs.make("qa:Wiki-v0"), [SearchTool(index)]), 8), 30.0)

Invariant: a wrapper never turns a bad action or a slow env into an exception; it ends the episode
as truncated with `info["truncated_reason"]` saying why.
"""

import asyncio
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from tidal.envs.core import Env, StepResult, Wrapper, offload

__all__ = [
    "Tool",
    "ToolUse",
    "TurnLimit",
    "StepTimeout",
    "ObservationFormat",
    "RewardShaping",
    "MAX_TOOL_USES_MESSAGE",
]

MAX_TOOL_USES_MESSAGE = "Reached the maximum number of tool uses. Please output your final answer directly."
"""GEM's wording, so prompts tuned on GEM read the same."""


@runtime_checkable
class Tool(Protocol):
    """What `ToolUse` needs from a tool (envs/tools/ implements Python, search and MCP).

    `parse` finds the first call in an action and returns `(call, parsed_action)`, where
    `parsed_action` is the action cut just after the call (what follows the call is not part of the
    turn, as in GEM), or None when the action calls no tool. `run(call)` returns the observation;
    errors come back as text, never as exceptions. A tool that may block sets `blocking = True`
    and is then run on the offload pool; a tool with `async arun(call)` is awaited instead.
    """

    name: str
    blocking: bool

    def instruction(self) -> str:
        """How to call the tool: shown to the agent after the env's first observation."""
        ...

    def parse(self, action: str) -> tuple[Any, str] | None: ...

    def run(self, call: Any) -> str: ...


class TurnLimit(Wrapper):
    """Truncates the episode after `max_turns` steps (tool turns count), Gymnasium's TimeLimit."""

    def __init__(self, env: Env, max_turns: int):
        if max_turns < 1:
            raise ValueError(f"TurnLimit max_turns: expected >= 1, got {max_turns}")
        super().__init__(env)
        self.max_turns = max_turns
        self.turns = 0

    async def areset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        self.turns = 0
        return await self.env.areset(seed)

    async def astep(self, action: str) -> StepResult:
        obs, reward, terminated, truncated, info = await self.env.astep(action)
        self.turns += 1
        if self.turns >= self.max_turns and not (terminated or truncated):
            truncated = True
            info = {**info, "truncated_reason": "max_turns"}
        return obs, reward, terminated, truncated, info


class StepTimeout(Wrapper):
    """Bounds every `areset`/`astep` by `timeout_s`; an expired step ends the episode as truncated.

    What happens to the work in flight depends on where it runs (`Env.abandon`): a thread cannot be
    killed, so a blocking env is marked broken and never reused while its thread runs on; an env in
    its own process has the process killed; a natively async env's call is simply cancelled. An
    inline (non-blocking, sync) env cannot be interrupted at all, which is why `check_env` flags
    inline steps that take long.
    """

    def __init__(self, env: Env, timeout_s: float):
        if timeout_s <= 0:
            raise ValueError(f"StepTimeout timeout_s: expected > 0, got {timeout_s}")
        super().__init__(env)
        self.timeout_s = timeout_s

    async def areset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self.env.areset(seed)
        except TimeoutError:
            reason = f"reset did not return within {self.timeout_s:g}s"
            self.env.abandon(reason)
            raise TimeoutError(f"env {self.id}: {reason}") from None

    async def astep(self, action: str) -> StepResult:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self.env.astep(action)
        except TimeoutError:
            reason = f"step did not return within {self.timeout_s:g}s"
            self.env.abandon(reason)
            obs = f"The environment did not respond within {self.timeout_s:g} seconds; the episode ends here."
            return obs, 0.0, False, True, {"truncated_reason": "step_timeout", "error": reason}


class ObservationFormat(Wrapper):
    """What the agent sees each turn: the last observation, or the history as one prompt string.

    Modes (GEM's ObservationWrapper): "last" (the engine's default: it keeps the token history
    itself), "concat" (every observation so far), "concat_with_action" (o0 a0 o1 a1 ... ot).
    `max_history` keeps only the last N observations. `info["suffix"]` (GEM games' per-turn
    "Enter your next guess.") is appended when `include_suffix`.
    """

    MODES = ("last", "concat", "concat_with_action")

    def __init__(self, env: Env, mode: str = "last", max_history: int | None = None, include_suffix: bool = True):
        if mode not in self.MODES:
            raise ValueError(f"ObservationFormat mode: expected one of {self.MODES}, got {mode!r}")
        super().__init__(env)
        self.mode, self.max_history, self.include_suffix = mode, max_history, include_suffix
        self.observations: list[str] = []
        self.actions: list[str] = []

    def _render(self, info: dict[str, Any]) -> str:
        n = len(self.observations) if self.max_history is None else self.max_history
        if self.mode == "last":
            text = self.observations[-1]
        elif self.mode == "concat":
            text = "\n".join(self.observations[-n:])
        else:
            parts = []
            first = max(0, len(self.observations) - n)
            for i in range(first, len(self.observations)):
                if i > first:
                    parts.append(self.actions[i - 1])
                parts.append(self.observations[i])
            text = "\n".join(parts)
        suffix = info.get("suffix") if self.include_suffix else None
        return f"{text}\n{suffix}" if suffix else text

    async def areset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        obs, info = await self.env.areset(seed)
        self.observations, self.actions = [obs], []
        return self._render(info), info

    async def astep(self, action: str) -> StepResult:
        obs, reward, terminated, truncated, info = await self.env.astep(action)
        self.actions.append(info.get("parsed_action", action))
        self.observations.append(obs)
        return self._render(info), reward, terminated, truncated, info


class ToolUse(Wrapper):
    """Lets the agent call tools: a turn that calls one runs it and does not step the env (GEM).

    Reset appends each tool's instruction to the first observation. A step tries the tools in
    order; the first that parses the action runs, and its output is the next observation with
    reward `tool_reward` (+ `tool_success_reward` if it did not raise). After `max_tool_uses` calls,
    actions go to the env. `info`: `use_tool`, `tool`, `parsed_action`, `tool_uses`, `tool_error`.
    """

    def __init__(
        self,
        env: Env,
        tools: Sequence[Tool],
        tool_reward: float = 0.0,
        tool_success_reward: float = 0.0,
        max_tool_uses: int = 10,
    ):
        super().__init__(env)
        self.tools = list(tools)
        self.tool_reward, self.tool_success_reward = tool_reward, tool_success_reward
        self.max_tool_uses = max_tool_uses
        self.tool_uses = 0

    @property
    def blocking(self) -> bool:  # type: ignore[override]
        return self.env.blocking or any(getattr(t, "blocking", False) for t in self.tools)

    @property
    def tool_instructions(self) -> str:
        lines = "\n".join(t.instruction() for t in self.tools)
        return f"Available tools:\n{lines}" if len(self.tools) > 1 else lines

    @property
    def instructions(self) -> str:  # type: ignore[override]
        return f"{self.env.instructions}\n{self.tool_instructions}".strip()

    async def areset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        self.tool_uses = 0
        obs, info = await self.env.areset(seed)
        return f"{obs}\n{self.tool_instructions}", {**info, "use_tool": False, "tool_uses": 0}

    async def _run(self, tool: Tool, call: Any) -> str:
        arun = getattr(tool, "arun", None)
        if arun is not None and inspect.iscoroutinefunction(arun):
            return await arun(call)
        if getattr(tool, "blocking", False):
            return await offload(tool.run, call)
        return tool.run(call)

    async def astep(self, action: str) -> StepResult:
        if self.tool_uses < self.max_tool_uses:
            for tool in self.tools:
                parsed = tool.parse(action)
                if parsed is None:
                    continue
                call, parsed_action = parsed
                self.tool_uses += 1
                reward, error = self.tool_reward, None
                try:
                    obs = await self._run(tool, call)
                    reward += self.tool_success_reward
                except Exception as exc:  # a tool bug is this turn's observation, not the episode's end
                    error = f"{type(exc).__name__}: {exc}"
                    obs = f"Tool {tool.name} failed: {error}"
                if self.tool_uses == self.max_tool_uses:
                    obs = f"{obs}\n\n{MAX_TOOL_USES_MESSAGE}"
                info = {
                    "use_tool": True,
                    "tool": tool.name,
                    "parsed_action": parsed_action,
                    "tool_uses": self.tool_uses,
                    "tool_error": error,
                }
                return obs, reward, False, False, info
        obs, reward, terminated, truncated, info = await self.env.astep(action)
        return obs, reward, terminated, truncated, {**info, "use_tool": False, "tool_uses": self.tool_uses}

    def close(self) -> None:
        for tool in self.tools:
            close = getattr(tool, "close", None)
            if close is not None:
                close()
        self.env.close()


class RewardShaping(Wrapper):
    """Rewrites each step's reward with `shape(reward, action, obs, info)`; the env's own is kept.

    `info["env_reward"]` keeps the unshaped reward so metrics can report both.

    >>> import envs
    >>> env = RewardShaping(envs.make("games:GuessTheNumber-v0"), lambda r, a, o, i: r - 0.01)
    """

    def __init__(self, env: Env, shape: Callable[[float, str, str, dict[str, Any]], float]):
        super().__init__(env)
        self.shape = shape

    async def astep(self, action: str) -> StepResult:
        obs, reward, terminated, truncated, info = await self.env.astep(action)
        shaped = float(self.shape(reward, action, obs, info))
        return obs, shaped, terminated, truncated, {**info, "env_reward": reward}
