"""Fixtures of the `tidal run` tests: run children that never outlive a test, whatever it asserts."""

import contextlib
import os
import signal
import subprocess

import pytest

from tests.run.proc import RunProcess, survivors

STOP_S = 120.0
"""How long a run left running by a failed test gets to stop its children in order."""


@pytest.fixture
def runs(tmp_path):
    """Factory of RunProcess children. At teardown one still running gets SIGTERM (it stops its children,
    their process groups included), then SIGKILL, and so does any process seen below it that is still
    alive: a failing test must not leave a server or a trainer behind."""
    made: list[RunProcess] = []

    def make(cfg: dict, **kw) -> RunProcess:
        run = RunProcess(tmp_path, cfg, **kw)
        made.append(run)
        return run

    yield make
    for run in made:
        if run.proc.poll() is None:  # a test that failed midway: stop it as a user would, then kill
            run.tree()
            run.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.proc.wait(STOP_S)
        run.kill()
        for pid in survivors(run.seen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
