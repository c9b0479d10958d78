r"""The math suite: generated arithmetic and word problems, and problems from a local file.

Ids (registered on import):
- `math:Arithmetic-v0`: expressions over + - * / (`depth`, `max_value` set the difficulty);
- `math:WordProblems-v0`: templated word problems;
- `math:Problems-v0`: a JSONL/Parquet file or a `datasets` directory saved to disk (`path=`,
  `question_key=`, `answer_key=`), by default the small set shipped in `data/problems.jsonl`; or a
  `datasets` dataset (`dataset="openai/gsm8k", dataset_config="main", split="test"`, or
  `dataset="json", data_files=...`).
Each accepts `max_attempts` (1: single-turn). Answers go in `\boxed{}`; see `verify.py`.
"""

from tidal.envs.math.env import FORMAT_PENALTY, MathEnv
from tidal.envs.math.tasks import MathTask, arithmetic_task, load_dataset_tasks, load_tasks, word_problem_task
from tidal.envs.math.verify import extract_answer, is_correct, parse_number
from tidal.envs.registry import register

__all__ = [
    "FORMAT_PENALTY",
    "MathEnv",
    "MathTask",
    "arithmetic_task",
    "extract_answer",
    "is_correct",
    "load_dataset_tasks",
    "load_tasks",
    "parse_number",
    "word_problem_task",
]

register("math:Arithmetic-v0", "tidal.envs.math.env:MathEnv", source="arithmetic")
register("math:WordProblems-v0", "tidal.envs.math.env:MathEnv", source="word")
register("math:Problems-v0", "tidal.envs.math.env:MathEnv", source="file")
