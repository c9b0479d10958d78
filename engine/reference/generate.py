"""`POST /generate` (docs/sglang.md §1): admission, the response body, and SSE streaming in both modes.

A request holds the generation (reader) lock for its whole life (§2), so a weight update that is
not under a pause waits for it. Every exit path of a handler (done, client gone, cancelled) leaves
no sequence behind: unfinished ones are aborted in `finally`. Streams are coalesced the way SGLang
coalesces them: a handler that falls behind sends the newest cumulative state, or the
concatenation of the deltas in incremental mode, never one event per token per se.
"""

import asyncio
import time

import msgspec
from aiohttp import web
from msgspec import UNSET
from tidal.engine.reference.api import ApiError, Item, json_encode, parse_generate, read_json, request_error
from tidal.engine.reference.config import STATE, ServerState
from tidal.engine.reference.scheduler import ABORTED_WAITING, Seq
from tidal.protocol.sglang import (
    SSE_DONE,
    SSE_PREFIX,
    Abort,
    ErrorResponse,
    GenerateResponse,
    MetaInfo,
    Stop,
    StreamError,
    StreamErrorDetail,
    TokenLogprob,
    WeightVersionSpan,
)

__all__ = ["handle_generate", "admit", "Emitter", "OutputText", "sse_headers"]

sse_headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE = SSE_PREFIX + SSE_DONE + b"\n\n"


def admit(state: ServerState, items: list[Item]) -> list[Seq]:
    """Tokenize, check and queue the items (no await inside: the rid check and submit are atomic)."""
    stepper = state.stepper
    if len(state.scheduler.waiting) + len(items) > state.cfg.server.max_queued_requests:
        raise request_error("The request queue is full.", status=503)
    seqs = []
    for item in items:
        if item.rid in state.scheduler.seqs or any(s.rid == item.rid for s in seqs):
            raise request_error(f"Duplicate request ID detected: {item.rid}")
        prompt = list(item.input_ids) if item.input_ids is not None else stepper.encode(item.text)
        if not prompt:
            raise request_error("The prompt is empty after tokenization.")
        if len(prompt) >= stepper.context_length:
            raise request_error(
                f"The input ({len(prompt)} tokens) is longer than the model's context length "
                f"({stepper.context_length} tokens)."
            )
        if item.logprob_start_len > len(prompt):
            raise request_error(
                f"logprob_start_len ({item.logprob_start_len}) is larger than the prompt ({len(prompt)} tokens)."
            )
        bad = [t for t in prompt if not 0 <= t < stepper.vocab_size]
        if bad:
            raise request_error(f"input_ids holds {bad[0]}, outside the vocabulary [0, {stepper.vocab_size}).")
        s = item.sampling
        stop_ids = set(s.stop_token_ids)
        if not s.ignore_eos:
            stop_ids |= stepper.eos_token_ids
        seqs.append(Seq(rid=item.rid, prompt=prompt, sampling=s, stop_ids=frozenset(stop_ids), item=item))
    for seq in seqs:
        state.scheduler.submit(seq)
    return seqs


class OutputText:
    """The response text of a sequence (§1.3): a matched stop token is left out and a matched stop
    string cut off (unless `no_stop_trim`). Steppers whose decoding is prefix-stable (the
    simulator) are decoded incrementally, so a long stream costs O(n), not O(n^2)."""

    def __init__(self, stepper, seq: Seq):
        self.stepper = stepper
        self.seq = seq
        self._stable = getattr(stepper, "prefix_stable_decode", False)
        self._text = ""
        self._n = 0

    def _decode(self, upto: int) -> str:
        ids, skip = self.seq.output_ids, self.seq.sampling.skip_special_tokens
        if not self._stable or upto < self._n:
            return self.stepper.decode(ids[:upto], skip)
        self._text += self.stepper.decode(ids[self._n:upto], skip)
        self._n = upto
        return self._text

    def text(self, *, hold: int = 0, sent: int = 0) -> str:
        """The text so far; while unfinished, the last `hold` characters (a possible stop-string
        prefix) are held back, never below the `sent` characters already streamed."""
        seq, s, fin = self.seq, self.seq.sampling, self.seq.finish
        n = len(seq.output_ids)
        if isinstance(fin, Stop) and isinstance(fin.matched, int) and not s.no_stop_trim:
            n -= 1
        text = self._decode(n)
        if isinstance(fin, Stop) and isinstance(fin.matched, str) and not s.no_stop_trim:
            cut = text.find(fin.matched)
            return text[:cut] if cut >= 0 else text
        if not fin and hold:
            return text[: max(sent, len(text) - hold)]
        return text


class Emitter:
    """Builds the §1.3 body of one sequence, for one final response or successive stream chunks."""

    def __init__(self, state: ServerState, seq: Seq, *, incremental: bool, batch_index: int | None):
        self.state = state
        self.seq = seq
        self.incremental = incremental
        self.batch_index = batch_index
        self.sent_tokens = 0
        self.sent_text = 0
        self.chunks = 0
        self._text = OutputText(state.stepper, seq)
        self._hold = max((len(x) for x in seq.sampling.stop), default=1) - 1

    def _logprobs(self, logprobs, ids, with_text: bool) -> list[TokenLogprob]:
        token_text = self.state.stepper.token_text
        return [TokenLogprob(lp, t, token_text(t) if with_text else None) for lp, t in zip(logprobs, ids, strict=True)]

    def body(self, *, stream: bool) -> GenerateResponse:
        """The body for the current state: a final response when the sequence finished."""
        seq, item, state = self.seq, self.seq.item, self.state
        final = seq.finished
        n = len(seq.output_ids)
        lo = self.sent_tokens if (stream and self.incremental) else 0
        text = self._text.text(hold=self._hold, sent=self.sent_text)
        queued_abort = seq.finish == ABORTED_WAITING  # carries neither prompt_tokens nor cached_tokens
        meta = MetaInfo(
            id=seq.rid, finish_reason=seq.finish, prompt_tokens=UNSET if queued_abort else len(seq.prompt),
            completion_tokens=n, cached_tokens=UNSET if queued_abort else seq.cached_tokens,
            weight_version=seq.weight_version if final and seq.spans else state.scheduler.version,
            num_retractions=seq.num_retractions, reasoning_tokens=0,
        )
        if item.return_logprob:
            with_text = item.return_text_in_logprobs
            first = self.chunks == 0
            if item.logprob_start_len >= 0 and seq.input_logprobs is not None and (first or not self.incremental):
                start = item.logprob_start_len
                meta.input_token_logprobs = self._logprobs(seq.input_logprobs, seq.prompt[start:], with_text)
            else:
                meta.input_token_logprobs = []
            meta.output_token_logprobs = self._logprobs(seq.output_logprobs[lo:n], seq.output_ids[lo:n], with_text)
            meta.output_token_logprobs_length = n
            if item.top_logprobs_num > 0:
                tops = (seq.output_top or [])[lo:n]
                meta.output_top_logprobs = [self._logprobs([p for p, _ in top], [t for _, t in top], with_text)
                                            for top in tops]
                if item.logprob_start_len >= 0 and (first or not self.incremental):
                    meta.input_top_logprobs = [None] * (len(seq.prompt) - item.logprob_start_len)
        if final:
            meta.weight_versions = [WeightVersionSpan(v, a, b) for v, a, b in seq.spans]
            meta.e2e_latency = time.monotonic() - seq.created
        if not stream or self.chunks == 0:
            meta.response_sent_to_client_ts = time.time()
        out = GenerateResponse(
            text=text[self.sent_text:] if (stream and self.incremental) else text,
            output_ids=seq.output_ids[lo:n], meta_info=meta,
            index=UNSET if self.batch_index is None else self.batch_index,
            prompt_token_ids=seq.prompt if item.return_prompt_token_ids else UNSET,
        )
        self.sent_tokens = n
        self.sent_text = len(text)
        self.chunks += 1
        return out


async def _stream_one(resp: web.StreamResponse, em: Emitter, interval: int, *, last: bool = False) -> None:
    """Write `em`'s events as its sequence grows. With `last` (the response's only sequence) the final
    event, `[DONE]` and the end of the body go out in one write: a one-token answer costs the server one
    send, headers included, not four."""
    seq = em.seq
    while True:
        await seq.changed.wait()
        seq.changed.clear()
        n = len(seq.output_ids)
        if not seq.finished and (n == em.sent_tokens or (em.chunks > 0 and n - em.sent_tokens < interval)):
            continue
        event = SSE_PREFIX + json_encode(em.body(stream=True)) + b"\n\n"
        if seq.finished and last:
            await resp.write_eof(event + _DONE)
            return
        await resp.write(event)
        if seq.finished:
            return


async def _write_error_event(request: web.Request, err: ApiError) -> web.StreamResponse:
    """§1.6: with stream true, a processing-time rejection is HTTP 200 + one error event + [DONE]."""
    resp = web.StreamResponse(status=200, headers=sse_headers)
    await resp.prepare(request)
    event = StreamError(StreamErrorDetail(err.message, code=err.status, retryable=err.status >= 500))
    await resp.write(SSE_PREFIX + json_encode(event) + b"\n\n" + _DONE)
    return resp


async def handle_generate(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    state.count("generate_requests")
    stream, body = False, b""
    try:
        body = await read_json(request)
        req, items, batch = parse_generate(body, stream_interval=state.cfg.server.stream_interval)
        stream = bool(req.stream)
    except ApiError as err:
        state.count("generate_rejected")
        if err.processing and _wants_stream(body):
            return await _write_error_event(request, err)
        raise
    await state.scheduler.gen_lock.acquire_read()
    seqs: list[Seq] = []
    try:
        try:
            seqs = admit(state, items)
        except ApiError as err:
            state.count("generate_rejected")
            if stream:
                return await _write_error_event(request, err)
            raise
        incremental = state.cfg.server.incremental_streaming_output
        emitters = [Emitter(state, s, incremental=incremental,
                            batch_index=s.item.index if batch and stream else None) for s in seqs]
        if not stream:
            await asyncio.gather(*(s.done.wait() for s in seqs))
            failed = next((s.finish for s in seqs if isinstance(s.finish, Abort) and s.finish.status_code), None)
            if failed is not None:  # §0 row 4: a server-side abort with a status is an HTTP error
                status = failed.status_code
                return web.Response(status=status, content_type="application/json", body=json_encode(
                    ErrorResponse(message=failed.message, type=str(status), code=status)))
            bodies = [em.body(stream=False) for em in emitters]
            return web.Response(body=json_encode(bodies if batch else bodies[0]), content_type="application/json")
        resp = web.StreamResponse(status=200, headers=sse_headers)
        await resp.prepare(request)
        if len(emitters) == 1:
            await _stream_one(resp, emitters[0], emitters[0].seq.sampling.stream_interval, last=True)
            return resp
        async with asyncio.TaskGroup() as tg:  # a batch: interleaved events; one failed write cancels its siblings
            for em in emitters:
                tg.create_task(_stream_one(resp, em, em.seq.sampling.stream_interval))
        await resp.write(_DONE)
        return resp
    except (ConnectionResetError, asyncio.CancelledError):
        state.count("client_disconnects")
        raise
    finally:
        for seq in seqs:
            state.scheduler.cancel(seq)
        await state.scheduler.gen_lock.release_read()


def _wants_stream(body: bytes) -> bool:
    """Whether a body that failed validation still asked for a stream (decides the error framing)."""
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return False
    return isinstance(raw, dict) and raw.get("stream") is True
