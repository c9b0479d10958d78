"""Trajectory channel, engine -> trainer: at-least-once on the wire, exactly once to the consumer.

docs/architecture.md invariant 4 (no trajectory is lost) and 5 (bounded memory), over one ZeroMQ DEALER (each
engine, connects) -> ROUTER (the trainer, binds) link:

- Every trajectory travels as `[Data(engine_id, epoch, seq), head, arrays]` (`frames.trajectory_frames`):
  a small head, then the four arrays in one frame, sent from the trajectory's own buffer without a copy. `epoch` names the
  engine incarnation (default: its start time in ns), so a restarted engine whose seqs start again
  at 1 is a new stream, never mistaken for duplicates. An engine that persists its spool may pass
  its old epoch to resume the old stream.
- Acknowledgement is commit-driven: the trainer acks a trajectory only when its consumer calls
  `commit` (after making it durable, e.g. in a checkpoint that also holds `dedup_state()`). The engine
  keeps every unacknowledged trajectory and resends it when the trainer incarnation changes (the
  trainer restarted and lost what it had not committed) or when the trainer has not seen it within
  `resend_after_s` (lost on a broken connection). A trainer killed with SIGKILL and restarted from
  its checkpoint therefore loses nothing and, with the checkpointed `DedupState`, uses nothing twice.
- Flow control: a sender holds at most `window` unacknowledged trajectories; `send` waits when the
  window is full (a trainer that does not commit stalls its engines), until an eighth of it is free. The receiver buffers at most
  `capacity` deliveries; when full it stops reading and ZeroMQ's high-water marks push back to the
  senders' sockets. With capacity >= engines x window the receiver never stops reading.
- Either side may restart while the other runs: the DEALER reconnects by itself, and `Hello`
  heartbeats tell a new trainer incarnation which streams exist.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

import zmq
import zmq.asyncio
from tidal.protocol.channels.curve import ClientKeys, CurveGuard, ServerKeys
from tidal.protocol.channels.dedup import MAX_STREAMS, DedupState, SeqSet, StreamTable
from tidal.protocol.channels.fastio import FastSocket, tune_allocator
from tidal.protocol.channels.frames import (
    ENVELOPE_VERSION,
    Ack,
    ChannelStats,
    Data,
    Delivery,
    Hello,
    bind,
    decode_ack,
    decode_envelope,
    encode_frame,
    trajectory_frames,
    trajectory_from_frames,
)
from tidal.protocol.errors import ProtocolError
from tidal.protocol.messages import Trajectory

__all__ = ["TrajectorySender", "TrajectoryReceiver", "MAX_AHEAD", "ACK_LINGER_MS", "REOPEN_FRACTION"]

log = logging.getLogger(__name__)

REOPEN_FRACTION = 8
"""A full window reopens once window // 8 (at least 1) of its trajectories are acknowledged: a blocked
engine then sends a run of trajectories per wake-up instead of one per acknowledgement."""

COALESCE_S, COALESCE_BATCH = 0.0005, 8
"""While a stream flows (the last batch held more than one message), the reader waits COALESCE_S
(up to a millisecond with asyncio's default selector) before taking a batch of fewer than
COALESCE_BATCH, so that one wake-up, one consumer turn and one ack serve several trajectories:
with ~2.5 messages per wake-up these cost both ends more than decoding a 32k-token trajectory.
A lone trajectory (the last batch held one) is taken at once, and so is every batch while the last
sender had at most 2 x COALESCE_BATCH unacknowledged: a small window would otherwise wait each time."""

ACK_LINGER_MS = 200
"""How long a closing receiver's socket may keep trying to deliver its last acks."""

MAX_FRAME_BYTES = 256 << 20
"""The largest frame the receiver reads (ZMQ_MAXMSGSIZE): far above any trajectory (a 1M-token one is
13 MiB), so that a hostile or broken peer announcing gigabytes is disconnected instead of buffered."""

MAX_AHEAD = 1 << 16
"""A seq this far beyond a stream's watermark is rejected: no honest sender's window is that large,
and accepting it would let one bad frame grow the out-of-order set without bound."""


async def _cancel(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class _Pending:
    """An unacknowledged trajectory as its frames: a resend sends them again, nothing re-encoded."""

    __slots__ = ("frames", "sent_at")

    def __init__(self, frames: list, sent_at: float) -> None:
        self.frames = frames
        self.sent_at = sent_at


class TrajectorySender:
    """Engine side: `async with TrajectorySender(url, "engine-0") as tx: seq = await tx.send(traj)`.

    Owns a DEALER socket and two tasks (ack reader, heartbeat/resend ticker), started on enter and
    cancelled on exit. Unacknowledged trajectories are lost on exit unless `flush` returned True, or
    unless the caller keeps them elsewhere: `on_commit(seqs)` is called (on the event loop, from the ack
    reader) with the seqs each ack newly committed, so a spool can forget them then.
    """

    def __init__(
        self,
        endpoint: str,
        engine_id: str,
        *,
        window: int = 256,
        resend_after_s: float = 5.0,
        heartbeat_s: float = 0.5,
        epoch: int | None = None,
        context: zmq.asyncio.Context | None = None,
        on_commit: Callable[[list[int]], None] | None = None,
        report: Callable[[], tuple[int, int, int]] | None = None,
        curve: ClientKeys | None = None,
    ) -> None:
        """`curve`: this engine's keys and the trainer's public key (protocol/channels/curve.py);
        None: no encryption (loopback)."""
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.endpoint = endpoint
        self.engine_id = engine_id
        self.epoch = time.time_ns() if epoch is None else epoch
        self.stats = ChannelStats()
        self._window = window
        self._resend_after_s = resend_after_s
        self._heartbeat_s = heartbeat_s
        self._context = context
        self._on_commit = on_commit
        self._report = report
        self._curve = curve
        self._guard: CurveGuard | None = None
        """() -> (started, in_flight, capacity) for each heartbeat: what the trainer's grants need."""
        self._next_seq = 1
        self._unacked: dict[int, _Pending] = {}  # insertion order is seq order
        self._room = asyncio.Event()  # cleared by send() at a full window, set again at _reopen_at
        self._reopen_at = window - max(1, window // REOPEN_FRACTION)
        self._empty = asyncio.Event()  # set while nothing is unacknowledged; flush() waits on it
        self._kick = asyncio.Event()  # wakes the ticker early (new trainer incarnation, report_now)
        self._trainer: int | None = None
        self._trainer_changed_at = 0.0
        self._seen = SeqSet()
        self._tasks: list[asyncio.Task] = []
        self._sock: zmq.asyncio.Socket | None = None
        self._io: FastSocket | None = None

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    async def __aenter__(self) -> TrajectorySender:
        tune_allocator()
        ctx = self._context or zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.immediate = 1  # queue only on a live connection: nothing piles up for an absent trainer
        sock.sndhwm = self._window
        sock.heartbeat_ivl = 1000  # notice a vanished trainer host and reconnect
        sock.heartbeat_timeout = 5000
        if self._curve is not None:
            self._guard = CurveGuard(sock, self._curve, f"engine {self.engine_id} trajectory sender")
            self._guard.secure()
        sock.connect(self.endpoint)
        self._sock = sock
        self._io = FastSocket(sock)
        self._room.set()
        self._empty.set()
        self._tasks = [asyncio.create_task(self._read_acks()), asyncio.create_task(self._tick())]
        if self._guard is not None:
            self._guard.start(self.stats)
        return self

    async def __aexit__(self, *exc) -> None:
        await _cancel(self._tasks)
        self._io.close()
        if self._guard is not None:
            await self._guard.close()
        self._sock.close(linger=0)

    async def send(self, traj: Trajectory) -> int:
        """Send one trajectory; returns its seq. Waits while `window` trajectories are unacknowledged.

        The trajectory's frames are kept (and sent again on a resend) from the moment a seq is
        assigned until the trainer commits it, so a cancelled `send` loses nothing. Its arrays are
        sent from their own buffers, without a copy: do not mutate them after sending.
        """
        while len(self._unacked) >= self._window:
            self._room.clear()
            await self._room.wait()
        frames = [b"", *trajectory_frames(traj)]  # may raise (not a Trajectory): before a seq is taken, no gap
        seq = self._next_seq
        self._next_seq += 1
        self._unacked[seq] = _Pending(frames, time.monotonic())
        frames[0] = encode_frame(Data(self.engine_id, self.epoch, seq, self._floor()))
        self._empty.clear()
        self.stats.sent += 1
        await self._io.send(frames, copy=False)
        return seq

    def _floor(self) -> int:
        """The lowest unacknowledged seq (the next one if none): all below it are committed."""
        return next(iter(self._unacked), self._next_seq)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until the trainer has committed everything sent; False if `timeout` ran out first."""
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True

    # --- trainer -> engine

    async def _read_acks(self) -> None:
        while True:
            for frames in await self._io.recv_batch():
                try:
                    if len(frames) != 1:
                        raise ProtocolError(f"ack: expected 1 frame, got {len(frames)}")
                    ack = decode_ack(frames[0].buffer)
                except ProtocolError as exc:
                    self.stats.rejected += 1
                    self.stats.last_error = str(exc)
                    log.warning("engine %s: rejected a frame from the trainer: %s", self.engine_id, exc)
                    continue
                self._on_ack(ack)

    def _on_ack(self, ack: Ack) -> None:
        if ack.epoch != self.epoch:
            return  # meant for an earlier incarnation of this engine
        if ack.trainer != self._trainer:
            if self._trainer is not None:  # a restarted trainer: it lost all it had not committed
                self._trainer_changed_at = time.monotonic()
                self._kick.set()
            self._trainer = ack.trainer
        self._seen = SeqSet(ack.seen, ack.seen_above)
        done = []
        for seq in self._unacked:
            if seq > ack.committed:
                break
            done.append(seq)
        done.extend(seq for seq in ack.committed_above if seq in self._unacked)
        for seq in done:
            del self._unacked[seq]
        self.stats.acked += len(done)
        if len(self._unacked) <= self._reopen_at:
            self._room.set()
        if not self._unacked:
            self._empty.set()
        if done and self._on_commit is not None:
            try:
                self._on_commit(done)
            except Exception:  # the ack reader must outlive a faulty hook, or nothing is acked again
                log.exception("engine %s: on_commit hook failed for %d seqs", self.engine_id, len(done))

    # --- heartbeat and resends

    def report_now(self) -> None:
        """Send the next heartbeat (with `report()`) at once rather than within heartbeat_s. An engine
        out of grant calls it as its episodes end, so the trainer hears of the freed slots and grants
        them without waiting for the periodic heartbeat (several calls before it goes make one)."""
        self._kick.set()

    async def _tick(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._heartbeat_s):
                    await self._kick.wait()
            self._kick.clear()
            report = self._report() if self._report is not None else (0, 0, 0)
            hello = encode_frame(Hello(self.engine_id, self.epoch, self._floor(), ENVELOPE_VERSION, *report))
            self._io.try_send([hello])  # no trainer connected: nobody to greet
            await self._resend_due()

    async def _resend_due(self) -> None:
        now = time.monotonic()
        due = [
            seq
            for seq, p in self._unacked.items()
            if seq not in self._seen
            and (p.sent_at < self._trainer_changed_at or now - p.sent_at >= self._resend_after_s)
        ]
        for seq in due:
            pending = self._unacked.get(seq)
            if pending is None:  # committed while an earlier resend was waiting
                continue
            pending.sent_at = time.monotonic()
            self.stats.resent += 1
            await self._io.send(pending.frames, copy=False)


class TrajectoryReceiver:
    """Trainer side: binds `endpoint`, hands each trajectory to `recv()` once, acks on `commit`.

    For a consumer that checkpoints: save `dedup_state(including=batch)` with the checkpoint, then
    `commit(batch)`; on restart pass the saved state as `dedup_state`. With `auto_commit=True` a
    delivery is committed as `recv` returns it (for consumers that keep no checkpoint).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        capacity: int = 256,
        dedup_state: DedupState | None = None,
        auto_commit: bool = False,
        context: zmq.asyncio.Context | None = None,
        curve: ServerKeys | None = None,
    ) -> None:
        """`curve`: the trainer's keys and the engines it admits (protocol/channels/curve.py); None:
        no encryption and no authentication (loopback)."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.endpoint = endpoint
        self.trainer = time.time_ns()  # this incarnation; engines resend what a new one has not seen
        self.stats = ChannelStats()
        self._capacity = capacity
        self._auto_commit = auto_commit
        self._context = context
        self._curve = curve
        self._guard: CurveGuard | None = None
        self._seen = StreamTable(dedup_state)  # held by this incarnation: queued, delivered or committed
        self._committed = StreamTable(dedup_state)
        self._items: collections.deque[Delivery] = collections.deque()
        self._not_empty = asyncio.Event()  # recv() waits on it
        self._not_full = asyncio.Event()  # the reader waits on it when `capacity` deliveries are queued
        # stream -> routing id of its latest connection (streams, not engine ids: two incarnations of
        # one engine may overlap, and each must get its own acks)
        self._peers: dict[tuple[str, int], bytes] = {}
        self.engines: dict[tuple[str, int], tuple[Hello, float]] = {}
        """(engine_id, epoch) -> the latest heartbeat of each engine that reports its episodes, and
        time.monotonic() when it came: what the trainer shares its staleness budget by."""
        self.reported = asyncio.Event()
        """Set when such a heartbeat arrives (the consumer clears it): the grants may change."""
        self._ack_due: dict[tuple[str, int], None] = {}  # streams whose Ack is to be sent (ordered set)
        self._ack_wake = asyncio.Event()
        self._reading = False  # the reader is between taking a batch and flushing the acks it led to
        self._sender_unacked = 0  # seq - floor + 1 of the last data frame: its sender's unacknowledged
        self._failure: BaseException | None = None
        self._tasks: list[asyncio.Task] = []
        self._sock: zmq.asyncio.Socket | None = None
        self._io: FastSocket | None = None

    async def __aenter__(self) -> TrajectoryReceiver:
        tune_allocator()
        ctx = self._context or zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.rcvhwm = self._capacity
        sock.maxmsgsize = MAX_FRAME_BYTES  # a peer announcing more is dropped at the frame's header
        sock.heartbeat_ivl = 1000
        sock.heartbeat_timeout = 5000
        try:
            if self._curve is not None:
                self._guard = CurveGuard(sock, self._curve, "trajectory receiver", ctx)
                self._guard.secure()
            self.endpoint = await bind(sock, self.endpoint)
        except BaseException:
            if self._guard is not None:
                await self._guard.close()
            sock.close(linger=0)
            raise
        self._sock = sock
        self._io = FastSocket(sock)
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._send_acks())]
        for task in self._tasks:
            task.add_done_callback(self._on_task_done)
        if self._guard is not None:
            self._guard.start(self.stats)
        return self

    async def __aexit__(self, *exc) -> None:
        await _cancel(self._tasks)
        self._flush_acks()  # what was committed is acknowledged before the socket goes
        self._io.close()
        if self._guard is not None:
            await self._guard.close()
        self._sock.close(linger=ACK_LINGER_MS)

    def _on_task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failure = task.exception()
            self._not_empty.set()

    @property
    def queued(self) -> int:
        """Deliveries read from the wire and not yet returned by `recv`."""
        return len(self._items)

    async def recv(self) -> Delivery:
        """The next trajectory not handed out before (by this incarnation or a committed earlier one)."""
        while not self._items:
            if self._failure is not None:
                raise RuntimeError(f"trajectory receiver on {self.endpoint} stopped") from self._failure
            self._not_empty.clear()
            await self._not_empty.wait()
        delivery = self._items.popleft()
        self._not_full.set()
        self.stats.delivered += 1
        if self._auto_commit:
            self.commit((delivery,))
        return delivery

    def commit(self, deliveries: Iterable[Delivery]) -> None:
        """The consumer made these durable: acknowledge them, so their engines forget them."""
        for d in deliveries:
            if self._committed.get(d.engine_id, d.epoch).add(d.seq):
                self.stats.committed += 1
            self._ack_due[(d.engine_id, d.epoch)] = None
        if not self._reading:  # else the reader sends them once its consumer has had its turn
            self._ack_wake.set()

    def dedup_state(self, including: Iterable[Delivery] = ()) -> DedupState:
        """What is committed (plus `including`, about to be): save it with the consumer's checkpoint."""
        return self._committed.state((d.engine_id, d.epoch, d.seq) for d in including)

    # --- engine -> trainer

    async def _read(self) -> None:
        flowing = False
        while True:
            batch = await self._io.recv_batch()
            if flowing and len(batch) < COALESCE_BATCH and self._sender_unacked > 2 * COALESCE_BATCH:
                await asyncio.sleep(COALESCE_S)
                batch += self._io.recv_ready()
            flowing = len(batch) > 1
            self._reading = True
            for frames in batch:
                try:
                    delivery = self._accept(frames)
                except ProtocolError as exc:
                    self.stats.rejected += 1
                    self.stats.last_error = str(exc)
                    log.warning("trajectory receiver %s: rejected a frame: %s", self.endpoint, exc)
                    continue
                if delivery is None:
                    continue
                while len(self._items) >= self._capacity:
                    self._reading = False  # commits made while the reader waits are acked at once
                    self._flush_acks()
                    self._not_full.clear()
                    await self._not_full.wait()
                    self._reading = True
                self._items.append(delivery)
                self._not_empty.set()
            try:
                await asyncio.sleep(0)  # the consumer runs between batches: a steady stream never blocks
            finally:
                self._reading = False
            self._flush_acks()  # what the consumer committed meanwhile, without waking the ack task

    def _accept(self, frames: list[zmq.Frame]) -> Delivery | None:
        """One multipart message from an engine: a new Delivery, or None (heartbeat, duplicate)."""
        if len(frames) < 2:
            raise ProtocolError(f"expected an envelope frame after the routing id, got {len(frames) - 1} frames")
        match env := decode_envelope(frames[1].buffer):
            case Hello(engine_id=engine_id, epoch=epoch, floor=floor):
                if len(frames) != 2:
                    raise ProtocolError(f"hello from {engine_id}: expected 1 frame, got {len(frames) - 1}")
                self._peer(engine_id, epoch, frames[0])
                if env.capacity or env.started:  # an engine that reports its episodes
                    self.engines[(engine_id, epoch)] = (env, time.monotonic())
                    self.reported.set()
                    if len(self.engines) > MAX_STREAMS:
                        del self.engines[next(iter(self.engines))]
                self._below(engine_id, epoch, floor)
                self._ack_due[(engine_id, epoch)] = None
                self._ack_wake.set()
                return None
            case Data(engine_id=engine_id, epoch=epoch, seq=seq, floor=floor):
                self.stats.received += 1
                if len(frames) != 4:
                    raise ProtocolError(
                        f"data {engine_id}/{epoch}/{seq}: expected envelope, head and arrays, got {len(frames) - 1} frames"
                    )
                self._peer(engine_id, epoch, frames[0])
                self._sender_unacked = seq - floor + 1
                seen = self._seen.get(engine_id, epoch)
                if floor > seen.upto + 1 or floor > self._committed.get(engine_id, epoch).upto + 1:
                    self._below(engine_id, epoch, floor)
                if seq in seen:
                    self.stats.duplicates += 1
                    if self._committed.contains(engine_id, epoch, seq):  # its ack was lost: say it again
                        self._ack_due[(engine_id, epoch)] = None
                        self._ack_wake.set()
                    return None
                if seq > seen.upto + MAX_AHEAD:
                    raise ProtocolError(
                        f"data {engine_id}/{epoch}/{seq}: seq is more than {MAX_AHEAD} beyond the "
                        f"stream's watermark {seen.upto}"
                    )
                seen.add(seq)
                try:
                    traj = trajectory_from_frames(frames[2].buffer, frames[3].buffer)
                except ProtocolError as exc:
                    # Never decodable: commit it as consumed-nothing, so the engine stops resending
                    # it and the watermark moves on.
                    self._committed.get(engine_id, epoch).add(seq)
                    self._ack_due[(engine_id, epoch)] = None
                    self._ack_wake.set()
                    raise ProtocolError(f"data {engine_id}/{epoch}/{seq}: {exc}") from None
                return Delivery(traj, engine_id, epoch, seq)

    def _below(self, engine_id: str, epoch: int, floor: int) -> None:
        """The engine says all seqs below `floor` were committed (by this or an earlier trainer)."""
        self._seen.get(engine_id, epoch).add_below(floor)
        self._committed.get(engine_id, epoch).add_below(floor)

    def _peer(self, engine_id: str, epoch: int, routing_id: zmq.Frame) -> None:
        key = (engine_id, epoch)
        if key not in self._peers and len(self._peers) >= MAX_STREAMS:
            del self._peers[next(iter(self._peers))]  # the oldest stream (bounded memory)
        self._peers[key] = routing_id.bytes

    async def _send_acks(self) -> None:
        while True:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            self._flush_acks()

    def _flush_acks(self) -> None:
        for key in list(self._ack_due):
            del self._ack_due[key]
            engine_id, epoch = key
            peer = self._peers.get(key)
            if peer is None:
                continue  # known only from a checkpoint; its engine will say hello
            c = self._committed.get(engine_id, epoch)
            s = self._seen.get(engine_id, epoch)
            ack = Ack(self.trainer, epoch, c.upto, sorted(c.above), s.upto, sorted(s.above))
            # ROUTER never blocks: to a vanished or full peer it drops, and the next Ack repeats it all.
            self._io.try_send([peer, encode_frame(ack)])
