"""The `sglang` backend: SGLang's native /generate over aiohttp, many servers behind one client.

Invariant (DESIGN.md 1, 2, 4): every token a server generated reaches the caller exactly once, with its
logprob and weight version. A stream is read in either server mode (contract §1.6: cumulative
`output_ids`, or deltas under `--incremental-streaming-output`) and only the new tokens are yielded.
A request that fails mid-stream (connection lost, 5xx, timeout, a response that breaks the contract)
moves to another healthy server with `input_ids = prompt + tokens received` and the remaining budget,
so nothing is generated twice; one aborted by a pause or a weight update is resubmitted the same way
(§1.7). Only `abort(request_id)` ends a stream with finish reason `abort`.

Per-chunk path: one typed msgspec decode of each SSE payload, list slices, no dict walking.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

import aiohttp
import msgspec

from engine.backends import http
from engine.backends.base import Backend, Chunk, Finish, Request, Sampling
from engine.backends.config import SGLangConfig
from engine.backends.errors import (
    BackendError,
    BadResponse,
    HTTPStatusError,
    RequestRejected,
    ServerUnavailable,
)
from engine.backends.routing import Router, Server
from protocol import sglang as wire

__all__ = ["SGLangBackend"]

log = logging.getLogger(__name__)

_JSON = {"Content-Type": "application/json"}
_ROUTING_KEY = "X-SMG-Routing-Key"
"""sglang-router's consistent-hashing key (contract §6): affinity behind a router URL too."""
_MAX_IDLE_RESUBMITS = 100
"""Server-side aborts in a row that returned no token before a request is given up: a pause resubmit
waits at the server, so only a server that aborts everything it receives gets here."""
_chunk = msgspec.json.Decoder(wire.GenerateResponse)
_model_info = msgspec.json.Decoder(wire.ModelInfo)
_control = msgspec.json.Decoder(wire.ControlResponse)


def _sampling(s: Sampling, budget: int) -> wire.SamplingParams:
    """The closed set of §1.2, only keys that differ from the server's defaults."""
    return wire.SamplingParams(
        max_new_tokens=budget, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        stop_token_ids=list(s.stop_token_ids) or None, stop=list(s.stop) or None, sampling_seed=s.seed,
        ignore_eos=s.ignore_eos,
    )


def _new_tokens(ev: wire.GenerateResponse, seen: int, url: str, rid: str) -> tuple[list[int], list[float]]:
    """The tokens of this event not yet received, whichever streaming mode the server runs (§1.6).

    `completion_tokens` is cumulative in every mode: a list of that length is cumulative (slice off what
    was seen), one of `completion_tokens - seen` entries is a delta. Ids and logprobs are judged apart
    (old `--stream-output` servers sent delta ids with cumulative logprobs).
    """
    meta = ev.meta_info
    total = meta.completion_tokens
    lps = meta.output_token_logprobs
    if lps is msgspec.UNSET:
        raise BadResponse("meta_info.output_token_logprobs missing (return_logprob was sent)", url=url,
                          request_id=rid)
    ids = ev.output_ids
    if ids is msgspec.UNSET:
        ids = [e.token_id for e in lps]
    n = len(ids)
    if n == total:
        ids = ids[seen:]
    elif n != total - seen:
        raise BadResponse(f"output_ids has {n} ids, completion_tokens is {total} and {seen} were received: "
                          "neither cumulative nor a delta", url=url, request_id=rid)
    m = len(lps)
    lp_total = total if meta.output_token_logprobs_length is msgspec.UNSET else meta.output_token_logprobs_length
    if m == lp_total:
        lps = lps[seen:]
    elif m != lp_total - seen:
        raise BadResponse(f"output_token_logprobs has {m} entries, {lp_total} in total and {seen} received: "
                          "neither cumulative nor a delta", url=url, request_id=rid)
    if len(lps) != len(ids) or [e.token_id for e in lps] != ids:
        raise BadResponse(f"output_token_logprobs ({len(lps)} entries) do not pair with the {len(ids)} new "
                          "output_ids", url=url, request_id=rid)
    logprobs = [e.logprob for e in lps]
    if None in logprobs:
        raise BadResponse("an output token's logprob is null", url=url, request_id=rid)
    return ids, logprobs


class SGLangBackend(Backend):
    """Client of one or more SGLang servers (or one sglang-router URL); see `SGLangConfig`."""

    config_type = SGLangConfig

    def __init__(self, cfg: SGLangConfig | None = None):
        self.cfg = cfg = cfg or SGLangConfig()
        self.router = Router(cfg.urls, balance=cfg.balance, affinity=cfg.affinity,
                             slack=cfg.affinity_slack, capacity=cfg.affinity_capacity,
                             eject_after=cfg.eject_after)
        self.counters: Counter[str] = Counter()
        self._headers = dict(_JSON)
        if cfg.api_key:
            self._headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task | None = None
        self._inflight: dict[str, tuple[Server, str]] = {}
        """request id -> (server, rid on the wire) of its current attempt."""
        self._aborted: set[str] = set()
        self._paused = False
        self._latest_disk: wire.UpdateWeightsFromDiskRequest | None = None
        """The last disk update, replayed on a server before it is re-admitted."""

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.cfg.max_connections, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None, connect=self.cfg.connect_timeout_s,
                                          sock_read=self.cfg.read_timeout_s),
            headers=self._headers,
        )
        self._health_task = asyncio.create_task(self._health_loop(), name="sglang-health")

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            try:
                await self._health_task
            except asyncio.CancelledError:
                pass
            self._health_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def stats(self) -> dict[str, int]:
        return dict(self.counters, servers_healthy=len(self.router.healthy), in_flight=len(self._inflight))

    # --- generation --------------------------------------------------------------------------------

    async def generate(self, request: Request) -> AsyncIterator[Chunk]:
        await self.start()
        rid, sampling, prompt = request.request_id, request.sampling, request.input_ids
        received: list[int] = []
        failed: set[Server] = set()
        error: BackendError | None = None
        attempt = retries = cached = idle = 0
        counters = self.counters
        counters["requests"] += 1
        try:
            while True:
                budget = sampling.max_new_tokens - len(received)
                if budget <= 0 and attempt:
                    yield Chunk([], [], "", Finish(reason="length", prompt_tokens=len(prompt),
                                                   completion_tokens=len(received), retries=retries))
                    return
                server = self.router.pick(request.session_key, failed)
                if server is None:
                    raise error or ServerUnavailable(
                        f"no healthy server among {len(self.router.servers)}", request_id=rid)
                wire_rid = rid if attempt == 0 else f"{rid}@{attempt}"
                body = wire.encode(wire.GenerateRequest(
                    input_ids=prompt + received if received else prompt,
                    sampling_params=_sampling(sampling, budget), rid=wire_rid, stream=self.cfg.stream,
                    return_logprob=True))
                cost = len(prompt) + sampling.max_new_tokens
                self.router.acquire(server, cost)
                self._inflight[rid] = (server, wire_rid)
                url = server.url
                seen = 0
                final: Chunk | None = None
                try:
                    async with aclosing(self._payloads(url, body, wire_rid, request.session_key)) as events:
                        async for payload in events:
                            if final is not None:
                                continue  # only [DONE] is due; reading it lets the connection be reused
                            try:
                                ev = _chunk.decode(payload)
                            except msgspec.DecodeError as exc:
                                raise self._bad_event(payload, exc, url, wire_rid) from None
                            counters["chunks"] += 1
                            ids, logprobs = _new_tokens(ev, seen, url, wire_rid)
                            seen += len(ids)
                            received += ids
                            counters["tokens"] += len(ids)
                            meta = ev.meta_info
                            fr = meta.finish_reason
                            if fr is None:
                                if rid not in self._aborted:
                                    if ids:
                                        yield Chunk(ids, logprobs, meta.weight_version)
                                    continue
                                counters["aborts"] += 1  # asked for, not yet seen by the server: hang up
                                final = Chunk(ids, logprobs, meta.weight_version, Finish(reason="abort"))
                                break
                            cached += meta.cached_tokens
                            final = Chunk(ids, logprobs, meta.weight_version, self._finish(fr, rid, wire_rid, url))
                    if final is None:
                        raise BadResponse("stream ended with [DONE] but no finish_reason", url=url,
                                          request_id=wire_rid)
                    finish = final.finish
                    if finish is not None:
                        finish.prompt_tokens = len(prompt)
                        finish.completion_tokens = len(received)
                        finish.cached_tokens = cached
                        finish.retries = retries
                        finish.server = url
                        self.router.succeeded(server)
                        yield final
                        return
                    if final.token_ids:  # aborted by a pause or a weight update: resubmit the rest
                        yield final
                        idle = 0
                    counters["resubmits"] += 1
                    idle += 1
                    if idle > _MAX_IDLE_RESUBMITS:
                        raise BackendError(f"aborted by the server {idle} times in a row without a token",
                                           url=url, request_id=rid)
                except BackendError as exc:
                    counters[f"errors_{exc.kind}"] += 1
                    if not exc.retryable or retries >= self.cfg.max_retries:
                        raise
                    if self.router.failed(server, hard=isinstance(exc, ServerUnavailable)):
                        counters["ejections"] += 1
                        log.warning("ejected %s: %s", url, exc)
                    log.warning("retrying %s elsewhere after %d tokens: %s", rid, len(received), exc)
                    error = exc
                    failed.add(server)
                    retries += 1
                    counters["retries"] += 1
                finally:
                    self.router.release(server, cost)
                attempt += 1
        finally:
            self._inflight.pop(rid, None)
            self._aborted.discard(rid)

    def _payloads(self, url: str, body: bytes, rid: str, key: str | None) -> AsyncIterator[bytes]:
        """The JSON payloads of one /generate: each SSE event, or the one body when not streaming."""
        headers = None if key is None else {_ROUTING_KEY: key}
        if self.cfg.stream:
            return http.sse_post(self._session, url, "/generate", body, rid, self.cfg.read_timeout_s,
                                 headers=headers)
        return self._whole(url, body, rid, headers)

    async def _whole(self, url: str, body: bytes, rid: str, headers: dict | None) -> AsyncIterator[bytes]:
        yield await http.call(self._session, "POST", url, "/generate", body, self.cfg.read_timeout_s, rid,
                              headers)

    def _finish(self, fr: wire.FinishReason, rid: str, wire_rid: str, url: str) -> Finish | None:
        """The caller's `Finish`, or None for an abort the caller did not ask for (resubmit it)."""
        match fr:
            case wire.Stop(matched=matched):
                return Finish(reason="stop", matched=matched)
            case wire.Length():
                return Finish(reason="length")
            case wire.Abort(status_code=int(status)) if status >= 500:
                raise HTTPStatusError(status, f"aborted by the server: {fr.message}", url=url, request_id=wire_rid)
            case wire.Abort(status_code=int(status)) if status >= 400:
                raise RequestRejected(f"rejected ({status} {fr.err_type}): {fr.message}", url=url,
                                      request_id=wire_rid)
            case wire.Abort() if rid in self._aborted:
                self.counters["aborts"] += 1
                return Finish(reason="abort")
        return None

    @staticmethod
    def _bad_event(payload: bytes, exc: Exception, url: str, rid: str) -> BackendError:
        """An in-stream error event (§1.6) as `RequestRejected`, anything else as `BadResponse`."""
        try:
            err = wire.decode_stream_event(payload)
        except Exception:
            return BadResponse(f"stream event: {exc}: {payload[:200]!r}", url=url, request_id=rid)
        if isinstance(err, wire.StreamError):
            if err.error.retryable:
                return HTTPStatusError(503, err.error.message, url=url, request_id=rid)
            return RequestRejected(f"rejected ({err.error.code} {err.error.type}): {err.error.message}",
                                   url=url, request_id=rid)
        return BadResponse(f"stream event: {exc}", url=url, request_id=rid)

    async def abort(self, request_id: str) -> None:
        entry = self._inflight.get(request_id)
        if entry is None:
            return
        self._aborted.add(request_id)
        server, wire_rid = entry
        await self._post(server, "/abort_request", wire.AbortRequest(rid=wire_rid))

    # --- control -----------------------------------------------------------------------------------

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
        latest = self._latest_disk
        if latest is None:
            return
        info = _model_info.decode(await self._call(server, "GET", "/model_info"))
        if info.weight_version != latest.weight_version:
            await self._post(server, "/update_weights_from_disk", latest)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)
            if not self._paused:
                await asyncio.gather(*(self._probe(s) for s in self.router.servers))

    async def weight_version(self) -> dict[str, str]:
        await self.start()
        servers = self.router.healthy
        bodies = await self._fan_out([self._call(s, "GET", "/model_info") for s in servers], "model_info")
        out = {}
        for server, body in zip(servers, bodies, strict=True):
            try:
                out[server.url] = _model_info.decode(body).weight_version
            except msgspec.DecodeError as exc:
                raise BadResponse(f"/model_info: {exc}", url=server.url) from None
        return out

    async def pause(self) -> None:
        await self.start()
        self._paused = True
        msg = wire.PauseRequest(mode=self.cfg.pause_mode)
        await self._fan_out([self._post(s, "/pause_generation", msg) for s in self.router.healthy], "pause")

    async def resume(self) -> None:
        await self.start()
        try:
            await self._fan_out([self._post(s, "/continue_generation", wire.ContinueRequest())
                                 for s in self.router.healthy], "continue")
        finally:
            self._paused = False

    async def _updating(self, update: Callable[[], Awaitable]) -> dict[str, str]:
        """Run `update()` under the configured discipline (pause -> update -> continue, or not)."""
        paused = self.cfg.weight_update == "pause"
        if paused:
            await self.pause()
        try:
            await update()
        finally:
            if paused:
                await self.resume()
        self.counters["weight_updates"] += 1
        return await self.weight_version()

    @property
    def _flush_cache(self) -> bool:
        """A cache flush fails while requests are held in place (§3.1), so skip it then."""
        return not (self.cfg.weight_update == "pause" and self.cfg.pause_mode == "in_place")

    async def update_weights_from_disk(self, path: str, version: str) -> dict[str, str]:
        await self.start()
        msg = wire.UpdateWeightsFromDiskRequest(
            model_path=str(path), weight_version=str(version), flush_cache=self._flush_cache,
            abort_all_requests=self.cfg.weight_update == "abort")
        self._latest_disk = msg
        return await self._updating(lambda: self._fan_out(
            [self._post(s, "/update_weights_from_disk", msg) for s in self.router.healthy],
            "update_weights_from_disk"))

    async def init_weights_group(self, master_address: str, master_port: int, *,
                                 group_name: str = "weight_update_group", backend: str = "gloo") -> int:
        await self.start()
        servers = self.router.servers
        world_size = 1 + len(servers) * self.cfg.tp_size
        calls = [self._post(s, "/init_weights_update_group", wire.InitWeightsUpdateGroupRequest(
            master_address=master_address, master_port=master_port, rank_offset=1 + i * self.cfg.tp_size,
            world_size=world_size, group_name=group_name, backend=backend)) for i, s in enumerate(servers)]
        await self._fan_out(calls, "init_weights_update_group")
        return world_size

    async def update_weights_from_distributed(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]], version: str, *,
        group_name: str = "weight_update_group",
    ) -> dict[str, str]:
        await self.start()
        msg = wire.UpdateWeightsFromDistributedRequest(
            names=names, dtypes=dtypes, shapes=shapes, group_name=group_name, weight_version=str(version),
            flush_cache=self._flush_cache, abort_all_requests=self.cfg.weight_update == "abort")
        return await self._updating(lambda: self._fan_out(
            [self._distributed(s, msg) for s in self.router.servers], "update_weights_from_distributed"))

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

    async def destroy_weights_group(self, group_name: str = "weight_update_group") -> None:
        await self.start()
        msg = wire.DestroyWeightsUpdateGroupRequest(group_name=group_name)
        await self._fan_out([self._post(s, "/destroy_weights_update_group", msg)
                             for s in self.router.servers], "destroy_weights_update_group")
