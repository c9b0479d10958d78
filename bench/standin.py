"""A trainer stand-in over the real channels, for benches and engine tests that need control over timing.

It binds the trajectory and status endpoints as `tidal trainer` does, shares the staleness budget by
the same `GrantTable`, commits every delivery at once, and "trains" a batch of B trajectories per
version when told to (or by itself with `auto_train`), taking `train_s` plus `train_s_per_token` for
every token of the batch: a trainer whose step time is a fixed cost per trained token. It checks
docs/architecture.md invariant 3 as it goes: the engines' `started` totals in their heartbeats
against the budget in force (`violations`), and it counts received trajectories staler than
max_staleness (`stale`: the trainer's per-sample drop). Weights are "published" from a fixed directory (the model
itself, or any directory a simulated server accepts), so servers load real files and report the new
version.

    async with Standin(batch_size=8, group_size=2, max_staleness=1, weights_path=model_dir) as trainer:
        ...  # start engines against trainer.endpoints
        await trainer.wait_for(16)
"""

from __future__ import annotations

import asyncio
import time

import msgspec
from tidal.protocol.channels import StatusPublisher, TrajectoryReceiver
from tidal.protocol.grants import GrantTable
from tidal.protocol.messages import DiskWeights, TrainerStatus, Trajectory, WeightsPublished

__all__ = ["Standin"]

RECEIVER_CAPACITY = 4096
"""Deliveries the receiver holds while the stand-in trains; beyond it the engines' sends wait."""


class Standin:
    """The trainer's side of both channels with a scripted step time; an async context manager.

    Args:
        batch_size, group_size, max_staleness: what `TrainerStatus` announces (the engines' budget).
        weights_path: a directory announced in a `WeightsPublished` after every step (None: none sent).
        auto_train: take a batch as soon as `batch_size` trajectories wait.
        train_s: fixed time of one step, seconds.
        train_s_per_token: added step time per token of the batch's trajectories, seconds.
        keep: keep every received trajectory in `received` (False: only the counts).
        max_uncommitted: the trainer's intake.max_uncommitted, as `TrainerStatus` announces it.
        commit: acknowledge each delivery at once (False: hold them until `commit_held`).
    """

    def __init__(self, *, batch_size: int, group_size: int, max_staleness: int, weights_path: str | None = None,
                 auto_train: bool = True, train_s: float = 0.0, train_s_per_token: float = 0.0, keep: bool = True,
                 max_uncommitted: int = 0, commit: bool = True):
        self.batch_size, self.max_staleness = batch_size, max_staleness
        self.weights_path = weights_path
        self.auto_train, self.train_s, self.train_s_per_token = auto_train, train_s, train_s_per_token
        self.max_uncommitted = max_uncommitted
        self.commit = commit
        """Commit every delivery at once (False: hold them uncommitted, as a trainer between checkpoints)."""
        self.uncommitted: list = []
        self.keep = keep
        self.grants = GrantTable(group_size=group_size)
        self.version = 0
        self.received: list[Trajectory] = []
        """Every distinct trajectory received, in order (only with `keep`)."""
        self.consumed = 0
        """Distinct trajectories received."""
        self.tokens = 0
        """Tokens of the distinct trajectories received (prompts, generations and observations)."""
        self.generated = 0
        """Generated tokens (loss mask 1) of the distinct trajectories received."""
        self.turns = 0
        """Assistant turns of the distinct trajectories received."""
        self.ids: set[str] = set()
        self.duplicates = 0
        self.stale = 0
        self.violations: list[str] = []
        self.max_started = 0
        self.pending: list[Trajectory] = []
        self.published: list[int] = []
        self.batch_times: list[float] = []
        """`time.monotonic()` when each step ended (the version it made was announced)."""
        self.train_seconds: list[float] = []
        """Scripted duration of each step."""

    async def __aenter__(self) -> Standin:
        self.rx = await TrajectoryReceiver("tcp://127.0.0.1:0", capacity=RECEIVER_CAPACITY).__aenter__()
        self.pub = await StatusPublisher("tcp://127.0.0.1:0", heartbeat_s=0.2).__aenter__()
        self.endpoints = {"endpoint": self.rx.endpoint, "status_endpoint": self.pub.endpoint}
        await self.pub.publish(self.status())
        self._tasks = [asyncio.create_task(self._consume()), asyncio.create_task(self._grant())]
        return self

    async def __aexit__(self, *exc) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pub.__aexit__(None, None, None)
        await self.rx.__aexit__(None, None, None)

    def status(self) -> TrainerStatus:
        s = TrainerStatus(version=self.version, consumed=self.consumed, batch_size=self.batch_size,
                          max_staleness=self.max_staleness, max_uncommitted=self.max_uncommitted)
        return msgspec.structs.replace(s, grants=self.grants.allocate(s.budget))

    def started(self) -> int:
        """Episodes the engines say they started and did not discard (their latest heartbeats, summed):
        what invariant 3 bounds."""
        return sum(h.started for h, _ in self.rx.engines.values())

    async def _grant(self) -> None:
        while True:
            before = self.grants.grants()  # a grant raised by a heartbeat is news too
            for (engine_id, epoch), (hello, heard) in list(self.rx.engines.items()):
                self.grants.heard(engine_id, epoch, started=hello.started, in_flight=hello.in_flight,
                                  capacity=hello.capacity, now=heard)
            started = self.started()
            self.max_started = max(self.max_started, started)
            status = self.status()
            if started > status.budget:
                self.violations.append(f"engines started {started} > budget {status.budget} at version {self.version}")
            if status.grants != before:
                await self.pub.publish(status)
            await asyncio.sleep(0.05)

    async def _consume(self) -> None:
        while True:
            d = await self.rx.recv()
            t = d.traj
            if self.commit:
                self.rx.commit([d])
            else:
                self.uncommitted.append(d)
            if t.id in self.ids:
                self.duplicates += 1
                continue
            if t.staleness(self.version) > self.max_staleness:
                self.stale += 1  # the trainer drops these (admission bounds starts, not every sample)
            self.ids.add(t.id)
            self.consumed += 1
            self.tokens += len(t)
            self.generated += int(t.mask().sum())
            self.turns += len(t.turns)
            if self.keep:
                self.received.append(t)
            self.pending.append(t)
            if self.auto_train and len(self.pending) >= self.batch_size:
                await self.train()

    def commit_held(self) -> None:
        """Commit what was held while `commit` was False, and commit from now on."""
        self.commit = True
        self.rx.commit(self.uncommitted)
        self.uncommitted = []

    async def train(self) -> None:
        """Take a batch: the version advances and, with a weights path, the new version is published."""
        batch, self.pending = self.pending[:self.batch_size], self.pending[self.batch_size:]
        seconds = self.train_s + self.train_s_per_token * sum(len(t) for t in batch)
        if seconds:
            await asyncio.sleep(seconds)
        self.version += 1
        self.train_seconds.append(seconds)
        self.batch_times.append(time.monotonic())
        await self.pub.publish(self.status())
        if self.weights_path is not None:
            await self.pub.publish(WeightsPublished(version=self.version, source=DiskWeights(self.weights_path),
                                                    published_at=time.time()))
            self.published.append(self.version)

    async def wait_for(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.consumed < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"received {self.consumed} of {n} trajectories in {timeout}s")
            await asyncio.sleep(0.05)
