"""The environment API: text in, text out, the shapes of GEM and Gymnasium, awaited by the engine.

`reset(seed) -> (observation, info)` and `step(action) -> (observation, reward, terminated,
truncated, info)`. `terminated` means the task ended (solved, failed, invalid in a way that ends it);
`truncated` means it was cut short (turn limit, timeout), so a learner may bootstrap.

The engine awaits `areset`/`astep`. A cheap env is called inline: no thread hop, no copy, so 1024
episodes on one event loop cost little more than a plain loop. An env whose step blocks (a
subprocess, an HTTP call, a solver) says so with `blocking = True`, and only then do `areset`/`astep`
run it on the offload thread pool, so a slow step never stalls the loop. Envs that are natively async
(HTTP clients) override `areset`/`astep` instead.

Invariant: an env never lets a bad action escape as an exception. Unparseable, empty, wrong-format or
huge actions get an observation saying what was wrong and the env's defined penalty. An exception out
of `step` is a bug in the env; the caller turns it into an `tidal.envs.episode.EpisodeError` record.
"""

import asyncio
import os
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tidal.protocol.errors import TidalError

__all__ = [
    "Env",
    "Wrapper",
    "Solver",
    "StepResult",
    "EnvError",
    "EnvBroken",
    "EnvNotFound",
    "configure_offload",
    "offload",
]

Solver = Callable[[str], str]
"""A policy: the latest observation in, the next action out. Scripted solvers are these."""

StepResult = tuple[str, float, bool, bool, dict[str, Any]]
"""(observation, reward, terminated, truncated, info)."""

DEFAULT_OFFLOAD_WORKERS = min(64, 4 * (os.cpu_count() or 1))
"""Threads for blocking envs: enough to overlap subprocess and HTTP waits, few enough to stay light."""


class EnvError(TidalError, RuntimeError):
    """An environment that cannot go on: broken state, an unusable configuration, a lost worker."""


class EnvBroken(EnvError):
    """The env was abandoned mid-step (a timed-out thread still runs it) and must not be used again."""


class EnvNotFound(TidalError, LookupError):
    """`make` was given an id that no suite, adapter or plugin registers."""


_executor: ThreadPoolExecutor | None = None
_executor_workers = DEFAULT_OFFLOAD_WORKERS


def configure_offload(max_workers: int = DEFAULT_OFFLOAD_WORKERS) -> None:
    """Size the thread pool that runs blocking envs; takes effect for the next offloaded call.

    A full pool is the back-pressure: a blocking step waits for a free thread.
    """
    global _executor, _executor_workers
    if max_workers < 1:
        raise ValueError(f"offload max_workers: expected >= 1, got {max_workers}")
    old, _executor, _executor_workers = _executor, None, max_workers
    if old is not None:
        old.shutdown(wait=False)


async def offload(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` on the offload pool and await it. Cancelling the await does not stop the thread."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(_executor_workers, thread_name_prefix="tidal-env")
    return await asyncio.get_running_loop().run_in_executor(_executor, fn, *args)


class Env:
    """Base of every environment. Subclass and override `reset`, `step`, `instructions`.

    >>> class Echo(Env):
    ...     instructions = "Repeat \\\\boxed{hi}."
    ...     def reset(self, seed=None):
    ...         super().reset(seed)
    ...         return self.instructions, {}
    ...     def step(self, action):
    ...         return "done", float(action == "\\\\boxed{hi}"), True, False, {}
    >>> env = Echo()
    >>> env.reset(seed=0)[0]
    'Repeat \\\\boxed{hi}.'
    >>> env.step("\\\\boxed{hi}")[1]
    1.0
    """

    blocking: bool = False
    """True when `step`/`reset` may block (subprocess, network, heavy compute): run them off the loop.
    A class attribute as a rule; an instance may set its own (an adapter decides per wrapped env)."""

    instructions: str = ""
    """The system prompt / task instruction text an agent gets before the first observation."""

    spec: Any = None
    """The registry's `EnvSpec` when built by `envs.make`; None for an env built by hand."""

    broken: str | None = None
    """Why the env may not be used again (set after an abandoned step), or None."""

    rng: random.Random

    @property
    def id(self) -> str:
        return self.spec.id if self.spec is not None else type(self).__name__

    @property
    def unwrapped(self) -> "Env":
        return self

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        """Start an episode. The base reseeds `self.rng` (this env's own RNG, never the global one)."""
        if seed is not None or not hasattr(self, "rng"):
            self.rng = random.Random(seed)
        return "", {}

    def step(self, action: str) -> StepResult:
        raise NotImplementedError(f"{type(self).__name__}.step")

    async def areset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        if self.broken is not None:
            self._check_usable()
        if self.blocking:
            return await offload(self.reset, seed)
        return self.reset(seed)

    async def astep(self, action: str) -> StepResult:
        if self.broken is not None:
            self._check_usable()
        if self.blocking:
            return await offload(self.step, action)
        return self.step(action)

    def inline_calls(self) -> "tuple[Callable[..., tuple[str, dict[str, Any]]], Callable[[str], StepResult]] | None":
        """`(reset, step)` of this env when a caller on the event loop may call them directly instead
        of awaiting `areset`/`astep`, else None. They may when the env is cheap (not `blocking`),
        usable (not `broken`), and its async methods are the base's, which only call them; a wrapper
        or a natively async env (an HTTP client) gives None and is awaited. The engine asks once per
        episode: a direct call saves the coroutine each `astep` costs, a fifth of the layer's price
        on a GEM game step at 1024 episodes (bench/envs.py)."""
        cls = type(self)
        if self.blocking or self.broken is not None or cls.astep is not Env.astep or cls.areset is not Env.areset:
            return None
        return self.reset, self.step

    def solver(self) -> Solver | None:
        """A scripted policy that solves the current episode (call after `reset`), or None."""
        return None

    def sample_action(self, rng: random.Random) -> str:
        """A random well-formed action, for random-policy benchmarks and checks."""
        raise NotImplementedError(f"{type(self).__name__}.sample_action")

    def abandon(self, reason: str) -> None:
        """Give up on a call still in flight (a timeout). A blocking env's call runs on in its thread,
        which cannot be killed, so the env is marked broken. A natively async env's call was just
        cancelled, so it stays usable from the next reset. Envs that own a process kill it."""
        if self.blocking:
            self.broken = reason

    def close(self) -> None:
        """Release what the env holds (processes, connections). Safe to call twice."""

    async def aclose(self) -> None:
        if self.blocking and self.broken is None:
            await offload(self.close)
        else:
            self.close()

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise EnvBroken(f"env {self.id} is broken and cannot be reused: {self.broken}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}>"


class Wrapper(Env):
    """Forwards everything to `env`; subclasses override one hook (Gymnasium's one-hook wrappers).

    Wrappers are async-first: they override `areset`/`astep` and await the inner env, so a wrapper
    never adds a thread hop; the sync `reset`/`step` drive the same code with `asyncio.run` only
    where no loop runs (scripts, `tidal envs play`).
    """

    def __init__(self, env: Env):
        self.env = env

    @property
    def blocking(self) -> bool:  # type: ignore[override]
        return self.env.blocking

    @property
    def instructions(self) -> str:  # type: ignore[override]
        return self.env.instructions

    _own_spec: Any = None

    @property
    def spec(self) -> Any:  # type: ignore[override]
        """The spec `envs.make` gave this wrapper (an entry point that returns its env wrapped), or
        else the inner env's: the id of a wrapped env is that of the outermost registered object."""
        return self._own_spec if self._own_spec is not None else self.env.spec

    @spec.setter
    def spec(self, value: Any) -> None:
        self._own_spec = value

    @property
    def broken(self) -> str | None:  # type: ignore[override]
        return self.env.broken

    @broken.setter
    def broken(self, reason: str | None) -> None:
        self.env.broken = reason

    @property
    def unwrapped(self) -> Env:
        return self.env.unwrapped

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        return asyncio.run(self.areset(seed))

    def step(self, action: str) -> StepResult:
        return asyncio.run(self.astep(action))

    async def areset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        return await self.env.areset(seed)

    async def astep(self, action: str) -> StepResult:
        return await self.env.astep(action)

    def solver(self) -> Solver | None:
        return self.env.solver()

    def sample_action(self, rng: random.Random) -> str:
        return self.env.sample_action(rng)

    def abandon(self, reason: str) -> None:
        self.env.abandon(reason)

    def close(self) -> None:
        self.env.close()

    async def aclose(self) -> None:
        await self.env.aclose()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "env":
            raise AttributeError(name)
        return getattr(self.env, name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}{self.env!r}>"
