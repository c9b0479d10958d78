"""10,000 trajectories from two engine processes while the trainer process is SIGKILLed twice.

docs/architecture.md invariant 4: the checkpointing consumer (tests/protocol/_actors.py) must end up with every
trajectory exactly once, although the wire delivers some of them several times.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ACTORS = Path(__file__).with_name("_actors.py")
PER_ENGINE = 5000


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ACTORS), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _start_trainer(endpoint: str, state_dir: Path) -> subprocess.Popen:
    proc = _spawn("trainer", endpoint, str(state_dir))
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


class _Committed:
    """The ids in the consumer's durable batch files (each file read once)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.ids: dict[str, list[str]] = {}

    def count(self) -> int:
        for path in self.state_dir.glob("batch-*.json"):
            if path.name not in self.ids:
                self.ids[path.name] = json.loads(path.read_text())["ids"]
        return sum(map(len, self.ids.values()))


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.slow
def test_every_trajectory_exactly_once_across_two_trainer_kills(tmp_path):
    endpoint = f"ipc://{tmp_path}/trainer.sock"
    committed = _Committed(tmp_path)
    procs = []
    try:
        trainer = _start_trainer(endpoint, tmp_path)
        procs.append(trainer)
        engines = [_spawn("engine", endpoint, f"engine-{k}", str(PER_ENGINE)) for k in range(2)]
        procs.extend(engines)
        for threshold in (2000, 5500):
            _wait_for(lambda t=threshold: committed.count() >= t, 60, f"{threshold} committed")
            trainer.send_signal(signal.SIGKILL)
            trainer.wait()
            trainer = _start_trainer(endpoint, tmp_path)
            procs.append(trainer)
        stats = []
        for proc in engines:
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err
            stats.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    committed.count()
    ids = [i for batch in committed.ids.values() for i in batch]
    expected = {f"engine-{k}-{i}" for k in range(2) for i in range(PER_ENGINE)}
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} trajectories consumed twice"
    assert set(ids) == expected
    assert sum(s["acked"] for s in stats) == 2 * PER_ENGINE
    # The kills were real: both engines had to resend what a dead trainer had not committed.
    assert sum(s["resent"] for s in stats) > 0
