"""A TCP proxy on 127.0.0.1 that injects network faults between two real processes.

It runs its own asyncio loop in a thread, so a test drives it from anywhere. Faults, switched at will:
  delay_s          each chunk waits this long before it is forwarded (both directions)
  truncate_every   every Nth connection is cut after `truncate_bytes` bytes in either direction: a
                   request, response or frame ends midway
  drop_every       every Nth connection is closed as soon as it is accepted
  drop_all()       close every open connection now (a flapping link, a NAT timeout)
`counts` says how many connections each fault hit, so a test can check that faults did happen.
"""

import asyncio
import contextlib
import threading
from collections import Counter

__all__ = ["Proxy"]

CHUNK = 1 << 16


class Proxy:
    """`with Proxy(port) as proxy:` listens on `proxy.port` and forwards to 127.0.0.1:`upstream`."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.port: int | None = None
        self.delay_s = 0.0
        self.truncate_every = 0
        self.truncate_bytes = 0
        self.drop_every = 0
        self.counts: Counter[str] = Counter()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"proxy-{upstream}", daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> "Proxy":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            self._server.close()
            self._close_all()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def drop_all(self) -> int:
        """Close every open connection now; how many there were."""
        async def drop():
            n = len(self._writers)
            self.counts["dropped_all"] += n
            self._close_all()
            return n
        return asyncio.run_coroutine_threadsafe(drop(), self._loop).result(10)

    def _close_all(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counts["connections"] += 1
        n = self.counts["connections"]
        if self.drop_every and n % self.drop_every == 0:
            self.counts["dropped"] += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            self.counts["upstream_refused"] += 1
            writer.transport.abort()
            return
        limit = self.truncate_bytes if self.truncate_every and n % self.truncate_every == 0 else None
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer, limit), self._pipe(up_reader, writer, limit))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: int | None) -> None:
        """Forward until either side closes (or `limit` bytes, then cut both): closing one direction
        ends the other, as a real broken link does."""
        sent = 0
        try:
            while data := await src.read(CHUNK):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if limit is not None and sent + len(data) >= limit:
                    dst.write(data[: max(limit - sent, 0)])
                    with contextlib.suppress(ConnectionError):
                        await dst.drain()
                    self.counts["truncated"] += 1
                    break
                sent += len(data)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()
