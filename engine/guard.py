"""`python -m tidal.engine.guard`: kills what `tidal run`'s children leave behind when it dies.

PR_SET_PDEATHSIG (engine/supervise.py) takes down the direct children of a SIGKILLed `tidal run`,
but not their own subprocesses: a server's workers, torchrun's ranks (in sessions of their own).
Those would be orphans. The guard is a small process that `tidal run` starts first, with a pipe on
its stdin, on which `tidal run` writes the pid of each child it starts, one per line. The guard
ignores the signals a terminal sends (Ctrl-C, hang-up: `tidal run` handles those and stops its
children in order), and every `SCAN_S` seconds, or when a line comes, it records each child and
every process below it, with their start times. When the pipe closes, at `tidal run`'s clean end or
at its death (the kernel closes the pipe then), it SIGKILLs every recorded process still alive (the
same pid with the same start time, so a reused pid is never hit) and exits. A subprocess started
less than `SCAN_S` before the death may escape; everything older does not. What `tidal run` starts
otherwise (a library's helper process) is not the guard's. Stdlib only, so it starts in milliseconds.
"""

import os
import select
import signal
import sys
from pathlib import Path

__all__ = ["tree", "main", "SCAN_S"]

SCAN_S = 0.5
"""Period of the guard's scans of the process tree."""


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time in clock ticks) of `pid`, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0].decode(), int(fields[19])


def tree(root: int) -> dict[int, int]:
    """Every living process below `root`: pid -> start time."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None and st[1] != "Z":
            children.setdefault(st[0], []).append(int(entry))
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            if (st := _stat(pid)) is None:
                continue
            found[pid] = st[2]
            todo.append(pid)
    return found


def _kill(known: dict[int, int]) -> int:
    """SIGKILL each recorded process that is still the same process; returns how many."""
    killed = 0
    for pid, started in known.items():
        st = _stat(pid)
        if st is not None and st[2] == started and st[1] != "Z":
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        print("usage: python -m tidal.engine.guard  (stdin: a pipe on which each child's pid comes)",
              file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    roots: dict[int, int] = {}
    """The children `tidal run` named, while they run: pid -> start time."""
    known: dict[int, int] = {}
    partial = b""
    while True:
        readable, _, _ = select.select([0], [], [], SCAN_S)
        data = os.read(0, 4096) if readable else b""
        if readable and not data:  # the pipe closed: tidal run ended or died
            _kill(known)
            return 0
        *lines, partial = (partial + data).split(b"\n")
        for line in lines:
            if line.strip().isdigit() and (st := _stat(int(line))) is not None:
                roots[int(line)] = st[2]
        roots = {pid: started for pid, started in roots.items() if (st := _stat(pid)) and st[2] == started}
        known = {pid: started for pid, started in known.items() if _stat(pid) is not None}
        for pid, started in roots.items():
            known[pid] = started
            known.update(tree(pid))


if __name__ == "__main__":
    sys.exit(main())
