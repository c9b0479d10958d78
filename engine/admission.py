"""Admission: whether this engine may start another group of episodes now (docs/architecture.md invariant 3).

A pure state machine (no IO, no clock): the daemon feeds it the trainer's status, the version the
servers serve, control messages and its own counts, and asks `blocked()` before starting each group.

The staleness bound: with B trajectories per step, trainer version k and max staleness s, the engines
together have started at most (k + 1 + s) * B + dropped episodes. `dropped` counts what will never
reach a training step: what the trainer took and dropped (`TrainerStatus.dropped`), plus what the
engine itself discarded before sending (zero-variance groups, episodes that failed). Without the
engine's own discards in it, every discard would shrink the budget for good and enough of them would
stall the run; with them, a discarded episode hands its admission back at once.

The budget counts from the trainer's version k, but an episode's tokens come from the version the
servers serve, which lags k while a weight update is on its way: an episode started then, under
version k - d, may be trained at k + s and arrive staler than s, to be dropped (wasted generation).
So while the servers are d versions behind, d batches of the budget wait for them: started at most
(k - d + 1 + s) * B, the bound counted from the served version. This engine holds those d batches
back from the budget the trainer has granted nobody yet (the status lists every grant) and only the
rest from its own grant: the trainer grants an engine about what it can run at once, so taking the
whole reserve from the grant would stop an engine far from the bound until the servers caught up.
(Episodes of engine incarnations the trainer has written off are in no grant, so after an engine
restart the reserve can be short by what they finished: this bound only saves wasted generation;
the grants alone keep invariant 3.)

The bound is global, and several engine processes share it through grants (tidal.protocol.grants): the
trainer gives each engine incarnation a cumulative number of episodes it may start
(`TrainerStatus.grants`, keyed by `grant_key(engine_id, epoch)`), and the grants together never exceed
the global budget. An engine starts nothing until the trainer has heard its heartbeat and granted it.
"""

from __future__ import annotations

from tidal.protocol.grants import grant_key
from tidal.protocol.messages import TrainerStatus

__all__ = ["Admission"]


class Admission:
    """Counts and gates for one engine. `blocked()` names what stops the next group, or None."""

    def __init__(self, engine_id: str, epoch: int, *, group_size: int, max_concurrent: int, sync: bool = False):
        self.key = grant_key(engine_id, epoch)
        self.group_size = group_size
        self.max_concurrent = max_concurrent
        self.sync = sync
        self.status: TrainerStatus | None = None
        self.status_fresh = False
        """False while the trainer has been silent longer than the engine's status timeout."""
        self.served_version: int | None = None
        """The oldest version any server serves (None: unknown, e.g. a backend that cannot say)."""
        self.paused = False
        self.draining = False
        self.spool_full = False
        self.serving = True
        """False while the backend has no server in rotation (every episode would fail at once)."""
        self.started = 0
        """Episodes started by this engine."""
        self.in_flight = 0
        self.discarded = 0
        """Episodes this engine started and will never send (given back to its budget)."""
        self.limit_started: int | None = None
        """`max_episodes`: started episodes at which the engine stops admitting for good."""

    def allowance(self) -> int:
        """Episodes this engine may have started in all, now."""
        if self.status is None:
            return 0
        return self.status.grants.get(self.key, 0) + self.discarded

    def blocked(self) -> str | None:
        """Why the next group (group_size episodes) cannot start now; None if it can."""
        if self.draining:
            return "draining"
        if self.limit_started is not None and self.started + self.group_size > self.limit_started:
            return "max_episodes"
        if self.paused:
            return "paused"
        if self.status is None or not self.status_fresh:
            return "no_trainer"
        if self.spool_full:
            return "spool_full"
        if not self.serving:
            return "no_server"
        if self.in_flight + self.group_size > self.max_concurrent:
            return "concurrency"
        if self.started + self.group_size > self.allowance():
            return "staleness"
        if self.served_version is not None:
            behind = max(0, self.status.version - self.served_version)
            if behind > (0 if self.sync else self.status.max_staleness):
                return "weights"  # tokens made now would be too stale to train on: wait for the update
            ungranted = max(0, self.status.budget - sum(self.status.grants.values()))
            reserve = max(0, behind * self.status.batch_size - ungranted)
            if self.started + self.group_size > self.allowance() - reserve:
                return "weights"  # the budget counted from the version served, not the trainer's (see above)
        return None

    def report(self) -> tuple[int, int, int]:
        """(started, in_flight, capacity) for the heartbeat the trainer's grants are made from. `started`
        leaves out the discarded episodes: the allowance already hands them back, and the trainer
        raises a grant to at least what it hears started, so counting them there too would give them
        back twice (the engines past the budget) or, with a status not yet re-published, never (the
        trainer's books full of episodes that will never arrive, and admission stalled for good)."""
        return self.started - self.discarded, self.in_flight, 0 if self.draining else self.max_concurrent

    def start_group(self) -> None:
        self.started += self.group_size
        self.in_flight += self.group_size

    def finish(self, n: int = 1, *, discarded: int = 0) -> None:
        """`n` episodes ended; `discarded` of them will never be sent (their admission comes back)."""
        self.in_flight -= n
        self.discarded += discarded
