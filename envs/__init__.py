"""tidal environments: an async text Env API (GEM/Gymnasium shapes), a registry, wrappers, suites.

    import envs
    env = envs.make("games:GuessTheNumber-v0", difficulty="easy")
    obs, info = await env.areset(seed=0)
    obs, reward, terminated, truncated, info = await env.astep(r"\\boxed{5}")

This package stands alone: it never imports engine/ or trainer/.
"""

from envs.answers import extract_boxed, final_answer
from envs.core import (
    Env,
    EnvBroken,
    EnvError,
    EnvNotFound,
    Solver,
    StepResult,
    Wrapper,
    configure_offload,
    offload,
)
from envs.episode import ERRORS, Episode, EpisodeError, run_episode
from envs.registry import EnvSpec, list, make, register, register_prefix, spec

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
    "EnvSpec",
    "make",
    "list",
    "register",
    "register_prefix",
    "spec",
    "Episode",
    "EpisodeError",
    "ERRORS",
    "run_episode",
    "extract_boxed",
    "final_answer",
]
