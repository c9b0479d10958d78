"""Status channel, trainer -> engines: TrainerStatus, WeightsPublished and control messages.

These are state, not a log: what an engine needs is the latest of each kind. The trainer binds an
XPUB socket and keeps the latest TrainerStatus, WeightsPublished and control message; it re-sends
them the moment it sees a new subscription (XPUB_VERBOSE shows every subscriber, so a late-joining
or reconnecting engine learns the current state at once) and re-publishes them every `heartbeat_s`.
PUB never blocks the trainer: a subscriber past its high-water mark misses frames, and the next
heartbeat repairs that, because only the latest state matters. A subscriber passes on only changes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time

import msgspec
import zmq
import zmq.asyncio
from tidal.protocol.channels.curve import ClientKeys, CurveGuard, ServerKeys
from tidal.protocol.channels.frames import bind
from tidal.protocol.errors import ProtocolError
from tidal.protocol.messages import (
    Drain,
    Pause,
    Resume,
    Shutdown,
    StatusMessage,
    TrainerStatus,
    WeightsPublished,
    decode_status,
    encode,
)

__all__ = ["StatusPublisher", "StatusSubscriber", "StatusStats"]

log = logging.getLogger(__name__)


class StatusStats(msgspec.Struct):
    """Counters of one status channel end."""

    published: int = 0
    """publisher: frames sent (new messages, re-sends to new subscribers, heartbeats)"""
    subscriptions: int = 0
    """publisher: subscriptions seen (each triggers a re-send of the latest state)"""
    received: int = 0
    """subscriber: frames read"""
    changes: int = 0
    """subscriber: messages that changed the latest state and were queued for `recv`"""
    dropped: int = 0
    """subscriber: queued changes dropped, oldest first, because `recv` fell `capacity` behind"""
    rejected: int = 0
    """both: frames that failed strict decoding (counted, dropped)"""
    last_error: str = ""
    refused: int = 0
    """both, with CURVE keys: failed handshakes (publisher: a subscriber without an allowed key;
    subscriber: the trainer refused this engine's key)"""


def _kind(msg: StatusMessage) -> str:
    match msg:
        case TrainerStatus():
            return "status"
        case WeightsPublished():
            return "weights"
        case Pause() | Resume() | Drain() | Shutdown():
            return "control"
    raise TypeError(f"not a status-channel message: {type(msg).__name__}")


class StatusPublisher:
    """Trainer side: `async with StatusPublisher("tcp://127.0.0.1:0") as pub: await pub.publish(s)`."""

    def __init__(
        self, endpoint: str, *, heartbeat_s: float = 1.0, context: zmq.asyncio.Context | None = None,
        curve: ServerKeys | None = None,
    ) -> None:
        """`curve`: the trainer's keys (protocol/channels/curve.py); None: no encryption (loopback)."""
        self.endpoint = endpoint
        self.stats = StatusStats()
        self._heartbeat_s = heartbeat_s
        self._context = context
        self._curve = curve
        self._guard: CurveGuard | None = None
        self._latest: dict[str, bytes] = {}  # kind -> encoded latest message
        self._tasks: list[asyncio.Task] = []
        self._sock: zmq.asyncio.Socket | None = None

    async def __aenter__(self) -> StatusPublisher:
        ctx = self._context or zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.XPUB)
        sock.linger = 0
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        try:
            if self._curve is not None:
                self._guard = CurveGuard(sock, self._curve, "status publisher", ctx)
                self._guard.secure()
            self.endpoint = await bind(sock, self.endpoint)
        except BaseException:
            if self._guard is not None:
                await self._guard.close()
            sock.close(linger=0)
            raise
        self._sock = sock
        self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._heartbeat())]
        if self._guard is not None:
            self._guard.start(self.stats)
        return self

    async def __aexit__(self, *exc) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._guard is not None:
            await self._guard.close()
        self._sock.close(linger=0)

    async def publish(self, msg: StatusMessage) -> None:
        """Make `msg` the latest of its kind and send it to every subscriber."""
        frame = encode(msg)
        self._latest[_kind(msg)] = frame
        await self._send(frame)

    async def _send(self, frame: bytes) -> None:
        self.stats.published += 1
        await self._sock.send(frame)

    async def _resend_latest(self) -> None:
        for frame in list(self._latest.values()):
            await self._send(frame)

    async def _watch(self) -> None:
        while True:
            event = await self._sock.recv()
            if event[:1] == b"\x01":  # a (re)subscription: bring that subscriber up to date
                self.stats.subscriptions += 1
                await self._resend_latest()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            await self._resend_latest()


class StatusSubscriber:
    """Engine side: `latest_status`, `latest_weights`, `latest_control`, and `recv()` for each change.

    `recv` returns messages that changed the latest of their kind, in order; if the caller falls
    `capacity` changes behind, the oldest are dropped (counted): the latest state is always kept.
    """

    def __init__(
        self, endpoint: str, *, capacity: int = 64, context: zmq.asyncio.Context | None = None,
        curve: ClientKeys | None = None,
    ) -> None:
        """`curve`: this engine's keys and the trainer's public key; None: no encryption (loopback)."""
        self.endpoint = endpoint
        self._curve = curve
        self.stats = StatusStats()
        self.latest_status: TrainerStatus | None = None
        self.latest_weights: WeightsPublished | None = None
        self.latest_control: Pause | Resume | Drain | Shutdown | None = None
        self.last_heard: float | None = None
        """time.monotonic() of the last good frame: the trainer's liveness (heartbeats included)"""
        self._context = context
        self._changes: collections.deque[StatusMessage] = collections.deque(maxlen=capacity)
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._sock: zmq.asyncio.Socket | None = None

    async def __aenter__(self) -> StatusSubscriber:
        ctx = self._context or zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.linger = 0
        sock.subscribe(b"")
        self._guard = None
        if self._curve is not None:
            self._guard = CurveGuard(sock, self._curve, "status subscriber")
            self._guard.secure()
        sock.connect(self.endpoint)
        self._sock = sock
        self._task = asyncio.create_task(self._read())
        self._task.add_done_callback(lambda _: self._changed.set())  # a dead reader wakes recv()
        if self._guard is not None:
            self._guard.start(self.stats)
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._guard is not None:
            await self._guard.close()
        self._sock.close(linger=0)

    async def recv(self) -> StatusMessage:
        """The next change of status, weights or control."""
        while not self._changes:
            if self._task.done() and not self._task.cancelled():
                raise RuntimeError(f"status subscriber on {self.endpoint} stopped") from self._task.exception()
            self._changed.clear()
            await self._changed.wait()
        return self._changes.popleft()

    async def _read(self) -> None:
        while True:
            frame = await self._sock.recv(copy=False)
            self.stats.received += 1
            try:
                msg = decode_status(frame.buffer)
            except ProtocolError as exc:
                self.stats.rejected += 1
                self.stats.last_error = str(exc)
                log.warning("status subscriber %s: rejected a frame: %s", self.endpoint, exc)
                continue
            self.last_heard = time.monotonic()
            kind = _kind(msg)
            if getattr(self, f"latest_{kind}") == msg:
                continue  # a heartbeat or a re-send: nothing changed
            setattr(self, f"latest_{kind}", msg)
            if len(self._changes) == self._changes.maxlen:
                self.stats.dropped += 1
            self._changes.append(msg)
            self.stats.changes += 1
            self._changed.set()
