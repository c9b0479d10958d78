"""`check_env(env)`: does an env keep the API's promises? (Gymnasium's env_checker, for text envs.)

Checked, in order, each failure named in the error:
1. `instructions` is a string; `reset(seed)` returns (str, dict) and the observation is not empty;
2. the same seed and the same actions give the same episode (and a different seed, where the env
   has randomness, may differ: not required);
3. `step` returns (str, float, bool, bool, dict) with a finite reward;
4. bad actions (empty, prose, an empty `\\boxed{}`, 1 MB of text, control characters) come back as
   observations, never exceptions;
5. the scripted solver, if there is one, plays an episode without error;
6. an env that does not declare `blocking` steps fast enough to be called inline (warned, with the
   measured time), because an inline step holds up every other episode on the loop.
Users run it on their own envs: `tidal envs check my_suite:MyEnv-v0`.
"""

import asyncio
import math
import random
import time
from collections.abc import Callable
from typing import Any

from tidal.envs.core import Env
from tidal.protocol.errors import TidalError

__all__ = ["check_env", "acheck_env", "EnvCheckError", "BAD_ACTIONS", "INLINE_STEP_BUDGET_S"]

BAD_ACTIONS = ("", "I am not sure what to do here.", "\\boxed{}", "x" * 1_000_000, "\\boxed{\x00\x1b[2J\ufffd}")

INLINE_STEP_BUDGET_S = 0.002
"""A step an env runs inline should take well under this; above it, declare `blocking = True`."""


class EnvCheckError(TidalError, AssertionError):
    """An env broke the API contract; the message lists every failed check."""


def _check_step(result: Any, where: str, problems: list[str]) -> bool:
    if not (isinstance(result, tuple) and len(result) == 5):
        problems.append(f"{where}: step must return a 5-tuple, got {type(result).__name__} {result!r:.80}")
        return True
    obs, reward, terminated, truncated, info = result
    if not isinstance(obs, str):
        problems.append(f"{where}: observation must be str, got {type(obs).__name__}")
    if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
        problems.append(f"{where}: reward must be a finite float, got {reward!r}")
    if not isinstance(terminated, bool) or not isinstance(truncated, bool):
        problems.append(f"{where}: terminated/truncated must be bool, got {terminated!r}, {truncated!r}")
    if not isinstance(info, dict):
        problems.append(f"{where}: info must be a dict, got {type(info).__name__}")
    return bool(terminated) or bool(truncated)


async def _episode(env: Env, seed: int, actions: list[str], problems: list[str], where: str) -> list[Any]:
    out: list[Any] = []
    first = await env.areset(seed)
    if not (isinstance(first, tuple) and len(first) == 2 and isinstance(first[0], str) and isinstance(first[1], dict)):
        problems.append(f"{where}: reset must return (str, dict), got {first!r:.80}")
        return out
    out.append(first[0])
    for action in actions:
        result = await env.astep(action)
        done = _check_step(result, where, problems)
        out.append(result[:4] if isinstance(result, tuple) else result)
        if done:
            break
    return out


def _policy(env: Env, rng: random.Random) -> Callable[[], str]:
    try:
        env.sample_action(rng)
    except NotImplementedError:
        return lambda: rng.choice(["\\boxed{1}", "\\boxed{a}", "1", "yes"])
    return lambda: env.sample_action(rng)


async def acheck_env(env: Env, seed: int = 0, steps: int = 8) -> list[str]:
    """Run the checks on `env` (it is reset and stepped); return warnings, raise `EnvCheckError`."""
    problems: list[str] = []
    warnings: list[str] = []
    if not isinstance(env, Env):
        raise EnvCheckError(f"{env!r} is not an envs.Env")
    if not isinstance(env.instructions, str):
        problems.append(f"instructions must be str, got {type(env.instructions).__name__}")

    await env.areset(seed)  # some envs sample actions from the current task
    draw = _policy(env, random.Random(seed))
    actions = [draw() for _ in range(steps)]
    first = await _episode(env, seed, actions, problems, "episode")
    if first and not first[0].strip():
        problems.append("reset returned an empty observation: the agent would see nothing")
    again = await _episode(env, seed, actions, problems, "replay")
    if first != again:
        diff = next((i for i, (a, b) in enumerate(zip(first, again, strict=False)) if a != b), min(len(first), len(again)))
        problems.append(f"not deterministic: seed {seed} with the same actions differs at step {diff}")

    for action in BAD_ACTIONS:
        label = f"bad action {action[:20]!r}{'...' if len(action) > 20 else ''}"
        try:
            await env.areset(seed)
            _check_step(await env.astep(action), label, problems)
        except Exception as exc:  # the contract: a bad action is an observation, not an exception
            problems.append(f"{label} raised {type(exc).__name__}: {exc}")

    solver_setup = await env.areset(seed + 1)
    solver = env.solver()
    if solver is not None:
        obs = solver_setup[0]
        for _ in range(1000):
            obs, *_, terminated, truncated, _info = await env.astep(solver(obs))
            if terminated or truncated:
                break

    if not env.blocking:
        await env.areset(seed)
        times = []
        for action in actions[:5]:
            start = time.perf_counter()
            result = await env.astep(action)
            times.append(time.perf_counter() - start)
            if result[2] or result[3]:
                break
        slowest = max(times, default=0.0)
        if slowest > INLINE_STEP_BUDGET_S:
            warnings.append(
                f"step took {slowest * 1e3:.1f} ms inline; declare `blocking = True` so it runs off the event loop"
            )
    await env.aclose()
    env.close()  # a second close must be harmless
    if problems:
        raise EnvCheckError(f"env {env.id} fails {len(problems)} check(s):\n- " + "\n- ".join(problems))
    return warnings


def check_env(env: Env, seed: int = 0, steps: int = 8) -> list[str]:
    """`acheck_env` for code that is not on an event loop (scripts, the CLI)."""
    return asyncio.run(acheck_env(env, seed, steps))
