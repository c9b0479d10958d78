"""`python -m tidal.engine.guard`: kills what `tidal run`'s children leave behind when it dies.

PR_SET_PDEATHSIG (engine/supervise.py) takes down the direct children of a SIGKILLed `tidal run`,
but not their own subprocesses: a server's workers, torchrun's ranks (in sessions of their own).
Those would be orphans. The guard is a small process that `tidal run` starts first, with a pipe on
its stdin, on which `tidal run` writes the pid of each child it starts, one per line (each child
leads a process group of its own). The guard ignores the signals a terminal sends (Ctrl-C, hang-up:
`tidal run` handles those and stops its children in order), says `ready` on stdout (`tidal run`
starts no child before that, so no child runs unwatched while the guard's Python starts), and every
`SCAN_S` seconds, or when a line comes, it records each child and every process below it, with
their start times, and which of the children's process groups still have members. A child that
died before its line was read still names its group: its subprocesses keep that group id.

When the pipe closes, at `tidal run`'s clean end or at its death (the kernel closes the pipe then),
it SIGKILLs every recorded process that is still the same process (same pid, same start time: a
reused pid is never hit) and every member of those process groups, then exits. A group keeps its
id after its leader died, so a subprocess started just before the end dies with its group; only one
that left its child's group (a new session) less than `SCAN_S` before the end can escape. What
`tidal run` starts otherwise (a library's helper process) is not the guard's. Stdlib only, so it
starts in milliseconds.
"""

import os
import select
import signal
import sys
from pathlib import Path
from typing import NamedTuple

__all__ = ["Proc", "snapshot", "below", "main", "SCAN_S"]

SCAN_S = 0.5
"""Period of the guard's scans of the process table."""


class Proc(NamedTuple):
    ppid: int
    pgid: int
    state: str
    """One letter, as ps shows it; "Z" is a zombie (dead, not yet reaped)."""
    start: int
    """Start time in clock ticks after boot: with the pid, names one process for good."""


def _stat(pid: int) -> Proc | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return Proc(int(fields[1]), int(fields[2]), fields[0].decode(), int(fields[19]))


def snapshot() -> dict[int, Proc]:
    """Every living (not zombie) process: pid -> Proc."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (p := _stat(int(entry))) is not None and p.state != "Z":
            procs[int(entry)] = p
    return procs


def below(procs: dict[int, Proc], roots) -> dict[int, int]:
    """Every process in `procs` below one of `roots`: pid -> start time."""
    children: dict[int, list[int]] = {}
    for pid, p in procs.items():
        children.setdefault(p.ppid, []).append(pid)
    found: dict[int, int] = {}
    todo = list(roots)
    while todo:
        for pid in children.get(todo.pop(), ()):
            if pid not in found:
                found[pid] = procs[pid].start
                todo.append(pid)
    return found


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


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
    groups: set[int] = set()
    """The children's process groups (a child's pid is its group's id) that had a member at the latest
    scan. An emptied group is dropped at once: its id may be reused only once no process has it."""
    known: dict[int, int] = {}
    """The children and everything below them seen so far, while they live: pid -> start time."""
    partial = b""
    os.write(1, b"ready\n")
    while True:
        readable, _, _ = select.select([0], [], [], SCAN_S)
        data = os.read(0, 4096) if readable else b""
        procs = snapshot()
        if readable and not data:  # the pipe closed: tidal run ended or died
            _kill([pid for pid, start in known.items() if pid in procs and procs[pid].start == start])
            _kill([pid for pid, p in procs.items() if p.pgid in groups])
            return 0
        *lines, partial = (partial + data).split(b"\n")
        for line in lines:
            if line.strip().isdigit():
                groups.add(int(line))
                if int(line) in procs:
                    roots[int(line)] = procs[int(line)].start
        roots = {pid: start for pid, start in roots.items() if pid in procs and procs[pid].start == start}
        known = {pid: start for pid, start in known.items() if pid in procs and procs[pid].start == start}
        known.update(roots)
        known.update(below(procs, roots))
        groups &= {p.pgid for p in procs.values()}


if __name__ == "__main__":
    sys.exit(main())
