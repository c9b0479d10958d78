"""First code to run inside the Python sandbox child: apply limits, then run the agent's file.

Run as `python -I -S sandbox_boot.py MEMORY_BYTES CPU_SECONDS FILE_BYTES CODE_PATH [HIDDEN_DIR...]` by `tidal.envs.tools.python.run_python`. It
uses the stdlib only and is the first code the child runs, so the limits hold before any import the
agent's code triggers. `-S` skips `site` (its .pth processing is 4/5 of Python's start-up time); the
boot adds the interpreter's site-packages to `sys.path` itself, so installed packages (numpy, sympy)
still import.

What it enforces on itself before the agent's code runs (the parent adds the wall-clock kill and,
where the kernel allows, an empty network namespace):
- address space (RLIMIT_AS) so a memory hog gets MemoryError instead of the machine's memory;
- CPU seconds (RLIMIT_CPU) as a backstop to the parent's wall-clock timeout;
- bytes any one file may grow to (RLIMIT_FSIZE), which also caps captured stdout/stderr;
- an audit hook that refuses sockets, new processes and signals, so without a network namespace the
  code still cannot open a connection, cannot start a process that would run without the hook, and
  cannot signal the process that started it (the engine, or its env worker);
  the same hook refuses writes, deletes and renames outside the temporary working directory, and
  reads under `hidden_dirs` (the parent passes the tidal `envs` package, where tasks, their tests
  and reference solutions live, so a policy cannot learn to read the answers).
"""

import os
import resource
import site
import sys

_BLOCKED_EVENTS = {
    "socket.__new__": "network access",
    "socket.connect": "network access",
    "socket.bind": "network access",
    "socket.getaddrinfo": "network access",
    "socket.sendto": "network access",
    "subprocess.Popen": "starting processes",
    "os.system": "starting processes",
    "os.exec": "starting processes",
    "os.posix_spawn": "starting processes",
    "os.fork": "starting processes",
    "os.forkpty": "starting processes",
    "pty.spawn": "starting processes",
    "os.kill": "signalling processes",
    "os.killpg": "signalling processes",
    "signal.pthread_kill": "signalling processes",
}

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                "os.link", "os.truncate", "os.utime", "shutil.rmtree"}
_workdir = os.path.realpath(os.getcwd())
_hidden: list[str] = []
"""Directories the code may not even read (the env's own package: its tasks, tests and solutions)."""


def _under(path, root: str) -> bool:
    full = os.path.realpath(os.fsdecode(path))
    return os.path.commonpath([full, root]) == root


def _outside(path) -> bool:
    return isinstance(path, str | bytes | os.PathLike) and not _under(path, _workdir)


_readable = [os.path.realpath(p) for p in (_workdir, sys.prefix, sys.base_prefix, sys.exec_prefix)]
"""Stay readable when a hidden directory contains them (a task file in /tmp, a venv in the repo);
a hidden directory inside one of them (the envs package in site-packages) stays hidden."""


def _hidden_path(path) -> bool:
    if not isinstance(path, str | bytes | os.PathLike):
        return False
    return any(
        _under(path, root) and not any(_under(path, ok) and _under(ok, root) for ok in _readable) for root in _hidden
    )


def _refuse(event: str, args: tuple) -> None:
    what = _BLOCKED_EVENTS.get(event)
    if what is not None:
        raise PermissionError(f"sandbox: {what} is not allowed ({event})")
    if event == "open":
        path, mode, flags = args
        writes = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & _WRITE_FLAGS)
        if writes and _outside(path):
            raise PermissionError(f"sandbox: writing outside the working directory: {path!r}")
        if _hidden_path(path):
            raise PermissionError(f"sandbox: reading {path!r} is not allowed")
    elif event in _PATH_EVENTS and any(_outside(a) for a in args[:2]):
        raise PermissionError(f"sandbox: {event} outside the working directory: {args[:2]!r}")


def _limit(kind: int, value: int) -> None:
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def _print_without_sandbox_frames(exc: BaseException) -> None:
    """Print the traceback as if main.py had been run directly: no frames of this file."""
    import traceback  # only on error: importing it costs a noticeable part of start-up

    report = traceback.TracebackException.from_exception(exc)
    report.stack = traceback.StackSummary.from_list([f for f in report.stack if f.filename != __file__])
    sys.stderr.write("".join(report.format()))


def main() -> int:
    memory_bytes, cpu_seconds, file_bytes = (int(a) for a in sys.argv[1:4])
    code_path, hidden_dirs = sys.argv[4], sys.argv[5:]
    with open(code_path, encoding="utf-8") as f:
        source = f.read()
    try:
        code = compile(source, "main.py", "exec")
    except SyntaxError as exc:
        import traceback

        sys.stderr.write("".join(traceback.format_exception_only(exc)))
        return 1
    _limit(resource.RLIMIT_AS, memory_bytes)
    _limit(resource.RLIMIT_CPU, cpu_seconds)
    _limit(resource.RLIMIT_FSIZE, file_bytes)
    _limit(resource.RLIMIT_CORE, 0)
    _hidden.extend(os.path.realpath(p) for p in hidden_dirs)
    sys.path.extend(p for p in site.getsitepackages() if p not in sys.path)
    sys.addaudithook(_refuse)
    sys.argv = ["main.py"]
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit:
        raise
    except BaseException as exc:  # the agent's error is its output: print it as Python would
        _print_without_sandbox_frames(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
