"""Child processes of `tidal run`: started so that none outlives the parent, stopped in order, watched.

The invariant: no child of `tidal run` outlives it, however it ends.
- Each child runs with PR_SET_PDEATHSIG = SIGKILL (Linux, through prctl): when the parent dies, even
  by SIGKILL, the kernel kills the child. The parent may die between fork and prctl, so the child
  then checks that its parent is still the process that forked it, and exits at once if not.
  The death signal follows the *thread* that forked, so children are started from the main thread.
- Each child leads a process group of its own: a terminal's Ctrl-C reaches the parent alone, which
  stops the children in reverse start order (the engine drains while the trainer and the server are
  still there), and the stop signal reaches the child's own subprocesses too.
- Stopping is staged: SIGTERM to the child's group, wait up to a deadline, then SIGKILL to the group.
- A child's own subprocesses are not covered by the death signal (it is not inherited); the guard
  (engine/guard.py, `Guard`), a process outside the parent's tree of signals, records each child's
  tree and kills what is left of it when the parent's pipe to it closes.
- A child's stdout and stderr go to a log file, never to a pipe: a child never blocks on a parent
  that stopped reading, and its log outlives it (the parent quotes its tail when it dies).

    child = Child("trainer", [sys.executable, "-m", "tidal", "trainer", "trainer.toml"], Path("trainer.log"))
    child.start()
    ...
    child.stop(deadline_s=60)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["Child", "Guard", "describe_exit", "pdeathsig_supported"]

_PR_SET_PDEATHSIG = 1
"""prctl option (linux/prctl.h): the signal this process gets when its parent dies."""

_LIBC = None
if sys.platform.startswith("linux"):  # loaded here, in the parent: nothing is loaded after fork
    try:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        _LIBC = None

POLL_S = 0.05
"""How often `stop` looks whether the child has exited while it waits."""


def pdeathsig_supported() -> bool:
    """Whether children can be tied to the parent's life (Linux with a loadable libc)."""
    return _LIBC is not None


def _tie_to(parent: int) -> Callable[[], None]:
    """The preexec function of a child of `parent`: die with it. Runs between fork and exec, so it
    only calls prctl and getppid (no allocation, no imports)."""

    def preexec() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def describe_exit(code: int | None) -> str:
    """`returncode` in words: "exit code 2", "killed by SIGKILL", "running"."""
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Child:
    """One supervised child process, restartable; its output appends to `log_path`."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = None if env is None else dict(env)
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        """Times started (1 after the first start; a restart adds one)."""
        self.log_offset = 0
        """Size of the log when the latest start began: what this start wrote follows it."""

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        """Start (or restart) the child; a header line in the log marks each start."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log_path, "ab") as log:
            header = f"=== tidal run: {self.name} start {self.starts} at {time.strftime('%Y-%m-%d %H:%M:%S')}: " \
                     f"{' '.join(self.argv)}\n"
            log.write(header.encode())
            log.flush()
            self.log_offset = log.tell()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                cwd=self.cwd, process_group=0, preexec_fn=_tie_to(os.getpid()),
            )

    def poll(self) -> int | None:
        """The exit code (negative: the signal) once the child has exited, else None."""
        return None if self.proc is None else self.proc.poll()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the child's process group (the child and the subprocesses it started)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, deadline_s: float, *, abandon: Callable[[], bool] = lambda: False) -> int | None:
        """SIGTERM, wait up to `deadline_s` (or until `abandon()` says to stop waiting), then SIGKILL;
        the group is killed in the end either way, so no subprocess of the child lingers. Returns the
        exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            self.signal_group(signal.SIGCONT)  # a stopped child (SIGSTOP, a debugger) acts on it too
            deadline = time.monotonic() + deadline_s
            while self.proc.poll() is None and time.monotonic() < deadline and not abandon():
                time.sleep(POLL_S)
        self.kill()
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL the child's group at once and reap the child."""
        if self.proc is None:
            return None
        self.signal_group(signal.SIGKILL)
        self.proc.wait()
        return self.proc.returncode

    def output(self, *, this_start: bool = True) -> str:
        """What the child wrote (since its latest start, or the whole log)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset if this_start else 0)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        """The last `lines` lines the child wrote since its latest start."""
        try:
            size = self.log_path.stat().st_size
            with open(self.log_path, "rb") as f:
                start = max(self.log_offset, size - 64 * 1024)
                f.seek(start)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Guard:
    """This process's guard (engine/guard.py): started before any child, closed after the last one.

    It runs in a session of its own (a terminal's signals and a kill of this process group miss it)
    and without the death signal: it must outlive this process to clean up after it."""

    def __init__(self, ready_timeout_s: float = 60.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tidal.engine.guard"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        # No child may start before the guard listens: one killed with the parent in the meantime
        # would leave its subprocesses to a guard that never saw them.
        ready, _, _ = select.select([self.proc.stdout], [], [], ready_timeout_s)
        said = self.proc.stdout.readline() if ready else b""
        self.proc.stdout.close()
        if said != b"ready\n":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the guard (python -m tidal.engine.guard) did not start within {ready_timeout_s:g} s "
                               f"(it said {said!r}, {describe_exit(self.proc.returncode)})")

    def watch(self, child: Child) -> None:
        """Guard `child` (just started) and what it starts."""
        try:
            self.proc.stdin.write(f"{child.pid}\n".encode())
            self.proc.stdin.flush()
        except OSError:  # the guard is gone: the death signal still covers the children themselves
            pass

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the pipe: the guard kills whatever it recorded that still runs, and exits."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
