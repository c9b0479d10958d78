"""Agent-written code that tries to leave the Python sandbox (envs/tools/python.py).

The audit hook alone is a Python-level guard: three lines that clear the boot module's tables, or a
native call through ctypes, step around it. Under bubblewrap the kernel holds the line: these tests
switch the hook off from inside and check that the code still cannot read the tasks' tests and
solutions, write outside its directory, see or signal the engine, or open a connection to the host.
The code env's reward is checked against code that games the test harness instead of solving."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import tidal.envs as envs
from tidal.envs.tools.python import SandboxLimits, bubblewrap, run_python

ENVS_PACKAGE = Path(envs.__file__).resolve().parent
DISABLE_HOOK = """
import sys
boot = sys.modules["__main__"]
boot._BLOCKED_EVENTS.clear()
boot._hidden.clear()
boot._workdir = "/"
"""
"""What any code can do to the audit hook: its tables are module globals of the boot script."""

needs_bwrap = pytest.mark.skipif(bubblewrap() is None, reason="bubblewrap (bwrap) is not installed or cannot run "
                                 "here; .ci/run installs it")


def probe(outside: Path, listener_port: int) -> str:
    """Code that reports, as JSON, what it reached with the hook switched off."""
    return DISABLE_HOOK + f"""
import json, os, socket, subprocess
out = {{}}
try:
    out["envs_listing"] = sorted(os.listdir({str(ENVS_PACKAGE)!r}))
except OSError as exc:
    out["envs_listing"] = repr(exc)
try:
    out["shell"] = subprocess.run(["sh", "-c", "cat {ENVS_PACKAGE}/code/data/*.jsonl | head -c 100"],
                                  capture_output=True, text=True).stdout
except OSError as exc:
    out["shell"] = repr(exc)
try:
    open({str(outside)!r}, "w").write("escaped")
    out["wrote_outside"] = True
except OSError as exc:
    out["wrote_outside"] = repr(exc)
try:
    os.kill({os.getpid()}, 0)
    out["signal_engine"] = True
except OSError as exc:
    out["signal_engine"] = repr(exc)
try:
    socket.create_connection(("127.0.0.1", {listener_port}), timeout=2).close()
    out["connected"] = True
except OSError as exc:
    out["connected"] = repr(exc)
print(json.dumps(out))
"""


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def _report(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@needs_bwrap
def test_code_that_switches_the_hook_off_still_reaches_nothing(tmp_path, listener):
    outside = tmp_path / "escaped.txt"
    result = run_python(probe(outside, listener), SandboxLimits(timeout_s=20))
    assert result.contained
    got = _report(result)
    assert got["envs_listing"] == [], "the envs package (tests, solutions) is visible"
    assert got["shell"] == "", "a shell read the tasks' data"
    assert got["wrote_outside"] is not True and not outside.exists()
    assert got["signal_engine"] is not True, "the code could signal the engine's process"
    assert got["connected"] is not True, "the code reached a socket of the host"


@needs_bwrap
def test_native_calls_reach_nothing_either(tmp_path):
    outside = tmp_path / "native.txt"
    code = f"""
import ctypes
libc = ctypes.CDLL(None)
print(libc.system(b"echo escaped > {outside}; ls {ENVS_PACKAGE}/code/data > /dev/stderr"))
"""
    result = run_python(code, SandboxLimits(timeout_s=20))
    assert result.contained
    assert not outside.exists()
    assert "tasks.jsonl" not in result.stderr


def test_without_bubblewrap_the_hook_refuses_signals():
    """The hook's own share (all there is without bubblewrap): signalling another process is refused."""
    result = run_python(f"import os\nos.kill({os.getpid()}, 0)\n", SandboxLimits(timeout_s=20))
    assert result.exit_code == 1 and "sandbox: signalling processes is not allowed" in result.stderr


# --- the code env's harness ----------------------------------------------------------------------------

GAMED = {
    "always-equal": """
import re, sys
class _Any:
    def __eq__(self, other):
        return True
    __hash__ = object.__hash__
_tests = sys._getframe(1).f_globals["tests"]  # the harness that exec'd this solution
for _name in set(re.findall(r"([A-Za-z_][A-Za-z_0-9]*)\\(", " ".join(_tests))):
    globals()[_name] = lambda *a, **k: _Any()
""",
    "patched-report": """
import json, sys
_dumps, _total = json.dumps, len(sys._getframe(1).f_globals["tests"])
def _fake(obj, *a, **k):
    if isinstance(obj, dict) and "nonce" in obj:
        obj = {**obj, "passed": _total, "failures": []}
    return _dumps(obj, *a, **k)
json.dumps = _fake
""",
}


@pytest.mark.parametrize("how", sorted(GAMED))
def test_code_env_rewards_no_gamed_harness(how):
    env = envs.make("code:Functions-v0")
    try:
        rewards = []
        for seed in range(4):
            env.reset(seed=seed)
            _, reward, *_ = env.step(f"```python\n{GAMED[how]}\n```")
            rewards.append(reward)
        assert max(rewards) < 1.0, f"{how}: rewarded {rewards}"
    finally:
        env.close()
