r"""The maths environment: one question, answered in `\boxed{}` (or a final line), checked exactly.

Rewards (GEM's MathEnv with its format-error reward): 1 for a correct answer, 0 for a wrong one,
`FORMAT_PENALTY` when no answer can be found (empty, unparseable or absurdly long actions). With
`max_attempts > 1` a wrong answer gets "incorrect, try again" and the episode goes on, which makes
it multi-turn; otherwise it is single-turn. Checking is cheap string work, so steps run inline.
"""

import functools
import random
from pathlib import Path
from typing import Any, Literal

from tidal.envs.answers import clip
from tidal.envs.core import Env, EnvError, Solver, StepResult
from tidal.envs.math.tasks import (
    DEFAULT_PROBLEMS,
    MathTask,
    arithmetic_task,
    load_dataset_tasks,
    load_tasks,
    word_problem_task,
)
from tidal.envs.math.verify import extract_answer, is_correct

__all__ = ["MathEnv", "FORMAT_PENALTY"]

FORMAT_PENALTY = -0.1
"""Reward for an action with no findable answer (GEM's format-error reward)."""

INSTRUCTIONS = (
    "Solve the maths problem. Reason step by step if you like, then give the final answer in "
    "\\boxed{}, for example \\boxed{42} or \\boxed{3/4}. Give exact values: fractions, not rounded decimals."
)


def _shared_tasks(path: Path, question_key: str, answer_key: str) -> tuple[MathTask, ...]:
    """One parsed copy of a task file for every env that reads it (1024 envs, one parse)."""
    return _load_once(path, path.stat().st_mtime_ns, question_key, answer_key)


@functools.lru_cache(maxsize=16)
def _load_once(path: Path, mtime_ns: int, question_key: str, answer_key: str) -> tuple[MathTask, ...]:
    return tuple(load_tasks(path, question_key, answer_key))


@functools.lru_cache(maxsize=16)
def _dataset_once(name: str, config: str | None, split: str, data_files: Any, question_key: str,
                  answer_key: str) -> tuple[MathTask, ...]:
    """One loaded copy of a `datasets` dataset for every env that reads it."""
    return tuple(load_dataset_tasks(name, config, split, data_files, question_key, answer_key))


class MathEnv(Env):
    r"""Maths questions from a generator or a local file.

    >>> env = MathEnv("arithmetic", depth=1)
    >>> question, _ = env.reset(seed=3)
    >>> env.step(env.solver()(question))[1]
    1.0
    """

    blocking = False
    instructions = INSTRUCTIONS

    def __init__(
        self,
        source: Literal["arithmetic", "word", "file"] = "arithmetic",
        path: str | Path = DEFAULT_PROBLEMS,
        question_key: str = "question",
        answer_key: str = "answer",
        depth: int = 2,
        max_value: int = 20,
        max_attempts: int = 1,
        dataset: str | None = None,
        dataset_config: str | None = None,
        split: str = "train",
        data_files: str | list[str] | None = None,
    ):
        if source not in ("arithmetic", "word", "file"):
            raise ValueError(f"MathEnv source: expected 'arithmetic', 'word' or 'file', got {source!r}")
        if depth < 1 or max_value < 1 or max_attempts < 1:
            raise ValueError(f"MathEnv: depth, max_value and max_attempts must be >= 1, got {depth}, "
                             f"{max_value}, {max_attempts}")
        self.source, self.depth, self.max_value, self.max_attempts = source, depth, max_value, max_attempts
        if source != "file":
            self.tasks = None
        elif dataset is not None:  # datasets.load_dataset(dataset, dataset_config, split=, data_files=)
            files = tuple(data_files) if isinstance(data_files, list) else data_files
            self.tasks = _dataset_once(dataset, dataset_config, split, files, question_key, answer_key)
        else:
            self.tasks = _shared_tasks(Path(path).resolve(), question_key, answer_key)
        self.task: MathTask | None = None
        self.attempts = 0
        self.done = False

    def _draw(self) -> MathTask:
        if self.tasks is not None:
            return self.tasks[self.rng.randrange(len(self.tasks))]
        if self.source == "word":
            return word_problem_task(self.rng)
        return arithmetic_task(self.rng, self.depth, self.max_value)

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed)
        self.task = self._draw()
        self.attempts, self.done = 0, False
        return self.task.question, {"source": self.task.source}

    def step(self, action: str) -> StepResult:
        if self.task is None:
            raise EnvError("MathEnv.step called before reset")
        if self.done:
            return "The episode is over; call reset.", 0.0, True, False, {"correct": False}
        self.attempts += 1
        last = self.attempts >= self.max_attempts
        answer = extract_answer(action)
        if answer is None:
            self.done = last
            obs = "No answer found: write your final answer in \\boxed{}, e.g. \\boxed{42}."
            return obs, FORMAT_PENALTY, last, False, {"correct": False, "format_error": True}
        if is_correct(answer, self.task.answer):
            self.done = True
            return "Correct.", 1.0, True, False, {"correct": True}
        self.done = last
        obs = "Incorrect." if last else f"Incorrect: {clip(answer)} is not the answer. Try again."
        return obs, 0.0, last, False, {"correct": False}

    def solver(self) -> Solver | None:
        if self.task is None:
            return None
        action = f"The answer is \\boxed{{{self.task.answer}}}"
        return lambda observation: action

    def sample_action(self, rng: random.Random) -> str:
        return f"\\boxed{{{rng.randint(-20, 100)}}}"
