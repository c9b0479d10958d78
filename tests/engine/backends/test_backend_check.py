"""`check_backend` passes on every built-in backend and the example plugin, and names what a broken
backend gets wrong."""

import re
from pathlib import Path

import pytest
from fake_sglang import FakeSGLang
from tidal.engine.backends import (
    Backend,
    Chunk,
    Finish,
    OpenAIBackend,
    OpenAIConfig,
    PluginConfig,
    SGLangBackend,
    SGLangConfig,
    create_backend,
)
from tidal.engine.backends.check import BackendContractError, check_backend

EXAMPLE = Path(__file__).parents[2] / "fixtures" / "example_backend"


@pytest.mark.parametrize("kind", ["sglang-cumulative", "sglang-incremental", "openai"])
async def test_builtin_backends_keep_the_contract(kind):
    async with FakeSGLang(incremental=kind == "sglang-incremental", token_delay_s=0.001) as s:
        if kind == "openai":
            backend = OpenAIBackend(OpenAIConfig(urls=[s.url]))
        else:
            backend = SGLangBackend(SGLangConfig(urls=[s.url], health_interval_s=60))
        async with backend:
            await check_backend(backend)


async def test_example_plugin_keeps_the_contract(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    async with create_backend(PluginConfig(name="echo", options={"delay_s": 0.001})) as backend:
        await check_backend(backend)


class Broken(Backend):
    """Yields what `flaw` says is wrong."""

    config_type = SGLangConfig

    def __init__(self, flaw: str):
        self.flaw = flaw

    async def generate(self, request):
        match self.flaw:
            case "two_finishes":
                yield Chunk([5], [-0.1], 0, Finish(reason="length", completion_tokens=1))
                yield Chunk([6], [-0.1], 0, Finish(reason="length", completion_tokens=2))
            case "missing_logprob":
                yield Chunk([5, 6], [-0.1], 0, Finish(reason="length", completion_tokens=2))
            case "positive_logprob":
                yield Chunk([5], [0.5], 0, Finish(reason="length", completion_tokens=1))
            case "no_finish":
                yield Chunk([5], [-0.1], 0)
            case "short_length":
                yield Chunk([5], [-0.1], 0, Finish(reason="length", completion_tokens=1))
            case "string_version":  # the wire's spelling leaked through
                yield Chunk([5], [-0.1], "default", Finish(reason="length", completion_tokens=1))

    async def abort(self, request_id):
        pass

    async def close(self):
        pass


@pytest.mark.parametrize("flaw, rule", [
    ("two_finishes", "only the last chunk may carry a Finish"),
    ("missing_logprob", "each token needs exactly one logprob"),
    ("positive_logprob", "finite floats <= 0"),
    ("no_finish", "the last chunk must carry a Finish"),
    ("short_length", "a length finish means max_new_tokens=8 tokens"),
    ("string_version", "weight_version is the policy version, an int >= 0"),
])
async def test_broken_backend_is_named_with_the_rule_it_breaks(flaw, rule):
    with pytest.raises(BackendContractError, match=f"^Broken: .*{re.escape(rule)}"):
        await check_backend(Broken(flaw))


@pytest.mark.parametrize("reason", ["terminated", "drained", "timeout", ""])
def test_a_finish_takes_only_generation_endings(reason):
    """`Finish.reason` is the generation subset of the one vocabulary: an episode ending is refused."""
    with pytest.raises(ValueError, match=f"Finish.reason {reason!r} is not a generation ending"):
        Finish(reason=reason)
    assert [Finish(reason=r).reason for r in ("stop", "length", "abort")] == ["stop", "length", "abort"]
