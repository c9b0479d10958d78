"""The render pool: chat-template rendering and observation encoding off the engine's event loop.

Rendering a chat template is pure Python (Jinja) and holds the GIL, so threads cannot take it off the
one thread that also streams every generation: at a ~2.6k-token conversation one observation costs
0.2-0.3 ms with Qwen2.5's template and 0.5-2 ms with Qwen3's, and an episode's first prompt several
ms, seconds of CPU per second at thousands of turns per second. `RenderPool` runs that work in N
child processes, each a
`python -m tidal.engine.render_worker CHECKPOINT` (engine/render_worker.py) with its own
`ChatTokenizer`, talking over its stdin/stdout in length-prefixed msgspec msgpack frames, never pickle.
The loop's share of a call is encoding it, one pipe write and one read per frame, and decoding the
reply: ~0.12 ms an observation at 2.6k tokens whatever the template (0.28 ms inline with Qwen2.5's,
0.58 ms with Qwen3's), ~0.2 ms a first prompt (3.7 ms inline); tidal.bench.render, 1000 episodes on a
loaded 2-core machine.

Scheduling: calls wait in one FIFO queue; a worker holds at most one frame in flight. The calls made
in one turn of the event loop go out together at its end, shared evenly among the idle workers, and
a worker that becomes idle takes what waits: up to `max_batch` calls in one frame. At low load calls
spread over the workers (latency); when they pile up they share frames, whose write, wake-up and read
the loop then pays once for several calls (3.4-5 calls a frame cut the loop's cost of an observation
by 10-20% in the bench above: 130-139 us unbatched, 108-116 us batched). The queue is the
back-pressure: it holds at most one call per episode awaiting a render, so it is bounded by the
engine's concurrency (rollout.max_concurrent).

Invariant: every call is answered exactly once: its result, the template's own `ChatTemplateError`
(as inline), or `RenderWorkerError`. A worker that exits or writes a malformed frame is logged with
its index and pid, counted (`worker_deaths`, `bad_frames`), killed and restarted in the background;
the calls it held go back to the front of the queue and are retried once on another process; a call
lost a second time fails with `RenderWorkerError` naming both losses. A caller that is cancelled
drops its call (a reply for it is discarded).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
from tidal.engine.chat_template import ChatTemplateError
from tidal.engine.render import DeltaRequest, DeltaResult, PromptRequest, PromptResult
from tidal.engine.render_worker import HEADER, MAX_FRAME, Call, FrameError, Ready, RenderFailed, Replies
from tidal.protocol.errors import TidalError

__all__ = ["RenderPool", "RenderWorkerError", "MAX_BATCH"]

log = logging.getLogger(__name__)

MAX_BATCH = 16
"""Calls one frame carries at most. Batching only saves the loop's per-frame cost (a write, a wake-up,
a read) when calls queue behind busy workers; a bound keeps one frame's render time, and what a dead
worker's retry must redo, small."""
RETRIES = 1
"""Times a call lost with its worker is sent again (to another process)."""
START_TIMEOUT_S = 120.0
"""A worker that has not loaded its tokenizer by then failed to start."""
CLOSE_TIMEOUT_S = 5.0
"""After its stdin closes, how long a worker gets to exit before it is killed."""
RESTART_BACKOFF_S = (0.0, 0.5, 2.0, 10.0)
"""Waits before successive restarts of a worker that fails to start (the last repeats)."""
STDERR_LINES = 20
"""Last lines of a worker's stderr kept to explain its death."""

_replies = msgspec.msgpack.Decoder(Ready | Replies)
_encoder = msgspec.msgpack.Encoder()


class RenderWorkerError(TidalError, RuntimeError):
    """A render call no worker could answer: lost with two workers, failed inside one, or the pool
    has no running worker (it cannot start them) or is closed."""


@dataclass(eq=False)
class _Call:
    id: int
    payload: bytes
    """The encoded `Call`, made when submitted (the caller's messages may change after)."""
    kind: type[PromptResult] | type[DeltaResult]
    """What a reply must hold."""
    future: asyncio.Future
    losses: list[str] = field(default_factory=list)
    """Why each worker that held it is gone."""


@dataclass(eq=False)
class _Worker:
    index: int
    ready: asyncio.Future
    """Done when the worker's `Ready` frame arrives (None), or with why it could not start."""
    closed: asyncio.Future
    """Done with the exit code once the process has exited and its pipes are drained."""
    transport: asyncio.SubprocessTransport | None = None
    pid: int = 0
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_LINES))
    inflight: list[_Call] = field(default_factory=list)
    lost: bool = False
    """Already given up on (killed; its calls requeued)."""

    @property
    def name(self) -> str:
        return f"render worker {self.index} (pid {self.pid})"

    def kill(self) -> None:
        if self.transport is not None and self.transport.get_returncode() is None:
            with contextlib.suppress(ProcessLookupError):
                self.transport.kill()

    def tail(self) -> str:
        return " | ".join(self.stderr) or "no output on stderr"


class _Pipes(asyncio.SubprocessProtocol):
    """One worker's pipes, parsed where the bytes arrive: a frame costs the loop one callback, no task."""

    def __init__(self, pool: RenderPool, worker: _Worker):
        self.pool, self.worker = pool, worker
        self.out = bytearray()
        self.err = bytearray()

    def connection_made(self, transport) -> None:
        self.worker.transport, self.worker.pid = transport, transport.get_pid()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 2:
            self.err += data
            *lines, self.err = self.err.split(b"\n")
            for line in lines:
                self.pool._said(self.worker, line.decode(errors="replace").rstrip())
            return
        self.out += data
        while len(self.out) >= HEADER.size and not self.worker.lost:
            (size,) = HEADER.unpack_from(self.out)
            if size > MAX_FRAME:
                self.pool._malformed(self.worker, f"frame length {size} exceeds {MAX_FRAME} bytes "
                                                  "(not a frame: text on stdout?)")
                return
            end = HEADER.size + size
            if len(self.out) < end:
                return
            with memoryview(self.out) as view:
                try:
                    message = _replies.decode(view[HEADER.size:end])
                except msgspec.DecodeError as exc:
                    message = exc
            del self.out[:end]
            self.pool._received(self.worker, message)

    def connection_lost(self, exc) -> None:
        if self.err:
            self.pool._said(self.worker, self.err.decode(errors="replace").rstrip())
        self.pool._exited(self.worker)


class RenderPool:
    """N render workers for one checkpoint; `async with RenderPool(path, 4) as pool: await pool.delta(...)`.

    Args:
        checkpoint: the checkpoint directory the engine's `ChatTokenizer` loads.
        workers: worker processes (at least 1).
        template: the named chat template, as `ChatTokenizer.load(template=...)`.
        max_batch: calls one frame may carry (1: no batching).
        command: the worker's argv before the checkpoint; by default this interpreter running
            `-m tidal.engine.render_worker`.
    """

    def __init__(self, checkpoint: str, workers: int, *, template: str | None = None, max_batch: int = MAX_BATCH,
                 command: Sequence[str] | None = None):
        if workers < 1 or max_batch < 1:
            raise ValueError(f"RenderPool: workers ({workers}) and max_batch ({max_batch}) must be at least 1")
        self.checkpoint = str(checkpoint)
        self.max_batch = max_batch
        self._argv = [*(command or (sys.executable, "-m", "tidal.engine.render_worker")), self.checkpoint]
        if template is not None:
            self._argv += ["--template", template]
        self._workers: list[_Worker | None] = [None] * workers
        self._idle: deque[_Worker] = deque()
        self._queue: deque[_Call] = deque()
        self._restarts: set[asyncio.Task] = set()
        self._dying: set[_Worker] = set()  # given up on, killed, not yet reaped
        self._next_id = 0
        self._open = False
        self._dispatch_soon = False  # a dispatch is scheduled for the end of this loop turn
        self.counters: Counter[str] = Counter()
        """calls, frames, retries, failed (RenderWorkerError), worker_deaths, bad_frames, restarts,
        start_failures."""

    # --- lifecycle

    async def __aenter__(self) -> RenderPool:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        """Start every worker and wait until each has loaded the tokenizer; raises `RenderWorkerError`."""
        self._open = True
        started = await asyncio.gather(*(self._spawn(i) for i in range(len(self._workers))), return_exceptions=True)
        for worker in started:
            if isinstance(worker, _Worker):
                self._enlist(worker)
        errors = [e for e in started if isinstance(e, BaseException)]
        if errors:
            await self.close()
            raise errors[0]

    async def close(self) -> None:
        """End the workers (stdin closed, then killed after `CLOSE_TIMEOUT_S`); pending calls fail."""
        self._open = False
        for task in self._restarts:
            task.cancel()
        await asyncio.gather(*self._restarts, return_exceptions=True)
        workers = [w for w in self._workers if w is not None]
        self._workers = [None] * len(self._workers)
        self._idle.clear()
        await asyncio.gather(*(self._stop(w) for w in workers), *(w.closed for w in self._dying))
        calls = [*self._queue, *(c for w in workers for c in w.inflight)]
        self._queue.clear()
        self._fail(calls, "the render pool is closed")

    async def _stop(self, worker: _Worker) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            worker.transport.get_pipe_transport(0).close()
        try:
            await asyncio.wait_for(asyncio.shield(worker.closed), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("%s did not exit %.0fs after its stdin closed: killed", worker.name, CLOSE_TIMEOUT_S)
            worker.kill()
            await worker.closed

    async def _spawn(self, index: int) -> _Worker:
        """A started worker that has sent `Ready`; raises `RenderWorkerError` with its stderr's last lines."""
        loop = asyncio.get_running_loop()
        worker = _Worker(index, loop.create_future(), loop.create_future())
        pipe = asyncio.subprocess.PIPE
        await loop.subprocess_exec(lambda: _Pipes(self, worker), *self._argv, stdin=pipe, stdout=pipe, stderr=pipe)
        try:
            why = await asyncio.wait_for(asyncio.shield(worker.ready), START_TIMEOUT_S)
        except TimeoutError:
            why = f"not ready after {START_TIMEOUT_S:.0f}s"
        except BaseException:  # cancelled (the pool closes): no worker may outlive it
            worker.kill()
            self._dying.add(worker)
            raise
        if why is not None:
            worker.kill()
            await worker.closed
            raise RenderWorkerError(f"{worker.name} ({' '.join(self._argv)}) could not start: {why}: {worker.tail()}")
        return worker

    def _enlist(self, worker: _Worker) -> None:
        """Put a started worker to work."""
        if not self._open:
            worker.kill()
            return
        self._workers[worker.index] = worker
        self._idle.append(worker)
        self._dispatch()

    async def _restart(self, index: int) -> None:
        for attempt in itertools.count():
            await asyncio.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
            try:
                worker = await self._spawn(index)
            except RenderWorkerError as exc:
                self.counters["start_failures"] += 1
                log.error("%s", exc)
                if not any(self._workers):  # nobody can answer what waits: fail it rather than hang
                    calls = list(self._queue)
                    self._queue.clear()
                    self._fail(calls, f"no render worker is running: {exc}")
                continue
            self.counters["restarts"] += 1
            log.info("%s started (restart)", worker.name)
            self._enlist(worker)
            return

    # --- calls

    async def prompt(self, request: PromptRequest) -> PromptResult:
        """`render_prompt` in a worker. Raises `ChatTemplateError` as inline, or `RenderWorkerError`."""
        return await self._call(request, PromptResult)

    async def delta(self, request: DeltaRequest) -> DeltaResult:
        """`observation_delta` in a worker. Raises `ChatTemplateError` as inline, or `RenderWorkerError`."""
        return await self._call(request, DeltaResult)

    async def _call(self, request: PromptRequest | DeltaRequest, kind: type):
        if not self._open:
            raise RenderWorkerError("the render pool is not running (start it, or it was closed)")
        self._next_id += 1
        try:
            payload = _encoder.encode(Call(id=self._next_id, request=request))
        except (TypeError, msgspec.EncodeError) as exc:
            raise TypeError(f"render pool: a {type(request).__name__} holds a value msgpack cannot carry "
                            f"(messages, tools and template kwargs must be JSON-like): {exc}") from None
        call = _Call(self._next_id, payload, kind, asyncio.get_running_loop().create_future())
        self._queue.append(call)
        self.counters["calls"] += 1
        if not self._dispatch_soon:  # the calls of this loop turn go out together
            self._dispatch_soon = True
            asyncio.get_running_loop().call_soon(self._dispatch)
        return await call.future

    def _dispatch(self) -> None:
        """Share waiting calls among idle workers, up to `max_batch` per frame. Never awaits."""
        self._dispatch_soon = False
        while self._queue and self._idle:
            size = min(self.max_batch, -(-len(self._queue) // len(self._idle)))
            batch: list[_Call] = []
            while self._queue and len(batch) < size:
                call = self._queue.popleft()
                if not call.future.done():  # a cancelled caller's call is dropped
                    batch.append(call)
            if not batch:
                return
            worker = self._idle.popleft()
            worker.inflight = batch
            body = _encoder.encode([msgspec.Raw(c.payload) for c in batch])
            self.counters["frames"] += 1
            try:
                worker.transport.get_pipe_transport(0).write(HEADER.pack(len(body)) + body)
            except (OSError, RuntimeError):  # its pipe is closed: it is exiting, and its exit retries these
                worker.kill()

    # --- what a worker's pipes deliver (callbacks of `_Pipes`)

    def _received(self, worker: _Worker, message: Ready | Replies | msgspec.DecodeError) -> None:
        if isinstance(message, msgspec.DecodeError):
            self._malformed(worker, str(message))
        elif isinstance(message, Ready) and not worker.ready.done():
            worker.ready.set_result(None)
        elif isinstance(message, Replies) and worker.ready.done():
            try:
                self._answer(worker, message)
            except FrameError as exc:
                self._malformed(worker, str(exc))
        else:
            self._malformed(worker, f"unexpected {type(message).__name__} frame")

    def _malformed(self, worker: _Worker, why: str) -> None:
        if not worker.ready.done():
            worker.ready.set_result(f"wrote a malformed first frame: {why}")
            worker.lost = True  # it never started: nothing to requeue or restart here
            worker.kill()
        elif self._open and not worker.lost:
            self._lost(worker, f"wrote a malformed frame: {why}", "bad_frames")

    def _exited(self, worker: _Worker) -> None:
        code = worker.transport.get_returncode()
        worker.transport.close()
        self._dying.discard(worker)
        if not worker.ready.done():
            worker.ready.set_result(f"exited with {code}")
        elif self._open and not worker.lost:
            self._lost(worker, f"exited with {code}: {worker.tail()}", "worker_deaths")
        if not worker.closed.done():
            worker.closed.set_result(code)

    def _said(self, worker: _Worker, line: str) -> None:
        """A line of a worker's stderr: logged, and the last few kept to explain its death."""
        worker.stderr.append(line)
        log.warning("%s: %s", worker.name, line)

    def _answer(self, worker: _Worker, message: Replies) -> None:
        ids = [r.id for r in message.replies]
        expected = [c.id for c in worker.inflight]
        if ids != expected:
            raise FrameError(f"replies to calls {ids[:8]}, expected {expected[:8]}")
        for call, reply in zip(worker.inflight, message.replies, strict=True):
            if call.future.done():
                continue
            match reply.result:
                case RenderFailed(error="template", message=text):
                    call.future.set_exception(ChatTemplateError(text))
                case RenderFailed(message=text):
                    self.counters["failed"] += 1
                    call.future.set_exception(RenderWorkerError(f"{worker.name}: {text}"))
                case result if isinstance(result, call.kind):
                    call.future.set_result(result)
                case result:
                    raise FrameError(f"call {call.id} expected a {call.kind.__name__}, got {type(result).__name__}")
        worker.inflight = []
        self._idle.append(worker)
        self._dispatch()

    def _lost(self, worker: _Worker, why: str, counter: str) -> None:
        """A dead or misbehaving worker: count, kill, requeue its calls (once), restart its slot."""
        self.counters[counter] += 1
        worker.lost = True
        worker.kill()
        self._dying.add(worker)
        if worker in self._idle:
            self._idle.remove(worker)
        if self._workers[worker.index] is worker:
            self._workers[worker.index] = None
        calls, worker.inflight = worker.inflight, []
        log.error("%s %s; restarting it, %d calls it held go to another worker", worker.name, why, len(calls))
        for call in reversed(calls):
            call.losses.append(f"{worker.name} {why}")
            if call.future.done():
                continue
            if len(call.losses) > RETRIES:
                self._fail([call], "render call lost with two workers: " + "; ".join(call.losses))
            else:
                self.counters["retries"] += 1
                self._queue.appendleft(call)
        task = asyncio.create_task(self._restart(worker.index))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)
        self._dispatch()

    def _fail(self, calls: list[_Call], why: str) -> None:
        for call in calls:
            if not call.future.done():
                self.counters["failed"] += 1
                call.future.set_exception(RenderWorkerError(why))

    # --- introspection

    @property
    def pids(self) -> list[int | None]:
        """Each slot's worker process id (None while it restarts)."""
        return [w.pid if w is not None else None for w in self._workers]

    def stats(self) -> dict[str, int]:
        """The counters, plus `queued` (calls waiting for a worker) and `workers` (running)."""
        return {**{k: self.counters[k] for k in ("calls", "frames", "retries", "failed", "worker_deaths",
                                                  "bad_frames", "restarts", "start_failures")},
                "queued": len(self._queue), "workers": sum(w is not None for w in self._workers)}
