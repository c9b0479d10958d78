"""Fixtures for the reference server tests: real `tidal serve` children on 127.0.0.1 port 0.

One server per test module (module scope) keeps the suite fast; helpers speak plain aiohttp so the
tests check the wire format itself, not a client library's reading of it.
"""

import pytest
from tidal.engine.reference.launch import ReferenceServer


@pytest.fixture(scope="module")
def model_server(tiny_model_dir):
    """The tiny model served with SGLang's default (cumulative) streaming and a prefix cache."""
    args = ["--set", "server.health_timeout_s=2", "--set", "model.prefix_cache_tokens=100000"]
    with ReferenceServer(tiny_model_dir, args=args) as srv:
        yield srv


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    """The same checkpoint loaded in the test process, for direct forward passes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)
