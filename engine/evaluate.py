"""Evaluation on held-out task seeds: the success rate a run reports (engine `eval` section).

Each evaluation plays the same `eval.episodes` seeds of the first task source, far from the training
seeds, at `eval.temperature` (greedy by default), with the agent's turn limit at that version. Eval
trajectories never reach the trainer and take no admission: they measure the policy the servers
serve, they do not train it. Success is an episode one of whose turns earned `eval.success_reward`.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
from tidal.engine.agent import Agent, EpisodeFailed
from tidal.engine.config import EngineConfig
from tidal.engine.generation import Generator
from tidal.engine.rollout import play
from tidal.engine.tasks import Task

__all__ = ["Evaluator", "EvalResult"]


class EvalResult(msgspec.Struct, frozen=True):
    version: int
    episodes: int
    success: float
    """Fraction of episodes that succeeded (failed episodes count as unsuccessful)."""
    reward: float
    """Mean episode reward over the episodes that ran to an end."""
    turns: float
    failed: int
    seconds: float


class Evaluator:
    def __init__(self, cfg: EngineConfig, agent: Agent, gen: Generator, step_timeout_s: float):
        self.cfg = cfg
        self.agent = agent
        self.gen = gen
        self.step_timeout_s = step_timeout_s
        self.next_version = 0
        self.results: list[EvalResult] = []

    def due(self, version: int | None) -> bool:
        e = self.cfg.eval
        return bool(e.every_versions) and version is not None and version >= self.next_version

    async def evaluate(self, version: int) -> EvalResult:
        e, src, t0 = self.cfg.eval, self.cfg.tasks[0], time.monotonic()
        max_turns = self.cfg.rollout.max_turns_at(version, getattr(self.cfg.agent, "max_turns", 1 << 30))
        tasks = [Task(f"eval-v{version}-{i}", f"eval-v{version}", src.env, e.seed_start + i, 0, max_turns, version,
                      dict(src.kwargs)) for i in range(e.episodes)]
        outcomes = await asyncio.gather(*(self._one(t) for t in tasks))
        done = [o for o in outcomes if o is not None]
        result = EvalResult(
            version=version, episodes=len(tasks),
            success=sum(1 for rewards in done if rewards and max(rewards) >= e.success_reward) / len(tasks),
            reward=sum(sum(r) for r in done) / max(1, len(done)),
            turns=sum(len(r) for r in done) / max(1, len(done)),
            failed=len(tasks) - len(done), seconds=time.monotonic() - t0,
        )
        self.results.append(result)
        self.next_version = (version // e.every_versions + 1) * e.every_versions
        return result

    async def _one(self, task: Task) -> list[float] | None:
        try:
            traj = await play(self.agent, task, self.gen, self.step_timeout_s)
        except EpisodeFailed:
            return None
        return [turn.reward for turn in traj.turns]
