"""Tasks: which environment and seed each group of episodes plays, and their ids.

A group is `group_size` episodes of one env id and task seed (the same prompt), so group-relative
advantages (GRPO, RLOO, ReBN) compare like with like. Sources are drawn by weight from a seeded RNG;
each source hands out its seeds as seed_start + engine_index, then every `engines`-th seed after, so
engines never play the same seed at once. Ids are unique per engine incarnation: the engine id and
its epoch (start time) name the group, the member index names the episode.
"""

from __future__ import annotations

import random

import msgspec
from tidal.engine.config import TaskConfig

__all__ = ["Task", "TaskSource"]


class Task(msgspec.Struct, frozen=True):
    """One episode to play: an env and a seed, its group, and the turn limit it was admitted with."""

    episode_id: str
    group_id: str
    env_id: str
    seed: int
    index: int
    """Member index within the group."""
    max_turns: int
    version: int
    """The trainer version when it was admitted (the horizon schedule's input)."""
    kwargs: dict = {}

    @property
    def sample_key(self) -> str:
        """What the episode is, independent of when and where it runs: the key of its sampling seeds."""
        return f"{self.env_id}/{self.seed}/{self.index}"


class TaskSource:
    """Draws groups from the configured sources, reproducibly."""

    def __init__(self, tasks: list[TaskConfig], *, engine_id: str, epoch: int, group_size: int,
                 engines: int = 1, engine_index: int = 0, seed: int = 0):
        self.tasks = tasks
        self.prefix = f"{engine_id}-{epoch:x}"
        self.group_size = group_size
        self.stride, self.offset = engines, engine_index
        self._rng = random.Random(seed)
        self._drawn = [0] * len(tasks)
        self._groups = 0

    def _seed(self, i: int) -> int:
        cfg = self.tasks[i]
        n = self._drawn[i]
        self._drawn[i] += 1
        k = self.offset + n * self.stride
        return cfg.seed_start + (k % cfg.seed_count if cfg.seed_count else k)

    def next_group(self, *, max_turns: int, version: int) -> list[Task]:
        """The next group's episodes, all on one env id and seed."""
        if len(self.tasks) == 1:
            i = 0
        else:
            i = self._rng.choices(range(len(self.tasks)), weights=[t.weight for t in self.tasks])[0]
        cfg, seed = self.tasks[i], self._seed(i)
        group_id = f"{self.prefix}-g{self._groups}"
        self._groups += 1
        return [Task(f"{group_id}-{j}", group_id, cfg.env, seed, j, max_turns, version, dict(cfg.kwargs))
                for j in range(self.group_size)]
