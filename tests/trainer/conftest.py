"""Fixtures of the trainer tests: daemon children that are always stopped."""

import contextlib
import signal
import subprocess

import pytest

from tests.trainer.proc import TrainerProcess


@pytest.fixture
def trainer_process(tmp_path):
    """Factory of TrainerProcess children; every one still running at teardown is killed."""
    made: list[TrainerProcess] = []

    def make(cfg: dict, **kw) -> TrainerProcess:
        proc = TrainerProcess(tmp_path, cfg, **kw)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()


@pytest.fixture
def torchrun_job(trainer_process):
    """`trainer_process` for torchrun jobs: a job still running at teardown gets SIGTERM, so that
    torchrun's agent stops its workers (they run in sessions of their own: a SIGKILL to torchrun
    alone would leave them waiting in a collective)."""
    made = []

    def make(cfg: dict, argv: tuple, **kw):
        job = trainer_process(cfg, argv=argv, **kw)
        made.append(job)
        return job

    yield make
    for job in made:
        if job.proc is not None and job.proc.poll() is None:
            job.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                job.wait(90)
