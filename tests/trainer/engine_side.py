"""The engine's half of a distributed weight update, for the trainer's tests: the real `WeightSync` over
the real `sglang` backend, fed the trainer's notices through a real status channel or directly.

    async with EngineSide([srv.url]) as engine:
        publisher = DistributedPublisher(cfg, engine.announce)
        await publisher.publish(1, tensors)
        await engine.settled(1)          # the engine has seen the update through (or failed it)
"""

import asyncio
import contextlib

from tidal.engine.backends import SGLangBackend, SGLangConfig
from tidal.engine.weights import WeightSync
from tidal.protocol.channels import StatusSubscriber
from tidal.protocol.messages import WeightsPublished


class EngineSide:
    """A WeightSync over an SGLangBackend of `urls`; `backend_cfg` goes to SGLangConfig."""

    def __init__(self, urls: list[str], **backend_cfg):
        backend_cfg.setdefault("health_interval_s", 0.2)
        backend_cfg.setdefault("control_timeout_s", 60.0)
        self.backend = SGLangBackend(SGLangConfig(urls=urls, **backend_cfg))
        self.served: list[int | None] = []
        """Every oldest-served version the WeightSync reported, in order."""
        self.notices: list[WeightsPublished] = []
        self.sync = WeightSync(self.backend, self.served.append)
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> "EngineSide":
        await self.backend.start()
        await self.sync.probe()
        self._tasks.append(asyncio.create_task(self.sync.run()))
        return self

    async def __aexit__(self, *exc) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.backend.close()

    async def announce(self, notice: WeightsPublished) -> None:
        """What the trainer's status channel delivers, delivered directly."""
        self.notices.append(notice)
        self.sync.offer(notice)

    def follow(self, sub: StatusSubscriber) -> None:
        """Offer every weights notice `sub` receives, as the engine daemon does."""
        async def pump():
            while True:
                msg = await sub.recv()
                if isinstance(msg, WeightsPublished):
                    await self.announce(msg)

        self._tasks.append(asyncio.create_task(pump()))

    async def settled(self, n: int, timeout: float = 120.0) -> None:
        """Wait until `n` updates in all have ended, applied or failed."""
        async with asyncio.timeout(timeout):
            while self.sync.updates + self.sync.failures < n:
                await asyncio.sleep(0.02)

    async def reached(self, version: int, timeout: float = 120.0) -> None:
        """Wait until the servers serve `version` or a later one."""
        async with asyncio.timeout(timeout):
            while not self.served or self.served[-1] is None or self.served[-1] < version:
                await asyncio.sleep(0.02)

    def healthy(self) -> dict[str, bool]:
        """URL -> in rotation now."""
        return {s.url: s.healthy for s in self.backend.router.servers}
