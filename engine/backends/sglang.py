"""The `sglang` backend: SGLang's native /generate over aiohttp, many servers behind one client.

Invariants 1, 2 and 4 (docs/architecture.md): every token a server generated reaches the caller exactly once, with its
logprob and weight version. A stream is read in either server mode (docs/sglang.md §1.6: cumulative
`output_ids`, or deltas under `--incremental-streaming-output`) and only the new tokens are yielded.
A request that fails mid-stream (connection lost, 5xx, timeout, a response that breaks the contract)
moves to another healthy server with `input_ids = prompt + tokens received` and the remaining budget,
so nothing is generated twice; one aborted by a pause or a weight update is resubmitted the same way
(§1.7). Only `abort(request_id)` ends a stream with finish reason `abort`.

Per-chunk path: one typed msgspec decode of each SSE payload, list slices, no dict walking.
Known limit: a stop string that straddles a retry boundary is not matched (the new server sees only
its own output's text); stop token ids are unaffected.
"""

from __future__ import annotations

import asyncio
import logging
from array import array
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated

import aiohttp
import msgspec
from msgspec import UNSET, Meta, UnsetType
from tidal.engine.backends import http
from tidal.engine.backends.base import Backend, Chunk, Finish, Request, Sampling
from tidal.engine.backends.coalesce import Coalescer, Unbatch
from tidal.engine.backends.config import SGLangConfig
from tidal.engine.backends.errors import (
    BackendError,
    BadResponse,
    HTTPStatusError,
    RequestRejected,
    ServerUnavailable,
)
from tidal.engine.backends.routing import Router, Server, count_failed_attempt
from tidal.engine.backends.sglang_control import SGLangControl
from tidal.protocol import sglang as wire
from tidal.protocol.errors import ProtocolError

__all__ = ["SGLangBackend"]

log = logging.getLogger(__name__)

_JSON = {"Content-Type": "application/json"}
_ROUTING_KEY = "X-SMG-Routing-Key"
"""sglang-router's consistent-hashing key (docs/sglang.md §6): affinity behind a router URL too."""
_MAX_IDLE_RESUBMITS = 100
"""Server-side aborts in a row that returned no token before a request is given up: a pause resubmit
waits at the server, so only a server that aborts everything it receives gets here."""
TokenId = Annotated[int, Meta(ge=0, lt=1 << 32)]
"""A token id the trajectory can hold (uint32); the decoder refuses any other."""
LogProb = Annotated[float, Meta(le=0.0)]
"""A log-probability; a positive one is a broken server, refused by the decoder."""


class _Logprob(msgspec.Struct, array_like=True, gc=False):
    """`[logprob, token_id, text]` of wire.TokenLogprob, text left unread (trailing items are skipped)."""

    logprob: LogProb | None
    token_id: TokenId


class _Meta(msgspec.Struct, gc=False):
    """The keys of wire.MetaInfo a stream event needs; msgspec skips the rest without building them."""

    finish_reason: wire.FinishReason | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    weight_version: str = "default"
    output_token_logprobs: list[_Logprob] | UnsetType = UNSET
    output_token_logprobs_length: int | UnsetType = UNSET


class _Event(msgspec.Struct, gc=False):
    """wire.GenerateResponse as this client reads it: impossible ids and logprobs fail the decode, in C."""

    meta_info: _Meta
    output_ids: list[TokenId] | UnsetType = UNSET
    index: int | UnsetType = UNSET
    """The item's position in a batched request (`coalesce`)."""


_chunk = msgspec.json.Decoder(_Event)


class _Attempt:
    """What one attempt leaves for the retry loop."""

    __slots__ = ("final", "cached")

    def __init__(self):
        self.final: Chunk | None = None
        self.cached = 0


def _sampling(s: Sampling, budget: int, stream_interval: int | None) -> wire.SamplingParams:
    """The closed set of §1.2: the policy's sampling always stated, optional keys only when set."""
    return wire.SamplingParams(
        max_new_tokens=budget, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        stop_token_ids=list(s.stop_token_ids) or None, stop=list(s.stop) or None, sampling_seed=s.seed,
        ignore_eos=s.ignore_eos, stream_interval=stream_interval,
    )


def _new_tokens(ev: _Event, seen: int, url: str, rid: str) -> tuple[list[int], list[float]]:
    """The tokens of this event not yet received, whichever streaming mode the server runs (§1.6).

    `completion_tokens` is cumulative in every mode: a list of that length is cumulative (slice off what
    was seen), one of `completion_tokens - seen` entries is a delta. Ids and logprobs are judged apart
    (old `--stream-output` servers sent delta ids with cumulative logprobs).
    """
    meta = ev.meta_info
    total = meta.completion_tokens
    lps = meta.output_token_logprobs
    if lps is UNSET:
        raise BadResponse("meta_info.output_token_logprobs missing (return_logprob was sent)", url=url,
                          request_id=rid)
    ids = ev.output_ids
    if ids is UNSET:
        ids = [e.token_id for e in lps]
    n = len(ids)
    if n == total:
        ids = ids[seen:]
    elif n != total - seen:
        raise BadResponse(f"output_ids has {n} ids, completion_tokens is {total} and {seen} were received: "
                          "neither cumulative nor a delta", url=url, request_id=rid)
    m = len(lps)
    lp_total = total if meta.output_token_logprobs_length is UNSET else meta.output_token_logprobs_length
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


class SGLangBackend(SGLangControl, Backend):
    """Client of one or more SGLang servers (or one sglang-router URL); see `SGLangConfig`."""

    config_type = SGLangConfig

    def __init__(self, cfg: SGLangConfig | None = None):
        self.cfg = cfg = cfg or SGLangConfig()
        self.router = Router(cfg.urls, balance=cfg.balance, affinity=cfg.affinity,
                             slack=cfg.affinity_slack, capacity=cfg.affinity_capacity,
                             eject_after=cfg.eject_after)
        self.counters: Counter[str] = Counter()
        self._workers = [Server(url.rstrip("/"), i) for i, url in enumerate(cfg.control_urls)]
        """Control-call targets behind a router (see `SGLangControl`); empty: the servers themselves."""
        self._headers = dict(_JSON)
        if cfg.api_key:
            self._headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task | None = None
        self._inflight: dict[str, tuple[Server, str]] = {}
        """request id -> (server, rid on the wire) of its current attempt."""
        self._aborted: set[str] = set()
        self._paused = False
        self._hold = asyncio.Event()
        """Cleared while new attempts must wait: between the buckets of a distributed update under
        `weight_update = "wait"` (see `SGLangControl.distributed_update`)."""
        self._hold.set()
        self._update = None
        """The distributed update in progress, if any (`SGLangControl.distributed_update`)."""
        self._latest_disk: wire.UpdateWeightsFromDiskRequest | None = None
        """The last disk update, replayed on a server before it is re-admitted."""
        self._latest_version: int | None = None
        """The newest version a weight update brought to some server: what re-admission requires."""
        self._stale: set[Server] = set()
        """Servers that took part of a distributed update and not the rest: weights of no version."""
        self._coalescer = None if cfg.coalesce == 1 else Coalescer(
            cfg.coalesce, lambda server, body, label: self._payloads(server.url, body, label, None),
            self._decode, self._abort_rid, self.counters)

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._session is not None:
            return
        self._session = http.client_session(self.cfg, self._headers)
        self._health_task = asyncio.create_task(self._health_loop(), name="sglang-health")

    async def close(self) -> None:
        if self._coalescer is not None:
            await self._coalescer.close()
        await http.stop_task(self._health_task)
        self._health_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def serving(self) -> bool:
        return bool(self.router.healthy)

    def stats(self) -> dict[str, int]:
        """Counters since start (absent until first counted) and two gauges:

        requests, chunks (stream events read), tokens (yielded); retries (moved to another server after
        a failure), resubmits (after an abort the caller did not ask for), aborts (asked for);
        with `coalesce`: batches (batched /generate sent), batched (requests in them), batches_refused
        (refused as a whole, their requests sent again alone);
        ejections, readmissions, readmissions_refused (a healthy ejected server not yet serving the
        latest version); errors_<kind> per `BackendError.kind` (timeout, bad_response,
        http_status, connection, rejected) and errors_<endpoint> per failed control fan-out;
        weight_updates; gauges servers_healthy and in_flight (requests being generated).
        """
        return dict(self.counters, servers_healthy=len(self.router.healthy), in_flight=len(self._inflight))

    # --- generation --------------------------------------------------------------------------------

    async def generate(self, request: Request) -> AsyncIterator[Chunk]:
        await self.start()
        rid, sampling, prompt = request.request_id, request.sampling, request.input_ids
        received = array("I")  # not a list: the GC never walks it (Request.input_ids)
        failed: set[Server] = set()
        error: BackendError | None = None
        attempt = retries = cached = idle = version = 0
        alone = False
        counters = self.counters
        counters["requests"] += 1
        try:
            while True:
                budget = sampling.max_new_tokens - len(received)
                if rid in self._aborted or (budget <= 0 and attempt):  # between two attempts
                    reason = "abort" if rid in self._aborted else "length"
                    counters["aborts"] += reason == "abort"
                    yield Chunk([], [], version, Finish(reason=reason, prompt_tokens=len(prompt),
                                                        completion_tokens=len(received), retries=retries))
                    return
                if not self._hold.is_set():  # between two buckets of a distributed update
                    await self._hold.wait()
                server = self.router.pick(request.session_key, failed)
                if server is None:
                    raise error or ServerUnavailable(
                        f"no healthy server among {len(self.router.servers)}", request_id=rid)
                wire_rid = rid if attempt == 0 else f"{rid}@{attempt}"
                params = _sampling(sampling, budget, self.cfg.stream_interval)
                if self._coalescer is not None and not alone:
                    events = self._coalescer.submit(server, wire_rid, request.prompt_with(received), params)
                else:
                    events = self._payloads(server.url, wire.encode(wire.GenerateRequest(
                        input_ids=request.prompt_with(received), sampling_params=params, rid=wire_rid,
                        stream=self.cfg.stream, return_logprob=True)), wire_rid, request.session_key)
                cost = len(prompt) + sampling.max_new_tokens
                self.router.acquire(server, cost)
                self._inflight[rid] = (server, wire_rid)
                state = _Attempt()
                try:
                    async with aclosing(self._attempt(server, wire_rid, events, request, received, state)) as chunks:
                        async for chunk in chunks:
                            yield chunk
                    final, cached, version = state.final, cached + state.cached, state.final.weight_version
                    if final.finish is not None:
                        final.finish.prompt_tokens = len(prompt)
                        final.finish.completion_tokens = len(received)
                        final.finish.cached_tokens = cached
                        final.finish.retries = retries
                        final.finish.server = server.url
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
                                           url=server.url, request_id=rid)
                except Unbatch:
                    alone = True  # the batch it was in was refused as a whole: its own verdict next
                except BackendError as exc:
                    count_failed_attempt(self.router, server, exc, counters, retries=retries,
                                         max_retries=self.cfg.max_retries, rid=rid, received=len(received))
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

    async def _attempt(self, server: Server, wire_rid: str, events: AsyncIterator[bytes | _Event],
                       request: Request, received: array, state: _Attempt) -> AsyncIterator[Chunk]:
        """One /generate on one server: yield its new tokens, extend `received` with them, and leave the
        last chunk in `state.final` (its `finish` None when the server aborted the request on its own).
        `events` are the raw payloads of its own request, or its decoded events out of a batch."""
        url, rid, counters, seen = server.url, request.request_id, self.counters, 0
        version_text, version = None, 0
        try:
            async with aclosing(events):
                async for payload in events:
                    if state.final is not None:
                        continue  # only [DONE] is due; reading it lets the connection be reused
                    ev = payload if type(payload) is _Event else self._decode(payload, url, wire_rid)
                    counters["chunks"] += 1
                    meta = ev.meta_info
                    if meta.weight_version != version_text:  # read before any token counts as received
                        version = http.served_version(meta.weight_version, url, wire_rid)
                        version_text = meta.weight_version
                    ids, logprobs = _new_tokens(ev, seen, url, wire_rid)
                    seen += len(ids)
                    received.extend(ids)
                    counters["tokens"] += len(ids)
                    fr = meta.finish_reason
                    if fr is None:
                        if rid not in self._aborted:
                            if ids:
                                yield Chunk(ids, logprobs, version)
                            continue
                        counters["aborts"] += 1  # asked for, not yet seen by the server: hang up
                        state.final = Chunk(ids, logprobs, version, Finish(reason="abort"))
                        return
                    state.cached = meta.cached_tokens
                    state.final = Chunk(ids, logprobs, version, self._finish(fr, rid, wire_rid, url))
        except BackendError:
            if state.final is None:
                raise
            log.warning("ignored a fault after the last chunk of %s from %s", wire_rid, url)
        if state.final is None:
            raise BadResponse("stream ended with [DONE] but no finish_reason", url=url, request_id=wire_rid)

    def _decode(self, payload: bytes, url: str, rid: str) -> _Event:
        try:
            return _chunk.decode(payload)
        except msgspec.DecodeError as exc:
            raise self._bad_event(payload, exc, url, rid) from None

    async def _abort_rid(self, server: Server, wire_rid: str) -> None:
        await self._post(server, "/abort_request", wire.AbortRequest(rid=wire_rid))

    def _payloads(self, url: str, body: bytes, rid: str, key: str | None) -> AsyncIterator[bytes]:
        """The JSON payloads of one /generate: each SSE event, or the one body when not streaming."""
        headers = None if key is None else {_ROUTING_KEY: key}
        if self.cfg.stream:
            return http.sse_post(self._session, url, "/generate", body, rid, self.cfg.read_timeout_s,
                                 headers=headers, max_bytes=self.cfg.max_response_bytes)
        return self._whole(url, body, rid, headers)

    async def _whole(self, url: str, body: bytes, rid: str, headers: dict | None) -> AsyncIterator[bytes]:
        yield await http.call(self._session, "POST", url, "/generate", body, self.cfg.read_timeout_s, rid,
                              headers, max_bytes=self.cfg.max_response_bytes)

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
        except ProtocolError:
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
        msg = wire.AbortRequest(rid=wire_rid)
        if not self._workers:
            await self._abort_rid(server, wire_rid)
        else:  # which worker the router chose is unknown; an unknown rid is a no-op (§4)
            await self._fan_out([self._post(w, "/abort_request", msg) for w in self._workers], "abort")
