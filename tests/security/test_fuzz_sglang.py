"""Hostile SGLang streams: the sglang backend reads whatever a server sends and either yields exact
tokens or raises a `BackendError` that names the server and the request, never anything else.

A real aiohttp server on 127.0.0.1 answers /health and writes the drawn bytes as the /generate stream,
in drawn pieces (an event may straddle reads). Two kinds of streams: a well-formed one, cumulative or
delta, whose tokens must come out exactly; and one assembled from hostile parts (wrong lengths, absurd
numbers, null logprobs, unknown finish reasons, bad versions, non-JSON, non-SSE lines, raw bytes).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tidal.engine.backends import BackendError
from tidal.engine.backends.base import Request, Sampling
from tidal.engine.backends.config import SGLangConfig
from tidal.engine.backends.errors import ResponseTooLarge
from tidal.engine.backends.sglang import SGLangBackend

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


async def run(stream: bytes, pieces: list[int], stats: dict | None = None,
              config: dict | None = None) -> tuple[list, BaseException | None, int]:
    """Generate once against a server that streams `stream` in `pieces`; (chunks, error, /generate calls).
    `config`: SGLangConfig fields over the harness's; `stats` gets the backend's counters."""
    calls = 0

    async def generate(request):
        nonlocal calls
        calls += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        at, sizes = 0, pieces or [len(stream)]
        i = 0
        while at < len(stream):
            size = max(1, sizes[i % len(sizes)])
            await resp.write(stream[at:at + size])
            at, i = at + size, i + 1
        return resp

    async def health(request):
        return web.Response(text="")

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}"
    chunks, error = [], None
    cfg = SGLangConfig(**{"urls": [url], "max_retries": 0, "read_timeout_s": 5, "health_interval_s": 60, **(config or {})})
    try:
        async with SGLangBackend(cfg) as backend:
            req = Request(input_ids=[1, 2, 3], sampling=Sampling(max_new_tokens=64), request_id="fuzz-r1")
            try:
                async for chunk in backend.generate(req):
                    chunks.append(chunk)
            except Exception as exc:  # judged by the caller: only BackendError is allowed
                error = exc
            if stats is not None:
                stats.update(backend.stats())
    finally:
        await runner.cleanup()
    return chunks, error, calls


def sse(events: list[bytes], done: bool = True) -> bytes:
    return b"".join(b"data: " + e + b"\n\n" for e in events) + (b"data: [DONE]\n\n" if done else b"")


def check_chunks(chunks) -> None:
    for c in chunks:
        assert len(c.token_ids) == len(c.logprobs)
        assert all(type(t) is int for t in c.token_ids)
        assert all(type(lp) is float for lp in c.logprobs)
        assert type(c.weight_version) is int and c.weight_version >= 0


# --- well-formed streams: exact tokens ---------------------------------------------------------------

def good_events(draw) -> tuple[list[int], list[float], str, list[dict]]:
    ids = draw(st.lists(st.integers(0, 200_000), min_size=1, max_size=30))
    lps = draw(st.lists(st.floats(-50, 0, allow_nan=False), min_size=len(ids), max_size=len(ids)))
    cuts = sorted(set(draw(st.lists(st.integers(1, len(ids)), max_size=6))) | {len(ids)})
    delta = draw(st.booleans())
    version = draw(st.sampled_from(["default", "0", "7"]))
    events, prev = [], 0
    for n, cut in enumerate(cuts):
        lo = prev if delta else 0
        last = n == len(cuts) - 1
        meta = {"id": "fuzz-r1", "completion_tokens": cut, "weight_version": version,
                "output_token_logprobs": [[lps[i], ids[i], None] for i in range(lo, cut)],
                "finish_reason": {"type": "length", "length": cut} if last else None,
                "prompt_tokens": 3}
        events.append({"text": "", "output_ids": ids[lo:cut], "meta_info": meta})
        prev = cut
    return ids, lps, version, events


@st.composite
def good_stream(draw):
    ids, lps, version, events = good_events(draw)
    return ids, lps, int(version) if version.isdigit() else 0, sse([json.dumps(e).encode() for e in events])


@FUZZ
@given(good_stream(), st.lists(st.integers(1, 64), max_size=5))
def test_a_well_formed_stream_gives_its_tokens_exactly(drawn, pieces):
    ids, lps, version, stream = drawn
    chunks, error, _ = asyncio.run(run(stream, pieces))
    assert error is None, error
    check_chunks(chunks)
    assert [t for c in chunks for t in c.token_ids] == ids
    assert [lp for c in chunks for lp in c.logprobs] == pytest.approx(lps)
    assert {c.weight_version for c in chunks} == {version}
    assert chunks[-1].finish is not None and chunks[-1].finish.reason == "length"


# --- hostile streams: BackendError or exact --------------------------------------------------------

ints = st.one_of(st.integers(-5, 40), st.integers(-(2 ** 70), 2 ** 70))
logprob = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.none(), st.just("x"), st.integers())
entry = st.one_of(st.tuples(logprob, ints, st.one_of(st.none(), st.text(max_size=3))).map(list),
                  st.lists(ints, max_size=4), st.none(), st.text(max_size=3))
finish = st.one_of(
    st.none(), st.just({"type": "stop"}), st.just({"type": "length"}), st.just({"type": "abort"}),
    st.fixed_dictionaries({"type": st.just("abort"), "status_code": ints, "message": st.text(max_size=5)}),
    st.fixed_dictionaries({"type": st.text(max_size=6)}), st.text(max_size=4), ints,
    st.fixed_dictionaries({"type": st.just("stop"), "matched": st.one_of(ints, st.text(max_size=3),
                                                                          st.lists(ints, max_size=3))}),
)
meta = st.fixed_dictionaries(
    {"id": st.one_of(st.just("fuzz-r1"), st.text(max_size=5))},
    optional={"completion_tokens": ints, "finish_reason": finish, "output_token_logprobs": st.lists(entry, max_size=6),
              "output_token_logprobs_length": ints, "prompt_tokens": ints, "cached_tokens": ints,
              "weight_version": st.one_of(st.sampled_from(["default", "", "3", "v7", "99999999999", "²", "-1"]),
                                          st.text(max_size=4), ints)})
event_obj = st.fixed_dictionaries({}, optional={"output_ids": st.one_of(st.lists(ints, max_size=6), st.text(max_size=3)),
                                                "meta_info": st.one_of(meta, st.none(), ints), "text": st.text(max_size=4),
                                                "error": st.fixed_dictionaries({"message": st.text(max_size=5)}, optional={
                                                    "code": ints, "retryable": st.booleans()})})
event = st.one_of(
    event_obj.map(lambda o: b"data: " + json.dumps(o).encode() + b"\n\n"),
    st.binary(max_size=40).map(lambda b: b"data: " + b + b"\n\n"),
    st.sampled_from([b": ping\n\n", b"event: x\n\n", b"data: [DONE]\n\n", b"data:[DONE]\n\n", b"\n\n",
                     b"data: {\n\n", b"data: \xff\xfe\n\n", b"id: 3\ndata: {}\n\n", b"data: " + b"[" * 5000 + b"\n\n"]),
    st.binary(max_size=60),
)


META_KEYS = ["completion_tokens", "finish_reason", "output_token_logprobs", "output_token_logprobs_length",
             "prompt_tokens", "cached_tokens", "weight_version", "id"]


@st.composite
def mutated_stream(draw):
    """A well-formed stream with a few fields replaced, dropped, or events repeated, lost or reordered:
    hostile values that get past JSON decoding into the backend's token logic."""
    _, _, _, events = good_events(draw)
    for _ in range(draw(st.integers(1, 4))):
        ev = events[draw(st.integers(0, len(events) - 1))]
        where = draw(st.sampled_from(["meta", "meta", "meta", "top", "drop", "dup", "lose", "swap"]))
        if where == "meta" and isinstance(ev.get("meta_info"), dict):
            key = draw(st.sampled_from(META_KEYS))
            if draw(st.booleans()):
                ev["meta_info"][key] = draw(meta.map(lambda m, key=key: m.get(key, None)) | ints | logprob)
            else:
                ev["meta_info"].pop(key, None)
        elif where == "top":
            ev["output_ids"] = draw(st.lists(ints, max_size=6) | st.text(max_size=3) | st.none())
        elif where == "drop":
            ev.pop(draw(st.sampled_from(["output_ids", "meta_info", "text"])), None)
        elif where == "dup":
            events.append(json.loads(json.dumps(ev)))
        elif where == "lose" and len(events) > 1:
            events.remove(ev)
        elif where == "swap" and len(events) > 1:
            events.reverse()
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


hostile = st.one_of(mutated_stream(), mutated_stream(), st.lists(event, max_size=6).map(b"".join))


@FUZZ
@given(hostile, st.lists(st.integers(1, 50), max_size=4))
def test_a_hostile_stream_is_a_named_backend_error(stream, pieces):
    chunks, error, calls = asyncio.run(run(stream, pieces))
    check_chunks(chunks)
    if error is not None:
        assert isinstance(error, BackendError), f"{type(error).__name__}: {error}"
        assert "server http://127.0.0.1:" in str(error) and "request fuzz-r1" in str(error), str(error)
    else:
        assert chunks and chunks[-1].finish is not None
        assert sum(len(c.token_ids) for c in chunks) == chunks[-1].finish.completion_tokens
    assert calls <= 101, "a server that aborts everything is given up after a bounded number of resubmits"


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(1, 50), max_size=4))
def test_arbitrary_bytes_are_a_named_backend_error(stream, pieces):
    chunks, error, _ = asyncio.run(run(stream, pieces))
    check_chunks(chunks)
    assert error is None or isinstance(error, BackendError), f"{type(error).__name__}: {error}"


def _event(ids, lps, finish=None) -> bytes:
    meta = {"id": "fuzz-r1", "completion_tokens": len(ids), "finish_reason": finish,
            "output_token_logprobs": [[lp, i, None] for lp, i in zip(lps, ids, strict=True)]}
    return json.dumps({"output_ids": ids, "meta_info": meta}).encode()


@pytest.mark.parametrize("ids, lps", [([-5, 3], [-0.1, -0.2]), ([2 ** 40, 3], [-0.1, -0.2]), ([5, 3], [5.0, -0.2])],
                         ids=["negative-id", "id-beyond-uint32", "positive-logprob"])
def test_impossible_tokens_are_a_bad_response(ids, lps):
    chunks, error, _ = asyncio.run(run(sse([_event(ids, lps, {"type": "length"})]), []))
    assert not chunks and isinstance(error, BackendError) and "fuzz-r1" in str(error)


# --- read caps: what one event or body may make the engine buffer -----------------------------------

@pytest.mark.parametrize("stream, pieces, streaming", [
    (b"data: " + b"x" * 4096, [512], True),                                   # a line that never ends
    (sse([_event([5], [-0.1]), b"[" + b"1," * 2000 + b"1]"]), [], True),     # a whole event, one write
    (b"{" + b" " * 4096 + b"}", [700], False),                                 # a non-streamed body
], ids=["unterminated-line", "whole-event", "body"])
def test_a_response_over_the_read_cap_is_refused_and_counted(stream, pieces, streaming):
    stats = {}
    chunks, error, _ = asyncio.run(run(stream, pieces, stats, {"max_response_bytes": 1024, "stream": streaming}))
    assert isinstance(error, ResponseTooLarge), error
    assert "max_response_bytes = 1024" in str(error) and "server http://127.0.0.1:" in str(error)
    assert stats["errors_too_large"] == 1
