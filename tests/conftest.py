"""Shared fixtures: a tiny model checkpoint built once per session (see engine/reference/tiny.py)."""

import os

import pytest
from hypothesis import settings

# The suite is deterministic: property tests draw the same examples every run (CI must not flake on a
# lucky draw). Set TIDAL_HYPOTHESIS=explore to draw fresh examples when hunting for bugs.
settings.register_profile("deterministic", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile("explore" if os.environ.get("TIDAL_HYPOTHESIS") == "explore" else "deterministic")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path of a 2-layer random Llama + byte tokenizer saved with save_pretrained."""
    from tidal.engine.reference.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
