"""`backend.coalesce`: requests for one server made together go out as one batched streaming /generate
(docs/sglang.md §1.5), against the CPU reference server (`tidal serve`) over real HTTP."""

import asyncio
import socket

import aiohttp
import msgspec
import pytest
from tidal.engine.backends import Request, Sampling, SGLangBackend, SGLangConfig
from tidal.engine.backends.errors import RequestRejected
from tidal.engine.reference.launch import ReferenceServer

from tests.engine.backends.fake_sglang import FakeSGLang

pytest.importorskip("torch")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with ReferenceServer(tiny_model_dir) as srv:
        yield srv


def client(urls, **cfg) -> SGLangBackend:
    return SGLangBackend(SGLangConfig(urls=urls, health_interval_s=60.0, **cfg))


def request(i: int, **sampling) -> Request:
    sampling = {"temperature": 1.0, "seed": 100 + i, "max_new_tokens": 6, **sampling}
    return Request(input_ids=[30 + i, 31, 32 + 2 * i], request_id=f"r{i}", sampling=Sampling(**sampling))


async def collect(b: SGLangBackend, req: Request):
    chunks = [c async for c in b.generate(req)]
    return [t for c in chunks for t in c.token_ids], [lp for c in chunks for lp in c.logprobs], chunks[-1].finish


async def server_state(url: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(url + "/server_info") as resp:
        return msgspec.json.decode(await resp.read())["internal_states"][0]


async def test_coalesced_requests_get_what_each_would_get_alone(server):
    reqs = [request(i) for i in range(12)]
    async with client([server.url]) as alone:
        expected = [await collect(alone, r) for r in reqs]
    async with client([server.url], coalesce=8) as b:
        got = await asyncio.gather(*(collect(b, r) for r in reqs))
        stats = b.stats()
    for (ids, lps, finish), (want_ids, want_lps, want_finish) in zip(got, expected, strict=True):
        assert ids == want_ids and finish.reason == want_finish.reason
        assert lps == pytest.approx(want_lps, abs=1e-4)
    assert stats["batched"] == 12 and stats["batches"] == 2  # 8, then the 4 left, in one loop iteration
    assert stats["requests"] == 12 and stats.get("retries", 0) == 0


async def test_a_request_the_server_refuses_fails_alone_and_its_batch_mates_are_served(server):
    bad = Request(input_ids=[30, 10**6], request_id="bad", sampling=Sampling(max_new_tokens=4))
    async with client([server.url], coalesce=8) as b:
        results = await asyncio.gather(collect(b, request(0)), collect(b, bad), collect(b, request(1)),
                                       return_exceptions=True)
        stats = b.stats()
    assert isinstance(results[1], RequestRejected) and "outside the vocabulary" in str(results[1])
    assert [len(r[0]) for r in (results[0], results[2])] == [6, 6]
    assert stats["batches_refused"] == 1 and stats["batches"] == 1  # the batch of 3; then each alone


async def test_abort_reaches_one_request_of_a_batch(server):
    long = {"max_new_tokens": 300, "ignore_eos": True}
    async with client([server.url], coalesce=8) as b:
        async def aborted():
            tokens = []
            async for chunk in b.generate(request(0, **long)):
                tokens += chunk.token_ids
                if len(tokens) == len(chunk.token_ids):  # the first chunk: abort it now
                    await b.abort("r0")
                if chunk.finish is not None:
                    return len(tokens), chunk.finish.reason

        first, second, third = await asyncio.gather(aborted(), collect(b, request(1, **long)),
                                                    collect(b, request(2, **long)))
        assert b.stats()["batches"] == 1
    assert first[1] == "abort" and first[0] < 300
    assert [len(second[0]), second[2].reason] == [300, "length"] and len(third[0]) == 300


async def test_a_request_whose_reader_leaves_is_aborted_on_the_server(server):
    before = (await server_state(server.url))["num_aborted_reqs"]
    long = {"max_new_tokens": 100000, "ignore_eos": True}
    async with client([server.url], coalesce=8) as b:
        async def leave_after_first_chunk(req):
            async for _ in b.generate(req):
                break

        await asyncio.gather(*(leave_after_first_chunk(request(i, **long)) for i in range(3)))
        for _ in range(200):  # the aborts go out in the background
            state = await server_state(server.url)
            if state["num_running_reqs"] == 0 and state["num_waiting_reqs"] == 0:
                break
            await asyncio.sleep(0.05)
    assert state["num_running_reqs"] == 0 and state["num_waiting_reqs"] == 0
    assert state["num_aborted_reqs"] - before == 3


async def test_a_batch_sent_to_a_dead_server_is_retried_on_a_live_one(server):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    reqs = [request(i) for i in range(6)]
    async with client([server.url]) as alone:
        expected = [(await collect(alone, r))[0] for r in reqs]
    async with client([dead, server.url], coalesce=8, balance="requests", affinity=False) as b:
        got = await asyncio.gather(*(collect(b, r) for r in reqs))
        stats = b.stats()
    assert [ids for ids, _, _ in got] == expected
    assert stats["retries"] >= 1 and stats["errors_connection"] == stats["retries"]


@pytest.mark.parametrize("extra, words", [({"stream": False}, "needs stream"),
                                          ({"control_urls": ["http://127.0.0.1:1"]}, "behind a router")])
def test_coalesce_refuses_what_it_cannot_do(extra, words):
    with pytest.raises(ValueError, match=words):
        SGLangConfig(coalesce=4, **extra)


async def test_requests_left_while_their_batch_is_on_its_way_are_aborted_once_it_begins():
    """Cancelled after their batch went out and before the server took it up: an abort sent at once
    would reach the server before the rids do, and be ignored (as SGLang ignores an unknown rid), and
    the batch would then be generated to its budget. The abort goes when the batch's stream begins."""
    async with FakeSGLang() as fake:
        async with aiohttp.ClientSession() as s:  # paused: a batch is accepted and waits, its rids unknown
            await (await s.post(fake.url + "/pause_generation", json={"mode": "in_place"})).read()
        async with client([fake.url], coalesce=8) as b:
            async def drain(req):
                return [c async for c in b.generate(req)]

            left = [asyncio.create_task(drain(request(i, max_new_tokens=5000))) for i in range(3)]
            await asyncio.sleep(0)  # they run to their queues and schedule the flush after this coroutine
            for t in left:  # their cancellations reach them after the flush has sent their batch
                t.cancel()
            await asyncio.gather(*left, return_exceptions=True)
            for _ in range(200):  # the batch reaches the server, which holds it
                if fake.requests("/generate"):
                    break
                await asyncio.sleep(0.01)
            assert b.stats()["batches"] == 1 and len(fake.requests("/generate")[0]["rid"]) == 3
            async with aiohttp.ClientSession() as s:
                await (await s.post(fake.url + "/continue_generation", json={})).read()
            for _ in range(500):
                if len(fake.finishes) == 3:
                    break
                await asyncio.sleep(0.01)
    assert sorted(fake.finishes.values()) == ["abort"] * 3, fake.finishes
