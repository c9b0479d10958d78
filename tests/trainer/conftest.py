"""Fixtures of the trainer tests: daemon children that are always stopped."""

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
