"""The `openai` backend: its failures name the server and the request and are counted; several
servers behind one client are routed like the `sglang` backend's (least-loaded, sticky per session),
and a request that fails mid-stream continues on another server from the tokens received."""

import asyncio

import pytest
from fake_sglang import FakeSGLang, token_at
from tidal.engine.backends import (
    BadResponse,
    OpenAIBackend,
    OpenAIConfig,
    Request,
    Sampling,
    ServerUnavailable,
    SGLangBackend,
    SGLangConfig,
    Unsupported,
)


async def test_refused_connection_names_server_and_request():
    async with FakeSGLang() as s:
        url = s.url
    async with OpenAIBackend(OpenAIConfig(urls=[url])) as o:
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


async def test_weight_version_from_sglang_metadata_is_an_int():
    """SGLang's /v1 stream names the version on its last chunk; earlier chunks carry the last one seen."""
    async with FakeSGLang(version="3") as s, OpenAIBackend(OpenAIConfig(urls=[s.url])) as o:
        first = [c async for c in o.generate(Request(input_ids=[1], request_id="a"))]
        second = [c async for c in o.generate(Request(input_ids=[1], request_id="b"))]
        s.version = "v7"
        with pytest.raises(BadResponse, match=f"{s.url} reports weight version 'v7'"):
            async for _ in o.generate(Request(input_ids=[1], request_id="c", sampling=Sampling(max_new_tokens=2))):
                pass
    assert [c.weight_version for c in first] == [0] * (len(first) - 1) + [3]
    assert {c.weight_version for c in second} == {3}


async def test_operations_the_openai_api_lacks_are_unsupported():
    async with OpenAIBackend(OpenAIConfig()) as o:
        with pytest.raises(Unsupported, match="OpenAIBackend cannot update weights from disk"):
            await o.update_weights_from_disk("/x", 1)
        with pytest.raises(Unsupported, match="cannot pause"):
            await o.pause()


PROMPT = [5, 6, 7]


def backend(*servers: FakeSGLang, **cfg) -> OpenAIBackend:
    cfg.setdefault("health_interval_s", 60.0)
    return OpenAIBackend(OpenAIConfig(urls=[s.url for s in servers], **cfg))


async def run(b: OpenAIBackend, rid: str, max_new_tokens: int = 5, session: str | None = None):
    chunks = [c async for c in b.generate(Request(input_ids=list(PROMPT), request_id=rid, session_key=session,
                                                  sampling=Sampling(max_new_tokens=max_new_tokens)))]
    return [t for c in chunks for t in c.token_ids], [lp for c in chunks for lp in c.logprobs], chunks


async def test_concurrent_requests_spread_over_servers_and_a_session_stays_on_its_server():
    async with (FakeSGLang(token_delay_s=0.02) as s1, FakeSGLang(token_delay_s=0.02) as s2,
                backend(s1, s2, balance="requests") as b):
        runs = await asyncio.gather(*(run(b, f"c{i}", session=f"traj-{i}") for i in range(4)))
        served = [chunks[-1].finish.server for _, _, chunks in runs]
        assert sorted(served) == sorted([s1.url, s1.url, s2.url, s2.url]), "least-loaded: two in flight each"
        for ids, _, _ in runs:
            assert ids == [token_at(PROMPT, i) for i in range(5)]
        # later turns of a session go back to its server, even while the other is idle
        for turn in range(3):
            _, _, chunks = await run(b, f"c0-turn{turn}", session="traj-0")
            assert chunks[-1].finish.server == served[0]
    assert len(s1.requests("/v1/completions")) + len(s2.requests("/v1/completions")) == 7


async def test_request_that_fails_mid_stream_continues_on_the_other_server_from_received_tokens():
    async with FakeSGLang() as s1, FakeSGLang() as s2, backend(s1, s2) as b:
        s1.faults["r"] = s2.faults["r"] = "drop"
        ids, logprobs, chunks = await run(b, "r", max_new_tokens=8)
        retried = next(req for s in (s1, s2) for req in s.requests("/v1/completions") if req["rid"] == "r@1")
        assert b.stats()["ejections"] == 1 and b.stats()["servers_healthy"] == 1
        # the ejected server gets nothing more; the healthy one takes every new request
        _, _, after = await run(b, "next")
        assert after[-1].finish.server == chunks[-1].finish.server
    first = [token_at(PROMPT, 0), token_at(PROMPT, 1)]
    assert retried["prompt"] == PROMPT + first and retried["max_tokens"] == 6
    assert ids == first + [token_at(PROMPT + first, i) for i in range(6)]
    assert logprobs == [-0.01, -0.02] + [-(i + 1) / 100 for i in range(6)]
    assert (chunks[-1].finish.reason, chunks[-1].finish.retries, chunks[-1].finish.completion_tokens) == (
        "length", 1, 8)
    assert b.stats()["retries"] == 1 and b.stats()["errors_connection"] == 1


async def test_a_5xx_moves_the_request_and_only_repeated_failures_eject():
    async with FakeSGLang() as s1, FakeSGLang() as s2, backend(s1, s2, eject_after=2) as b:
        s1.faults["r"] = s2.faults["r"] = "http_500"
        ids, _, chunks = await run(b, "r")
        assert ids == [token_at(PROMPT, i) for i in range(5)] and chunks[-1].finish.retries == 1
        assert b.stats()["servers_healthy"] == 2, "one 5xx is not enough to eject"


async def test_every_server_failing_raises_the_last_error_after_max_retries():
    async with FakeSGLang() as s1, FakeSGLang() as s2, backend(s1, s2, max_retries=1) as b:
        for s in (s1, s2):
            s.faults["r"] = "drop"
            s.faults["r@1"] = "drop"
        with pytest.raises(ServerUnavailable, match=r"request r@1"):
            await run(b, "r")
        assert b.stats()["retries"] == 1 and b.stats()["errors_connection"] == 2


async def test_ejected_server_is_readmitted_by_a_health_probe():
    async with FakeSGLang() as s1, FakeSGLang() as s2, backend(s1, s2, health_interval_s=0.05) as b:
        await b.start()
        s2.healthy = False
        async with asyncio.timeout(10):
            while len(b.router.healthy) != 1:
                await asyncio.sleep(0.02)
        _, _, chunks = await run(b, "while-ejected")
        assert chunks[-1].finish.server == s1.url
        s2.healthy = True
        async with asyncio.timeout(10):
            while len(b.router.healthy) != 2:
                await asyncio.sleep(0.02)
        assert b.stats()["readmissions"] == 1 and await b.health() == {s1.url: True, s2.url: True}
