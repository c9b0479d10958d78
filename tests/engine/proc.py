"""The engine daemon as a real child process (`python -m tidal engine CONFIG`) and its JSONL record."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomli_w
from tidal.bench.engine_child import merge_sections

from tests.trainer.proc import records


def engine_toml(tmp: Path, model_dir, server_url: str, trainer_ready: dict, **sections) -> dict:
    """A small engine config under `tmp` against one server and the trainer whose `ready` record is given."""
    cfg = {
        "model": {"path": str(model_dir), "max_context": 1024},
        "tasks": [{"env": "games:GuessTheNumber-v0", "kwargs": {"difficulty": "easy"}}],
        "backend": {"type": "sglang", "urls": [server_url], "health_interval_s": 0.5},
        "agent": {"type": "chat", "max_turns": 3, "max_new_tokens": 8},
        "sampling": {"seed": 0},
        "rollout": {"group_size": 2, "max_concurrent": 16},
        "trainer": {"endpoint": trainer_ready["endpoint"], "status_endpoint": trainer_ready["status_endpoint"],
                    "spool_dir": str(tmp / "spool"), "window": 256},
        "metrics": {"jsonl": str(tmp / "engine.jsonl"), "every_s": 0.5, "console": False},
    }
    return merge_sections(cfg, sections)


class EngineProcess:
    """One `python -m tidal engine` child; `start` waits for its `ready` event."""

    def __init__(self, tmp: Path, cfg: dict, name: str = "engine", env: dict | None = None, wrap=()):
        """`wrap`: a command line the child runs under (e.g. nsenter into a namespace)."""
        self.tmp = tmp
        self.env = env or {}
        self.wrap = list(wrap)
        self.name = name
        self.config = tmp / f"{name}.toml"
        self.config.write_text(tomli_w.dumps(cfg))
        self.jsonl = Path(cfg["metrics"]["jsonl"])
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 60.0) -> dict:
        seen = len(self.events("ready"))
        self.starts += 1
        log = open(self.tmp / f"{self.name}-{self.starts}.log", "wb")
        self.proc = subprocess.Popen([*self.wrap, sys.executable, "-m", "tidal", "engine", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = self.events("ready")
            if len(ready) > seen:
                return ready[-1]
            if self.proc.poll() is not None:
                raise AssertionError(f"engine exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"engine not ready after {timeout}s:\n{self.log()}")

    def events(self, name: str) -> list[dict]:
        return [r for r in records(self.jsonl) if r.get("event") == name]

    def last_metrics(self) -> dict:
        rows = [r for r in records(self.jsonl) if "engine/episodes_started" in r]
        return rows[-1] if rows else {}

    def log(self) -> str:
        return (self.tmp / f"{self.name}-{self.starts}.log").read_text(errors="replace")[-4000:]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"engine still running after {timeout}s; last metrics {self.last_metrics()}\n"
                                 f"{self.log()}") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
