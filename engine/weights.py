"""Weights mid-rollout: the trainer's `WeightsPublished` notices reach every server through the backend.

The engine is the one owner of every weight update, so the backend's pause policy (pause -> update ->
continue with retract or in-place, which keeps in-flight requests and gives each token the version the
server reports for it; abort, which resubmits them with their tokens kept; or wait) holds around disk
and distributed updates alike:
  disk         the backend's `update_weights_from_disk` loads the published directory on every server.
  distributed  the trainer announces a pending notice, then broadcasts as rank 0. If the notice names
               another group than the one the servers are in (address, port, name, formation id),
               they join it first (`init_weights_group`, which blocks until the trainer forms it);
               then, inside one `distributed_update` scope, they receive the buckets in the trainer's
               order, one `update_weights_from_distributed` each. Only the last bucket sets the version.
One update at a time, newest first: a notice that arrives while an update runs replaces any older one
still pending (a server never needs the version between two it loads; a broadcast the trainer has
given up on is gone). A failed disk update is tried again (after 1 s, doubling to 30 s) until it
succeeds or a newer notice replaces it: the trainer publishes its next version only after new data,
and an engine whose servers stay too far behind admits none, so without the retry one lost call (a
reset connection during the pause) stalls the run for good. After every update the engine knows the oldest version its servers serve, which
admission uses to keep new tokens within the staleness bound. A failed update is counted and reported;
a failed distributed one also leaves the group, so the next notice forms it again. The backend keeps a
server that failed out of rotation until it serves the latest version.
"""

from __future__ import annotations

import asyncio
import logging
import time

from tidal.engine.backends.base import Backend
from tidal.engine.backends.errors import BackendError, Unsupported
from tidal.protocol.messages import DiskWeights, DistributedWeights, WeightsPublished

__all__ = ["WeightSync", "buckets_of"]

log = logging.getLogger(__name__)

RETRY_S = (1.0, 30.0)
"""First and longest wait before a failed disk update is tried again (doubling in between)."""


def buckets_of(src: DistributedWeights) -> list[tuple[list[str], list[str], list[list[int]]]]:
    """The notice's tensors cut into its buckets: (names, dtypes, shapes) per bucket, in order.
    A notice whose lists disagree is a `BackendError` naming the lengths (nothing is received)."""
    n = len(src.names)
    if not n == len(src.dtypes) == len(src.shapes):
        raise BackendError(f"distributed weights notice: {n} names, {len(src.dtypes)} dtypes and "
                           f"{len(src.shapes)} shapes; expected one of each per tensor")
    sizes = src.buckets or [n]
    if any(k < 1 for k in sizes) or sum(sizes) != n:
        raise BackendError(f"distributed weights notice: buckets {sizes} do not cut its {n} tensors "
                           "into non-empty runs")
    out, i = [], 0
    for k in sizes:
        out.append((src.names[i:i + k], src.dtypes[i:i + k], src.shapes[i:i + k]))
        i += k
    return out


class WeightSync:
    """Applies weight notices in order of arrival, skipping superseded ones."""

    def __init__(self, backend: Backend, on_served):
        """`on_served(version | None)` is called with the oldest version the servers serve after each update."""
        self.backend = backend
        self.on_served = on_served
        self.served: int | None = None
        self.updates = 0
        self.failures = 0
        self.retries = 0
        self.skipped = 0
        self.last_seconds = 0.0
        self.last_error = ""
        self._pending: WeightsPublished | None = None
        self._wake = asyncio.Event()
        self._group: tuple[str, int, str, str] | None = None
        """The group the servers are in: (address, port, name, formation id) of its rendezvous."""

    async def release(self) -> None:
        """At start: resume every server. An engine killed between the pause and the continue of an
        update leaves its servers paused, holding every request (and failing /health) until someone
        continues them, and no one else will. Resuming a server that is not paused does nothing; if
        another engine is mid-update on a shared server, its update only waits for running requests."""
        try:
            await self.backend.resume()
        except Unsupported:
            pass
        except BackendError as exc:
            log.warning("cannot resume the servers at start: %s", exc)

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
        match notice.source:
            case DistributedWeights(pending=False):
                # The broadcast is over: nothing left to receive. A pending notice for it not yet taken
                # is dropped too (the trainer gave up on it).
                pending = self._pending
                if pending is not None and pending.version == notice.version and isinstance(
                        pending.source, DistributedWeights):
                    self._pending = None
                    self.skipped += 1
                return
            case DiskWeights() if notice.version == self.served:
                return  # a re-sent notice for the weights served now
        # An older version than served is applied too: a trainer restored from a checkpoint republishes
        # it, and the servers must drop the versions it published after that checkpoint and lost. A
        # distributed notice is taken even for the version served: the trainer waits to broadcast it.
        if self._pending is not None:
            self.skipped += 1
        self._pending = notice
        self._wake.set()

    async def run(self) -> None:
        wait = RETRY_S[0]
        while True:
            await self._wake.wait()
            self._wake.clear()
            notice, self._pending = self._pending, None
            if notice is None or await self._apply(notice) or not isinstance(notice.source, DiskWeights):
                wait = RETRY_S[0]
                continue
            try:  # a newer notice, arriving meanwhile, is taken instead
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                if self._pending is None:
                    self._pending = notice
                    self.retries += 1
                    self._wake.set()
            wait = min(2 * wait, RETRY_S[1])

    async def _apply(self, notice: WeightsPublished) -> bool:
        """Apply one notice; False if it failed (counted, logged, the servers probed)."""
        t0 = time.monotonic()
        try:
            match notice.source:
                case DiskWeights(path=path):
                    served = await self.backend.update_weights_from_disk(path, notice.version)
                case DistributedWeights() as src:
                    served = await self._receive(notice.version, src)
        except BackendError as exc:
            self.failures += 1
            self.last_error = f"version {notice.version}: {exc}"[:500]
            log.warning("weight update to version %d failed: %s", notice.version, exc)
            await self.probe()
            return False
        self.updates += 1
        self.last_seconds = time.monotonic() - t0
        self.served = min(served.values()) if served else notice.version
        self.on_served(self.served)
        return True

    async def _receive(self, version: int, src: DistributedWeights) -> dict[str, int]:
        """Join the notice's group if the servers are not in it, then take every bucket under the
        backend's pause policy. A failure while joining or receiving leaves the group: its state on
        either side is unknown, and the trainer forms a new one for its next version."""
        buckets = buckets_of(src)
        rendezvous = (src.master_address, src.master_port, src.group_name, src.group_id)
        received = False
        try:
            if rendezvous != self._group:
                if self._group is not None:
                    await self._leave()
                await self.backend.init_weights_group(
                    src.master_address, src.master_port, group_name=src.group_name, backend=src.backend,
                    world_size=src.world_size)
                self._group = rendezvous
            async with self.backend.distributed_update(version, len(buckets)):
                for names, dtypes, shapes in buckets:
                    await self.backend.update_weights_from_distributed(
                        names, dtypes, shapes, version, group_name=src.group_name, flattened=src.flatten)
                received = True
        except BackendError:
            if not received:  # after the last bucket (a continue that failed) the group is sound
                await self._leave(src.group_name)
            raise
        return await self.backend.weight_version()

    async def _leave(self, group_name: str | None = None) -> None:
        """Best effort: every server leaves the group (one that is down has left it already)."""
        name = group_name if self._group is None else self._group[2]
        self._group = None
        if name is None:
            return
        try:
            await self.backend.destroy_weights_group(name)
        except BackendError as exc:
            log.info("leaving weight-update group %r: %s", name, exc)
