"""The control plane of the `sglang` backend: health, pause/continue and weight updates, fanned out.

Invariants: every server in rotation serves the latest weights (an ejected server is re-admitted
only after the last disk update is replayed on it); no server is ejected for failing health probes
during the backend's own pause (SGLang's /health blocks then, docs/sglang.md §2); every control POST
carries a JSON object body (§0). A fan-out tries every server and reports all failures at once.
Versions are ints here and strings on the wire: `str(k)` goes out, `http.served_version` reads what
comes back (a server never updated serves 0).
`SGLangBackend` mixes this in; the state it uses (`cfg`, `router`, `counters`, `_session`,
`_workers`, `_paused`, `_latest_disk`) is set up there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import msgspec
from tidal.engine.backends import http
from tidal.engine.backends.errors import BackendError, BadResponse, HTTPStatusError, ServerUnavailable
from tidal.engine.backends.routing import Server
from tidal.protocol import sglang as wire

__all__ = ["SGLangControl"]

log = logging.getLogger(__name__)

_model_info = msgspec.json.Decoder(wire.ModelInfo)


def _wire_version(version: int) -> str:
    """A policy version as SGLang's `weight_version` string; anything but an int >= 0 is the caller's bug."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"weight version {version!r}: expected the policy version, an int >= 0")
    return str(version)


class SGLangControl:
    """Control operations over every server of an `SGLangBackend`.

    The targets are the generation servers, or `cfg.control_urls` when `urls` is one sglang-router
    URL: the router proxies /generate and /health but has no abort, pause or weight routes (§6).
    """

    def _targets(self, healthy: bool = True) -> list[Server]:
        """Who receives control calls: the workers behind a router, else the (healthy) servers."""
        if self._workers:
            return self._workers
        return self.router.healthy if healthy else self.router.servers

    async def _call(self, server: Server, method: str, path: str, msg: msgspec.Struct | None = None) -> bytes:
        return await http.call(self._session, method, server.url, path, None if msg is None else wire.encode(msg),
                               self.cfg.control_timeout_s, max_bytes=self.cfg.max_response_bytes)

    async def _post(self, server: Server, path: str, msg: msgspec.Struct) -> bytes:
        return await self._call(server, "POST", path, msg)

    async def _fan_out(self, calls: list[Awaitable], what: str) -> list:
        """Await every call; if any failed, raise one `BackendError` listing each failure."""
        results = await asyncio.gather(*calls, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for err in errors:
            if not isinstance(err, BackendError):
                raise err
        if errors:
            self.counters[f"errors_{what}"] += len(errors)
            raise BackendError(f"{what} failed on {len(errors)} of {len(results)} servers: "
                               + "; ".join(str(e) for e in errors))
        return results

    async def health(self) -> dict[str, bool]:
        await self.start()
        return dict(await asyncio.gather(*(self._probe(s) for s in self.router.servers)))

    async def _probe(self, server: Server) -> tuple[str, bool]:
        """GET /health; eject on failure, re-admit (after replaying the last disk update) on success."""
        timeout = aiohttp.ClientTimeout(total=self.cfg.health_timeout_s)
        try:
            async with self._session.get(server.url + "/health", timeout=timeout) as resp:
                ok = resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            ok = False
        if ok and not server.healthy:
            try:
                await self._catch_up(server)
            except BackendError as exc:
                self.counters["readmissions_refused"] += 1
                log.warning("not re-admitting %s: %s", server.url, exc)
                return server.url, False
            if self.router.admit(server):
                self.counters["readmissions"] += 1
                log.info("re-admitted %s", server.url)
        elif not ok and server.healthy and self.router.eject(server):
            self.counters["ejections"] += 1
            log.warning("ejected %s: /health failed", server.url)
        return server.url, ok

    async def _catch_up(self, server: Server) -> None:
        """Bring a server to the latest version before it re-enters rotation: the last disk update is
        replayed on it (not on a router: it has no such route). A distributed update cannot be
        replayed (the trainer broadcasts to every rank at once): a server without it, or holding part
        of one, waits for the next update, which admits it."""
        if self._workers:
            return
        latest, stale = self._latest_version, server in self._stale
        if latest is None and not stale:
            return
        try:
            info = _model_info.decode(await self._call(server, "GET", "/model_info"))
        except msgspec.DecodeError as exc:
            raise BadResponse(f"/model_info: {exc}", url=server.url) from None
        served = http.served_version(info.weight_version, server.url)
        if served == latest and not stale:
            return
        disk = self._latest_disk
        if disk is not None and latest is not None and int(disk.weight_version) == latest:
            await self._post(server, "/update_weights_from_disk", disk)
            if self._latest_version != latest:  # an update finished meanwhile, without this server
                raise BackendError(f"it took version {latest}, but {self._latest_version} arrived meanwhile: the "
                                   "next probe brings it", url=server.url)
            self._stale.discard(server)
            return
        held = "weights of no version (part of a distributed update)" if stale else f"version {served}"
        raise BackendError(f"it holds {held} and the latest is {latest}: it re-enters rotation with the next "
                           "weight update", url=server.url)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)
            if not self._paused and self._update is None:
                await asyncio.gather(*(self._probe(s) for s in self.router.servers))

    async def weight_version(self) -> dict[str, int]:
        await self.start()
        servers = self._targets()
        bodies = await self._fan_out([self._call(s, "GET", "/model_info") for s in servers], "model_info")
        out = {}
        for server, body in zip(servers, bodies, strict=True):
            try:
                info = _model_info.decode(body)
            except msgspec.DecodeError as exc:
                raise BadResponse(f"/model_info: {exc}", url=server.url) from None
            out[server.url] = http.served_version(info.weight_version, server.url)
        return out

    async def pause(self) -> None:
        await self.start()
        await self._pause(self._targets(), self.cfg.pause_mode)

    async def _pause(self, servers: list[Server], mode: str) -> None:
        self._paused = True
        msg = wire.PauseRequest(mode=mode)
        await self._fan_out([self._post(s, "/pause_generation", msg) for s in servers], "pause")

    async def resume(self) -> None:
        await self.start()
        await self._resume(self._targets())

    async def _resume(self, servers: list[Server]) -> None:
        try:
            await self._fan_out([self._post(s, "/continue_generation", wire.ContinueRequest()) for s in servers],
                                "continue")
        finally:
            self._paused = False

    @property
    def _flush_cache(self) -> bool:
        """A cache flush fails while requests are held in place (§3.1), so skip it then."""
        return not (self.cfg.weight_update == "pause" and self.cfg.pause_mode == "in_place")

    # --- disk updates: one call per server -------------------------------------------------------

    async def update_weights_from_disk(self, path: str, version: int) -> dict[str, int]:
        """pause -> load -> continue, or load with `abort_all_requests`, or let each server wait for
        its in-flight requests (`weight_update`). A server that failed keeps its old weights (§3.1);
        when others took the new ones it leaves rotation until the update is replayed on it. With no
        server in rotation the update fails (`ServerUnavailable`), and the first server to return
        is given it before it re-enters rotation."""
        await self.start()
        msg = wire.UpdateWeightsFromDiskRequest(
            model_path=str(path), weight_version=_wire_version(version), flush_cache=self._flush_cache,
            abort_all_requests=self.cfg.weight_update == "abort")
        servers = self._targets()
        if not servers:
            self._latest_disk, self._latest_version = msg, version
            raise ServerUnavailable(f"no server in rotation to take version {version} (of "
                                    f"{len(self.router.servers)}): the first back is given it before it serves")
        paused = self.cfg.weight_update == "pause"
        failed = dict.fromkeys(servers)  # until the load says otherwise: a failed pause loads nothing
        try:
            if paused:
                await self._pause(servers, self.cfg.pause_mode)
            failed = await self._each(servers, lambda s: self._post(s, "/update_weights_from_disk", msg),
                                      "update_weights_from_disk")
        finally:
            try:
                if paused:  # also after a failed pause: the servers that did pause must not stay paused
                    await self._resume(servers)
            finally:  # a failed continue does not undo the load: what a server serves is what it loaded
                self._loaded(msg, version, servers, failed)
        if failed:
            raise self._failure(failed, len(servers), "update_weights_from_disk")
        self.counters["weight_updates"] += 1
        return await self.weight_version()

    def _loaded(self, msg: wire.UpdateWeightsFromDiskRequest, version: int, servers: list[Server],
                failed: dict) -> None:
        """Bookkeeping after a disk update reached `servers` and failed on `failed`."""
        if len(failed) == len(servers):
            return  # nobody serves `version`: all keep what they had, and all stay in rotation
        self._latest_disk, self._latest_version = msg, version  # the latest, replayed on re-admission
        self._stale.difference_update(servers)  # a whole checkpoint replaces whatever they held
        self._eject(failed, f"failed the update to version {version}")
        # re-admitted by a probe while this update ran (caught up to the version before): out again
        # until the next probe replays this one, or it would serve an old version beside the new
        self._eject([s for s in self._targets() if s not in servers], f"missed the update to version {version}")

    # --- distributed updates: a group, then one call per bucket on every server -------------------

    async def init_weights_group(self, master_address: str, master_port: int, *,
                                 group_name: str = wire.WEIGHT_UPDATE_GROUP, backend: str = "gloo",
                                 world_size: int | None = None) -> int:
        """Every server joins (ejected ones too: a group needs all its ranks); any group of this name a
        server still holds (an earlier formation, an engine that restarted) is left first."""
        await self.start()
        servers = self._targets(healthy=False)
        ranks = 1 + len(servers) * self.cfg.tp_size
        if world_size is not None and world_size != ranks:
            raise BackendError(
                f"the weight-update group at {master_address}:{master_port} has world size {world_size}, but "
                f"this backend brings 1 + {len(servers)} servers x tp_size {self.cfg.tp_size} = {ranks} ranks: "
                "set the trainer's publish.server_ranks to the servers' total TP size")
        leave = wire.DestroyWeightsUpdateGroupRequest(group_name=group_name)
        await asyncio.gather(*(self._post(s, "/destroy_weights_update_group", leave) for s in servers),
                             return_exceptions=True)  # "does not exist" is the usual answer
        calls = [self._post(s, "/init_weights_update_group", wire.InitWeightsUpdateGroupRequest(
            master_address=master_address, master_port=master_port, rank_offset=1 + i * self.cfg.tp_size,
            world_size=ranks, group_name=group_name, backend=backend)) for i, s in enumerate(servers)]
        await self._fan_out(calls, "init_weights_update_group")
        return ranks

    @contextlib.asynccontextmanager
    async def distributed_update(self, version: int, calls: int) -> AsyncIterator[None]:
        """One distributed update of `calls` buckets on every server (see `Backend.distributed_update`).

        The discipline holds over all the buckets: pause -> buckets -> continue; abort with one bucket
        is that call's `abort_all_requests`, with several a pause in mode "abort" (the resubmits wait
        for the continue); wait with one bucket is the server's update lock, with several new requests
        are also held here (`_hold`), or they would run between two buckets. Each server's
        weight-update session (§3.5) is open from the first bucket to the last.

        A server that failed a bucket or took only some holds weights of no version: it leaves
        rotation (staying paused, its requests held, if the update paused it) until a later update
        brings it the latest version; the servers that took every bucket are admitted again.
        """
        await self.start()
        if self._update is not None:
            raise RuntimeError("one weight update at a time: a distributed update is already running")
        if calls < 1:
            raise ValueError(f"a distributed update has at least one bucket, got {calls}")
        up = self._update = _Update(version, calls, self._targets(healthy=False))
        policy = self.cfg.weight_update
        mode = self.cfg.pause_mode if policy == "pause" else "abort" if policy == "abort" and calls > 1 else None
        ok = False
        try:
            if mode is not None:
                await self._pause(up.servers, mode)
            if policy == "wait" and calls > 1:
                self._hold.clear()
            up.sessions = await self._begin_sessions(up.servers)
            yield
            if up.made != calls:
                raise RuntimeError(f"the update to version {version} made {up.made} of its {calls} bucket calls")
            ok = True
        finally:
            self._update = None
            await self._settle(up, mode, ok)
        self.counters["weight_updates"] += 1

    async def _settle(self, up: _Update, mode: str | None, ok: bool) -> None:
        """End a distributed update: eject the servers holding part of it, admit those that took all
        of it, close the sessions and continue every server but the first kind. After a failure this
        is best effort (the failure is what is reported)."""
        mixed = [s for s in up.servers if s in up.failed or s in up.partial]
        self._stale.update(mixed)
        self._eject(mixed, f"holds part of version {up.version}'s weights")
        if up.done:  # someone serves `version`: the latest, which re-admission requires
            self._latest_version = up.version
            self._stale.difference_update(up.done)
        for server in up.done:
            if self.router.admit(server):
                self.counters["readmissions"] += 1
                log.info("re-admitted %s: it serves version %d", server.url, up.version)
        try:
            await self._end_sessions(up.sessions, strict=ok)
        finally:
            try:
                if mode is not None:
                    rest = [s for s in up.servers if s not in mixed]
                    if ok:
                        await self._resume(rest)
                    else:
                        await asyncio.gather(*(self._post(s, "/continue_generation", wire.ContinueRequest())
                                               for s in rest), return_exceptions=True)
            finally:
                self._paused = False
                self._hold.set()

    async def update_weights_from_distributed(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]], version: int, *,
        group_name: str = wire.WEIGHT_UPDATE_GROUP, flattened: bool = False,
    ) -> dict[str, int]:
        if self._update is None:  # a call of its own is an update of one bucket
            async with self.distributed_update(version, 1):
                served = await self.update_weights_from_distributed(
                    names, dtypes, shapes, version, group_name=group_name, flattened=flattened)
            return served
        up = self._update
        if version != up.version or up.made >= up.calls:
            raise RuntimeError(f"bucket {up.made + 1} for version {version} in an update to version {up.version} "
                               f"of {up.calls} buckets")
        last = up.made == up.calls - 1
        up.made += 1
        msg = wire.UpdateWeightsFromDistributedRequest(
            names=names, dtypes=dtypes, shapes=shapes, group_name=group_name,
            weight_version=_wire_version(version) if last else None, flush_cache=last and self._flush_cache,
            abort_all_requests=self.cfg.weight_update == "abort" and up.calls == 1,
            load_format="flattened_bucket" if flattened else None)
        failed = await self._each(up.servers, lambda s: self._post(s, "/update_weights_from_distributed", msg),
                                  "update_weights_from_distributed")
        for server in up.servers:
            if server in failed:
                up.failed.add(server)
            elif last:
                up.partial.discard(server)
                up.done.append(server)
            else:
                up.partial.add(server)
        if failed:
            raise self._failure(failed, len(up.servers), "update_weights_from_distributed")
        return {s.url: version for s in up.done} if last else {}

    async def _begin_sessions(self, servers: list[Server]) -> list[Server]:
        """Open a weight-update session (§3.5) on each server that has them (404: an older server)."""
        older: set[Server] = set()

        async def begin(server: Server) -> None:
            try:
                await self._post(server, "/begin_weight_update", wire.BeginWeightUpdateRequest())
            except HTTPStatusError as exc:
                if exc.status != 404:
                    raise
                older.add(server)

        failed = await self._each(servers, begin, "begin_weight_update")
        opened = [s for s in servers if s not in failed and s not in older]
        if failed:
            await self._end_sessions(opened, strict=False)
            raise self._failure(failed, len(servers), "begin_weight_update")
        return opened

    async def _end_sessions(self, sessions: list[Server], *, strict: bool) -> None:
        calls = [self._post(s, "/end_weight_update", wire.EndWeightUpdateRequest()) for s in sessions]
        if strict:
            await self._fan_out(calls, "end_weight_update")
        else:  # after a failure: best effort, the failure is what is reported
            await asyncio.gather(*calls, return_exceptions=True)

    async def destroy_weights_group(self, group_name: str = wire.WEIGHT_UPDATE_GROUP) -> None:
        await self.start()
        msg = wire.DestroyWeightsUpdateGroupRequest(group_name=group_name)
        await self._fan_out([self._post(s, "/destroy_weights_update_group", msg)
                             for s in self._targets(healthy=False)], "destroy_weights_update_group")

    # --- failures -----------------------------------------------------------------------------------

    async def _each(self, servers: list[Server], call: Callable[[Server], Awaitable],
                    what: str) -> dict[Server, BackendError]:
        """`call` on every server at once; the servers that failed, with their errors (counted)."""
        results = await asyncio.gather(*(call(s) for s in servers), return_exceptions=True)
        failed = {}
        for server, r in zip(servers, results, strict=True):
            if isinstance(r, BaseException):
                if not isinstance(r, BackendError):
                    raise r
                failed[server] = r
        self.counters[f"errors_{what}"] += len(failed)
        return failed

    @staticmethod
    def _failure(failed: dict[Server, BackendError], n: int, what: str) -> BackendError:
        return BackendError(f"{what} failed on {len(failed)} of {n} servers: "
                            + "; ".join(str(e) for e in failed.values()))

    def _eject(self, servers, why: str) -> None:
        for server in servers:
            if self.router.eject(server):
                self.counters["ejections"] += 1
                log.warning("ejected %s: it %s", server.url, why)


class _Update:
    """How far one distributed update got on each server (`SGLangControl.distributed_update`)."""

    __slots__ = ("version", "calls", "made", "servers", "sessions", "partial", "failed", "done")

    def __init__(self, version: int, calls: int, servers: list[Server]):
        self.version = version
        self.calls = calls
        self.made = 0
        """Bucket calls made so far."""
        self.servers = servers
        """Every server: each takes its ranks in the group."""
        self.sessions: list[Server] = []
        """Servers with a weight-update session open."""
        self.partial: set[Server] = set()
        """Took some buckets but not the last: weights of no version."""
        self.failed: set[Server] = set()
        """Failed a bucket call: may hold part of it."""
        self.done: list[Server] = []
        """Took every bucket: serve the new version."""
