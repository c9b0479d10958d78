"""The `openai` backend: OpenAI-compatible `/v1/completions` servers that take and return token ids.

What vLLM (and SGLang's OpenAI route) serve (docs/sglang.md §5): `prompt` as token ids, `logprobs: 0` for the
sampled token's logprob, `return_token_ids: true` so each streamed choice carries its new `token_ids`
(token in, token out: the text is never re-tokenized). Stream chunks are deltas. The finish reason is
`stop`, `length` or `abort`. The weight version comes from SGLang's `metadata`, which only the last
chunk carries: earlier chunks are tagged with the last version this client saw (0, the initial
checkpoint, before any; a server that sends none, like vLLM, stays at 0).

Several servers behind one client, with the `sglang` backend's policy (engine/backends/routing.py):
least-loaded with affinity per session key, ejection after failures, `/health` probes that re-admit.
Invariants 1 and 2 (docs/architecture.md): every token a server generated reaches the caller exactly once. A request
that fails (connection lost, 5xx, timeout, a broken chunk) moves to another healthy server with
`prompt = prompt + tokens received` and the remaining budget, so nothing is generated twice.

No pause or weight routes exist in the OpenAI API, so those raise `Unsupported`; `abort` closes the
stream, which makes vLLM and SGLang abort the request server-side.
"""

from __future__ import annotations

import asyncio
import logging
from array import array
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing

import aiohttp
import msgspec
from tidal.engine.backends import http
from tidal.engine.backends.base import Backend, Chunk, Finish, Request
from tidal.engine.backends.config import OpenAIConfig
from tidal.engine.backends.errors import BackendError, BadResponse, ServerUnavailable
from tidal.engine.backends.routing import Router, Server, count_failed_attempt
from tidal.protocol import sglang as wire

__all__ = ["OpenAIBackend"]

log = logging.getLogger(__name__)

_chunk = msgspec.json.Decoder(wire.CompletionResponse)


class OpenAIBackend(Backend):
    """Client of one or more OpenAI-compatible servers; see `OpenAIConfig`."""

    config_type = OpenAIConfig

    def __init__(self, cfg: OpenAIConfig | None = None):
        self.cfg = cfg = cfg or OpenAIConfig()
        self.router = Router(cfg.urls, balance=cfg.balance, affinity=cfg.affinity, slack=cfg.affinity_slack,
                             capacity=cfg.affinity_capacity, eject_after=cfg.eject_after)
        self.counters: Counter[str] = Counter()
        self._headers = {"Content-Type": "application/json"}
        if cfg.api_key:
            self._headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task | None = None
        self._inflight: dict[str, str] = {}
        """request id -> the rid of its current attempt on the wire."""
        self._streams: dict[str, aiohttp.ClientResponse] = {}
        """wire rid -> its open response, so `abort` can close it."""
        self._aborted: set[str] = set()
        self._version = 0
        """The policy version a server last reported (`http.served_version`)."""

    async def start(self) -> None:
        if self._session is not None:
            return
        self._session = http.client_session(self.cfg, self._headers)
        self._health_task = asyncio.create_task(self._health_loop(), name="openai-health")

    async def close(self) -> None:
        await http.stop_task(self._health_task)
        self._health_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def serving(self) -> bool:
        return bool(self.router.healthy)

    def stats(self) -> dict[str, int]:
        """Counters since start: requests, chunks, tokens, retries, aborts, ejections, readmissions,
        errors_<kind> per `BackendError.kind`; gauges servers_healthy and in_flight."""
        return dict(self.counters, servers_healthy=len(self.router.healthy), in_flight=len(self._inflight))

    # --- generation --------------------------------------------------------------------------------

    async def generate(self, request: Request) -> AsyncIterator[Chunk]:
        await self.start()
        rid, prompt = request.request_id, request.input_ids
        received = array("I")  # not a list: the GC never walks it (Request.input_ids)
        failed: set[Server] = set()
        error: BackendError | None = None
        retries = 0
        counters = self.counters
        counters["requests"] += 1
        try:
            while True:
                budget = request.sampling.max_new_tokens - len(received)
                if rid in self._aborted or budget <= 0:  # between two attempts
                    reason = "abort" if rid in self._aborted else "length"
                    counters["aborts"] += reason == "abort"
                    yield Chunk([], [], self._version, Finish(reason=reason, prompt_tokens=len(prompt),
                                                              completion_tokens=len(received), retries=retries))
                    return
                server = self.router.pick(request.session_key, failed)
                if server is None:
                    raise error or ServerUnavailable(f"no healthy server among {len(self.router.servers)}",
                                                     request_id=rid)
                wire_rid = rid if not retries else f"{rid}@{retries}"
                self._inflight[rid] = wire_rid
                cost = len(prompt) + request.sampling.max_new_tokens
                self.router.acquire(server, cost)
                try:
                    async with aclosing(self._attempt(server, wire_rid, request, received, budget)) as chunks:
                        async for chunk in chunks:
                            if chunk.finish is not None:
                                chunk.finish.prompt_tokens = len(prompt)
                                chunk.finish.completion_tokens = len(received)
                                chunk.finish.retries = retries
                                self.router.succeeded(server)
                            yield chunk
                    return
                except BackendError as exc:
                    count_failed_attempt(self.router, server, exc, counters, retries=retries,
                                         max_retries=self.cfg.max_retries, rid=rid, received=len(received))
                    error = exc
                    failed.add(server)
                    retries += 1
                    counters["retries"] += 1
                finally:
                    self.router.release(server, cost)
        finally:
            self._inflight.pop(rid, None)
            self._aborted.discard(rid)

    async def _attempt(self, server: Server, wire_rid: str, request: Request, received: array,
                       budget: int) -> AsyncIterator[Chunk]:
        """One /v1/completions on one server for the rest of `request`: yield its new tokens (extending
        `received`), the last chunk with its `Finish`."""
        s, url, counters = request.sampling, server.url, self.counters
        body = wire.encode(wire.CompletionRequest(
            model=self.cfg.model, prompt=request.prompt_with(received),
            max_tokens=budget, temperature=s.temperature, top_p=s.top_p, top_k=None if s.top_k == -1 else s.top_k,
            stop=list(s.stop) or None, stop_token_ids=list(s.stop_token_ids) or None, seed=s.seed,
            ignore_eos=s.ignore_eos, stream=True, logprobs=0, return_token_ids=True, rid=wire_rid))
        final: Chunk | None = None
        events = http.sse_post(self._session, url, "/v1/completions", body, wire_rid, self.cfg.read_timeout_s,
                               self._streams, max_bytes=self.cfg.max_response_bytes)
        try:
            async with aclosing(events):
                async for payload in events:
                    if final is not None:
                        continue  # only [DONE] is due; reading it lets the connection be reused
                    try:
                        ev = _chunk.decode(payload)
                    except msgspec.DecodeError as exc:
                        raise BadResponse(f"/v1/completions chunk: {exc}", url=url, request_id=wire_rid) from None
                    counters["chunks"] += 1
                    if ev.metadata and "weight_version" in ev.metadata:
                        self._version = http.served_version(str(ev.metadata["weight_version"]), url, wire_rid)
                    if not ev.choices:
                        continue
                    choice = ev.choices[0]
                    ids = choice.token_ids
                    if ids is None:
                        raise BadResponse("choices[0].token_ids missing: the server must honour "
                                          "return_token_ids (SGLang, vLLM >= 0.10.2)", url=url, request_id=wire_rid)
                    logprobs = choice.logprobs.token_logprobs if choice.logprobs is not None else []
                    if len(logprobs) != len(ids) or None in logprobs:
                        raise BadResponse(f"{len(ids)} token_ids but logprobs {logprobs!r}", url=url,
                                          request_id=wire_rid)
                    received.extend(ids)
                    counters["tokens"] += len(ids)
                    if choice.finish_reason is None:
                        if ids:
                            yield Chunk(ids, logprobs, self._version)
                        continue
                    counters["aborts"] += choice.finish_reason == "abort"
                    final = Chunk(ids, logprobs, self._version,
                                  Finish(reason=choice.finish_reason, matched=choice.matched_stop, server=url))
        except ServerUnavailable:
            if final is not None:
                log.warning("ignored a fault after the last chunk of %s from %s", wire_rid, url)
            elif request.request_id in self._aborted:  # abort() closed the stream
                counters["aborts"] += 1
                final = Chunk([], [], self._version, Finish(reason="abort", server=url))
            else:
                raise
        if final is None:
            raise BadResponse("stream ended with [DONE] but no finish_reason", url=url, request_id=wire_rid)
        yield final

    async def abort(self, request_id: str) -> None:
        wire_rid = self._inflight.get(request_id)
        if wire_rid is None:
            return
        self._aborted.add(request_id)
        resp = self._streams.get(wire_rid)
        if resp is not None:
            resp.close()

    # --- health ------------------------------------------------------------------------------------

    async def health(self) -> dict[str, bool]:
        await self.start()
        return dict(await asyncio.gather(*(self._probe(s) for s in self.router.servers)))

    async def _probe(self, server: Server) -> tuple[str, bool]:
        """GET /health; eject on failure, re-admit on success."""
        try:
            await http.call(self._session, "GET", server.url, "/health", None, self.cfg.health_timeout_s,
                            max_bytes=self.cfg.max_response_bytes)
            ok = True
        except BackendError:
            ok = False
        if ok and self.router.admit(server):
            self.counters["readmissions"] += 1
            log.info("re-admitted %s", server.url)
        elif not ok and self.router.eject(server):
            self.counters["ejections"] += 1
            log.warning("ejected %s: /health failed", server.url)
        return server.url, ok

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)
            await asyncio.gather(*(self._probe(s) for s in self.router.servers))
