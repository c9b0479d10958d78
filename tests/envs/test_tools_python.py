"""The Python sandbox enforces its limits for real: each test runs a child that tries to break one."""

import socket
import tempfile
from pathlib import Path

import pytest
import tidal.envs.code
from tidal.envs.tools import (
    TOOL_COUNTS,
    PythonTool,
    SandboxLimits,
    extract_code,
    network_isolation,
    run_python,
)

LIMITS = SandboxLimits(timeout_s=20.0, memory_mb=256, max_output_bytes=1000)
"""Generous time: on a loaded CI machine even starting Python can take a while."""


def test_runs_code_and_returns_output():
    result = run_python("print(6 * 7)", LIMITS)
    assert result.ok and result.stdout == "42\n" and result.stderr == ""


def test_timeout_kills_an_infinite_loop():
    before = TOOL_COUNTS.copy()
    result = run_python("while True:\n    pass", SandboxLimits(timeout_s=2.0))
    assert TOOL_COUNTS["python_timeouts"] == before["python_timeouts"] + 1
    assert TOOL_COUNTS["python_runs"] == before["python_runs"] + 1
    assert result.timed_out and not result.ok
    assert result.exit_code < 0
    assert "timed out" in result.summary()


def test_timeout_keeps_what_was_printed_before_the_kill():
    code = "import time\nprint('started', flush=True)\ntime.sleep(60)"
    result = run_python(code, SandboxLimits(timeout_s=3.0))
    assert result.timed_out and result.stdout == "started\n"


def test_memory_hog_fails_with_memory_error():
    result = run_python("x = bytearray(1 << 30)\nprint('allocated')", LIMITS)
    assert result.exit_code == 1
    assert "MemoryError" in result.stderr and "allocated" not in result.stdout


def test_output_is_truncated_to_the_limit():
    result = run_python("print('x' * 50000)", LIMITS)
    assert result.truncated
    assert result.stdout.startswith("x" * 1000)
    assert result.stdout.count("x") == 1000
    assert "49001 more bytes truncated" in result.stdout


def test_files_beyond_the_size_limit_cannot_be_written():
    code = "open('big', 'w').write('x' * 100000)"
    result = run_python(code, SandboxLimits(timeout_s=20.0, max_file_bytes=10000))
    assert result.exit_code == 1 and "File too large" in result.stderr


def test_network_attempt_fails():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"
        result = run_python(code, LIMITS)
        server.setblocking(False)  # the child has exited: a connection it made would be queued by now
        with pytest.raises(BlockingIOError):
            server.accept()
    assert "connected" not in result.stdout
    assert result.exit_code == 1 and "PermissionError" in result.stderr


@pytest.mark.skipif(not network_isolation(), reason="no unprivileged network namespace on this kernel")
def test_network_namespace_has_no_interfaces_up():
    code = "print(open('/proc/net/dev').read())"
    result = run_python(code, LIMITS)
    assert result.network_isolated
    assert "eth0" not in result.stdout


def test_processes_cannot_be_started():
    result = run_python("import os\nos.system('echo escaped')", LIMITS)
    assert "escaped" not in result.stdout and "PermissionError" in result.stderr


def test_temporary_directory_is_removed_and_writes_outside_are_refused(tmp_path):
    outside = tmp_path / "outside.txt"
    code = f"import os\nopen('inside.txt', 'w').write('ok')\nprint(os.getcwd())\nopen({str(outside)!r}, 'w')"
    result = run_python(code, LIMITS)
    workdir = Path(result.stdout.strip())
    assert workdir.name.startswith("tidal-py-")
    assert not workdir.exists()
    assert not outside.exists() and "outside the working directory" in result.stderr


def test_traceback_shows_only_the_agents_code():
    result = run_python("def f():\n    return 1 / 0\nf()", LIMITS)
    assert 'File "main.py", line 2, in f' in result.stderr
    assert "sandbox_boot" not in result.stderr and "ZeroDivisionError" in result.stderr


def test_extract_code_takes_the_first_block_and_cuts_the_action():
    action = "think\n<python>print(1)</python> then ```python\nprint(2)\n``` more"
    assert extract_code(action) == ("print(1)", "think\n<python>print(1)</python>")
    assert extract_code("```python\nprint(2)\n```\nrest") == ("print(2)", "```python\nprint(2)\n```")
    assert extract_code("no code here") is None


def test_tool_observation_reports_output_and_errors():
    tool = PythonTool(LIMITS)
    assert tool.blocking
    code, _ = tool.parse("<python>print(sum(range(10)))</python>")
    assert tool.run(code) == "Code execution result: 45\n"
    assert "NameError" in tool.run("print(undefined_name)")
    assert "no code given" in tool.run("   ")


def test_the_envs_package_with_task_solutions_cannot_be_read():
    tasks = Path(tidal.envs.code.__file__).with_name("data") / "tasks.jsonl"
    result = run_python(f"print(open({str(tasks)!r}).read())", LIMITS)
    assert result.exit_code == 1 and "is not allowed" in result.stderr and "solution" not in result.stdout
    result = run_python("import tidal.envs.code", LIMITS)  # refused if installed, not found if editable (no .pth)
    assert result.exit_code == 1 and ("PermissionError" in result.stderr or "ModuleNotFoundError" in result.stderr)


def test_a_hidden_directory_around_the_workdir_leaves_the_workdir_readable(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("answer")
    code = f"open('mine.txt', 'w').write('ok')\nprint(open('mine.txt').read())\nopen({str(secret)!r})"
    result = run_python(code, LIMITS, hidden_dirs=(tempfile.gettempdir(),))
    assert result.stdout == "ok\n" and "is not allowed" in result.stderr
