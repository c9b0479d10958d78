"""The code environment: write a Python function, get rewarded by running its tests in the sandbox.

The agent's last fenced ```python block (or `<python>` block) is its solution. It runs with the
solution's parts of the task's asserts in `tidal.envs.tools.python.run_python` (time, memory, output limits, no network), so a step
blocks for up to the sandbox timeout and the env declares `blocking = True`.

Reward: 1 when every test passes, else 0 (`info["passed"]`/`info["total"]` give the fraction);
`FORMAT_PENALTY` when the action holds no code. With `max_attempts > 1` the agent sees which tests
failed and may try again. The tests are judged outside the sandbox (envs/code/harness.py): only the
values the solution's functions return cross back, as plain literals, and the comparisons with the
expected values run in this process, so an object whose `__eq__` is always true, a patched
`json.dumps` or a forged report earns nothing, and the expected values never reach the agent's code.
"""

import functools
import json
import random
import re
import secrets
from pathlib import Path
from typing import Any

import msgspec
from tidal.envs.code.harness import HARNESS, Check
from tidal.envs.core import Env, EnvError, Solver, StepResult
from tidal.envs.tools.python import SandboxLimits, run_python

__all__ = ["CodeEnv", "CodeTask", "load_code_tasks", "extract_solution", "FORMAT_PENALTY", "DEFAULT_TASKS"]

FORMAT_PENALTY = -0.1
"""Reward for an action without a code block (GEM's CodeEnv gives the same)."""

REPORT_BYTES = 256 << 10
"""Bytes of the harness's report read back (every probe's value): beyond it the run fails as cut off."""

DEFAULT_TASKS = Path(__file__).with_name("data") / "tasks.jsonl"

INSTRUCTIONS = (
    "Solve the programming task in Python. Answer with the complete code in one fenced block:\n"
    "```python\n# your code\n```\nThe code is run against hidden tests; only the last code block counts."
)

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

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
                task = decoder.decode(line)
                for test in task.tests:
                    Check.of(test)
            except (msgspec.DecodeError, ValueError) as exc:
                raise ValueError(f"{path}:{lineno}: not a code task: {exc}") from exc
            tasks.append(task)
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
        self.limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=REPORT_BYTES)
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
        checks = [Check.of(test) for test in self.task.tests]
        nonce = secrets.token_hex(16)
        probes = [probe for check in checks for probe in check.probes]
        files = {"solution.py": code, "probes.json": json.dumps(probes)}
        result = run_python(HARNESS.replace("NONCE", repr(nonce)), self.limits, files, self.hidden_dirs)
        report = _report(result.stdout, nonce, len(probes))
        if report is None:
            if result.timed_out:
                return 0, [f"timed out after {self.limits.timeout_s:g} s"]
            return 0, [f"the program was ended before the tests finished (exit status {result.exit_code})"]
        if report["load_error"] is not None:
            return 0, [f"solution.py did not load: {report['load_error']}"]
        passed, failures, results = 0, [], report["results"]
        for check in checks:
            why = check.judge(results[:len(check.probes)])
            results = results[len(check.probes):]
            if why is None:
                passed += 1
            else:
                failures.append(f"{check.test}  ->  {why}")
        return passed, failures[:3]

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


def _report(stdout: str, nonce: str, probes: int) -> dict | None:
    """The harness's report in `stdout` (the last line with `nonce`), if it is whole."""
    for line in reversed(stdout.splitlines()):
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(report, dict) or report.get("nonce") != nonce:
            continue
        results = report.get("results")
        load_error = report.get("load_error")
        if load_error is not None and not isinstance(load_error, str):
            return None
        if load_error is None and not (isinstance(results, list) and len(results) == probes and all(
                isinstance(r, list) and len(r) == 2 and r[0] in ("value", "error") and isinstance(r[1], str)
                for r in results)):
            return None
        return report
    return None
