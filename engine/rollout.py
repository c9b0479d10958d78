"""The engine's core loop: admit groups, play their episodes concurrently, hand finished groups over.

`Rollout` owns every episode task (one TaskGroup) and keeps docs/architecture.md's invariants on this side:
- Staleness (3): a group starts only when `Admission.blocked()` is None, under the trainer's latest
  status; episodes the engine discards (failed members' groups, zero-variance groups) hand their
  admission back.
- No loss (4): a finished group goes to the sink, which spools it to disk before sending; an episode
  still running when the process dies is lost work (never half-sent data).
- Bounded memory (5): at most `rollout.max_concurrent` episodes run; the sink's spool bound stops
  admission; weight notices keep only the newest pending one.
A group is all or nothing: if one member fails (its env raised, generation failed), the whole group is
discarded and counted, since the trainer's group-relative advantages need every member.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable

from tidal.engine.admission import Admission
from tidal.engine.agent import Agent, EpisodeFailed
from tidal.engine.config import EngineConfig
from tidal.engine.generation import Generator
from tidal.engine.tasks import Task, TaskSource
from tidal.envs.episode import ERRORS, EpisodeError
from tidal.envs.wrappers import StepTimeout
from tidal.protocol.messages import Trajectory

from tidal import envs

__all__ = ["Rollout", "play"]

log = logging.getLogger(__name__)

DEFAULT_STEP_TIMEOUT_S = 60.0
"""Bound on a blocking env's step for agents whose config names none."""

RECENT = 4096
"""Finished trajectories whose staleness and rewards the metrics window keeps (bounded)."""


class Rollout:
    """Episodes in, groups out. `changed()` must be called whenever an admission input changes."""

    def __init__(self, cfg: EngineConfig, agent: Agent, gen: Generator, admission: Admission,
                 tasks: TaskSource, deliver, out_of_grant: Callable[[], None] | None = None):
        """`deliver(group)` is awaited with each finished group of trajectories (the sink's `put`); it may
        wait (back-pressure), which holds the group's episodes' concurrency slots meanwhile.
        `out_of_grant()` is called whenever admission finds the trainer's grant used up (the sink's
        `report_now`): the grant follows the counts the trainer last heard, so while the engine waits
        for more, each episode that ends is reported at once, not at the next periodic heartbeat."""
        self.cfg = cfg
        self.agent = agent
        self.gen = gen
        self.admission = admission
        self.tasks = tasks
        self.deliver = deliver
        self.counters: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        """Failed episodes by reason ("env_error", "backend_error", ...)."""
        self.last_error = ""
        self.recent: deque[tuple[int, float, int]] = deque(maxlen=RECENT)
        """(staleness, reward, turns) of recently finished trajectories, for metrics: staleness is how many
        versions the trainer was ahead of a trajectory's oldest token when it finished (-1: unknown),
        taken then, not against a later version, so a window of old trajectories does not read stale."""
        self.blocked_by: Counter[str] = Counter()
        """Admission checks that found the next group blocked, by reason."""
        self.out_of_grant = out_of_grant
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    def changed(self) -> None:
        """Wake the admission loop (new status, weights served, an episode ended, control)."""
        self._changed.set()

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    async def run(self) -> None:
        """Admit until draining (or `max_episodes`), then wait for every group in flight."""
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    if self.gen.backend.serving() is False:  # checked here too: a failed episode ejects at once
                        self.admission.serving = False
                    reason = self.admission.blocked()
                    if reason in ("draining", "max_episodes"):
                        break
                    if reason is not None:
                        self.blocked_by[reason] += 1
                        if reason == "staleness" and self.out_of_grant is not None:
                            self.out_of_grant()
                        self._changed.clear()
                        await self._changed.wait()
                        continue
                    status = self.admission.status
                    max_turns = self.cfg.rollout.max_turns_at(status.version, self._default_turns())
                    group = self.tasks.next_group(max_turns=max_turns, version=status.version)
                    self.admission.start_group()
                    self.counters["groups_started"] += 1
                    task = tg.create_task(self._group(group))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    await asyncio.sleep(0)  # let the new episodes start before admitting more
        finally:
            self.changed()

    def cancel(self) -> int:
        """Cancel every episode in flight (a drain whose deadline passed); returns how many groups."""
        for task in self._tasks:
            task.cancel()
        return len(self._tasks)

    @property
    def step_timeout_s(self) -> float:
        return getattr(self.cfg.agent, "step_timeout_s", DEFAULT_STEP_TIMEOUT_S)

    def _default_turns(self) -> int:
        return getattr(self.cfg.agent, "max_turns", 1 << 30)

    async def _group(self, group: list[Task]) -> None:
        try:
            results = await asyncio.gather(*(self._episode(t) for t in group))
        except asyncio.CancelledError:
            self.admission.finish(len(group), discarded=len(group))
            self.counters["episodes_cancelled"] += len(group)
            self.changed()
            raise
        done = [r for r in results if isinstance(r, Trajectory)]
        keep = len(done) == len(group)
        if not keep:
            self.counters["groups_incomplete"] += 1
        elif self.cfg.rollout.drop_zero_variance and len({t.reward for t in done}) == 1:
            self.counters["groups_zero_variance"] += 1
            keep = False
        status = self.admission.status
        for t in done:
            stale = max(0, status.version - t.min_version) if status is not None and t.min_version >= 0 else -1
            self.recent.append((stale, t.reward, len(t.turns)))
            self.counters[f"finish/{t.finish_reason}"] += 1
        self.counters["episodes_finished"] += len(group)
        if keep:
            await self.deliver(done)  # may wait on the spool's bound: this group keeps its slots meanwhile
            self.counters["groups_delivered"] += 1
            self.counters["trajectories_delivered"] += len(done)
            self.admission.finish(len(group))
        else:
            self.counters["groups_discarded"] += 1
            self.admission.finish(len(group), discarded=len(group))
        self.changed()

    async def _episode(self, task: Task) -> Trajectory | None:
        """One episode: its trajectory, or None when it failed (counted with its reason)."""
        try:
            return await play(self.agent, task, self.gen, self.step_timeout_s)
        except EpisodeFailed as exc:
            self._failed(exc.reason, str(exc), task, exc.__cause__)
        except Exception as exc:  # an agent or env-construction bug ends this episode only, counted
            self._failed("agent_error", f"{type(exc).__name__}: {exc}", task, exc)
        return None

    def _failed(self, reason: str, message: str, task: Task, cause: BaseException | None) -> None:
        self.errors[reason] += 1
        self.last_error = f"{reason}: {message}"[:500]
        if reason == "env_error":
            ERRORS[task.env_id] += 1
        if cause is not None and self.errors[reason] <= 3:  # the first few with their traceback
            log.warning("episode %s failed (%s): %s\n%s", task.episode_id, reason, message,
                        EpisodeError.from_exception(cause, "episode").traceback)
        else:
            log.warning("episode %s failed (%s): %s", task.episode_id, reason, message)

    def snapshot(self) -> dict[str, float]:
        """Window figures for metrics: staleness histogram, reward and turns of recent trajectories."""
        out: dict[str, float] = {}
        if self.recent:
            stale = Counter(k for k, _, _ in self.recent if k >= 0)
            for k, n in sorted(stale.items()):
                out[f"engine/staleness/{k}"] = n
            out["engine/reward_mean"] = sum(r for _, r, _ in self.recent) / len(self.recent)
            out["engine/turns_mean"] = sum(t for _, _, t in self.recent) / len(self.recent)
        return out


async def play(agent: Agent, task: Task, gen: Generator, step_timeout_s: float) -> Trajectory:
    """Make the task's env, let `agent` play it, close the env. A blocking env's calls are bounded by
    `step_timeout_s` (a cheap inline env cannot hang the loop for long and is called directly)."""
    env = envs.make(task.env_id, **task.kwargs)
    try:
        if env.inline_calls() is None:
            env = StepTimeout(env, step_timeout_s)
        return await agent.run(task, gen, env)
    finally:
        try:
            await env.aclose()
        except Exception as exc:
            log.warning("closing env %s of %s failed: %s", task.env_id, task.episode_id, exc)
