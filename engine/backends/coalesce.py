"""Coalescing: the requests one client makes to one server in the same event-loop iteration go out as
one batched, streaming `/generate` (docs/sglang.md §1.5).

Why: an agent's turns are often a few tokens (a move, a tool call), and then the HTTP work of a request,
on both sides, costs as much CPU as the model's work on it. A batch pays that once for many requests.

Each item keeps its own rid, so `/abort_request` still reaches it alone, and its own stream: the
server tags each event with the item's `index`, the reader hands it to that item, and the item's stream
ends at its own finish, not at the batch's `[DONE]`. A fault of the whole exchange (connection lost,
timeout, 5xx, a broken event) reaches every item not yet finished, and each retries as it would alone.
A batch of two or more refused as a whole (a 4xx, an in-stream rejection) is sent again one request at
a time (`Unbatch`), so one bad prompt fails only its own request. An item whose consumer leaves before
its finish is aborted on the server, as hanging up a request of its own would: at once if the batch's
stream has begun (the server holds its rid), else when it begins or fails (an abort sent sooner could
reach the server before the rid does, and be lost).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from msgspec import UNSET
from tidal.engine.backends.errors import BackendError, BadResponse, ServerUnavailable
from tidal.engine.backends.routing import Server
from tidal.protocol import sglang as wire

__all__ = ["Coalescer", "Unbatch"]

log = logging.getLogger(__name__)

_END = object()
"""An item's stream has ended (after its finish, or with the batch's [DONE])."""


class Unbatch(Exception):
    """The server refused a batch as a whole: send this request again on its own."""


class _Item:
    __slots__ = ("rid", "input_ids", "sampling", "queue", "done", "left", "started")

    def __init__(self, rid: str, input_ids: list[int], sampling: wire.SamplingParams):
        self.rid = rid
        self.input_ids = input_ids
        self.sampling = sampling
        self.queue: asyncio.Queue = asyncio.Queue()
        """Its events, then `_END` or an exception; at most one event per token, so bounded by the budget."""
        self.done = False
        """Its finish was read, or its stream was ended by the batch."""
        self.left = False
        """Its consumer stopped reading."""
        self.started = False
        """Its batch's stream has begun: the server holds its rid."""


class Coalescer:
    """Batches requests per server (at most `max_items` in one) and hands each its own events.

    `post(server, body, label)` streams the payloads of one /generate; `decode(payload, url, label)` is
    the client's event decoder (raising `BackendError` for a broken or error event); `abort(server, rid)`
    aborts one rid on a server.
    """

    def __init__(self, max_items: int, post: Callable[[Server, bytes, str], AsyncIterator[bytes]],
                 decode: Callable[[bytes, str, str], Any], abort: Callable[[Server, str], Awaitable],
                 counters: Counter):
        self.max_items = max_items
        self._post, self._decode, self._abort = post, decode, abort
        self.counters = counters
        self._pending: dict[Server, list[_Item]] = {}
        self._flush_due = False
        self._tasks: set[asyncio.Task] = set()

    def submit(self, server: Server, rid: str, input_ids: list[int],
               sampling: wire.SamplingParams) -> AsyncIterator[Any]:
        """Queue one request for `server`; iterate the result for its decoded events."""
        item = _Item(rid, input_ids, sampling)
        items = self._pending.setdefault(server, [])
        items.append(item)
        if len(items) >= self.max_items:
            self._send(server, self._pending.pop(server))
        elif not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)
        return self._events(server, item)

    async def close(self) -> None:
        """Cancel the batches in flight; their open items end with `ServerUnavailable`."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _flush(self) -> None:
        self._flush_due = False
        pending, self._pending = self._pending, {}
        for server, items in pending.items():
            self._send(server, items)

    def _send(self, server: Server, items: list[_Item]) -> None:
        self.counters["batches"] += 1
        self.counters["batched"] += len(items)
        self._spawn(self._run(server, items))

    def _spawn(self, coro: Awaitable) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, server: Server, items: list[_Item]) -> None:
        """Send one batch and deal its events out, item by item."""
        label = f"{items[0].rid}+{len(items) - 1}" if len(items) > 1 else items[0].rid
        body = wire.encode(wire.GenerateRequest(
            input_ids=[it.input_ids for it in items], sampling_params=[it.sampling for it in items],
            rid=[it.rid for it in items], stream=True, return_logprob=True))
        try:
            async with aclosing(self._post(server, body, label)) as payloads:
                async for payload in payloads:
                    if not items[0].started:  # the first event (the check spares a call per event)
                        self._started(server, items)
                    ev = self._decode(payload, server.url, label)
                    i = ev.index
                    if i is UNSET or not 0 <= i < len(items):
                        raise BadResponse(f"a batch event's index is {i}, not one of its {len(items)} items",
                                          url=server.url, request_id=label)
                    item = items[i]
                    if item.done:
                        raise BadResponse(f"an event for batch item {i} after its finish", url=server.url,
                                          request_id=item.rid)
                    if ev.meta_info.finish_reason is not None:
                        item.done = True
                    if not item.left:
                        item.queue.put_nowait(ev)
                        if item.done:
                            item.queue.put_nowait(_END)
        except BackendError as exc:
            self._started(server, items)  # refused, cut or timed out before its first event: the
            # server may hold the rids all the same
            open_items = [it for it in items if not it.done]
            if len(items) > 1 and not exc.retryable:
                self.counters["batches_refused"] += 1
                log.warning("a batch of %d to %s was refused (%s): its requests go again one by one",
                            len(items), server.url, exc)
                self._end(open_items, Unbatch(str(exc)))
            else:
                self._end(open_items, exc)
        except BaseException:
            self._end([it for it in items if not it.done],
                      ServerUnavailable("the batch's stream was cancelled", url=server.url, request_id=label))
            raise
        else:  # [DONE] with an item unfinished: its consumer reports the missing finish
            self._started(server, items)
            self._end([it for it in items if not it.done], _END)

    def _started(self, server: Server, items: list[_Item]) -> None:
        """The server holds the batch's rids: abort the items left while it was on its way (once)."""
        if items[0].started:
            return
        for it in items:
            it.started = True
            if it.left and not it.done:
                self._spawn(self._abort_quietly(server, it.rid))

    @staticmethod
    def _end(items: list[_Item], what: object) -> None:
        for it in items:
            it.done = True
            it.queue.put_nowait(what)

    async def _events(self, server: Server, item: _Item) -> AsyncIterator[Any]:
        try:
            while True:
                x = await item.queue.get()
                if x is _END:
                    return
                if isinstance(x, BaseException):  # one instance for every open item: no shared traceback
                    raise x.with_traceback(None)
                yield x
        finally:
            item.left = True
            if item.started and not item.done:  # the server would generate it to the end
                self._spawn(self._abort_quietly(server, item.rid))

    async def _abort_quietly(self, server: Server, rid: str) -> None:
        try:
            await self._abort(server, rid)
        except BackendError as exc:
            log.warning("could not abort %s on %s, left by its consumer: %s", rid, server.url, exc)
