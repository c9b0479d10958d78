"""Weights mid-rollout: the trainer's `WeightsPublished` notices reach every server through the backend.

One update at a time, newest first: a notice that arrives while an update runs replaces any older one
still pending (a server never needs the version between two it loads). Disk weights are loaded by the
backend's `update_weights_from_disk`, which applies its pause policy around the load (pause ->
update -> continue with retract or in-place keeps in-flight requests, and each token keeps the
version the server reports for it; abort resubmits them with their tokens kept). Distributed
weights were broadcast by the trainer to the servers before it sent the notice, so the notice itself
says what they serve. After every update the engine knows the oldest version its servers serve,
which admission uses to keep new tokens within the staleness bound. A failed update is counted and
reported; the backend keeps a server that failed it out of rotation until it serves the latest.
"""

from __future__ import annotations

import asyncio
import logging
import time

from tidal.engine.backends.base import Backend
from tidal.engine.backends.errors import BackendError, Unsupported
from tidal.protocol.messages import DiskWeights, DistributedWeights, WeightsPublished

__all__ = ["WeightSync"]

log = logging.getLogger(__name__)


class WeightSync:
    """Applies weight notices in order of arrival, skipping superseded ones."""

    def __init__(self, backend: Backend, on_served):
        """`on_served(version | None)` is called with the oldest version the servers serve after each update."""
        self.backend = backend
        self.on_served = on_served
        self.served: int | None = None
        self.updates = 0
        self.failures = 0
        self.skipped = 0
        self.last_seconds = 0.0
        self.last_error = ""
        self._pending: WeightsPublished | None = None
        self._wake = asyncio.Event()

    async def probe(self) -> int | None:
        """Ask the servers what they serve (at start, and after a failed update); None if unknown."""
        try:
            versions = await self.backend.weight_version()
        except Unsupported:
            versions = {}
        except BackendError as exc:
            log.warning("cannot read the servers' weight versions: %s", exc)
            versions = {}
        self.served = min(versions.values()) if versions else None
        self.on_served(self.served)
        return self.served

    def offer(self, notice: WeightsPublished) -> None:
        if notice.version == self.served:
            return  # a re-sent notice for the weights served now
        # An older version than served is applied too: a trainer restored from a checkpoint republishes
        # it, and the servers must drop the versions it published after that checkpoint and lost.
        if self._pending is not None:
            self.skipped += 1
        self._pending = notice
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            notice, self._pending = self._pending, None
            if notice is not None:
                await self._apply(notice)

    async def _apply(self, notice: WeightsPublished) -> None:
        t0 = time.monotonic()
        try:
            match notice.source:
                case DiskWeights(path=path):
                    served = await self.backend.update_weights_from_disk(path, notice.version)
                case DistributedWeights():
                    served = {"broadcast": notice.version}
        except BackendError as exc:
            self.failures += 1
            self.last_error = f"version {notice.version}: {exc}"[:500]
            log.warning("weight update to version %d failed: %s", notice.version, exc)
            await self.probe()
            return
        self.updates += 1
        self.last_seconds = time.monotonic() - t0
        self.served = min(served.values()) if served else notice.version
        self.on_served(self.served)
