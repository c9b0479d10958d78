"""The trainer daemon as a real child process (`python -m tidal.trainer CONFIG`) and its JSONL record."""

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


def trainer_toml(tmp: Path, model_dir, **sections) -> dict:
    """A small, fast trainer config under `tmp`, with `sections` merged over the defaults."""
    cfg = {
        "learner": {"model": {"path": str(model_dir), "dtype": "float32"}, "optim": {"lr": 1e-3}},
        "intake": {"endpoint": "tcp://127.0.0.1:0", "status_endpoint": "tcp://127.0.0.1:0", "batch_size": 4,
                   "group_size": 2, "max_staleness": 1},
        "checkpoint": {"dir": str(tmp / "ckpt"), "every_steps": 0},
        "publish": {"type": "disk", "dir": str(tmp / "weights")},
        "metrics": {"jsonl": str(tmp / "metrics.jsonl"), "console": False},
    }
    return merge_sections(cfg, sections)


async def served(http, url: str) -> tuple[list[float], str]:
    """Greedy logprobs of four tokens after a fixed prompt from a `tidal serve` at `url`, and its
    weight version: what changes when a publish lands."""
    body = {"input_ids": [40, 41, 42], "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}}
    async with http.post(f"{url}/generate", json=body) as resp:
        out = await resp.json()
    async with http.get(f"{url}/model_info") as resp:
        version = (await resp.json())["weight_version"]
    return [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]], version


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TrainerProcess:
    """One `python -m tidal.trainer` child; `start` waits for its `ready` record."""

    def __init__(self, tmp: Path, cfg: dict, *, argv=("-m", "tidal.trainer"), env=None, wrap=()):
        """`wrap`: a command line the child runs under (e.g. nsenter into a namespace)."""
        self.tmp = tmp
        self.wrap = list(wrap)
        self.config = tmp / "trainer.toml"
        self.config.write_text(tomli_w.dumps(cfg))
        self.jsonl = Path(cfg["metrics"]["jsonl"])
        self.argv = argv
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 120.0) -> dict:
        self.launch()
        return self.ready(timeout)

    def launch(self) -> None:
        """Start the child without waiting (overlap its start-up with the test's own work)."""
        self._seen_ready = len([r for r in records(self.jsonl) if r.get("event") == "ready"])
        self.starts += 1
        log = open(self.tmp / f"trainer-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [*self.wrap, sys.executable, *self.argv, str(self.config)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **(self.env or {})},
        )
        log.close()

    def ready(self, timeout: float = 120.0) -> dict:
        """Wait for the `ready` record of the child `launch` started; returns it (endpoints, version)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = [r for r in records(self.jsonl) if r.get("event") == "ready"]
            if len(ready) > self._seen_ready:
                return ready[-1]
            if self.proc.poll() is not None:
                raise AssertionError(f"trainer exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"trainer not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.output()[-4000:]

    def output(self) -> str:
        """All of the child's output (`log()` is its tail: torchrun's summary alone can fill it)."""
        return (self.tmp / f"trainer-{self.starts}.log").read_text(errors="replace")

    def ranks(self) -> dict[int, int]:
        """A torchrun child's workers, rank: pid (the agent's children, each in a session of its own,
        so a signal to the agent's process group does not reach them)."""
        found = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
                environ = (stat.parent / "environ").read_bytes().split(b"\0") if ppid == self.proc.pid else []
            except (OSError, ValueError):  # gone meanwhile, or not ours to read
                continue
            found |= {int(kv[5:]): int(stat.parent.name) for kv in environ if kv.startswith(b"RANK=")}
        return found

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
