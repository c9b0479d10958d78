"""The code environment: write a Python function, get rewarded by running its tests in the sandbox.

The agent's last fenced ```python block (or `<python>` block) is its solution. It runs with the
task's asserts in `tidal.envs.tools.python.run_python` (time, memory, output limits, no network), so a step
blocks for up to the sandbox timeout and the env declares `blocking = True`.

Reward: 1 when every test passes, else 0 (`info["passed"]`/`info["total"]` give the fraction);
`FORMAT_PENALTY` when the action holds no code. With `max_attempts > 1` the agent sees which tests
failed and may try again. The test report travels on a file descriptor the harness saved before the
agent's code ran, tagged with a per-run nonce, and the harness files are deleted first, so printing
a fake report does not earn a reward (a deliberately adversarial program in the same interpreter
could still find the nonce in memory; this is a training signal, not a security boundary).
"""

import functools
import json
import random
import re
import secrets
from pathlib import Path
from typing import Any

import msgspec
from tidal.envs.core import Env, EnvError, Solver, StepResult
from tidal.envs.tools.python import SandboxLimits, run_python

__all__ = ["CodeEnv", "CodeTask", "load_code_tasks", "extract_solution", "FORMAT_PENALTY", "DEFAULT_TASKS"]

FORMAT_PENALTY = -0.1
"""Reward for an action without a code block (GEM's CodeEnv gives the same)."""

DEFAULT_TASKS = Path(__file__).with_name("data") / "tasks.jsonl"

INSTRUCTIONS = (
    "Solve the programming task in Python. Answer with the complete code in one fenced block:\n"
    "```python\n# your code\n```\nThe code is run against hidden tests; only the last code block counts."
)

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

_HARNESS = '''\
import json, os, sys, traceback
report = os.fdopen(os.dup(1), "w")
sink = open("output.txt", "w")
os.dup2(sink.fileno(), 1)
os.dup2(sink.fileno(), 2)
tests = json.load(open("tests.json"))
source = open("solution.py").read()
for name in ("tests.json", "main.py"):
    os.remove(name)
namespace = {"__name__": "solution"}
failures, passed = [], 0
try:
    exec(compile(source, "solution.py", "exec"), namespace)
except BaseException as exc:
    failures.append("solution.py did not load: " + "".join(traceback.format_exception_only(exc)).strip())
else:
    for test in tests:
        try:
            exec(compile(test, "test", "exec"), namespace)
            passed += 1
        except BaseException as exc:
            failures.append(test + "  ->  " + "".join(traceback.format_exception_only(exc)).strip())
sys.stdout.flush()
sys.stderr.flush()
report.write(json.dumps({"nonce": NONCE, "passed": passed, "failures": failures[:3]}) + "\\n")
report.flush()
'''


class CodeTask(msgspec.Struct, frozen=True):
    """A function to write, the asserts that check it, and a reference solution (for the solver)."""

    id: str
    prompt: str
    tests: list[str]
    solution: str = ""


def load_code_tasks(path: str | Path = DEFAULT_TASKS) -> list[CodeTask]:
    """Tasks from JSONL, one `{"id", "prompt", "tests": [...], "solution"}` object per line."""
    decoder = msgspec.json.Decoder(CodeTask)
    tasks = []
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if line.strip():
            try:
                tasks.append(decoder.decode(line))
            except msgspec.DecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a code task: {exc}") from exc
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    return tasks


def extract_solution(action: str) -> str | None:
    """The last fenced code block (else the last `<python>` block) of the action; None if there is none.

    Linear in the action's length: a fence's opening ``` closes any earlier fence, and the last
    `<python>` block is found from the right with `rfind`.
    """
    blocks = _FENCE.findall(action)
    if blocks:
        code = blocks[-1]
    else:
        end = action.rfind("</python>")
        start = action.rfind("<python>", 0, end) if end >= 0 else -1
        code = action[start + len("<python>") : end] if start >= 0 else ""
    return code if code.strip() else None


@functools.lru_cache(maxsize=16)
def _load_once(path: Path, mtime_ns: int) -> tuple[CodeTask, ...]:
    """One parsed copy of a task file for every env that reads it."""
    return tuple(load_code_tasks(path))


class CodeEnv(Env):
    """Write-a-function tasks checked by their tests in the sandbox.

    >>> env = CodeEnv()
    >>> prompt, _ = env.reset(seed=0)
    >>> env.step(env.solver()(prompt))[1]
    1.0
    """

    blocking = True
    instructions = INSTRUCTIONS

    def __init__(self, path: str | Path = DEFAULT_TASKS, max_attempts: int = 1,
                 timeout_s: float = 5.0, memory_mb: int = 512):
        if max_attempts < 1:
            raise ValueError(f"CodeEnv max_attempts: expected >= 1, got {max_attempts}")
        resolved = Path(path).resolve()
        self.tasks = _load_once(resolved, resolved.stat().st_mtime_ns)
        self.hidden_dirs = (str(resolved.parent),)  # the agent's code may not read the tests and solutions
        self.max_attempts = max_attempts
        self.limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
        self.task: CodeTask | None = None
        self.attempts = 0
        self.done = False

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed)
        self.task = self.tasks[self.rng.randrange(len(self.tasks))]
        self.attempts, self.done = 0, False
        return self.task.prompt, {"task_id": self.task.id}

    def run_tests(self, code: str) -> tuple[int, list[str]]:
        """Run the current task's tests on `code`: (tests passed, up to three failure messages)."""
        assert self.task is not None
        nonce = secrets.token_hex(16)
        harness = _HARNESS.replace("NONCE", repr(nonce))
        files = {"solution.py": code, "tests.json": json.dumps(self.task.tests)}
        result = run_python(harness, self.limits, files, self.hidden_dirs)
        for line in reversed(result.stdout.splitlines()):
            try:
                report = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(report, dict) and report.get("nonce") == nonce:
                return int(report["passed"]), list(report["failures"])
        if result.timed_out:
            return 0, [f"timed out after {self.limits.timeout_s:g} s"]
        return 0, [f"the program was ended before the tests finished (exit status {result.exit_code})"]

    def step(self, action: str) -> StepResult:
        if self.task is None:
            raise EnvError("CodeEnv.step called before reset")
        if self.done:
            return "The episode is over; call reset.", 0.0, True, False, {}
        self.attempts += 1
        last = self.attempts >= self.max_attempts
        code = extract_solution(action)
        if code is None:
            self.done = last
            obs = "No code found: put your complete solution in a ```python fenced block."
            return obs, FORMAT_PENALTY, last, False, {"format_error": True, "passed": 0, "total": len(self.task.tests)}
        passed, failures = self.run_tests(code)
        total = len(self.task.tests)
        info = {"passed": passed, "total": total}
        if passed == total:
            self.done = True
            return f"All {total} tests passed.", 1.0, True, False, info
        self.done = last
        report = f"{passed}/{total} tests passed.\n" + "\n".join(failures)
        return report if last else report + "\nFix the code and answer again.", 0.0, last, False, info

    def solver(self) -> Solver | None:
        if self.task is None:
            return None
        action = f"```python\n{self.task.solution}```"
        return lambda observation: action

    def sample_action(self, rng: random.Random) -> str:
        assert self.task is not None
        return rng.choice([f"```python\n{self.task.solution}```", "```python\npass\n```", "I don't know."])
