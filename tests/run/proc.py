"""`tidal run` as a real child process in tests, its run dir, and its process tree read from /proc."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomli_w
from tidal.bench.engine_child import merge_sections

ROOT = Path(__file__).resolve().parents[2]
FAKE_SGLANG = Path(__file__).resolve().parent / "fake_sglang"
NO_MATPLOTLIB = Path(__file__).resolve().parent / "no_matplotlib"
"""On PYTHONPATH, makes `import matplotlib` fail."""


def run_toml(model_dir, **sections) -> dict:
    """A short `tidal run` config on the tiny model, `sections` merged over it section by section."""
    cfg = {
        "max_steps": 3,
        "max_minutes": 0.0,
        "model": {"path": str(model_dir)},
        "engine": {"metrics": {"every_s": 0.5, "console": False}, "agent": {"type": "chat", "max_turns": 3,
                                                                             "max_new_tokens": 8}},
        "trainer": {"intake": {"batch_size": 8, "group_size": 4}, "checkpoint": {"every_steps": 0}},
        "console": {"mode": "lines", "every_s": 2.0},
        "plots": {"enabled": False},
        "restart": {"stop_timeout_s": 60.0, "ready_timeout_s": 180.0, "backoff_s": 0.2},
    }
    return merge_sections(cfg, sections)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of a process, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """Every living process below `pid`: pid -> start time (to tell a reused pid apart)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None and st[1] != "Z":
            children.setdefault(st[0], []).append(int(entry.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            st = _stat(child)
            if st is not None:
                found[child] = st[2]
                todo.append(child)
    return found


def survivors(procs: dict[int, int]) -> list[int]:
    """Those of `procs` still alive: same pid, same start time, not a zombie."""
    alive = []
    for pid, started in procs.items():
        st = _stat(pid)
        if st is not None and st[2] == started and st[1] != "Z":
            alive.append(pid)
    return alive


def wait_until(cond, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


class RunProcess:
    """One `python -m tidal run CONFIG --run-dir DIR` child."""

    def __init__(self, tmp: Path, cfg: dict, *, args=(), env=None, name: str = "run"):
        self.tmp = tmp
        self.run_dir = tmp / name
        self.config = tmp / f"{name}.toml"
        self.config.write_text(tomli_w.dumps(cfg))
        self.out = tmp / f"{name}.out"
        self.seen: dict[int, int] = {}
        """Every process seen below the run (`tree`): pid -> start time."""
        argv = [sys.executable, "-m", "tidal", "run", str(self.config), "--run-dir", str(self.run_dir), *args]
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})

    def tree(self) -> dict[int, int]:
        """The living processes below the run now (also remembered in `seen`)."""
        found = descendants(self.proc.pid)
        self.seen.update(found)
        return found

    def events(self, name: str | None = None, **match) -> list[dict]:
        rows = read_jsonl(self.run_dir / "run.jsonl")
        return [r for r in rows if (name is None or r.get("event") == name)
                and all(r.get(k) == v for k, v in match.items())]

    def steps(self) -> list[dict]:
        return [r for r in read_jsonl(self.run_dir / "metrics" / "trainer.jsonl") if r.get("event") == "step"]

    def child_pid(self, name: str) -> int:
        return int(self.events("started", child=name)[-1]["pid"])

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def logs(self) -> str:
        parts = [self.output()[-3000:]]
        for log in sorted((self.run_dir / "logs").glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)

    def wait_for(self, cond, timeout: float, what: str):
        def check():
            if self.proc.poll() is not None:
                raise AssertionError(f"tidal run exited with {self.proc.returncode} while waiting for {what}:\n"
                                     f"{self.logs()}")
            return cond()
        try:
            return wait_until(check, timeout, what)
        except AssertionError as exc:
            if "timed out" in str(exc):
                raise AssertionError(f"{exc}\n{self.logs()}") from None
            raise

    def wait(self, timeout: float = 180.0) -> int:
        """The exit code; a run still going after `timeout` fails the test with its logs."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"tidal run still running after {timeout:g} s:\n{self.logs()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
