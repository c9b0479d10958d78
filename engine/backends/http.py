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
    ServerUnavailable,
)
from tidal.protocol.errors import ProtocolError
from tidal.protocol.sglang import SSE_DONE, SSE_PREFIX, error_message, parse_weight_version

__all__ = ["sse_post", "call", "client_session", "stop_task", "served_version"]

_SKIP = len(SSE_PREFIX)


def client_session(cfg, headers: dict[str, str]) -> aiohttp.ClientSession:
    """The one pool a routing backend keeps (`cfg` is its `Routed` config): `max_connections` in all,
    no cap per host, connect and read timeouts, and no total limit, since a stream lasts as long as
    its generation."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=cfg.max_connections, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s),
        headers=headers,
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
                   headers: dict[str, str] | None = None) -> AsyncIterator[bytes]:
    """POST `body` to `url + path` and yield each event's JSON payload until `[DONE]`.

    While the stream is open its response is in `open_streams[rid]` (when given): closing it from
    elsewhere ends the stream with `ServerUnavailable`, and the server sees a disconnect.

    Raises `HTTPStatusError` (non-200, with the server's error message), `BadResponse` (not SSE),
    `BackendTimeout` (silence beyond the session's read timeout), `ServerUnavailable` (connection
    refused or lost, or the stream ended without `[DONE]`), each naming `url` and `rid`.
    """
    try:
        async with session.post(url + path, data=body, headers=headers) as resp:
            if resp.status != 200:
                raise HTTPStatusError(resp.status, error_message(await resp.read()), url=url, request_id=rid)
            if open_streams is not None:
                open_streams[rid] = resp
            buf = b""
            done = False
            async for data in resp.content.iter_any():
                start = len(buf) - 1  # a blank line may straddle two reads
                buf += data
                if done or buf.find(b"\n\n", max(start, 0)) < 0:
                    continue
                *events, buf = buf.split(b"\n\n")
                for event in events:
                    if event.startswith(SSE_PREFIX):
                        payload = event[_SKIP:]
                    elif event.startswith(b"data:"):  # the space is optional in SSE
                        payload = event[5:]
                    elif event.startswith(b":"):  # a comment (keep-alive), ignored by SSE readers
                        continue
                    else:
                        raise BadResponse(f"SSE event without 'data: ': {event[:80]!r}", url=url, request_id=rid)
                    if payload == SSE_DONE:
                        done = True  # read on to the end of the body, so the connection is reused
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


async def call(session: aiohttp.ClientSession, method: str, url: str, path: str, data: bytes | None,
               timeout_s: float, rid: str = "", headers: dict[str, str] | None = None) -> bytes:
    """One request/response exchange; the body of a 2xx, else a `BackendError` naming the server."""
    try:
        async with session.request(method, url + path, data=data, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            body = await resp.read()
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
