"""bench/report.py progress: a bench says on stderr when it starts, that it still runs, and when it ends."""

import io
import subprocess
import sys
import threading

import pytest
from tidal.bench.report import case, running


class Lines(io.StringIO):
    """A stream a test can wait on: `seen` is set once `marker` was written."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker, self.seen = marker, threading.Event()

    def write(self, text: str) -> int:
        if self.marker in text:
            self.seen.set()
        return super().write(text)


def test_running_beats_until_the_bench_ends():
    out = Lines(": running, ")
    with running("tidal bench x --quick", heartbeat_s=0.01, file=out):
        assert out.seen.wait(60), "a heartbeat while the bench runs"
    lines = out.getvalue().splitlines()
    assert lines[0] == "tidal bench x --quick: started"
    assert lines[1].startswith("tidal bench x --quick: running, ")
    assert lines[-1].startswith("tidal bench x --quick: finished in ") and lines[-1].endswith(" s")


def test_a_failed_bench_says_so_and_a_case_has_two_lines():
    out = io.StringIO()
    with pytest.raises(RuntimeError), running("tidal bench x", file=out):
        raise RuntimeError("boom")
    assert out.getvalue().splitlines()[-1].startswith("tidal bench x: failed after ")
    out = io.StringIO()
    with case("envs", "games at 1024 envs", file=out):
        pass
    first, last = out.getvalue().splitlines()
    assert first == "tidal bench envs: games at 1024 envs ..."
    assert last.startswith("tidal bench envs: games at 1024 envs done in ")


def test_tidal_bench_help_has_no_progress_lines():
    out = subprocess.run([sys.executable, "-m", "tidal", "bench", "transport", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--quick" in out.stdout and out.stderr == ""
