"""The `openai` backend: an OpenAI-compatible `/v1/completions` server that takes and returns token ids.

What vLLM (and SGLang's OpenAI route) serve (contract §5): `prompt` as token ids, `logprobs: 0` for the
sampled token's logprob, `return_token_ids: true` so each streamed choice carries its new `token_ids`
(token in, token out: the text is never re-tokenized). Stream chunks are deltas. The finish reason is
`stop`, `length` or `abort`. The weight version comes from SGLang's `metadata`, which only the last
chunk carries: earlier chunks are tagged with the last version this client saw ("" before any).

No pause or weight routes exist in the OpenAI API, so those raise `Unsupported`; `abort` closes the
stream, which makes vLLM and SGLang abort the request server-side.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing

import aiohttp
import msgspec

from engine.backends import http
from engine.backends.base import Backend, Chunk, Finish, Request
from engine.backends.config import OpenAIConfig
from engine.backends.errors import BackendError, BadResponse, ServerUnavailable
from protocol import sglang as wire

__all__ = ["OpenAIBackend"]

_chunk = msgspec.json.Decoder(wire.CompletionResponse)


class OpenAIBackend(Backend):
    """Client of one OpenAI-compatible server; see `OpenAIConfig`."""

    config_type = OpenAIConfig

    def __init__(self, cfg: OpenAIConfig | None = None):
        self.cfg = cfg = cfg or OpenAIConfig()
        self.url = cfg.url.rstrip("/")
        self.counters: Counter[str] = Counter()
        self._headers = {"Content-Type": "application/json"}
        if cfg.api_key:
            self._headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._session: aiohttp.ClientSession | None = None
        self._streams: dict[str, aiohttp.ClientResponse] = {}
        """request id -> its open response, so `abort` can close it."""
        self._aborted: set[str] = set()
        self._version = ""
        """The weight version the server last reported."""

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.cfg.max_connections, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(total=None, connect=self.cfg.connect_timeout_s,
                                              sock_read=self.cfg.read_timeout_s),
                headers=self._headers,
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def stats(self) -> dict[str, int]:
        return dict(self.counters, in_flight=len(self._streams))

    async def generate(self, request: Request) -> AsyncIterator[Chunk]:
        await self.start()
        rid, s = request.request_id, request.sampling
        body = wire.encode(wire.CompletionRequest(
            model=self.cfg.model, prompt=request.input_ids, max_tokens=s.max_new_tokens,
            temperature=s.temperature, top_p=s.top_p, top_k=None if s.top_k == -1 else s.top_k,
            stop=list(s.stop) or None, stop_token_ids=list(s.stop_token_ids) or None, seed=s.seed,
            ignore_eos=s.ignore_eos, stream=True, logprobs=0, return_token_ids=True, rid=rid))
        counters = self.counters
        counters["requests"] += 1
        total = 0
        url = self.url
        final: Chunk | None = None
        events = http.sse_post(self._session, url, "/v1/completions", body, rid, self.cfg.read_timeout_s,
                               self._streams)
        try:
            async with aclosing(events):
                async for payload in events:
                    if final is not None:
                        continue  # only [DONE] is due; reading it lets the connection be reused
                    try:
                        ev = _chunk.decode(payload)
                    except msgspec.DecodeError as exc:
                        raise BadResponse(f"/v1/completions chunk: {exc}", url=url, request_id=rid) from None
                    counters["chunks"] += 1
                    if ev.metadata and "weight_version" in ev.metadata:
                        self._version = str(ev.metadata["weight_version"])
                    if not ev.choices:
                        continue
                    choice = ev.choices[0]
                    ids = choice.token_ids
                    if ids is None:
                        raise BadResponse("choices[0].token_ids missing: the server must honour "
                                          "return_token_ids (SGLang, vLLM >= 0.10.2)", url=url, request_id=rid)
                    logprobs = choice.logprobs.token_logprobs if choice.logprobs is not None else []
                    if len(logprobs) != len(ids) or None in logprobs:
                        raise BadResponse(f"{len(ids)} token_ids but logprobs {logprobs!r}", url=url,
                                          request_id=rid)
                    total += len(ids)
                    counters["tokens"] += len(ids)
                    if choice.finish_reason is None:
                        if ids:
                            yield Chunk(ids, logprobs, self._version)
                        continue
                    counters["aborts"] += choice.finish_reason == "abort"
                    final = Chunk(ids, logprobs, self._version, Finish(
                        reason=choice.finish_reason, matched=choice.matched_stop,
                        prompt_tokens=len(request.input_ids), completion_tokens=total, server=url))
        except BackendError as exc:
            if final is None and isinstance(exc, ServerUnavailable) and rid in self._aborted:
                counters["aborts"] += 1  # abort() closed the stream
                final = Chunk([], [], self._version, Finish(reason="abort", prompt_tokens=len(request.input_ids),
                                                            completion_tokens=total, server=url))
            elif final is None:
                counters[f"errors_{exc.kind}"] += 1
                raise
        finally:
            self._aborted.discard(rid)
        if final is None:
            counters["errors_bad_response"] += 1
            raise BadResponse("stream ended with [DONE] but no finish_reason", url=url, request_id=rid)
        yield final

    async def abort(self, request_id: str) -> None:
        resp = self._streams.get(request_id)
        if resp is not None:
            self._aborted.add(request_id)
            resp.close()

    async def health(self) -> dict[str, bool]:
        await self.start()
        try:
            await http.call(self._session, "GET", self.url, "/health", None, self.cfg.connect_timeout_s)
        except BackendError:
            return {self.url: False}
        return {self.url: True}
