"""Fixtures of the fault-injection suite: a `Pipeline` whose processes are all killed at teardown."""

import pytest

from tests.faults.pipeline import Pipeline


@pytest.fixture
def pipeline(tmp_path, tiny_model_dir):
    """Servers, trainer and engines of one test; whatever still runs at teardown is killed."""
    made = Pipeline(tmp_path, tiny_model_dir)
    yield made
    made.close()
