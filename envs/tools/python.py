"""Run agent-written Python in a sandboxed child process, and the tool that offers it to the agent.

Every run gets a fresh temporary working directory that is removed afterwards, whatever happened.
What is enforced (see sandbox_boot.py for the child's half):
- wall-clock timeout: the whole process group is killed at `timeout_s` (CPU rlimit as a backstop);
- memory: RLIMIT_AS of `memory_mb`, so allocation beyond it raises MemoryError in the child;
- output: stdout and stderr go to files capped by RLIMIT_FSIZE; the result keeps the first
  `max_output_bytes` of each and says how much was cut;
- containment, with bubblewrap (`bwrap`, installed by .ci/run) where it runs: the child has its own
  PID, network, IPC and mount namespaces, sees the filesystem read-only except its working
  directory (and an empty /tmp), sees the `envs` package and `hidden_dirs` as empty directories,
  and has no capabilities. That holds whatever the code does, native calls (ctypes) included: it
  cannot read the tasks' tests and solutions, write outside its directory, reach any socket of
  the host, or signal the engine or any other process. It costs about 30 ms a run (88 against 60 ms
  for `print(1)` on the 2-core dev machine);
- without bubblewrap: an empty network namespace (`unshare -rn`) when the kernel allows it;
- always, an audit hook in the child that refuses sockets, new processes and signals to other
  processes, writes, deletes and renames outside the working directory, and reads of the `envs`
  package. The hook is a Python-level guard: native calls, or code that reaches the boot module's
  state, step around it. It is the only filesystem guard where bubblewrap is missing;
- environment: `python -I -S` (no user site, no PYTHON* variables, no .pth hooks; site-packages
  stay importable), a minimal `env`, stdin closed.
Not enforced: reads elsewhere on the machine (only the `envs` package and `hidden_dirs` are hidden)
and total disk use (each file is capped, not their number). Running a step blocks for up to
`timeout_s`, so the tool declares itself blocking and the env that uses it is offloaded.
"""

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO

import msgspec
from tidal.envs.tools.counters import TOOL_COUNTS
from tidal.envs.tools.tags import first_tagged

__all__ = ["ExecResult", "SandboxLimits", "run_python", "network_isolation", "bubblewrap", "extract_code",
           "PythonTool"]

_BOOT = Path(__file__).with_name("sandbox_boot.py")
_HIDDEN_DIRS = (str(Path(__file__).resolve().parents[1]),)
"""The `envs` package (task data, tests, solutions): the sandboxed code may not read it."""
_PYTHON_FENCE = re.compile(r"```[ \t]*python[ \t]*\n(.*?)```", re.DOTALL)


class SandboxLimits(msgspec.Struct, frozen=True):
    """Resource limits of one sandboxed run."""

    timeout_s: float = 5.0
    """Wall-clock seconds before the process group is killed."""
    memory_mb: int = 512
    """Address-space limit of the child (RLIMIT_AS), in MiB."""
    max_output_bytes: int = 8192
    """Bytes of stdout (and, separately, of stderr) kept in the result."""
    max_file_bytes: int = 16 << 20
    """Largest file the child may write (RLIMIT_FSIZE), captured output included."""


class ExecResult(msgspec.Struct, frozen=True):
    """What one sandboxed run produced."""

    stdout: str
    stderr: str
    exit_code: int
    """The child's exit status; negative is the signal that ended it."""
    timed_out: bool
    truncated: bool
    """True if stdout or stderr was longer than `max_output_bytes`."""
    network_isolated: bool
    """True if the child ran in its own, empty network namespace."""
    contained: bool = False
    """True if the child ran under bubblewrap (see the module docstring): what it could reach was
    limited by the kernel, not only by the audit hook."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def summary(self) -> str:
        """The text an agent sees: output, then errors, then why the run ended early if it did."""
        parts = [self.stdout]
        if self.stderr:
            parts.append(self.stderr)
        if self.timed_out:
            parts.append("[timed out: the program was killed]")
        elif self.exit_code == -signal.SIGXFSZ:
            parts.append("[killed: output or file size limit exceeded]")
        elif self.exit_code < 0:
            parts.append(f"[killed by signal {signal.Signals(-self.exit_code).name}]")
        return "".join(p if p.endswith("\n") or not p else p + "\n" for p in parts)


@functools.cache
def network_isolation() -> bool:
    """Whether `unshare -rn` can give a child an empty network namespace on this machine."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        done = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


_BWRAP_BASE = ("--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
               "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp")
_BOOT_INSIDE = "/tmp/.tidal-sandbox-boot.py"
"""Where the boot script is mounted in the sandbox: the envs package that holds it is hidden there."""


@functools.cache
def bubblewrap() -> str | None:
    """The `bwrap` executable when it can contain a child on this machine (user namespaces allowed)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    try:
        done = subprocess.run([bwrap, *_BWRAP_BASE, "--", "/bin/true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bwrap if done.returncode == 0 else None


@functools.cache
def _interpreter_dirs() -> tuple[str, ...]:
    """The interpreter's directories that lie under /tmp, outermost only: the sandbox's /tmp is empty,
    so they are bound back read-only (a virtual environment in a checkout under /tmp, say)."""
    found = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                   os.path.dirname(os.path.realpath(sys.executable)))
                    if os.path.realpath(p).startswith("/tmp/")})
    return tuple(p for p in found if not any(p != q and p.startswith(q + "/") for q in found))


def _contained(bwrap: str, work: str, hidden: list[str], argv: list[str]) -> list[str]:
    """`argv` under bubblewrap: read-only root, `work` writable, each hidden directory an empty tmpfs
    (except one that holds the working directory or the interpreter: the audit hook guards that one)."""
    keep = [os.path.realpath(p) for p in (work, sys.prefix, sys.base_prefix, sys.exec_prefix)]
    args = [bwrap, *_BWRAP_BASE, "--bind", work, work, "--ro-bind", str(_BOOT), _BOOT_INSIDE]
    for path in _interpreter_dirs():  # under /tmp (a checkout or venv there): the tmpfs above hid them
        args += ["--ro-bind", path, path]
    for path in hidden:
        real = os.path.realpath(path)
        if os.path.isdir(real) and not any(os.path.commonpath([k, real]) == real for k in keep):
            args += ["--tmpfs", real]
    return [*args, "--chdir", work, "--", argv[0], *argv[1:3], _BOOT_INSIDE, *argv[4:]]


def _read_capped(f: BinaryIO, limit: int) -> tuple[str, bool]:
    """Read from our own handle: the child may have deleted or renamed the file by now."""
    f.seek(0)
    head = f.read(limit)
    rest = f.seek(0, os.SEEK_END) - len(head)
    text = head.decode("utf-8", errors="replace")
    if rest > 0:
        return text + f"\n[... {rest} more bytes truncated]\n", True
    return text, False


def run_python(code: str, limits: SandboxLimits = SandboxLimits(), files: dict[str, str] | None = None,
               hidden_dirs: tuple[str, ...] = ()) -> ExecResult:
    """Run `code` as `main.py` in a fresh temporary directory under `limits`; blocks until it ends.

    `files` are written next to it first (e.g. a test file the code must satisfy); `hidden_dirs`
    are directories the code may not read, besides the `envs` package (e.g. a user's task files).
    """
    bwrap = bubblewrap()
    isolated = bwrap is not None or network_isolation()
    with tempfile.TemporaryDirectory(prefix="tidal-py-") as tmp:
        work = Path(tmp)
        for name, text in (files or {}).items():
            (work / name).write_text(text, encoding="utf-8")
        (work / "main.py").write_text(code, encoding="utf-8")
        argv = [sys.executable, "-I", "-S", str(_BOOT), str(limits.memory_mb << 20), str(int(limits.timeout_s) + 1),
                str(limits.max_file_bytes), "main.py", *_HIDDEN_DIRS, *hidden_dirs]
        if bwrap is not None:
            argv = _contained(bwrap, os.path.realpath(tmp), [*_HIDDEN_DIRS, *hidden_dirs], argv)
        elif isolated:
            argv = ["unshare", "-rn", "--", *argv]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        with (work / ".stdout").open("w+b") as out, (work / ".stderr").open("w+b") as err:
            proc = subprocess.Popen(argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
            stdout, cut_out = _read_capped(out, limits.max_output_bytes)
            stderr, cut_err = _read_capped(err, limits.max_output_bytes)
    TOOL_COUNTS["python_runs"] += 1
    TOOL_COUNTS["python_timeouts"] += timed_out
    TOOL_COUNTS["python_killed"] += proc.returncode < 0 and not timed_out
    TOOL_COUNTS["python_truncated"] += cut_out or cut_err
    return ExecResult(stdout, stderr, proc.returncode, timed_out, cut_out or cut_err, isolated, bwrap is not None)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill whatever the run left behind (its whole session) and reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def extract_code(action: str) -> tuple[str, str] | None:
    """The first Python block in `action` and the action cut just after it, or None.

    Accepts `<python>...</python>` and a ```python fenced block, whichever ends first (as GEM's
    PythonCodeTool does), so anything the model wrote after its call is not part of the turn.
    Linear in the action's length (see tags.py); a fence's opening ``` closes any earlier fence.
    """
    found = []
    tagged = first_tagged(action, "python")
    if tagged is not None:
        found.append((tagged[2], tagged[0]))
    fenced = _PYTHON_FENCE.search(action)
    if fenced is not None:
        found.append((fenced.end(), fenced.group(1)))
    if not found:
        return None
    end, code = min(found)
    return code.strip("\n"), action[:end]


class PythonTool:
    """Offers `run_python` to the agent: `<python>code</python>` in, the program's output out.

    `fenced=False` accepts only `<python>` tags, leaving ```python blocks to the env (the code env
    reads its final answer from one).
    """

    name = "python"
    blocking = True

    def __init__(self, limits: SandboxLimits = SandboxLimits(), fenced: bool = True):
        self.limits = limits
        self.fenced = fenced

    def instruction(self) -> str:
        return (
            "python: run Python code in a sandbox and see what it prints. Write the code between "
            "<python> and </python>; only printed output is returned, there is no network, and "
            f"each run is limited to {self.limits.timeout_s:g} s and {self.limits.memory_mb} MiB."
        )

    def parse(self, action: str) -> tuple[str, str] | None:
        if not self.fenced:
            tagged = first_tagged(action, "python")
            return None if tagged is None else (tagged[0].strip("\n"), action[: tagged[2]])
        return extract_code(action)

    def run(self, code: str) -> str:
        if not code.strip():
            return "Code execution result: [no code given]\n"
        return "Code execution result: " + run_python(code, self.limits).summary()
