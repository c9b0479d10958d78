"""Sharing the staleness budget among engine processes (docs/architecture.md invariant 3; docs/protocol.md, Grants).

The bound is global: with B trajectories per step, trainer version k and max staleness s, all engines
together start at most (k + 1 + s) * B + dropped episodes. The trainer, which alone knows k and
`dropped`, splits that budget into grants: each engine incarnation (engine id + epoch) may start at
most `grants[key]` episodes, counted from its own start. Engines report `started` (less the episodes
they discarded, whose admission they hand back themselves), `in_flight` and their concurrency
`capacity` in the heartbeats of the trajectory channel (`Hello`); the trainer sends
the grants in every `TrainerStatus`. An engine without a grant starts nothing.

A pure state machine (no IO; time is passed in):
- Grants only grow, so an engine never finds itself past a grant it was given.
- A new incarnation's grant starts at what it reports having started (a restarted trainer cannot
  take back what engines already started; it only stops granting until its budget catches up).
- An incarnation not heard from for `gone_after_s`, or replaced by a newer epoch of the same engine
  id, is gone: the episodes it had finished stay counted (their trajectories are in its spool and
  arrive through its successor), those in flight were lost with it and give their budget back, and
  its unused grant returns to the pool.
- Free budget goes to engines that can use it, one group at a time in turn, so engines share evenly.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["grant_key", "GrantTable"]


def grant_key(engine_id: str, epoch: int) -> str:
    """The key of an engine incarnation in `TrainerStatus.grants`."""
    return f"{engine_id}/{epoch}"


@dataclass
class _Incarnation:
    engine_id: str
    epoch: int
    started: int
    in_flight: int
    capacity: int
    heard: float
    grant: int


class GrantTable:
    """The trainer's view of engines and what each may start."""

    def __init__(self, *, group_size: int, gone_after_s: float = 30.0):
        self.group_size = group_size
        self.gone_after_s = gone_after_s
        self.live: dict[str, _Incarnation] = {}
        self.retired = 0
        """Episodes started by gone incarnations that count against the budget (those they finished)."""
        self.lost = 0
        """Episodes gone incarnations had in flight: lost work, given back to the budget."""

    def heard(self, engine_id: str, epoch: int, *, started: int, in_flight: int, capacity: int, now: float) -> None:
        """A heartbeat from an engine incarnation."""
        key = grant_key(engine_id, epoch)
        inc = self.live.get(key)
        if inc is None:
            for other in [k for k, v in self.live.items() if v.engine_id == engine_id and v.epoch < epoch]:
                self._retire(other)  # a restarted engine: its predecessor is gone
            if any(v.engine_id == engine_id and v.epoch > epoch for v in self.live.values()):
                return  # a late heartbeat of an incarnation already replaced
            inc = self.live[key] = _Incarnation(engine_id, epoch, started, in_flight, capacity, now, started)
        inc.started = max(inc.started, started)
        inc.in_flight, inc.capacity, inc.heard = in_flight, capacity, now
        inc.grant = max(inc.grant, inc.started)

    def _retire(self, key: str) -> None:
        inc = self.live.pop(key)
        self.retired += inc.started - inc.in_flight
        self.lost += inc.in_flight

    def expire(self, now: float) -> list[str]:
        """Retire incarnations silent for `gone_after_s`; returns their keys."""
        gone = [k for k, v in self.live.items() if now - v.heard > self.gone_after_s]
        for key in gone:
            self._retire(key)
        return gone

    def used(self) -> int:
        return self.retired + sum(v.grant for v in self.live.values())

    def allocate(self, budget: int) -> dict[str, int]:
        """Hand out what `budget` leaves free, a group at a time in turn; returns every live grant."""
        free = budget - self.used()
        while free >= self.group_size:
            wanting = [v for v in self.live.values()
                       if v.grant + self.group_size <= v.started - v.in_flight + v.capacity]
            if not wanting:
                break
            for inc in sorted(wanting, key=lambda v: (v.grant - v.started, v.engine_id)):
                if free < self.group_size:
                    break
                inc.grant += self.group_size
                free -= self.group_size
        return self.grants()

    def grants(self) -> dict[str, int]:
        return {k: v.grant for k, v in self.live.items()}
