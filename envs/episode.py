"""Running one episode to its end, and turning an env that raises into a counted error record.

`run_episode` is the reference turn loop (tests, `check_env`, `tidal envs play`, the benchmark);
the engine has its own loop with the model in it but uses `EpisodeError.from_exception` and
`ERRORS` the same way. Invariant: an exception from an env never escapes `run_episode`; it ends the
episode with `finish_reason = "env_error"` and a record holding type, message and traceback.
Finish reasons are the project's one vocabulary, `tidal.protocol.messages.FinishReason`.
"""

import inspect
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable

import msgspec
from tidal.envs.core import Env
from tidal.protocol.messages import FinishReason

__all__ = ["EpisodeError", "Episode", "ERRORS", "run_episode"]

ERRORS: Counter[str] = Counter()
"""Env errors per env id since start (metric `envs/errors`); the engine exports it."""


class EpisodeError(msgspec.Struct, frozen=True):
    """What an env raised: enough to debug it from a log line or a trajectory record."""

    type: str
    message: str
    traceback: str
    phase: str
    """Which call raised: "reset" or "step"."""

    @classmethod
    def from_exception(cls, exc: BaseException, phase: str) -> "EpisodeError":
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type(exc).__qualname__, str(exc), tb, phase)


class Episode(msgspec.Struct):
    """One finished episode: observations[0] is the reset observation, then one per step."""

    env_id: str
    seed: int | None
    observations: list[str] = msgspec.field(default_factory=list)
    actions: list[str] = msgspec.field(default_factory=list)
    rewards: list[float] = msgspec.field(default_factory=list)
    infos: list[dict] = msgspec.field(default_factory=list)
    terminated: bool = False
    truncated: bool = False
    finish_reason: FinishReason | None = None
    """None until it ends; `run_episode` ends one "terminated", "truncated", "max_turns" (its cap) or
    "env_error"; the engine's loop may end one with any other `FinishReason` (max_tokens, step_timeout...)."""
    error: EpisodeError | None = None

    @property
    def total_reward(self) -> float:
        return sum(self.rewards)


Policy = Callable[[str], str] | Callable[[str], Awaitable[str]]


async def run_episode(env: Env, policy: Policy, seed: int | None = None, max_turns: int = 1000) -> Episode:
    """Reset `env` with `seed` and step it with `policy` until it ends or `max_turns` steps pass.

    `policy` is `obs -> action`, sync or async; a solver from `env.solver()` works as one. An
    exception from the policy propagates: it is the caller's bug, not the env's.
    """
    ep = Episode(env.id, seed)
    calls = env.inline_calls()  # a cheap env is called directly, others are awaited
    try:
        obs, info = calls[0](seed) if calls else await env.areset(seed)
    except Exception as exc:  # an env bug ends this episode only; it is recorded and counted
        return _failed(ep, exc, "reset")
    ep.observations.append(obs)
    ep.infos.append(info)
    for _ in range(max_turns):
        action = policy(obs)
        if inspect.isawaitable(action):
            action = await action
        try:
            obs, reward, ep.terminated, ep.truncated, info = calls[1](action) if calls else await env.astep(action)
        except Exception as exc:
            return _failed(ep, exc, "step")
        ep.actions.append(action)
        ep.observations.append(obs)
        ep.rewards.append(float(reward))
        ep.infos.append(info)
        if ep.terminated or ep.truncated:
            ep.finish_reason = "terminated" if ep.terminated else "truncated"
            return ep
    ep.finish_reason = "max_turns"
    return ep


def _failed(ep: Episode, exc: Exception, phase: str) -> Episode:
    ep.error = EpisodeError.from_exception(exc, phase)
    ep.finish_reason = "env_error"
    ERRORS[ep.env_id] += 1
    return ep
