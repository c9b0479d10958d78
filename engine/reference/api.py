"""The reference server's view of SGLang's HTTP contract (docs/sglang.md §0-§1).

Owns request validation: a `/generate` body, decoded with protocol/sglang.py's wire Structs,
becomes a list of `Item`s (one per prompt and sample, §1.5) with fully resolved `Sampling`; anything
that breaks the contract raises `ApiError` carrying the exact §0 envelope and status.
`sampling_params` is a closed set: an unknown key is the serde-worded 400 of 0.5.23; `null` means
"the default" (§1.2). Every endpoint with a body reads it through `read_json`: a Content-Type that
is not JSON is the same framework 400 on `/generate`, `/v1/completions` and the control routes.
"""

import uuid
from dataclasses import dataclass

import msgspec
from tidal.protocol.sglang import ControlResponse, ErrorResponse, GenerateRequest, SamplingParams

__all__ = [
    "ApiError", "Sampling", "Item", "parse_generate", "resolve_sampling", "framework_error",
    "contract_error", "request_error", "control_error", "SAMPLING_KEYS", "json_encode", "read_json",
]

_encoder = msgspec.json.Encoder()
json_encode = _encoder.encode


class ApiError(Exception):
    """A rejected request: HTTP status and the JSON body to send (one of the §0 envelopes).

    `processing`: rejected while processing (§0 row 3), which a stream reports as an in-stream
    error event with HTTP 200 (§1.6) instead of this status and body.
    """

    def __init__(self, status: int, body: dict | msgspec.Struct, message: str, *, processing: bool = False):
        super().__init__(message)
        self.status = status
        self.body = body
        self.message = message
        self.processing = processing


def framework_error(message: str, status: int = 400) -> ApiError:
    """§0 row 1: malformed JSON, wrong types, missing required body (the web framework's envelope)."""
    return ApiError(status, ErrorResponse(message=message, type="Bad Request", code=status), message)


async def read_json(request) -> bytes:
    """The raw body of a request that must be JSON. A Content-Type that is not JSON (`text/plain`,
    a form) is a framework 400 (§0 row 1), as SGLang's FastAPI answers it; no Content-Type at all
    is read as JSON, as FastAPI does."""
    if "Content-Type" in request.headers:
        kind = request.content_type
        if kind != "application/json" and not kind.endswith("+json"):
            raise framework_error(f"Content-Type {kind!r} is not JSON; send the body as application/json")
    return await request.read()


def contract_error(message: str) -> ApiError:
    """§0 row 2: a `/generate` schema-contract violation, the error being a bare string."""
    return ApiError(400, {"error": message}, message)


def request_error(message: str, status: int = 400) -> ApiError:
    """§0 row 3: rejected while processing (empty ids, duplicate rid, bad sampling value)."""
    return ApiError(status, {"error": {"message": message}}, message, processing=True)


def control_error(message: str) -> ApiError:
    """§0 row 5: a control endpoint that failed (`success: false`)."""
    return ApiError(400, ControlResponse(success=False, message=message), message)


SAMPLING_KEYS: tuple[str, ...] = SamplingParams.__struct_fields__
_UNSUPPORTED = ("stop_regex", "json_schema", "regex", "ebnf", "structural_tag", "beam_width", "watermark", "choice")


@dataclass(frozen=True, slots=True)
class Sampling:
    """Resolved sampling parameters with SGLang's defaults filled in and ranges checked."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 1 << 30
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    stream_interval: int = 1
    sampling_seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        """temperature < 1e-6 means greedy (SGLang then samples with top_k = 1)."""
        return self.temperature < 1e-6


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise request_error(message)


def resolve_sampling(p: SamplingParams | None, *, stream_interval: int = 1) -> Sampling:
    """Fill in SGLang's defaults for absent and null keys and check its ranges (§1.2)."""
    p = SamplingParams() if p is None else p
    for key in _UNSUPPORTED:
        if getattr(p, key) is not None:
            raise request_error(f"{key} is not supported by the tidal reference server.")
    d = Sampling()
    s = Sampling(
        max_new_tokens=d.max_new_tokens if p.max_new_tokens is None else p.max_new_tokens,
        min_new_tokens=p.min_new_tokens or 0,
        temperature=d.temperature if p.temperature is None else p.temperature,
        top_p=d.top_p if p.top_p is None else p.top_p,
        top_k=d.top_k if p.top_k in (None, -1) else p.top_k,
        min_p=p.min_p or 0.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        presence_penalty=p.presence_penalty or 0.0,
        repetition_penalty=d.repetition_penalty if p.repetition_penalty is None else p.repetition_penalty,
        stop=(p.stop,) if isinstance(p.stop, str) else tuple(p.stop or ()),
        stop_token_ids=tuple(p.stop_token_ids or ()),
        ignore_eos=bool(p.ignore_eos),
        skip_special_tokens=d.skip_special_tokens if p.skip_special_tokens is None else p.skip_special_tokens,
        no_stop_trim=bool(p.no_stop_trim),
        n=1 if p.n is None else p.n,
        stream_interval=stream_interval if p.stream_interval is None else p.stream_interval,
        sampling_seed=p.sampling_seed,
        logit_bias=tuple(_logit_bias(p.logit_bias or {})),
    )
    _check(s.max_new_tokens >= 0, f"max_new_tokens must be at least 0, got {s.max_new_tokens}.")
    _check(s.min_new_tokens >= 0, f"min_new_tokens must be at least 0, got {s.min_new_tokens}.")
    _check(s.min_new_tokens <= s.max_new_tokens,
           f"min_new_tokens must be in [0, max_new_tokens({s.max_new_tokens})], got {s.min_new_tokens}.")
    _check(s.temperature >= 0.0, f"temperature must be non-negative, got {s.temperature}.")
    _check(0.0 < s.top_p <= 1.0, f"top_p must be in (0, 1], got {s.top_p}.")
    _check(s.top_k >= 1, f"top_k must be -1 (disable), or at least 1, got {s.top_k}.")
    _check(0.0 <= s.min_p <= 1.0, f"min_p must be in [0, 1], got {s.min_p}.")
    _check(-2.0 <= s.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {s.frequency_penalty}.")
    _check(-2.0 <= s.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {s.presence_penalty}.")
    _check(0.0 < s.repetition_penalty <= 2.0, f"repetition_penalty must be in (0, 2], got {s.repetition_penalty}.")
    _check(len(s.stop) <= 32, f"stop must hold at most 32 strings, got {len(s.stop)}.")
    _check(s.n >= 1, f"n must be at least 1, got {s.n}.")
    _check(s.stream_interval >= 1, f"stream_interval must be at least 1, got {s.stream_interval}.")
    return s


def _logit_bias(raw: dict[str, float]):
    for key, value in raw.items():
        try:
            yield int(key), float(value)
        except ValueError:
            raise request_error(f"logit_bias keys must be token ids, got {key!r}.") from None


@dataclass(slots=True)
class Item:
    """One sequence to generate: a prompt (ids or text) and its resolved options."""

    index: int
    rid: str
    input_ids: list[int] | None
    text: str | None
    sampling: Sampling
    return_logprob: bool
    logprob_start_len: int
    top_logprobs_num: int
    return_text_in_logprobs: bool
    return_prompt_token_ids: bool


_request_decoder = msgspec.json.Decoder(GenerateRequest)


def _unknown_sampling_key(body: bytes) -> str | None:
    """The first key of a `sampling_params` object outside the closed set, if the body is JSON at all
    (a typed decode may stop at a wrong type before reaching malformed JSON further on)."""
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    params = raw.get("sampling_params") if isinstance(raw, dict) else None
    for obj in params if isinstance(params, list) else [params]:
        if isinstance(obj, dict):
            for key in obj:
                if key not in SAMPLING_KEYS:
                    return key
    return None


def _pick(value, i: int, default):
    """Batch fields are either one value for every item or a list with one per item."""
    if isinstance(value, list):
        return value[i] if i < len(value) else default
    return default if value is None else value


def parse_generate(body: bytes, *, stream_interval: int = 1) -> tuple[GenerateRequest, list[Item], bool]:
    """Decode a `/generate` body; return the request, its items (i·n+j order) and whether it is a batch."""
    if not body.strip():
        raise framework_error("Field required: the request body must be a JSON object")
    try:
        req = _request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        unknown = _unknown_sampling_key(body)
        if unknown is not None:
            expected = ", ".join(f"`{k}`" for k in SAMPLING_KEYS)
            raise contract_error(f"unknown field `{unknown}`, expected one of {expected}") from None
        raise framework_error(f"invalid /generate request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise framework_error(f"JSON decode error: {exc}") from None
    if (req.text is None) == (req.input_ids is None):
        raise request_error("Either text or input_ids should be provided, and not both.")
    if req.input_ids is not None:
        batch = bool(req.input_ids) and isinstance(req.input_ids[0], list)
        if any(isinstance(x, list) != batch for x in req.input_ids):
            raise framework_error("input_ids: expected [int] or [[int]], got a mix of ints and lists")
        prompts = req.input_ids if batch else [req.input_ids]
    else:
        batch = isinstance(req.text, list)
        prompts = req.text if batch else [req.text]
    if not prompts:
        raise request_error("A batch must hold at least one prompt.")
    if isinstance(req.sampling_params, list) and len(req.sampling_params) != len(prompts):
        raise request_error(
            f"sampling_params has {len(req.sampling_params)} entries for {len(prompts)} prompts."
        )
    samplings = [resolve_sampling(_pick(req.sampling_params, i, None), stream_interval=stream_interval)
                 for i in range(len(prompts))]
    n = samplings[0].n
    if any(s.n != n for s in samplings):
        raise request_error("all items of a batch must use the same n.")
    items: list[Item] = []
    for i, prompt in enumerate(prompts):
        if req.input_ids is not None and not prompt:
            raise request_error("input_ids cannot be empty.")
        for j in range(n):
            if n > 1:
                rid = uuid.uuid4().hex
            elif isinstance(req.rid, list):
                rid = req.rid[i] if i < len(req.rid) else uuid.uuid4().hex
            elif req.rid is not None:
                rid = f"{req.rid}_{i}" if batch else req.rid
            else:
                rid = uuid.uuid4().hex
            items.append(Item(
                index=i * n + j, rid=rid,
                input_ids=prompt if req.input_ids is not None else None,
                text=prompt if req.text is not None else None,
                sampling=samplings[i],
                return_logprob=bool(_pick(req.return_logprob, i, False)),
                logprob_start_len=-1 if req.logprob_start_len is None else req.logprob_start_len,
                top_logprobs_num=req.top_logprobs_num or 0,
                return_text_in_logprobs=bool(req.return_text_in_logprobs),
                return_prompt_token_ids=bool(req.return_prompt_token_ids),
            ))
    return req, items, batch or n > 1
