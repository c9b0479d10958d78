r"""The `synthetic` suite: a natively async env with a fixed number of turns, for engine benchmarks.

`synthetic:Turns-v0` stands in for an agentic env whose steps wait on something outside the process
(a sandbox, a tool server, a simulator): each `areset`/`astep` awaits a latency drawn from a lognormal
around `latency_s` (0: none) without holding up the event loop, exactly as an HTTP-backed env would.
Every episode lasts `turns` steps whatever the actions say, so a benchmark fixes the number of turns
per episode. The observation is a fixed text of about `obs_chars` characters. The reward, paid on the
last step, is a hash of the seed and the actions, in [0, 1): reproducible for a seed and a list of
actions, and different across the members of a group (their actions differ), so group-relative
advantages are not all zero.

Invariant (the env API's): no action raises; the same seed and actions give the same episode (the
latency draws come from their own RNG, so they never change what the agent sees).

>>> env = Turns(turns=2)
>>> obs, _ = env.reset(seed=3)
>>> env.step("a")[2:4], env.step("b")[2:4]
((False, False), (True, False))
"""

import asyncio
import math
import random
import zlib
from typing import Any

from tidal.envs.core import Env, StepResult
from tidal.envs.registry import register

__all__ = ["Turns"]

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")
_TEXT = " ".join(_WORDS[(i * 7 + i // 10) % len(_WORDS)] for i in range(4096))
"""Observations are windows of this text: cheap to cut, so the env costs the engine next to nothing."""


class Turns(Env):
    """`turns` steps of awaited latency; the reward (last step only) hashes the seed and the actions.

    Args:
        turns: steps per episode; the last one terminates it.
        latency_s: median of each reset's and step's latency, seconds (0: none).
        latency_sigma: sigma of log(latency): the tail of slow steps.
        obs_chars: length of each observation, characters (about that many tokens for a byte tokenizer).
    """

    instructions = "Answer anything; the episode lasts a fixed number of turns."

    def __init__(self, turns: int = 3, latency_s: float = 0.0, latency_sigma: float = 0.5, obs_chars: int = 64):
        if turns < 1:
            raise ValueError(f"Turns: turns must be >= 1, got {turns}")
        if latency_s < 0 or latency_sigma < 0:
            raise ValueError(f"Turns: latency_s and latency_sigma must be >= 0, got {latency_s}, {latency_sigma}")
        if obs_chars < 1:
            raise ValueError(f"Turns: obs_chars must be >= 1, got {obs_chars}")
        self.turns, self.latency_s, self.latency_sigma, self.obs_chars = turns, latency_s, latency_sigma, obs_chars
        self._latency_rng: random.Random | None = None
        self._seed = 0
        self._turn = 0
        self._digest = 0

    # --- the episode (pure, no waiting)

    def _observation(self) -> str:
        head = f"Turn {self._turn + 1} of {self.turns}. "
        start = (self._seed * 31 + self._turn * 17) % (len(_TEXT) // 2)
        return head + _TEXT[start:start + max(0, self.obs_chars - len(head))]

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        self._seed = 0 if seed is None else seed
        if self.latency_s > 0:  # its own RNG: the draws never change what the agent sees
            self._latency_rng = random.Random(self._seed ^ 0x5EED)
        self._turn = 0
        self._digest = zlib.crc32(str(self._seed).encode())
        return self._observation(), {"turns": self.turns}

    def step(self, action: str) -> StepResult:
        if not isinstance(action, str):
            action = str(action)
        self._digest = zlib.crc32(action.encode("utf-8", "replace"), self._digest)
        self._turn += 1
        if self._turn >= self.turns:
            return "Done.", (self._digest % 1000) / 1000.0, True, False, {"turns": self._turn}
        return self._observation(), 0.0, False, False, {"turns": self._turn}

    # --- natively async: the latency is awaited, never slept on the loop

    def _latency(self) -> float:
        if self._latency_rng is None:
            return 0.0
        return self._latency_rng.lognormvariate(math.log(self.latency_s), self.latency_sigma)

    async def areset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        result = self.reset(seed)
        await self._wait()
        return result

    async def astep(self, action: str) -> StepResult:
        result = self.step(action)
        await self._wait()
        return result

    async def _wait(self) -> None:
        delay = self._latency()
        if delay > 0:
            await asyncio.sleep(delay)

    def sample_action(self, rng: random.Random) -> str:
        return rng.choice(_WORDS)


register("synthetic:Turns-v0", "tidal.envs.synthetic:Turns")
