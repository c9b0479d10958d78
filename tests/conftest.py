"""Shared fixtures: a tiny model checkpoint built once per session (see engine/reference/tiny.py)."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path of a 2-layer random Llama + byte tokenizer saved with save_pretrained."""
    from engine.reference.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
