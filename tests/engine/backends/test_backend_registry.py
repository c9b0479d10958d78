"""Backends chosen by name: built-ins, a third-party package found through its `tidal.backends` entry
point (tests/fixtures/example_backend, loaded exactly as an installed distribution), config errors."""

import math
from pathlib import Path

import msgspec
import pytest
from tidal.engine.backends import (
    BackendConfig,
    OpenAIBackend,
    PluginConfig,
    Request,
    Sampling,
    SGLangBackend,
    SGLangConfig,
    available_backends,
    create_backend,
    load_backend,
)
from tidal.protocol.config import Strict, load_config
from tidal.protocol.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "fixtures" / "example_backend"


class EngineSection(Strict):
    """A daemon config with a backend section, as the engine's has."""

    backend: BackendConfig = msgspec.field(default_factory=SGLangConfig)


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))


def test_builtins_are_always_available():
    assert load_backend("sglang") is SGLangBackend and load_backend("openai") is OpenAIBackend
    assert {"sglang", "openai"} <= set(available_backends())


async def test_third_party_backend_is_found_through_its_entry_point_and_generates(example, tmp_path):
    assert available_backends()["echo"] == "tidal_example_backend:EchoBackend"
    toml = tmp_path / "engine.toml"
    toml.write_text('[backend]\ntype = "plugin"\nname = "echo"\noptions = { vocab_size = 4 }\n')
    backend = create_backend(load_config(EngineSection, toml).backend)
    assert type(backend).__name__ == "EchoBackend" and backend.cfg.vocab_size == 4
    async with backend as b:
        chunks = [c async for c in b.generate(Request(input_ids=[3, 4, 5], request_id="e",
                                                      sampling=Sampling(max_new_tokens=4)))]
        assert await b.weight_version() == {"echo": 0}
        assert await b.update_weights_from_disk("/ckpt", 7) == {"echo": 7}
    assert [t for c in chunks for t in c.token_ids] == [3, 4, 5, 3]
    assert {c.weight_version for c in chunks} == {0}
    assert chunks[0].logprobs == [pytest.approx(-math.log(4))]
    assert (chunks[-1].finish.reason, chunks[-1].finish.completion_tokens) == ("length", 4)


async def test_third_party_backend_abort(example):
    b = create_backend(PluginConfig(name="echo", options={"delay_s": 0.001}))
    got = []
    async for chunk in b.generate(Request(input_ids=[1], request_id="x", sampling=Sampling(max_new_tokens=10**6))):
        got += chunk.token_ids
        if len(got) == 2:
            await b.abort("x")
        last = chunk
    assert last.finish.reason == "abort" and len(got) == 2


def test_builtin_chosen_by_type_tag(tmp_path):
    toml = tmp_path / "engine.toml"
    toml.write_text('[backend]\ntype = "sglang"\nurls = ["http://127.0.0.1:1", "http://127.0.0.1:2"]\n')
    backend = create_backend(load_config(EngineSection, toml).backend)
    assert isinstance(backend, SGLangBackend)
    assert [s.url for s in backend.router.servers] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert isinstance(create_backend(load_config(EngineSection, overrides=["backend.type=openai"]).backend),
                      OpenAIBackend)


def test_plugin_options_are_validated_against_its_config_type(example):
    with pytest.raises(ConfigError, match=r"backend 'echo' options: Expected `int` >= 2 - at `\$.vocab_size`"):
        create_backend(PluginConfig(name="echo", options={"vocab_size": 1}))
    with pytest.raises(ConfigError, match="unknown field `vocab`"):
        create_backend(PluginConfig(name="echo", options={"vocab": 3}))


def test_unknown_type_and_unknown_field_fail_at_load():
    with pytest.raises(ConfigError, match="backend"):
        load_config(EngineSection, overrides=["backend.type=vllm"])
    with pytest.raises(ConfigError, match="url"):
        load_config(EngineSection, overrides=["backend.url=http://x"])  # sglang takes `urls`


def test_server_urls_are_checked_at_load():
    with pytest.raises(ConfigError, match=r"urls\[1\]: expected a base URL like http://127.0.0.1:30000, got '127.0.0.1:30001'"):
        load_config(EngineSection, overrides=['backend.urls=["http://127.0.0.1:30000", "127.0.0.1:30001"]'])
    with pytest.raises(ConfigError, match="each server once"):
        load_config(EngineSection, overrides=['backend.urls=["http://a:1", "http://a:1"]'])
    with pytest.raises(ConfigError, match=r"urls\[0\]: expected a base URL"):
        load_config(EngineSection, overrides=["backend.type=openai", 'backend.urls=["localhost"]'])


def test_unregistered_broken_and_wrong_entry_points_name_the_problem(monkeypatch, tmp_path):
    dist = tmp_path / "bogus-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bogus\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[tidal.backends]\nnotabackend = json:dumps\nmissing = no_such_module_here:Backend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"'nope' is not registered .*available: \[.*'sglang'"):
        load_backend("nope")
    with pytest.raises(ConfigError, match="json:dumps.*not a subclass of tidal.engine.backends.Backend"):
        load_backend("notabackend")
    with pytest.raises(ConfigError, match="no_such_module_here:Backend.*cannot be loaded"):
        load_backend("missing")
