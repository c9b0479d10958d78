"""Fixtures of the `tidal run` tests: run children that never outlive a test, whatever it asserts."""

import contextlib
import os
import signal

import pytest

from tests.run.proc import RunProcess, survivors


@pytest.fixture
def runs(tmp_path):
    """Factory of RunProcess children. At teardown each is SIGKILLed, and so is any process seen below
    it that is still alive (a failing test must not leave a server or a trainer behind)."""
    made: list[RunProcess] = []

    def make(cfg: dict, **kw) -> RunProcess:
        run = RunProcess(tmp_path, cfg, **kw)
        made.append(run)
        return run

    yield make
    for run in made:
        if run.proc.poll() is None:
            run.tree()
        run.kill()
        for pid in survivors(run.seen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
