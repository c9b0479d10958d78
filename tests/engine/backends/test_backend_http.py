"""SSE framing: events split across reads at any byte, several per read, and the end of a stream."""

import asyncio

import aiohttp
import pytest
from aiohttp import web
from tidal.engine.backends import BadResponse, ServerUnavailable
from tidal.engine.backends.http import sse_post

EVENTS = [b'{"a":1}', b'{"b":[1,2,3]}', b'{"c":"x\\ny"}']


async def serve(stream: bytes, piece: int):
    """An SSE server that writes `stream` in `piece`-byte writes with a pause between them."""

    async def handler(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(stream), piece):
            await resp.write(stream[i:i + piece])
            await asyncio.sleep(0.002)
        return resp

    app = web.Application()
    app.router.add_post("/s", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def collect(stream: bytes, piece: int) -> list[bytes]:
    runner, url = await serve(stream, piece)
    try:
        async with aiohttp.ClientSession() as session:
            return [p async for p in sse_post(session, url, "/s", b"{}", "r", 5.0)]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
async def test_events_split_at_any_byte_arrive_whole(piece):
    stream = b"".join(b"data: " + e + b"\n\n" for e in EVENTS) + b"data: [DONE]\n\n"
    assert await collect(stream, piece) == EVENTS


async def test_comments_and_data_without_a_space_are_read_as_sse_defines():
    assert await collect(b": ping\n\ndata:" + EVENTS[0] + b"\n\ndata: [DONE]\n\n", 1000) == EVENTS[:1]


async def test_missing_done_and_non_sse_lines_are_errors():
    with pytest.raises(ServerUnavailable, match=r"stream closed before data: \[DONE\].*request r"):
        await collect(b"data: " + EVENTS[0] + b"\n\n", 1000)
    with pytest.raises(BadResponse, match="SSE event without 'data: '"):
        await collect(b"event: x\n\ndata: [DONE]\n\n", 1000)
