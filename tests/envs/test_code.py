"""The code suite runs the agent's code against the task's tests in the sandbox."""

import json
import re

import pytest
from tidal.envs.code import FORMAT_PENALTY, CodeEnv, extract_solution, load_code_tasks
from tidal.envs.tools import SandboxLimits

from tidal import envs


def _fenced(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}\n```\n"


@pytest.fixture
def env():
    env = envs.make("code:Functions-v0", timeout_s=20.0)
    env.reset(seed=0)
    env.task = next(t for t in env.tasks if t.id == "reverse_words")
    return env


def test_declared_blocking_so_it_is_offloaded():
    assert CodeEnv.blocking is True


def test_correct_solution_gets_1(env):
    obs, reward, terminated, truncated, info = env.step(_fenced("def reverse_words(s):\n    return ' '.join(s.split()[::-1])"))
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert info == {"passed": 4, "total": 4} and obs == "All 4 tests passed."


def test_wrong_solution_gets_0_and_names_failing_tests(env):
    obs, reward, terminated, _, info = env.step(_fenced("def reverse_words(s):\n    return s"))
    assert (reward, terminated) == (0.0, True)
    assert info["passed"] == 2 and info["total"] == 4  # '' and 'one' are their own reverse
    assert "2/4 tests passed" in obs and "assert reverse_words('hello world') == 'world hello'" in obs


def test_printing_a_fake_report_earns_nothing(env):
    fake = 'import json\nprint(json.dumps({"nonce": "guess", "passed": 4, "failures": []}))'
    assert env.step(_fenced(fake))[1] == 0.0
    env.done, env.attempts = False, 0
    assert env.step(_fenced("import os\nos._exit(0)"))[1] == 0.0


def test_infinite_loop_times_out_with_reward_0(env):
    env.limits = SandboxLimits(timeout_s=2.0)
    obs, reward, terminated, _, _ = env.step(_fenced("def reverse_words(s):\n    while True:\n        pass"))
    assert (reward, terminated) == (0.0, True) and "timed out" in obs


@pytest.mark.parametrize("action", ["", "no code at all", "```python\n\n```", "x" * 500_000])
def test_actions_without_code_get_the_format_penalty(env, action):
    obs, reward, terminated, _, info = env.step(action)
    assert reward == FORMAT_PENALTY and terminated and info["format_error"]
    assert "No code found" in obs


def test_retries_show_failures_then_accept_a_fix():
    env = CodeEnv(max_attempts=2, timeout_s=20.0)
    env.reset(seed=0)
    obs, reward, terminated, _, _ = env.step(_fenced("x = 1"))
    assert (reward, terminated) == (0.0, False) and "Fix the code" in obs
    assert env.step(env.solver()(obs))[1:3] == (1.0, True)


async def test_every_shipped_task_is_solved_by_its_reference_solution():
    env = envs.make("code:Functions-v0")
    assert env.instructions and "```python" in env.instructions
    solved = set()
    for seed in range(40):
        episode = await envs.run_episode(env, lambda obs: env.solver()(obs), seed=seed)
        assert episode.error is None and episode.rewards == [1.0]
        solved.add(episode.infos[0]["task_id"])
        if len(solved) == len(env.tasks):
            break
    assert solved == {t.id for t in load_code_tasks()}


def test_extract_solution_takes_the_last_block():
    action = "```python\nfirst\n```\ntext\n```\nsecond\n```"
    assert extract_solution(action) == "second\n"
    assert extract_solution("<python>x = 1</python>") == "x = 1"
    assert extract_solution("none") is None


def test_reset_is_deterministic_under_a_seed():
    a, b = CodeEnv(), CodeEnv()
    assert a.reset(seed=5) == b.reset(seed=5)


def test_a_user_task_file_is_hidden_from_the_agents_code(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"id": "t", "prompt": "define f", "tests": ["assert f() == 1"], "solution": "def f():\\n    return 1\\n"}\n')
    env = CodeEnv(path=path, timeout_s=20.0)
    env.reset(seed=0)
    cheat = f"def f():\n    return 1 if open({str(path)!r}).read() else 0"
    obs, reward, *_ = env.step(_fenced(cheat))
    assert reward == 0.0 and "is not allowed" in obs


def test_harness_docstring_examples_run():
    import doctest

    import tidal.envs.code.harness

    failed, tried = doctest.testmod(tidal.envs.code.harness)
    assert tried > 0 and failed == 0


def test_only_the_solutions_parts_of_a_test_are_probed():
    from tidal.envs.code.harness import Check

    check = Check.of("assert sorted(f([3, 1]))[0] == min([3, 1]) and not g('x').upper()")
    assert check.probes == ["f([3, 1])", "g('x').upper()"]
    assert check.judge([("value", "[1, 3]"), ("value", "''")]) is None
    assert check.judge([("value", "[3, 3]"), ("value", "''")]) == "AssertionError"
    assert check.judge([("error", "ValueError: no"), ("value", "''")]) == "ValueError: no"
    assert "not a plain value" in check.judge([("value", "<__main__._Any object at 0x7f>"), ("value", "''")])


@pytest.mark.parametrize("test, problem", [
    ("x = f(1)", "expected one `assert EXPR` statement"),
    ("assert all(f(i) == i for i in range(3))", "`f(i)` uses i, bound inside the test"),
    ("assert f(", "does not parse"),
])
def test_a_test_the_harness_cannot_split_is_refused_at_load(tmp_path, test, problem):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"id": "t", "prompt": "p", "tests": [test]}) + "\n")
    with pytest.raises(ValueError, match=re.escape(problem)):
        load_code_tasks(path)


def test_a_tuple_is_not_a_list_and_a_subclass_is_its_plain_value(env):
    env.task = next(t for t in env.tasks if t.id == "two_sum")
    as_list = "def two_sum(xs, target):\n    return [0, 1]"
    assert env.step(_fenced(as_list))[4]["passed"] == 0  # (0, 1) expected, never None
    env.done, env.attempts = False, 0
    env.task = next(t for t in env.tasks if t.id == "reverse_words")
    subclass = ("class S(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n"
                "def reverse_words(s):\n    return S('nope')")
    assert env.step(_fenced(subclass))[1] == 0.0
