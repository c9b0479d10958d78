"""Batched I/O on a ZeroMQ socket from asyncio, without pyzmq's asyncio layer: the channel's hot path.

pyzmq's asyncio API costs Futures, a Poller and enum arithmetic per operation. Here a reader waits
for readability once and then drains every queued message with non-blocking calls; a send goes
straight through, and only waits when the socket would block (high-water mark reached, or no peer
yet). Waiting is one `loop.add_reader` on ZeroMQ's descriptor, which signals any change of the
socket's state and is cleared by reading EVENTS: every wait, wake-up and direct call reads EVENTS
and wakes the waiters whose condition holds, so a signal consumed by a send can never leave a
reader asleep beside a full queue.

`tune_allocator` keeps glibc from mapping and unmapping every large message buffer: measured on the
32k-token trajectory benchmark, page faults on freshly mapped frames cost each side more CPU than
encoding, decoding and validating together.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import platform

import zmq

__all__ = ["FastSocket", "BATCH", "tune_allocator", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 16 << 20
"""Allocations below this come from the heap and are reused after free. glibc's default (128 KiB,
raised only after the first free of a mapped block) maps every trajectory frame afresh: ZeroMQ
allocates one buffer per message on both ends, and each new mapping is zero-filled page by page."""
TRIM_THRESHOLD = 64 << 20
"""Free memory kept at the top of the heap before it is returned to the system: room for a window
of large frames, so a steady stream does not give pages back only to fault them in again."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h

_send, _recv, _get = zmq.backend.Socket.send, zmq.backend.Socket.recv, zmq.backend.Socket.get
"""pyzmq's compiled socket calls, below its Python-level checks and enum arithmetic."""
_NOBLOCK, _NOBLOCK_MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS, _POLLIN, _POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)


@functools.cache
def tune_allocator() -> bool:
    """Set glibc's mmap and trim thresholds for this process once; False where libc is not glibc.

    Process-wide by nature: both channel ends call it, so engines and trainers get it by using a
    channel. The memory kept is bounded by TRIM_THRESHOLD per malloc arena.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))

BATCH = 64
"""Messages drained per call at most: a reader that yields to the loop between batches (the trajectory
receiver does) lets its consumer and acknowledgements run at least every BATCH messages."""


class FastSocket:
    """Non-blocking I/O on `sock` (a zmq socket; its own async methods must not be used alongside).

    The caller keeps ownership: `close()` stops watching the descriptor, then the caller closes `sock`.
    """

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self._raw = zmq.Socket.shadow(sock.underlying)
        self._ready = asyncio.Event()  # set when EVENTS held what a waiter wants
        self._wanted = {_POLLIN: 0, _POLLOUT: 0}  # waiters per condition
        self._mask = 0  # the conditions someone waits for
        self._loop: asyncio.AbstractEventLoop | None = None

    def close(self) -> None:
        """Stop watching the socket's descriptor (before the socket closes)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._raw.FD)
        self._loop = None

    def _rearm(self) -> None:
        """After any call on the socket: wake the waiters whose condition now holds."""
        if self._mask and _get(self._raw, _EVENTS) & self._mask:
            self._ready.set()

    def _on_signal(self) -> None:
        """The descriptor is readable: read EVENTS (which clears it) even with nobody waiting."""
        if _get(self._raw, _EVENTS) & self._mask:
            self._ready.set()

    async def _wait(self, flag: int) -> None:
        """Until the socket's EVENTS hold `flag` (POLLIN: a message to read; POLLOUT: room to send)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._raw.FD, self._on_signal)
        self._wanted[flag] += 1
        self._mask |= flag
        try:
            while not _get(self._raw, _EVENTS) & flag:
                self._ready.clear()
                await self._ready.wait()
        finally:
            self._wanted[flag] -= 1
            if not self._wanted[flag]:
                self._mask &= ~flag

    async def recv_batch(self) -> list[list[zmq.Frame]]:
        """Wait for at least one message; return every queued one (up to BATCH), as zero-copy frames."""
        while not (batch := self.recv_ready()):
            await self._wait(_POLLIN)
        return batch

    def recv_ready(self) -> list[list[zmq.Frame]]:
        """The messages queued now (up to BATCH, maybe none), without waiting."""
        raw, batch = self._raw, []
        # EVENTS before each message instead of a final zmq.Again: raising one costs more than a
        # message's frames (pyzmq builds the error and its enums in Python).
        while len(batch) < BATCH and _get(raw, _EVENTS) & _POLLIN:
            batch.append(self._recv_message())
        self._rearm()
        return batch

    def _recv_message(self) -> list[zmq.Frame]:
        """One queued multipart message (EVENTS said one is there). `Frame.more` instead of pyzmq's
        recv_multipart, which asks the socket for RCVMORE after every frame."""
        raw = self._raw
        frames = [_recv(raw, _NOBLOCK, False, False)]
        while frames[-1].more:  # the rest of a multipart message is already here: never Again
            frames.append(_recv(raw, _NOBLOCK, False, False))
        return frames

    async def send(self, frames: list, copy: bool = True) -> None:
        """Send one multipart message; waits only while the socket cannot take it."""
        while not self.try_send(frames, copy):
            await self._wait(_POLLOUT)

    def try_send(self, frames: list, copy: bool = True) -> bool:
        """Send if the socket can take it now; False if it would block (nothing was sent).

        Calls the compiled send per frame with int flags: pyzmq's send_multipart checks every part
        in Python and combines enum flags per part, which cost more than the sends themselves. Once
        ZeroMQ takes the first part of a message it takes the rest without blocking."""
        raw, last = self._raw, len(frames) - 1
        try:
            _send(raw, frames[0], _NOBLOCK_MORE if last else _NOBLOCK, copy, False)
            for i in range(1, last):
                _send(raw, frames[i], _NOBLOCK_MORE, copy, False)
            if last:
                _send(raw, frames[last], _NOBLOCK, copy, False)
        except zmq.Again:  # only the first part can meet it
            return False
        finally:
            self._rearm()
        return True
