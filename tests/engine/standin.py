"""A trainer stand-in over the real channels, for engine tests that need control over timing.

It binds the trajectory and status endpoints as `tidal trainer` does, shares the staleness budget by
the same `GrantTable`, commits every delivery at once, and "trains" a batch of B trajectories per
version when told to (or by itself with `auto_train`). It checks docs/architecture.md invariant 3 as it goes:
the engines' `started` totals in their heartbeats against the budget in force (`violations`), and it
counts received trajectories staler than max_staleness (`stale`: the trainer's per-sample drop). Weights are "published" from a fixed directory (the
model itself), so servers load real files and report the new version.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
from tidal.protocol.channels import StatusPublisher, TrajectoryReceiver
from tidal.protocol.grants import GrantTable
from tidal.protocol.messages import DiskWeights, TrainerStatus, Trajectory, WeightsPublished


class Standin:
    def __init__(self, *, batch_size: int, group_size: int, max_staleness: int, weights_path: str | None = None,
                 auto_train: bool = True, train_s: float = 0.0, max_uncommitted: int = 0):
        self.batch_size, self.max_staleness = batch_size, max_staleness
        self.weights_path = weights_path
        self.auto_train, self.train_s = auto_train, train_s
        self.max_uncommitted = max_uncommitted
        self.grants = GrantTable(group_size=group_size)
        self.version = 0
        self.received: list[Trajectory] = []
        self.by_id: dict[str, Trajectory] = {}
        self.duplicates = 0
        self.stale = 0
        self.violations: list[str] = []
        self.max_started = 0
        self.pending: list[Trajectory] = []
        self.published: list[int] = []

    async def __aenter__(self) -> Standin:
        self.rx = await TrajectoryReceiver("tcp://127.0.0.1:0", capacity=4096).__aenter__()
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
        s = TrainerStatus(version=self.version, consumed=len(self.received), batch_size=self.batch_size,
                          max_staleness=self.max_staleness, max_uncommitted=self.max_uncommitted)
        return msgspec.structs.replace(s, grants=self.grants.allocate(s.budget))

    async def _grant(self) -> None:
        while True:
            for (engine_id, epoch), (hello, heard) in list(self.rx.engines.items()):
                self.grants.heard(engine_id, epoch, started=hello.started, in_flight=hello.in_flight,
                                  capacity=hello.capacity, now=heard)
            started = sum(h.started for h, _ in self.rx.engines.values())
            self.max_started = max(self.max_started, started)
            before = self.grants.grants()
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
            self.rx.commit([d])
            if t.id in self.by_id:
                self.duplicates += 1
                continue
            if t.staleness(self.version) > self.max_staleness:
                self.stale += 1  # the trainer drops these (admission bounds starts, not every sample)
            self.by_id[t.id] = t
            self.received.append(t)
            self.pending.append(t)
            if self.auto_train and len(self.pending) >= self.batch_size:
                await self.train()

    async def train(self) -> None:
        """Take a batch: the version advances and, with a weights path, the new version is published."""
        self.pending = self.pending[self.batch_size:]
        if self.train_s:
            await asyncio.sleep(self.train_s)
        self.version += 1
        await self.pub.publish(self.status())
        if self.weights_path is not None:
            await self.pub.publish(WeightsPublished(version=self.version, source=DiskWeights(self.weights_path),
                                                    published_at=time.time()))
            self.published.append(self.version)

    async def wait_for(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"received {len(self.received)} of {n} trajectories in {timeout}s")
            await asyncio.sleep(0.05)
