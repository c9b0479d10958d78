"""tidal environments: an async text Env API (GEM/Gymnasium shapes), a registry, wrappers, suites.

    from tidal import envs
    env = envs.make("games:GuessTheNumber-v0", difficulty="easy")
    obs, info = await env.areset(seed=0)
    obs, reward, terminated, truncated, info = await env.astep(r"\\boxed{5}")
    envs.check_env(envs.make("my_suite:MyEnv-v0"))   # the API's promises, checked

Modules: core (Env, Wrapper, offload pool), registry (ids, make, plugins), episode (run_episode,
error records), wrappers (turn limit, timeout, formats, tools, shaping), process (env in a worker
process), check (check_env), answers (lenient \\boxed{} parsing), games/, math/, code/, qa/,
tools/, adapters/ (gem:, agentgym:).

This package stands alone: it never imports engine/ or trainer/.
"""

from tidal.envs.answers import extract_boxed, final_answer
from tidal.envs.check import EnvCheckError, acheck_env, check_env
from tidal.envs.core import (
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
from tidal.envs.episode import ERRORS, Episode, EpisodeError, run_episode
from tidal.envs.process import ProcessEnv, RemoteEnvError
from tidal.envs.registry import EnvSpec, list, make, register, register_prefix, spec

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
    "check_env",
    "acheck_env",
    "EnvCheckError",
    "ProcessEnv",
    "RemoteEnvError",
]
