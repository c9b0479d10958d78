"""The engine daemon as a measured child process, for the engine benches (bench/engine.py, bench/async_vs_sync.py).

`EngineChild` runs `python -m tidal engine CONFIG` as the user would, waits for its `ready` event and
reads what the benches measure from outside, so nothing in the engine changes for being measured:
its CPU time (utime + stime of /proc/PID/stat, all its threads), its resident memory (VmRSS of
/proc/PID/status), how long its event-loop thread waited for a CPU (/proc/PID/schedstat: on a shared
machine, lag that is not the engine's own) and its metrics JSONL, read incrementally. `tokenizer_dir` writes the model
directory the engine renders conversations with: the tiny byte-level tokenizer and its chat template
(engine/reference/tiny.py), no weights; a simulated server accepts it as a weights path too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

__all__ = ["EngineChild", "engine_config", "merge_sections", "tokenizer_dir", "proc_cpu_s", "proc_rss_mib", "proc_runqueue_wait_s"]

_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) the process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 onwards
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime: fields 14 and 15


def proc_runqueue_wait_s(pid: int) -> float:
    """Seconds the process's main thread (the event loop's) has waited for a CPU while runnable: lag
    that comes from other processes on the machine, not from the loop's own work."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def proc_rss_mib(pid: int) -> float:
    """Resident memory of the process now, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def tokenizer_dir(path: Path) -> Path:
    """The tiny byte-level tokenizer and chat template saved under `path` (built once, then reused)."""
    if not (path / "tokenizer.json").is_file():
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from tidal.engine.reference.tiny import build_tokenizer

        build_tokenizer().save_pretrained(path)
    return path


def merge_sections(cfg: dict, sections: dict) -> dict:
    """`cfg` with `sections` over it: a dict with no `type` key merges into the section it names, anything
    else (a tagged union's variant, a list, a value) replaces it."""
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(name), dict) and "type" not in values:
            cfg[name] = {**cfg[name], **values}
        else:
            cfg[name] = values
    return cfg


def engine_config(model_dir: Path, server_url: str, endpoints: dict, workdir: Path, **sections) -> dict:
    """An engine config against one server and the trainer at `endpoints`; `sections` update it.

    A section given as a dict with no `type` key merges into the default one; anything else replaces it.
    """
    cfg = {
        "model": {"path": str(model_dir), "max_context": 32768},
        "tasks": [{"env": "synthetic:Turns-v0", "kwargs": {"turns": 3}}],
        "backend": {"type": "sglang", "urls": [server_url], "health_interval_s": 5.0},
        "agent": {"type": "chat", "max_turns": 64, "max_new_tokens": 256, "max_episode_tokens": 1 << 20},
        "sampling": {"seed": 0},
        "rollout": {"group_size": 8, "max_concurrent": 256},
        "trainer": {**endpoints, "spool_dir": str(workdir / "spool"), "window": 1 << 16, "max_spool_mb": 1 << 14},
        "metrics": {"jsonl": str(workdir / "engine.jsonl"), "every_s": 0.5, "console": False},
    }
    return merge_sections(cfg, sections)


class EngineChild:
    """One `python -m tidal engine` child under `workdir`; a context manager that kills it on exit."""

    def __init__(self, workdir: Path, cfg: dict, name: str = "engine"):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / f"{name}.toml"
        self.config.write_text(tomli_w.dumps(cfg))
        self.jsonl = Path(cfg["metrics"]["jsonl"])
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self._records: list[dict] = []
        self._offset = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> dict:
        """Launch and wait for the `ready` event; returns it."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tidal", "engine", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = [r for r in self.records() if r.get("event") == "ready"]
            if ready:
                return ready[0]
            if self.proc.poll() is not None:
                raise RuntimeError(f"tidal engine exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"tidal engine not ready after {timeout}s:\n{self.log()}")

    def records(self) -> list[dict]:
        """Every complete JSONL record so far (read incrementally)."""
        if self.jsonl.exists():
            with open(self.jsonl, "rb") as f:
                f.seek(self._offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            self._offset += end
            self._records += [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        return self._records

    def metrics(self) -> list[dict]:
        """The periodic metrics records (not events)."""
        return [r for r in self.records() if "engine/episodes_started" in r and "event" not in r]

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def rss_mib(self) -> float:
        return proc_rss_mib(self.pid)

    def runqueue_wait_s(self) -> float:
        return proc_runqueue_wait_s(self.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGKILL, timeout: float = 60.0) -> int | None:
        """Signal the child (SIGKILL by default) and wait for it; returns its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> EngineChild:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
