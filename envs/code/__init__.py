"""The code suite: write a Python function, rewarded by its tests run in the sandboxed Python tool.

Ids (registered on import):
- `code:Functions-v0`: small function-writing tasks shipped in `data/tasks.jsonl` (`path=` for
  your own file of `{"id", "prompt", "tests", "solution"}` lines), `max_attempts` for retries
  with test feedback, `timeout_s` and `memory_mb` for the sandbox.
Wrap it with `tidal.envs.wrappers.ToolUse(env, [PythonTool()])` to let the agent run code before answering.
"""

from tidal.envs.code.env import (
    DEFAULT_TASKS,
    FORMAT_PENALTY,
    CodeEnv,
    CodeTask,
    extract_solution,
    load_code_tasks,
)
from tidal.envs.registry import register

__all__ = ["CodeEnv", "CodeTask", "DEFAULT_TASKS", "FORMAT_PENALTY", "extract_solution", "load_code_tasks"]

register("code:Functions-v0", "tidal.envs.code.env:CodeEnv")
