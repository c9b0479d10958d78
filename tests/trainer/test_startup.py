"""`tidal trainer` start-up failures are one line on stderr and exit code 2 (as `tidal serve`'s and `tidal engine`'s)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("make", "expected"), [
    (lambda tmp: tmp / "missing", "not found: no such directory"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "has no config.json"),
])
def test_a_model_path_that_is_not_a_checkpoint_is_one_line(tmp_path, make, expected):
    path = make(tmp_path)
    out = subprocess.run([sys.executable, "-m", "tidal", "trainer", "--set", f"learner.model.path={path}",
                          "--set", "intake.endpoint=tcp://127.0.0.1:0", "--set", "intake.status_endpoint=tcp://127.0.0.1:0",
                          "--set", f"metrics.jsonl={tmp_path / 'm.jsonl'}", "--set", "metrics.console=false"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tidal trainer: ") and expected in lines[0], out.stderr


def test_debug_shows_the_traceback_above_the_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tidal", "trainer", "--debug",
                          "--set", f"learner.model.path={tmp_path / 'missing'}"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback (most recent call last)" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("tidal trainer: learner.model.path: model path")
