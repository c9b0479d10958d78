"""The `openai` backend's failures: each names the server and the request, and is counted."""

import pytest
from fake_sglang import FakeSGLang

from engine.backends import (
    OpenAIBackend,
    OpenAIConfig,
    Request,
    ServerUnavailable,
    SGLangBackend,
    SGLangConfig,
    Unsupported,
)


async def test_refused_connection_names_server_and_request():
    async with FakeSGLang() as s:
        url = s.url
    async with OpenAIBackend(OpenAIConfig(url=url)) as o:
        with pytest.raises(ServerUnavailable, match=f"server {url}, request gone-1"):
            async for _ in o.generate(Request(input_ids=[1], request_id="gone-1")):
                pass
        assert o.stats()["errors_connection"] == 1 and await o.health() == {url: False}


async def test_sglang_client_with_every_server_down_says_so():
    async with FakeSGLang() as s:
        url = s.url
    async with SGLangBackend(SGLangConfig(urls=[url], health_interval_s=60)) as b:
        with pytest.raises(ServerUnavailable, match=f"server {url}, request gone-2"):
            async for _ in b.generate(Request(input_ids=[1], request_id="gone-2")):
                pass
        with pytest.raises(ServerUnavailable, match="no healthy server among 1"):
            async for _ in b.generate(Request(input_ids=[1], request_id="gone-3")):
                pass


async def test_operations_the_openai_api_lacks_are_unsupported():
    async with OpenAIBackend(OpenAIConfig()) as o:
        with pytest.raises(Unsupported, match="OpenAIBackend cannot update weights from disk"):
            await o.update_weights_from_disk("/x", "1")
        with pytest.raises(Unsupported, match="cannot pause"):
            await o.pause()
