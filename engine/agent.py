"""Agents: how one episode turns an env and a model into a trajectory; the default multi-turn chat agent.

An `Agent` is an async function of a task, a generation client and an env that returns the episode's
trajectory; everything else (admission, grouping, weights, delivery) is the engine's. The default
`ChatAgent` renders the conversation with the model's own chat template, streams a generation, decodes
the action, steps the env, appends the observation as the template's delta, and repeats until the env
ends the episode or a limit does; each ending is the trajectory's finish reason. Other agents (tool
calling, planning, several generations per step, multi-agent) register under the entry-point group
`tidal.agents` and are chosen with `agent = {type = "plugin", name = "...", options = {...}}`.

Invariant 1 (docs/architecture.md): the trajectory is the transcript's one token sequence, the model's tokens
exactly as the server returned them (loss mask 1), everything else mask 0.
"""

from __future__ import annotations

import abc
import time
from typing import ClassVar

import msgspec
from tidal.engine import plugins
from tidal.engine.chat import Transcript
from tidal.engine.config import AgentConfig, ChatAgentConfig, PluginAgentConfig
from tidal.engine.generation import Generator
from tidal.engine.render_pool import RenderWorkerError
from tidal.engine.tasks import Task
from tidal.envs.core import Env
from tidal.protocol.errors import TidalError
from tidal.protocol.messages import Trajectory, Turn

__all__ = ["Agent", "ChatAgent", "EpisodeFailed", "trajectory_of", "create_agent", "GROUP"]

GROUP = "tidal.agents"
BUILTIN = {"chat": "tidal.engine.agent:ChatAgent"}


class EpisodeFailed(TidalError, RuntimeError):
    """An episode that produced no data: the env raised, or generation failed after its retries.

    `reason` is its finish reason ("env_error", "backend_error"); the engine counts it and gives its
    admission back."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Agent(abc.ABC):
    """One instance per engine; `run` is called concurrently for many episodes."""

    config_type: ClassVar[type[msgspec.Struct]]

    @abc.abstractmethod
    async def run(self, task: Task, gen: Generator, env: Env) -> Trajectory:
        """Play one episode of `env` (not yet reset) and return its trajectory.

        Raise `EpisodeFailed` for an episode that yields no data (its env raised, generation failed);
        the engine closes `env` afterwards either way.
        """


def trajectory_of(task: Task, transcript: Transcript, turns: list[Turn], *, finish_reason: str,
                  terminated: bool = False, truncated: bool = False, timing: dict | None = None,
                  counters: dict | None = None, info: dict | None = None, sampling: dict | None = None) -> Trajectory:
    """The wire trajectory of a finished transcript; its reward is the sum of the turn rewards."""
    extra = {"sampling": sampling} if sampling else {}
    return Trajectory.build(
        id=task.episode_id, group_id=task.group_id, env_id=task.env_id, task_seed=task.seed,
        tokens=transcript.tokens, loss_mask=transcript.loss_mask, behav_logp=transcript.behav_logp,
        versions=transcript.versions, turns=turns, reward=float(sum(t.reward for t in turns)),
        terminated=terminated, truncated=truncated, finish_reason=finish_reason,
        timing=timing or {}, counters={"divergences": transcript.divergences, **(counters or {})},
        info=info or {}, **extra,
    )


class ChatAgent(Agent):
    """Multi-turn chat: one generation per env step."""

    config_type = ChatAgentConfig

    def __init__(self, cfg: ChatAgentConfig):
        self.cfg = cfg

    async def run(self, task: Task, gen: Generator, env: Env) -> Trajectory:
        cfg, t0 = self.cfg, time.monotonic()
        calls = env.inline_calls()
        try:
            obs, info = calls[0](task.seed) if calls else await env.areset(task.seed)
        except Exception as exc:  # an env bug ends this episode only, as a counted error
            raise EpisodeFailed("env_error", f"{task.env_id} reset(seed={task.seed}): {type(exc).__name__}: {exc}") from exc
        messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        messages.append({"role": "user", "content": self._observation(obs, info)})
        pool = gen.render_pool
        try:
            transcript = await Transcript.create(gen.tokenizer, messages, pool=pool)
        except RenderWorkerError as exc:
            raise EpisodeFailed("render_error", f"{task.episode_id} prompt: {exc}") from exc
        turns: list[Turn] = []
        terminated = truncated = False
        finish_reason, generated, gen_s, env_s = "max_turns", 0, 0.0, 0.0
        for turn in range(task.max_turns):
            new_tokens = min(cfg.max_new_tokens, gen.room(transcript), cfg.max_episode_tokens - generated)
            if new_tokens <= 0:
                finish_reason = "context_length" if gen.room(transcript) <= 0 else "max_tokens"
                break
            start, t1 = len(transcript), time.monotonic()
            try:
                await gen.generate(transcript, request_id=f"{task.episode_id}/{turn}/", max_new_tokens=new_tokens,
                                   session_key=task.episode_id, seed_key=f"{task.sample_key}/{turn}")
            except TidalError as exc:  # BackendError after its retries: no trustworthy data
                raise EpisodeFailed("backend_error", f"{task.episode_id} turn {turn}: {exc}") from exc
            action = transcript.end_turn()
            end, t2 = len(transcript), time.monotonic()
            generated += end - start
            try:
                obs, reward, terminated, truncated, info = calls[1](action) if calls else await env.astep(action)
            except Exception as exc:
                raise EpisodeFailed("env_error", f"{task.env_id} step {turn}: {type(exc).__name__}: {exc}") from exc
            gen_s, env_s = gen_s + t2 - t1, env_s + time.monotonic() - t2
            turns.append(Turn(start, end, float(reward)))
            if terminated or truncated:
                finish_reason = "terminated" if terminated else "truncated"
                if truncated and info.get("truncated_reason") == "step_timeout":
                    finish_reason = "step_timeout"
                break
            if turn + 1 < task.max_turns:
                try:
                    await transcript.add_messages_async([{"role": "user", "content": self._observation(obs, info)}],
                                                        pool)
                except RenderWorkerError as exc:
                    raise EpisodeFailed("render_error", f"{task.episode_id} turn {turn}: {exc}") from exc
        timing = {"episode_s": time.monotonic() - t0, "generate_s": gen_s, "env_s": env_s}
        return trajectory_of(task, transcript, turns, finish_reason=finish_reason, terminated=terminated,
                             truncated=truncated, timing=timing, counters={"turns": len(turns)},
                             sampling=gen.sampling_info)

    def _observation(self, obs: str, info: dict) -> str:
        suffix = info.get("suffix") if self.cfg.use_info_suffix else None
        return f"{obs}\n{suffix}" if isinstance(suffix, str) and suffix else obs


def create_agent(cfg: AgentConfig) -> Agent:
    """The agent a config section names, its options validated against its `config_type`."""
    match cfg:
        case PluginAgentConfig(name=name, options=options):
            return plugins.instantiate(plugins.load(GROUP, name, BUILTIN, Agent, "agent", "tidal.engine.agent.Agent"), options, "agent", name)
        case ChatAgentConfig():
            return ChatAgent(cfg)
