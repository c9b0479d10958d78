"""Trajectory intake: a bounded buffer between the trajectory channel and the learner.

Invariants kept here (docs/architecture.md):
  3. A trajectory whose staleness (version being trained - its min_version) exceeds max_staleness is
     dropped and counted, both on arrival and again when a batch is formed (buffered ones age).
  4. No trajectory is lost or used twice: ids are deduplicated (the channel is at-least-once), every
     buffered trajectory is part of `snapshot()` (saved in each checkpoint), and deliveries are
     acknowledged to the engines only once a durable checkpoint covers them (or, with
     `commit = "step"`, once a step has used or dropped them).
  5. Bounded: at most `capacity` trajectories wait; when full the pump stops receiving, the channel's
     own bound fills and the engines wait. Incomplete groups never deadlock a full buffer: the oldest
     are released as partial groups (counted).

`Intake` is the pure state machine (trajectories in, batches out); `IntakePump` is the IO around it.
"""

import asyncio
import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
from tidal.protocol.messages import Trajectory, decode_trajectory, encode
from tidal.trainer.config import IntakeConfig

__all__ = ["Intake", "IntakeState", "Batch", "IntakePump"]

log = logging.getLogger(__name__)

SEEN_IDS = 65536
"""Trajectory ids remembered for deduplication: far more than any engine's resend window."""


class IntakeState(msgspec.Struct, kw_only=True):
    """What a checkpoint keeps of the intake so that a resumed trainer loses and repeats nothing."""

    buffered: list[bytes] = []
    """Received, not yet used trajectories, msgpack-encoded (tidal.protocol.messages.encode)."""
    ready: list[str] = []
    """Groups closed for a batch (complete, or released as partial), in batch order."""
    group_dropped: dict[str, int] = {}
    """Per waiting group, members already dropped as stale or rejected (they count towards completion)."""
    seen_ids: list[str] = []
    """Recently accepted trajectory ids, oldest first."""
    counters: dict[str, int] = {}


@dataclass
class _Group:
    members: list[Trajectory] = field(default_factory=list)
    dropped: int = 0


@dataclass
class Batch:
    """One step's trajectories, whole groups, and the staleness of each at the version it trains."""

    trajectories: list[Trajectory]
    staleness: list[int]

    @property
    def ids(self) -> list[str]:
        return [t.id for t in self.trajectories]


class Intake:
    """Groups trajectories, drops stale ones, and hands out batches of about B (pure: no IO, no clock)."""

    def __init__(self, cfg: IntakeConfig, state: IntakeState | None = None, *,
                 check: Callable[[Trajectory], str | None] | None = None):
        """`check` says why the model cannot train a well-formed trajectory (None if it can): such a
        trajectory would fail the whole step, so it is rejected and counted instead (the daemon passes
        `Learner.reject_reason` and the model's position limit)."""
        self.cfg = cfg
        self.check = check
        self.last_rejection = ""
        self.counters: Counter[str] = Counter()
        self._groups: dict[str, _Group] = {}
        self._ready: deque[str] = deque()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._size = 0
        self._drops: list[tuple[str, str, int]] = []
        """(trajectory id, "stale" or "rejected", version) of each drop since `take_drops`."""
        if state is not None:
            self._restore(state)

    # --- arrivals ---

    def offer(self, traj: Trajectory, version: int) -> str:
        """Take one received trajectory; return what became of it: buffered, duplicate, stale or rejected."""
        if traj.id in self._seen:
            self.counters["duplicate"] += 1
            return "duplicate"
        self._remember(traj.id)
        group = self._groups.get(traj.group_id)
        if group is None:
            group = self._groups[traj.group_id] = _Group()
        problem = self.check(traj) if self.check is not None else None
        if problem:  # counts towards its group's completion, as a stale member does
            self.counters["rejected"] += 1
            self.last_rejection = f"group {traj.group_id}: {problem}"
            group.dropped += 1
            outcome = "rejected"
            self._drops.append((traj.id, outcome, version))
        elif traj.staleness(version) > self.cfg.max_staleness:
            self.counters["received"] += 1
            self.counters["stale_dropped"] += 1
            group.dropped += 1
            outcome = "stale"
            self._drops.append((traj.id, outcome, version))
        else:
            self.counters["received"] += 1
            group.members.append(traj)
            self._size += 1
            outcome = "buffered"
        if len(group.members) + group.dropped == self.cfg.group_size:
            self._close(traj.group_id)
        return outcome

    @property
    def size(self) -> int:
        """Trajectories buffered (ready or in incomplete groups)."""
        return self._size

    @property
    def full(self) -> bool:
        return self._size >= self.cfg.capacity

    def buffered_ids(self) -> set[str]:
        return {t.id for g in self._groups.values() for t in g.members}

    # --- batches ---

    def take_batch(self, version: int) -> Batch | None:
        """Whole groups totalling at most B trajectories, once at least B are ready; else None.

        Members that went stale while waiting are dropped first. If the buffer is full and no batch
        can form, the oldest incomplete groups are released as partial groups.
        """
        ready = self._purge_stale(version)
        while ready < self.cfg.batch_size and self.full:
            gid = self._oldest_incomplete()
            if gid is None:
                break
            self.counters["partial_groups"] += 1
            self._close(gid)
            ready = self._purge_stale(version)
        if ready < self.cfg.batch_size:
            return None
        taken: list[Trajectory] = []
        keep: deque[str] = deque()
        for gid in self._ready:
            members = self._groups[gid].members
            if len(taken) + len(members) <= self.cfg.batch_size:
                taken.extend(members)
                del self._groups[gid]
            else:
                keep.append(gid)
        self._ready = keep
        self._size -= len(taken)
        self.counters["used"] += len(taken)
        return Batch(taken, [t.staleness(version) for t in taken])

    def _close(self, gid: str) -> None:
        """A group that will get no more members: ready for a batch (or gone, if all were dropped)."""
        group = self._groups[gid]
        if group.members:
            self._ready.append(gid)
            group.dropped = self.cfg.group_size  # complete: late duplicates of its id start a new group
        else:
            del self._groups[gid]

    def _oldest_incomplete(self) -> str | None:
        ready = set(self._ready)
        return next((gid for gid in self._groups if gid not in ready), None)

    def _purge_stale(self, version: int) -> int:
        """Drop members of ready groups that are now too stale; return how many ready ones remain."""
        total = 0
        for gid in list(self._ready):
            group = self._groups[gid]
            fresh = [t for t in group.members if t.staleness(version) <= self.cfg.max_staleness]
            if len(fresh) != len(group.members):
                self._drops.extend((t.id, "stale", version) for t in group.members
                                   if t.staleness(version) > self.cfg.max_staleness)
                self.counters["stale_dropped"] += len(group.members) - len(fresh)
                self._size -= len(group.members) - len(fresh)
                group.members = fresh
                if not fresh:
                    self._ready.remove(gid)
                    del self._groups[gid]
            total += len(fresh)
        return total

    def take_drops(self) -> list[tuple[str, str, int]]:
        """The drops since the last call, oldest first: (trajectory id, "stale" or "rejected", the
        version it was dropped at), for the daemon's `dropped` records (the ledger's other half)."""
        drops, self._drops = self._drops, []
        return drops

    def _remember(self, traj_id: str) -> None:
        self._seen[traj_id] = None
        if len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)

    # --- checkpoint ---

    def snapshot(self) -> IntakeState:
        """Everything needed to rebuild this intake; taken between awaits so it is consistent."""
        ready = set(self._ready)
        order = [*self._ready, *(gid for gid in self._groups if gid not in ready)]
        return IntakeState(
            buffered=[bytes(encode(t)) for gid in order for t in self._groups[gid].members],
            ready=list(self._ready),
            group_dropped={gid: g.dropped for gid, g in self._groups.items() if g.dropped and gid not in ready},
            seen_ids=list(self._seen),
            counters=dict(self.counters),
        )

    def _restore(self, state: IntakeState) -> None:
        self.counters.update(state.counters)
        for traj_id in state.seen_ids:
            self._remember(traj_id)
        for gid, dropped in state.group_dropped.items():
            self._groups[gid] = _Group(dropped=dropped)
        for frame in state.buffered:
            traj = decode_trajectory(frame)
            group = self._groups.setdefault(traj.group_id, _Group())
            group.members.append(traj)
            self._size += 1
        for gid in state.ready:
            self._close(gid)
        for gid, group in list(self._groups.items()):
            if gid not in state.ready and len(group.members) + group.dropped >= self.cfg.group_size:
                self._close(gid)


class IntakePump:
    """Receives from a `tidal.protocol.channels.TrajectoryReceiver` into an `Intake` and acknowledges.

    The receive loop waits while the intake is full (back-pressure); `next_batch` waits until a batch
    forms. Deliveries are committed by `covered_by_checkpoint()` (everything received so far: used
    trajectories are in the saved model, buffered ones in the saved intake state) or, with
    `commit = "step"`, by `stepped()` (everything not still buffered).
    """

    def __init__(self, receiver, intake: Intake, version_fn):
        self.receiver = receiver
        self.intake = intake
        self._version = version_fn
        self._uncommitted: list = []
        self._changed = asyncio.Condition()
        self.pressure = asyncio.Event()
        """Set while `intake.max_uncommitted` deliveries wait for acknowledgement: the owner should
        checkpoint now, even between steps (say every arrival is stale), or engine windows fill."""

    def _update_pressure(self) -> None:
        if len(self._uncommitted) >= self.intake.cfg.max_uncommitted:
            self.pressure.set()
        else:
            self.pressure.clear()

    @property
    def uncommitted(self) -> int:
        return len(self._uncommitted)

    def pending(self) -> list:
        """The deliveries not yet acknowledged, oldest first (a checkpoint covers these)."""
        return list(self._uncommitted)

    async def run(self) -> None:
        """Receive forever (the daemon cancels it); waits while the intake is full."""
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: not self.intake.full)
            delivery = await self.receiver.recv()
            self._uncommitted.append(delivery)
            if self.intake.offer(delivery.traj, self._version()) == "rejected":
                log.warning("intake rejected %s", self.intake.last_rejection)
            self._update_pressure()
            async with self._changed:
                self._changed.notify_all()

    async def next_batch(self) -> Batch:
        """Wait until `take_batch` gives a batch at the current version."""
        async with self._changed:
            batch = None
            while batch is None:
                batch = self.intake.take_batch(self._version())
                if batch is None:
                    await self._changed.wait()
            self._changed.notify_all()
            return batch

    def covered_by_checkpoint(self, covered: list) -> None:
        """A checkpoint holding `covered` (the `pending()` of its snapshot) is durable: acknowledge them
        (some may have been acknowledged by `stepped` meanwhile; acknowledging twice is harmless)."""
        done = {id(d) for d in covered}
        self._uncommitted = [d for d in self._uncommitted if id(d) not in done]
        if covered:
            self.receiver.commit(covered)
        self._update_pressure()

    def stepped(self) -> None:
        """commit = "step": acknowledge every delivery whose trajectory is no longer buffered."""
        buffered = self.intake.buffered_ids()
        done = [d for d in self._uncommitted if d.traj.id not in buffered]
        self._uncommitted = [d for d in self._uncommitted if d.traj.id in buffered]
        if done:
            self.receiver.commit(done)
        self._update_pressure()
