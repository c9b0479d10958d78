"""The engine's trajectory sink: every finished group is spooled to disk, then sent, then forgotten
only once the trainer has committed it.

Invariant (no trajectory is lost): delivery is at-least-once with trajectory ids and the trainer
deduplicates; while the trainer is away the engine spools to disk within a configured bound, then
pauses new rollouts (back-pressure), never dropping silently. So:

- `put(group)` returns once the group is on disk (`Spool.append`, fsynced). Groups put while an
  append is running are written together by the next one: one fsync for all of them.
- A sender task hands spooled records, oldest first, to a `TrajectorySender`; its `on_commit` hook
  maps the committed seqs back to records, which are marked done (and their segments deleted).
- `put` waits while the spool is full (or the disk refuses writes: retried every `retry_s`);
  `full` and `room()` tell admission to stop starting episodes before it comes to that.
- On entry the records an earlier run left in the spool are sent first, in a new stream (epoch):
  the trainer may receive some of them twice and deduplicates them by trajectory id.
- Bounded memory: beyond the sender's `window` unacknowledged trajectories, at most `window` more
  are held in memory (those put while the window had room); the rest wait on disk and are read back
  READ_BATCH at a time when their turn comes.

Acks arrive only when the trainer checkpoints (commit-driven), so the window must cover what an
engine produces in one checkpoint interval or the engine stalls until the next checkpoint. With the
spool, `window` only bounds memory; `max_spool_bytes` bounds everything else.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable

import zmq.asyncio
from tidal.engine.spool import RecordId, Spool, SpoolError
from tidal.protocol.channels import TrajectorySender
from tidal.protocol.channels.curve import ClientKeys
from tidal.protocol.messages import Trajectory

__all__ = ["TrajectorySink", "READ_BATCH"]

log = logging.getLogger(__name__)

READ_BATCH = 32
"""Records read back from disk per thread hop when the sender's turn reaches spooled-only ones."""


class TrajectorySink:
    """`async with TrajectorySink(url, "engine-0", "/var/spool/tidal", max_spool_bytes=8 << 30) as sink:
    await sink.put(group)`. Owns a Spool, a TrajectorySender and three tasks (writer, sender, marker)."""

    def __init__(
        self,
        endpoint: str,
        engine_id: str,
        spool_dir: str | os.PathLike,
        *,
        window: int = 256,
        max_spool_bytes: int,
        segment_bytes: int | None = None,
        retry_s: float = 1.0,
        resend_after_s: float = 5.0,
        heartbeat_s: float = 0.5,
        context: zmq.asyncio.Context | None = None,
        epoch: int | None = None,
        report: Callable[[], tuple[int, int, int]] | None = None,
        curve: ClientKeys | None = None,
    ) -> None:
        """`epoch` names this incarnation's stream (default: now) and must be new for each run: seqs
        start again at 1, so an old epoch would make the trainer take resent records for duplicates.
        `report() -> (started, in_flight, capacity)` rides every heartbeat, for the trainer's grants
        (tidal.protocol.grants)."""
        self.engine_id = engine_id
        self.spool_dir = spool_dir
        self._window = window
        self._max_spool_bytes = max_spool_bytes
        self._segment_bytes = segment_bytes
        self._retry_s = retry_s
        reporting = {} if report is None else {"report": report}  # a sender option only where given
        self._tx = TrajectorySender(
            endpoint, engine_id, window=window, resend_after_s=resend_after_s, heartbeat_s=heartbeat_s,
            context=context, on_commit=self._on_commit, epoch=epoch, curve=curve, **reporting,
        )
        self._spool: Spool | None = None
        # put() -> writer: groups waiting for the next append, with the future each put() awaits
        self._to_write: list[tuple[list[Trajectory], asyncio.Future]] = []
        self._writing: list[tuple[list[Trajectory], asyncio.Future]] = []  # the append in flight
        self._write_wake = asyncio.Event()
        # writer -> sender: spooled records not yet sent, oldest first (ids only: the rest is on disk)
        self._queue: deque[RecordId] = deque()
        self._hot: dict[RecordId, Trajectory] = {}  # in-memory copies, at most `window` with the unacked
        self._queued = asyncio.Event()
        # sender -> marker: sent records by seq, and committed records to mark done
        self._by_seq: dict[int, RecordId] = {}
        self._early: set[int] = set()  # seqs committed before send() returned them (rare)
        self._to_mark: list[RecordId] = []
        self._marking: list[RecordId] = []  # the mark_done in flight
        self._mark_wake = asyncio.Event()
        self._space = asyncio.Event()  # set when a commit may have freed spool space; put() waits on it
        self._progress = asyncio.Event()  # set on every commit; flush() waits on it
        self._disk_error: str | None = None
        self._failure: BaseException | None = None
        self._tasks: list[asyncio.Task] = []
        self._spooled = self._committed = self._recovered = self._resent = self._spool_errors = 0

    # --- lifecycle

    async def __aenter__(self) -> TrajectorySink:
        self._spool = await asyncio.to_thread(
            Spool, self.spool_dir, max_bytes=self._max_spool_bytes, segment_bytes=self._segment_bytes
        )
        try:
            await self._tx.__aenter__()
        except BaseException:
            self._spool.close()
            raise
        recovered = self._spool.pending_ids()
        self._recovered = len(recovered)
        if recovered:
            log.info("engine %s: sending %d trajectories left in the spool %s by an earlier run",
                     self.engine_id, len(recovered), self.spool_dir)
            self._queue.extend(recovered)
            self._queued.set()
        self._tasks = [asyncio.create_task(f()) for f in (self._write_loop, self._send_loop, self._mark_loop)]
        for task in self._tasks:
            task.add_done_callback(self._on_task_done)
        return self

    async def __aexit__(self, *exc) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, fut in self._writing + self._to_write:
            if not fut.done():
                fut.set_exception(RuntimeError(
                    f"trajectory sink {self.engine_id} closed while a group was being spooled (it may be on "
                    f"disk, and is then sent by the next run)"))
        await self._tx.__aexit__(*exc)
        marks, self._to_mark = self._to_mark, []
        await asyncio.to_thread(self._finish, marks)

    def _finish(self, marks: list[RecordId]) -> None:
        self._committed += self._spool.mark_done(marks)
        self._spool.close()

    def _on_task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failure = task.exception()
            log.error("engine %s: trajectory sink task failed: %r", self.engine_id, self._failure)
            self._space.set()
            self._progress.set()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"trajectory sink {self.engine_id} stopped") from self._failure

    # --- the engine's side

    @property
    def full(self) -> bool:
        """True while a put would wait: the spool is at max_spool_bytes or the disk refuses writes."""
        return self._spool.full or self._disk_error is not None

    def room(self) -> int:
        """Spool bytes left before put() waits (0 while full)."""
        return 0 if self.full else self._max_spool_bytes - self._spool.bytes

    def report_now(self) -> None:
        """Heartbeat the trainer with `report()` now (TrajectorySender.report_now)."""
        self._tx.report_now()

    async def put(self, trajs: list[Trajectory]) -> None:
        """Spool one finished group durably and queue it for sending; waits while the spool is full.

        Cancelled before the group was taken for writing, nothing was spooled; after that, the
        group is spooled and sent anyway (at-least-once: put again, it is deduplicated by id).
        """
        if not trajs:
            return
        for traj in trajs:
            if not isinstance(traj, Trajectory):
                raise TypeError(f"trajectory sink {self.engine_id}: put takes Trajectory objects, got "
                                f"{type(traj).__name__}")
        while self.full or self._failure is not None:
            self._raise_if_failed()
            self._space.clear()
            await self._space.wait()
        entry = (list(trajs), asyncio.get_running_loop().create_future())
        self._to_write.append(entry)
        self._write_wake.set()
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry in self._to_write:
                self._to_write.remove(entry)
            raise

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until the trainer has committed everything put (and earlier runs left); False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                while self._busy():
                    self._raise_if_failed()
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            return False
        return True

    def _busy(self) -> bool:
        """Something put (or left by an earlier run) is not yet committed and marked done."""
        return bool(self._to_write or self._writing or self._spool.records or self._to_mark or self._marking)

    def stats(self) -> dict[str, int]:
        """Counters: spooled (records appended by this run), sent (first sends), committed (marked
        done), spool_bytes, pending (records in the spool not committed), corrupt_records (skipped
        as unreadable), resent (records an earlier run left, sent again), recovered (how many it
        left), wire_resent (sends repeated for a trainer that did not see or lost them),
        spool_errors (failed appends, retried), unacked (sent, not committed)."""
        return {
            "spooled": self._spooled,
            "sent": self._tx.stats.sent,
            "committed": self._committed,
            "spool_bytes": self._spool.bytes,
            "pending": self._spool.records,
            "corrupt_records": self._spool.corrupt_records,
            "resent": self._resent,
            "recovered": self._recovered,
            "wire_resent": self._tx.stats.resent,
            "spool_errors": self._spool_errors,
            "unacked": self._tx.unacked,
        }

    # --- writer: put() -> spool

    async def _write_loop(self) -> None:
        while True:
            while not self._to_write:
                self._write_wake.clear()
                await self._write_wake.wait()
            self._writing, self._to_write = self._to_write, []
            trajs = [t for group, _ in self._writing for t in group]
            rids = await self._append(trajs)
            room = self._window - self._tx.unacked - len(self._hot)
            for rid, traj in zip(rids, trajs, strict=True):
                if room > 0:
                    self._hot[rid] = traj
                    room -= 1
                self._queue.append(rid)
            self._spooled += len(rids)
            self._queued.set()
            for _, fut in self._writing:
                if not fut.done():
                    fut.set_result(None)
            self._writing = []

    async def _append(self, trajs: list[Trajectory]) -> list[RecordId]:
        while True:
            try:
                rids = await asyncio.to_thread(self._spool.append, trajs)
            except SpoolError as exc:
                self._spool_errors += 1
                if self._disk_error is None:
                    log.warning("engine %s: spooling paused, retrying every %.1f s: %s",
                                self.engine_id, self._retry_s, exc)
                self._disk_error = str(exc)
                await asyncio.sleep(self._retry_s)
                continue
            if self._disk_error is not None:
                log.warning("engine %s: spooling resumed after %s", self.engine_id, self._disk_error)
                self._disk_error = None
                self._space.set()
            return rids

    # --- sender: spool -> trainer

    async def _send_loop(self) -> None:
        while True:
            while not self._queue:
                self._queued.clear()
                await self._queued.wait()
            rids = list(itertools.islice(self._queue, READ_BATCH))
            trajs = [self._hot.pop(rid, None) for rid in rids]
            cold = [rid for rid, traj in zip(rids, trajs, strict=True) if traj is None]
            if cold:
                read = iter(await asyncio.to_thread(self._spool.read_many, cold))
                trajs = [next(read) if traj is None else traj for traj in trajs]
            for rid, traj in zip(rids, trajs, strict=True):
                if traj is not None:  # None: corrupt on disk (counted and forgotten by the spool)
                    seq = await self._tx.send(traj)
                    self._resent += rid.segment < self._spool.first_segment
                    if seq in self._early:
                        self._early.discard(seq)
                        self._to_mark.append(rid)
                        self._mark_wake.set()
                    else:
                        self._by_seq[seq] = rid
                self._queue.popleft()
            self._progress.set()

    def _on_commit(self, seqs: list[int]) -> None:
        for seq in seqs:
            rid = self._by_seq.pop(seq, None)
            if rid is None:
                self._early.add(seq)
            else:
                self._to_mark.append(rid)
        self._mark_wake.set()

    # --- marker: commits -> spool

    async def _mark_loop(self) -> None:
        while True:
            while not self._to_mark:
                self._mark_wake.clear()
                await self._mark_wake.wait()
            self._marking, self._to_mark = self._to_mark, []
            self._committed += await asyncio.to_thread(self._spool.mark_done, self._marking)
            self._marking = []
            self._space.set()
            self._progress.set()
