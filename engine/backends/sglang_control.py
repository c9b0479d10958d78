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
import logging
from collections.abc import Awaitable, Callable

import aiohttp
import msgspec
from tidal.engine.backends import http
from tidal.engine.backends.errors import BackendError, BadResponse, HTTPStatusError
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
                               self.cfg.control_timeout_s)

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
        """Replay the last disk update on a server that missed it (not on a router: it has no such route)."""
        latest = self._latest_disk
        if latest is None or self._workers:
            return
        try:
            info = _model_info.decode(await self._call(server, "GET", "/model_info"))
        except msgspec.DecodeError as exc:
            raise BadResponse(f"/model_info: {exc}", url=server.url) from None
        if http.served_version(info.weight_version, server.url) != int(latest.weight_version):
            await self._post(server, "/update_weights_from_disk", latest)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)
            if not self._paused:
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
        self._paused = True
        msg = wire.PauseRequest(mode=self.cfg.pause_mode)
        await self._fan_out([self._post(s, "/pause_generation", msg) for s in self._targets()], "pause")

    async def resume(self) -> None:
        await self.start()
        try:
            await self._fan_out([self._post(s, "/continue_generation", wire.ContinueRequest())
                                 for s in self._targets()], "continue")
        finally:
            self._paused = False

    async def _updating(self, update: Callable[[], Awaitable]) -> dict[str, int]:
        """Run `update()` under the configured discipline (pause -> update -> continue, or not)."""
        paused = self.cfg.weight_update == "pause"
        try:
            if paused:
                await self.pause()
            await update()
        finally:
            if paused:  # also after a failed pause: the servers that did pause must not stay paused
                await self.resume()
        self.counters["weight_updates"] += 1
        return await self.weight_version()

    @property
    def _flush_cache(self) -> bool:
        """A cache flush fails while requests are held in place (§3.1), so skip it then."""
        return not (self.cfg.weight_update == "pause" and self.cfg.pause_mode == "in_place")

    async def update_weights_from_disk(self, path: str, version: int) -> dict[str, int]:
        await self.start()
        msg = wire.UpdateWeightsFromDiskRequest(
            model_path=str(path), weight_version=_wire_version(version), flush_cache=self._flush_cache,
            abort_all_requests=self.cfg.weight_update == "abort")
        self._latest_disk = msg
        return await self._updating(lambda: self._fan_out(
            [self._post(s, "/update_weights_from_disk", msg) for s in self._targets()],
            "update_weights_from_disk"))

    async def init_weights_group(self, master_address: str, master_port: int, *,
                                 group_name: str = wire.WEIGHT_UPDATE_GROUP, backend: str = "gloo") -> int:
        await self.start()
        servers = self._targets(healthy=False)
        world_size = 1 + len(servers) * self.cfg.tp_size
        calls = [self._post(s, "/init_weights_update_group", wire.InitWeightsUpdateGroupRequest(
            master_address=master_address, master_port=master_port, rank_offset=1 + i * self.cfg.tp_size,
            world_size=world_size, group_name=group_name, backend=backend)) for i, s in enumerate(servers)]
        await self._fan_out(calls, "init_weights_update_group")
        return world_size

    async def update_weights_from_distributed(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]], version: int, *,
        group_name: str = wire.WEIGHT_UPDATE_GROUP,
    ) -> dict[str, int]:
        await self.start()
        msg = wire.UpdateWeightsFromDistributedRequest(
            names=names, dtypes=dtypes, shapes=shapes, group_name=group_name, weight_version=_wire_version(version),
            flush_cache=self._flush_cache, abort_all_requests=self.cfg.weight_update == "abort")
        return await self._updating(lambda: self._fan_out(
            [self._distributed(s, msg) for s in self._targets(healthy=False)], "update_weights_from_distributed"))

    async def _distributed(self, server: Server, msg: wire.UpdateWeightsFromDistributedRequest) -> None:
        """begin (when the server has it: 404 on older ones, §3.5) -> update -> end."""
        try:
            await self._post(server, "/begin_weight_update", wire.BeginWeightUpdateRequest())
            session = True
        except HTTPStatusError as exc:
            if exc.status != 404:
                raise
            session = False
        try:
            await self._post(server, "/update_weights_from_distributed", msg)
        finally:
            if session:
                await self._post(server, "/end_weight_update", wire.EndWeightUpdateRequest())

    async def destroy_weights_group(self, group_name: str = wire.WEIGHT_UPDATE_GROUP) -> None:
        await self.start()
        msg = wire.DestroyWeightsUpdateGroupRequest(group_name=group_name)
        await self._fan_out([self._post(s, "/destroy_weights_update_group", msg)
                             for s in self._targets(healthy=False)], "destroy_weights_update_group")
