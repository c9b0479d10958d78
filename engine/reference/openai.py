"""OpenAI-compatible `POST /v1/completions` (docs/sglang.md §5), what vLLM-style clients speak.

Prompts may be token ids (`[int]` or `[[int]]`). Each choice is one sequence of the shared
scheduler, so it batches, pauses and aborts exactly like `/generate`. `logprobs: k` gives the
sampled tokens' logprobs (the §1.4 definition, see runner.py) and the top k per position;
`return_token_ids` adds `token_ids` / `prompt_token_ids` to each choice (token in, token out).
"""

import asyncio
import time
import uuid

import msgspec
from aiohttp import web
from msgspec import UNSET
from tidal.engine.reference.api import (
    ApiError,
    Item,
    framework_error,
    json_encode,
    read_json,
    resolve_sampling,
)
from tidal.engine.reference.config import STATE, ServerState
from tidal.engine.reference.generate import OutputText, admit, sse_headers
from tidal.engine.reference.scheduler import Seq
from tidal.protocol.sglang import (
    SSE_DONE,
    SSE_PREFIX,
    Abort,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Length,
    SamplingParams,
    Stop,
    Usage,
    WeightVersionSpan,
)

__all__ = ["routes"]

_DEFAULT_MAX_TOKENS = 16
"""OpenAI's (and SGLang's) `max_tokens` when the request leaves it out."""

routes = web.RouteTableDef()


def _error(message: str, status: int = 400) -> ApiError:
    """A request rejected while processing: the OpenAI-style envelope SGLang's OpenAI routes send
    (`type` "BadRequestError"); a body that is not a valid request is `framework_error` (§0 row 1),
    the same 400 `/generate` answers."""
    return ApiError(status, ErrorResponse(message=message, type="BadRequestError", code=status), message)


def _items(req: CompletionRequest, state: ServerState) -> list[Item]:
    if req.echo and req.logprobs is not None:
        raise _error("Echo is not compatible with logprobs. To compute logprobs of input prompt, "
                     "please use the native /generate API.")
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        prompts = [prompt]
    elif all(isinstance(x, str) for x in prompt) or all(isinstance(x, list) for x in prompt):
        prompts = list(prompt)
    else:
        raise _error("prompt: expected a string, [string], [int] or [[int]], got a mix")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise _error("prompt cannot be empty.")
    params = SamplingParams(
        max_new_tokens=_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens,
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, stop=req.stop,
        stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, skip_special_tokens=req.skip_special_tokens,
        no_stop_trim=req.no_stop_trim, frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty, repetition_penalty=req.repetition_penalty,
        min_new_tokens=req.min_tokens, logit_bias=req.logit_bias, sampling_seed=req.seed)
    try:
        sampling = resolve_sampling(params, stream_interval=state.cfg.server.stream_interval)
    except ApiError as err:
        raise _error(err.message) from None
    n = 1 if req.n is None else req.n
    if n < 1:
        raise _error(f"n must be at least 1, got {n}.")
    base = req.rid or uuid.uuid4().hex
    items = []
    for i, p in enumerate(prompts):
        for j in range(n):
            idx = i * n + j
            items.append(Item(
                index=idx, rid=base if len(prompts) * n == 1 else f"{base}_{idx}",
                input_ids=p if isinstance(p, list) else None, text=p if isinstance(p, str) else None,
                sampling=sampling, return_logprob=req.logprobs is not None, logprob_start_len=-1,
                top_logprobs_num=req.logprobs or 0, return_text_in_logprobs=True, return_prompt_token_ids=False,
            ))
    return items


def _finish(seq: Seq) -> tuple[str | None, int | str | list[int] | None]:
    """`finish_reason` and `matched_stop` of a choice (§5)."""
    match seq.finish:
        case Stop(matched=matched):
            return "stop", matched
        case Length():
            return "length", None
        case Abort():
            return "abort", None
    return None, None


class _Choice:
    """Text and logprob deltas of one choice; the whole thing when not streaming."""

    def __init__(self, state: ServerState, seq: Seq, req: CompletionRequest):
        self.state, self.seq, self.req = state, seq, req
        self.sent_tokens = 0
        self.sent_text = 0
        self._text = OutputText(state.stepper, seq)

    def delta(self) -> CompletionChoice:
        seq, req = self.seq, self.req
        n = len(seq.output_ids)
        lo = self.sent_tokens
        text = self._text.text()
        piece = text[self.sent_text:]
        if req.echo and lo == 0:
            piece = (seq.item.text or self.state.stepper.decode(seq.prompt)) + piece
        kind, matched = _finish(seq)
        out = CompletionChoice(index=seq.item.index, text=piece, finish_reason=kind, matched_stop=matched,
                               token_ids=UNSET, prompt_token_ids=UNSET)
        if req.logprobs is not None:
            token_text = self.state.stepper.token_text
            ids = seq.output_ids[lo:n]
            tops = (seq.output_top or [])[lo:n] if req.logprobs > 0 else [None] * len(ids)
            out.logprobs = CompletionLogprobs(
                tokens=[token_text(t) for t in ids], token_logprobs=seq.output_logprobs[lo:n],
                top_logprobs=[None if top is None else {token_text(t): lp for lp, t in top} for top in tops],
                text_offset=[-1] * len(ids),
            )
        if req.return_token_ids:
            out.token_ids = seq.output_ids[lo:n]
            if lo == 0:
                out.prompt_token_ids = seq.prompt
        self.sent_tokens = n
        self.sent_text = len(text)
        return out


def _metadata(seqs: list[Seq], state: ServerState) -> dict:
    spans = seqs[0].spans if len(seqs) == 1 else []
    version = seqs[0].weight_version if len(seqs) == 1 and spans else state.scheduler.version
    return {"weight_version": version, "weight_versions": [WeightVersionSpan(v, a, b) for v, a, b in spans]}


def _usage(seqs: list[Seq], n: int) -> Usage:
    """Each prompt counted once however many samples it has (n per prompt, adjacent)."""
    prompt_tokens = sum(len(s.prompt) for s in seqs[::n])
    completion_tokens = sum(len(s.output_ids) for s in seqs)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    try:
        req = msgspec.json.decode(await read_json(request), type=CompletionRequest)
    except msgspec.DecodeError as exc:
        raise framework_error(f"invalid /v1/completions request: {exc}") from None
    items = _items(req, state)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def response(choices: list[CompletionChoice], usage=UNSET, metadata=UNSET) -> CompletionResponse:
        return CompletionResponse(id=cid, created=created, model=state.served_model_name, choices=choices,
                                  usage=usage, metadata=metadata)

    await state.scheduler.gen_lock.acquire_read()
    seqs: list[Seq] = []
    try:
        try:
            seqs = admit(state, items)
        except ApiError as err:
            raise _error(err.message) from None
        choices = [_Choice(state, s, req) for s in seqs]
        if not req.stream:
            await asyncio.gather(*(s.done.wait() for s in seqs))
            return web.Response(content_type="application/json", body=json_encode(response(
                [c.delta() for c in choices], usage=_usage(seqs, req.n or 1), metadata=_metadata(seqs, state))))
        resp = web.StreamResponse(status=200, headers=sse_headers)
        await resp.prepare(request)

        async def stream_one(choice: _Choice):
            seq = choice.seq
            while True:
                await seq.changed.wait()
                seq.changed.clear()
                chunk = response([choice.delta()])
                if seq.finished:
                    chunk.metadata = _metadata([seq], state)
                await resp.write(SSE_PREFIX + json_encode(chunk) + b"\n\n")
                if seq.finished:
                    return

        async with asyncio.TaskGroup() as tg:  # one failed write cancels its siblings
            for choice in choices:
                tg.create_task(stream_one(choice))
        if (req.stream_options or {}).get("include_usage"):
            chunk = response([], usage=_usage(seqs, req.n or 1))
            await resp.write(SSE_PREFIX + json_encode(chunk) + b"\n\n")
        await resp.write(SSE_PREFIX + SSE_DONE + b"\n\n")
        return resp
    finally:
        for seq in seqs:
            state.scheduler.cancel(seq)
        await state.scheduler.gen_lock.release_read()
