"""HTTP plumbing every HTTP backend shares: one SSE stream or one call, with every failure a `BackendError`.

Server-sent events here are the subset SGLang and OpenAI-compatible servers send (docs/sglang.md §1.6): each
event is `data: <json>` and a blank line, the last one `data: [DONE]`; comment lines (`: ping`) are
skipped, and `event:`/`id:` lines, which these servers never send, are an error. Bytes
are split on the blank line as they arrive (one read may hold several events, or part of one), so a
stream costs one await per network read, not per line. `served_version` reads a server's weight
version string as the int policy version the backend interface speaks.
"""

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from tidal.engine.backends.errors import (
    BackendError,
    BackendTimeout,
    BadResponse,
    HTTPStatusError,
    ResponseTooLarge,
    ServerUnavailable,
)
from tidal.protocol.errors import ProtocolError
from tidal.protocol.sglang import SSE_DONE, SSE_PREFIX, error_message, parse_weight_version

__all__ = ["sse_post", "call", "client_session", "stop_task", "served_version"]

_SKIP = len(SSE_PREFIX)
_NO_CAP = 1 << 62
"""The read cap when a caller sets none."""


def client_session(cfg, headers: dict[str, str]) -> aiohttp.ClientSession:
    """The one pool a routing backend keeps (`cfg` is its `Routed` config): `max_connections` in all,
    no cap per host, connect and read timeouts, and no total limit, since a stream lasts as long as
    its generation. No cookie jar: these APIs set none, and a jar is consulted on every request."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=cfg.max_connections, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s),
        headers=headers,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def stop_task(task: asyncio.Task | None) -> None:
    """Cancel a background task (a health loop) and wait until it has ended."""
    if task is not None:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


async def sse_post(session: aiohttp.ClientSession, url: str, path: str, body: bytes, rid: str,
                   read_timeout_s: float, open_streams: dict | None = None,
                   headers: dict[str, str] | None = None, max_bytes: int | None = None) -> AsyncIterator[bytes]:
    """POST `body` to `url + path` and yield each event's JSON payload until `[DONE]`.

    While the stream is open its response is in `open_streams[rid]` (when given): closing it from
    elsewhere ends the stream with `ServerUnavailable`, and the server sees a disconnect.

    Raises `HTTPStatusError` (non-200, with the server's error message), `BadResponse` (not SSE),
    `ResponseTooLarge` (an event, or the unterminated rest of one, over `max_bytes`), `BackendTimeout`
    (silence beyond the session's read timeout), `ServerUnavailable` (connection refused or lost, or
    the stream ended without `[DONE]`), each naming `url` and `rid`.
    """
    cap = max_bytes if max_bytes is not None else _NO_CAP
    try:
        async with session.post(url + path, data=body, headers=headers) as resp:
            if resp.status != 200:
                raise HTTPStatusError(resp.status, error_message(await _read(resp, cap, url, path, rid)),
                                      url=url, request_id=rid)
            if open_streams is not None:
                open_streams[rid] = resp
            buf = b""
            done = False
            async for data in resp.content.iter_any():
                if done:
                    continue  # read on to the end of the body, so the connection is reused
                start = len(buf) - 1  # a blank line may straddle two reads
                buf += data
                if buf.find(b"\n\n", max(start, 0)) < 0:
                    if len(buf) > cap:
                        raise _too_large("an SSE event", cap, url, rid)
                    continue
                *events, buf = buf.split(b"\n\n")
                if len(buf) > cap:
                    raise _too_large("an SSE event", cap, url, rid)
                for event in events:
                    if len(event) > cap:
                        raise _too_large(f"an SSE event of {len(event)} bytes", cap, url, rid)
                    if event.startswith(SSE_PREFIX):
                        payload = event[_SKIP:]
                    elif event.startswith(b"data:"):  # the space is optional in SSE
                        payload = event[5:]
                    elif event.startswith(b":"):  # a comment (keep-alive), ignored by SSE readers
                        continue
                    else:
                        raise BadResponse(f"SSE event without 'data: ': {event[:80]!r}", url=url, request_id=rid)
                    if payload == SSE_DONE:
                        done = True
                        break
                    yield payload
            if not done:
                raise ServerUnavailable("stream closed before data: [DONE]", url=url, request_id=rid)
    except BackendError:
        raise
    except TimeoutError:
        raise BackendTimeout(f"no stream event within {read_timeout_s} s", url=url, request_id=rid) from None
    except aiohttp.ClientError as exc:
        raise ServerUnavailable(f"{type(exc).__name__}: {exc}", url=url, request_id=rid) from None
    finally:
        if open_streams is not None:
            open_streams.pop(rid, None)


def _too_large(what: str, cap: int, url: str, rid: str) -> ResponseTooLarge:
    return ResponseTooLarge(f"{what} is over backend.max_response_bytes = {cap}: refused", url=url, request_id=rid)


async def _read(resp: aiohttp.ClientResponse, cap: int, url: str, path: str, rid: str) -> bytes:
    """The whole body, refused once it passes `cap` bytes (by its Content-Length before any is read)."""
    if resp.content_length is not None and resp.content_length > cap:
        raise _too_large(f"{path}: a body of {resp.content_length} bytes", cap, url, rid)
    body = bytearray()
    async for data in resp.content.iter_any():
        body += data
        if len(body) > cap:
            raise _too_large(f"{path}: the body", cap, url, rid)
    return bytes(body)


async def call(session: aiohttp.ClientSession, method: str, url: str, path: str, data: bytes | None,
               timeout_s: float, rid: str = "", headers: dict[str, str] | None = None,
               max_bytes: int | None = None) -> bytes:
    """One request/response exchange; the body of a 2xx, else a `BackendError` naming the server
    (`ResponseTooLarge` for a body over `max_bytes`)."""
    cap = max_bytes if max_bytes is not None else _NO_CAP
    try:
        async with session.request(method, url + path, data=data, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            body = await _read(resp, cap, url, path, rid)
    except TimeoutError:
        raise BackendTimeout(f"{path}: no answer within {timeout_s} s", url=url, request_id=rid) from None
    except aiohttp.ClientError as exc:
        raise ServerUnavailable(f"{path}: {type(exc).__name__}: {exc}", url=url, request_id=rid) from None
    if resp.status >= 300:
        raise HTTPStatusError(resp.status, f"{path}: {error_message(body)}", url=url, request_id=rid)
    return body


def served_version(text: str, url: str, rid: str = "") -> int:
    """The policy version a server reports (`parse_weight_version`); one that names none is the
    server's `BadResponse`."""
    try:
        return parse_weight_version(text, url)
    except ProtocolError as exc:
        raise BadResponse(str(exc), url=url, request_id=rid) from None
