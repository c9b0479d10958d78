"""Exactly-once hand-off on an at-least-once wire: which (engine, epoch, seq) a trainer already has.

docs/architecture.md invariant 4: delivery is at-least-once and the trainer deduplicates. A stream is one engine
incarnation, `(engine_id, epoch)`; its sequence numbers start at 1. Per stream we keep a contiguous
watermark (every seq <= `upto` is in the set) plus the few seqs above it that arrived out of order, so
memory is O(streams x sender window), not O(trajectories). This module is a pure state machine: no
sockets, no clocks. `DedupState` is its durable form, saved in the trainer's checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

__all__ = ["StreamMark", "DedupState", "SeqSet", "StreamTable", "MAX_EPOCHS_PER_ENGINE", "MAX_STREAMS"]

MAX_EPOCHS_PER_ENGINE = 4
"""Incarnations kept per engine id: an engine restarted more often than this within one trainer run has
nothing left to resend from its older incarnations (their unacknowledged work died with them)."""

MAX_STREAMS = 4096
"""Streams kept in all; beyond it the oldest-created stream is forgotten (bounded memory)."""


class StreamMark(msgspec.Struct, array_like=True, frozen=True):
    """One stream's set of seqs: all of 1..upto, plus `above` (sorted, each > upto + 1)."""

    engine_id: str
    epoch: int
    upto: int = 0
    above: list[int] = []


class DedupState(msgspec.Struct, kw_only=True, frozen=True):
    """The committed (consumed and durable) seqs of every stream; the trainer checkpoints it."""

    streams: list[StreamMark] = []
    schema_version: int = 1


class SeqSet:
    """Watermark + out-of-order set. `add` is O(1) amortised; memory is O(out-of-order seqs)."""

    __slots__ = ("upto", "above")

    def __init__(self, upto: int = 0, above: Iterable[int] = ()) -> None:
        self.upto = upto
        self.above = {s for s in above if s > upto}
        self._advance()

    def __contains__(self, seq: int) -> bool:
        return seq <= self.upto or seq in self.above

    def add(self, seq: int) -> bool:
        """Add `seq`; False when it was already in the set."""
        if seq == self.upto + 1 and not self.above:  # the steady state: the next seq, in order
            self.upto = seq
            return True
        if seq in self:
            return False
        self.above.add(seq)
        self._advance()
        return True

    def add_below(self, floor: int) -> None:
        """Add every seq below `floor` (known committed elsewhere); keeps memory bounded."""
        if floor - 1 > self.upto:
            self.upto = floor - 1
            self.above = {s for s in self.above if s > self.upto}
            self._advance()

    def _advance(self) -> None:
        while self.upto + 1 in self.above:
            self.upto += 1
            self.above.remove(self.upto)

    def copy(self) -> SeqSet:
        return SeqSet(self.upto, self.above)


class StreamTable:
    """`SeqSet` per `(engine_id, epoch)`, bounded by MAX_EPOCHS_PER_ENGINE and MAX_STREAMS."""

    def __init__(self, state: DedupState | None = None) -> None:
        self._sets: dict[tuple[str, int], SeqSet] = {}
        for mark in state.streams if state else ():
            self._sets[(mark.engine_id, mark.epoch)] = SeqSet(mark.upto, mark.above)

    def get(self, engine_id: str, epoch: int) -> SeqSet:
        """The stream's set, created empty (evicting old streams) when new."""
        key = (engine_id, epoch)
        found = self._sets.get(key)
        if found is None:
            found = self._sets[key] = SeqSet()
            self._evict(engine_id)
        return found

    def _evict(self, engine_id: str) -> None:
        epochs = sorted(e for (eid, e) in self._sets if eid == engine_id)
        for epoch in epochs[:-MAX_EPOCHS_PER_ENGINE]:
            del self._sets[(engine_id, epoch)]
        while len(self._sets) > MAX_STREAMS:
            del self._sets[next(iter(self._sets))]

    def contains(self, engine_id: str, epoch: int, seq: int) -> bool:
        found = self._sets.get((engine_id, epoch))
        return found is not None and seq in found

    def state(self, including: Iterable[tuple[str, int, int]] = ()) -> DedupState:
        """A snapshot, with the `(engine_id, epoch, seq)` triples of `including` added to it."""
        sets = {key: s.copy() for key, s in self._sets.items()}
        for engine_id, epoch, seq in including:
            sets.setdefault((engine_id, epoch), SeqSet()).add(seq)
        return DedupState(
            streams=[StreamMark(eid, epoch, s.upto, sorted(s.above)) for (eid, epoch), s in sets.items()]
        )
