"""SGLang's HTTP API as msgspec Structs: the one schema the `sglang` client and the reference server share.

Restated field by field from docs/sglang.md (baseline sglang 0.5.23); section
numbers below (§1.2 ...) point there. Rules this module keeps:

- Requests are encoded with `omit_defaults`, so a body carries only the keys its sender set (defaults
  are None or booleans: msgspec compares defaults by identity), and `SamplingParams` is the closed
  set of §1.2 (`forbid_unknown_fields`: an unknown key is a 400 upstream).
- The same Structs decode what a server receives, as leniently as SGLang: unknown top-level keys are
  skipped, JSON null is taken where SGLang's field is optional (every sampling key, §1.2), and a key
  SGLang defaults may be absent. A field the client always sends but SGLang defaults is typed
  `X | None = None` ("None: SGLang's default", named in its docstring), so `omit_defaults` cannot
  drop it by identity; the server applies the default.
- Responses are read leniently: unknown keys are skipped (wire Structs never forbid them, docs/protocol.md),
  and keys that only some responses carry default to `UNSET`, which encodes as "absent" and is falsy.
  A key a reader defaults but a server sometimes leaves out (a queued abort's counters, the optional
  /v1 keys) is typed `X | UnsetType` with the reader's default: absent decodes as that default, and
  the reference server, which builds every body from these Structs, sets UNSET to omit it.
- `finish_reason` is a tagged union on `type` (§1.4); a logprob entry is the 3-array
  `[logprob, token_id, text]` (`TokenLogprob`, `array_like`).

>>> body = encode(GenerateRequest(input_ids=[1, 2], sampling_params=SamplingParams(max_new_tokens=4),
...     rid="t0", stream=True, return_logprob=True))
>>> body
b'{"input_ids":[1,2],"sampling_params":{"max_new_tokens":4},"rid":"t0","stream":true,"return_logprob":true}'
>>> r = decode_generate(b'{"text":"a","output_ids":[97],"meta_info":{"id":"t0",'
...     b'"finish_reason":{"type":"length","length":1},"output_token_logprobs":[[-0.5,97,null]]}}')
>>> r.meta_info.finish_reason, r.meta_info.output_token_logprobs[0].logprob
(Length(length=1), -0.5)
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType
from tidal.protocol.errors import ProtocolError

__all__ = [
    "SSE_PREFIX",
    "SSE_DONE",
    "WEIGHT_UPDATE_GROUP",
    "SamplingParams",
    "GenerateRequest",
    "Stop",
    "Length",
    "Abort",
    "FinishReason",
    "TokenLogprob",
    "WeightVersionSpan",
    "MetaInfo",
    "GenerateResponse",
    "StreamErrorDetail",
    "StreamError",
    "ErrorResponse",
    "AbortRequest",
    "PauseRequest",
    "ContinueRequest",
    "UpdateWeightsFromDiskRequest",
    "InitWeightsUpdateGroupRequest",
    "DestroyWeightsUpdateGroupRequest",
    "UpdateWeightsFromDistributedRequest",
    "UpdateWeightsFromTensorRequest",
    "UpdateWeightVersionRequest",
    "BeginWeightUpdateRequest",
    "EndWeightUpdateRequest",
    "ControlResponse",
    "StatusResponse",
    "ModelInfo",
    "ServerInfo",
    "ModelCard",
    "ModelList",
    "CompletionRequest",
    "CompletionLogprobs",
    "CompletionChoice",
    "Usage",
    "CompletionResponse",
    "encode",
    "decode_generate",
    "decode_generate_batch",
    "decode_stream_event",
    "error_message",
    "INITIAL_WEIGHT_VERSIONS",
    "parse_weight_version",
]

SSE_PREFIX = b"data: "
"""Every SSE event is one `data: <compact json>` line followed by a blank line (§1.6)."""

SSE_DONE = b"[DONE]"
"""The payload of the last event of every stream, /generate and /v1/completions alike."""

WEIGHT_UPDATE_GROUP = "weight_update_group"
"""SGLang's default `group_name` of the weight-update process group (§3.2)."""

INITIAL_WEIGHT_VERSIONS = frozenset({"default", ""})
"""What a server reports before any update names a version: SGLang's default `"default"` (and `""`).
Both read as version 0, the initial checkpoint (see `parse_weight_version`)."""

_MAX_WEIGHT_VERSION = 2**31 - 1
"""Per-token versions travel as int32 (`tidal.protocol.arrays.VERSION_DTYPE`)."""


# --- /generate request (§1.1, §1.2) -------------------------------------------------------------


class SamplingParams(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True, kw_only=True):
    """`sampling_params` of /generate: the closed set of 0.5.23 (§1.2).

    None (absent, or JSON null for any key) means the server's default, given in each docstring; a
    server may also apply its model's `preferred_sampling_params`, so an RL client sends what its
    policy uses. Flags default to SGLang's value, so a sender that sets the default leaves the key
    out (msgspec omits a default by identity: only None and booleans serve as defaults here).
    """

    max_new_tokens: int | None = None
    """Generation budget (server default 128); 0 is legal and finishes at once with `length`."""
    min_new_tokens: int | None = None
    """EOS and stop conditions are suppressed until this many tokens exist (0)."""
    temperature: float | None = None
    """1.0; 0 (or below 1e-6) is greedy, and logprobs then use T=1 (§1.4)."""
    top_p: float | None = None
    """Nucleus mass in (0, 1] (1.0)."""
    top_k: int | None = None
    """-1 or the server's 2^30 (its default) mean the whole vocabulary."""
    min_p: float | None = None
    """In [0, 1] (0.0)."""
    frequency_penalty: float | None = None
    """In [-2, 2] (0.0)."""
    presence_penalty: float | None = None
    """In [-2, 2] (0.0)."""
    repetition_penalty: float | None = None
    """In (0, 2] (1.0)."""
    stop: str | list[str] | None = None
    """Stop strings (at most 32); matched on the detokenized text."""
    stop_token_ids: list[int] | None = None
    """Stop token ids, in addition to the model's EOS ids; the stop token stays in `output_ids`."""
    stop_regex: str | list[str] | None = None
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    """Affects `text` only, never `output_ids`."""
    spaces_between_special_tokens: bool | None = True
    no_stop_trim: bool | None = False
    """False: a matched stop string is cut from `text`; stop tokens are always kept in the ids."""
    n: int | None = None
    """Parallel samples (1); tidal sends n separate requests instead (§1.5: the server replaces rids)."""
    stream_interval: int | None = None
    """Tokens per SSE event (the server's `--stream-interval`)."""
    sampling_seed: int | None = None
    logit_bias: dict[str, float] | None = None
    """Token id (as a string) -> additive bias."""
    json_schema: Any = None
    """This key and the seven below are in the closed set but unused by tidal; the contract does not
    pin their types, so any JSON value decodes (the reference server refuses those it cannot honour)."""
    regex: Any = None
    ebnf: Any = None
    structural_tag: Any = None
    custom_params: Any = None
    beam_width: Any = None
    watermark: Any = None
    choice: Any = None


class GenerateRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Body of `POST /generate` (§1.1). Exactly one of `text` / `input_ids`; a list value is a batch.

    Unknown top-level keys are ignored, as SGLang does. Where SGLang's field is optional, null reads
    as the default (`return_logprob`, `logprob_start_len`, `top_logprobs_num`); its plain bool flags
    (`stream`, `return_text_in_logprobs`, ...) refuse null, and so do these.
    """

    text: str | list[str] | None = None
    input_ids: list[int | list[int]] | None = None
    """Token ids (token in, token out: what RL sends); a list of lists is a batch."""
    sampling_params: SamplingParams | list[SamplingParams] | None = None
    """One object for every item, or one per batch item."""
    rid: str | list[str] | None = None
    """Request id, echoed as `meta_info.id`; needed by /abort_request; must not prefix another rid."""
    stream: bool = False
    return_logprob: bool | list[bool] | None = False
    logprob_start_len: int | None = None
    """-1 (default): output logprobs only; k >= 0: also prompt positions k..end (first logprob null)."""
    top_logprobs_num: int | None = None
    """0 (default): no top logprobs."""
    token_ids_logprob: list[int | list[int]] | None = None
    return_text_in_logprobs: bool = False
    lora_path: str | list[str | None] | None = None
    session_id: str | None = None
    session_params: dict[str, Any] | None = None
    routing_key: str | None = None
    routed_dp_rank: int | None = None
    extra_key: str | None = None
    cache_salt: str | None = None
    priority: int | None = None
    return_prompt_token_ids: bool = False
    return_routed_experts: bool = False


# --- /generate response (§1.3, §1.4) ------------------------------------------------------------


class Stop(msgspec.Struct, tag_field="type", tag="stop"):
    """EOS, a stop token id (`matched` int, sometimes a list) or a stop string / regex (`matched` str)."""

    matched: int | str | list[int] | None = None


class Length(msgspec.Struct, tag_field="type", tag="length"):
    """`max_new_tokens` (or the context limit) reached."""

    length: int | None = None


class Abort(msgspec.Struct, tag_field="type", tag="abort"):
    """Aborted: by /abort_request or a pause (partial output, HTTP 200), or rejected (`status_code` set).

    A running request's abort carries `status_code` and `err_type` (null unless rejected); one aborted
    in the waiting queue carries only `message` ("Abort in waiting queue"): leave both UNSET.
    """

    message: str = "Aborted"
    status_code: int | None | UnsetType = UNSET
    err_type: str | None | UnsetType = UNSET


FinishReason = Stop | Length | Abort


class TokenLogprob(msgspec.Struct, array_like=True, gc=False):
    """One logprob entry `[logprob, token_id, text]`; text is null unless `return_text_in_logprobs`.

    `logprob` is log-softmax(logits / T) over the full vocabulary, before top-k/top-p (T=1 if greedy).
    """

    logprob: float | None
    token_id: int
    text: str | None = None


class WeightVersionSpan(msgspec.Struct, gc=False):
    """Output tokens [start, end) were produced by weights of `version`."""

    version: str
    start: int
    end: int


class MetaInfo(msgspec.Struct, kw_only=True):
    """`meta_info` of a /generate response or stream chunk. Read every optional key defensively (§1.4)."""

    id: str
    finish_reason: FinishReason | None = None
    """None on every stream chunk but the last."""
    prompt_tokens: int | UnsetType = 0
    """Absent (0 here) only on an abort in the waiting queue; a server sends UNSET to leave it out."""
    completion_tokens: int = 0
    """Cumulative in every streaming mode."""
    cached_tokens: int | UnsetType = 0
    """Prompt tokens served from the prefix cache; absent (0 here) exactly when `prompt_tokens` is."""
    weight_version: str = "default"
    """Version of the last span (older servers: the server's current version)."""
    input_token_logprobs: list[TokenLogprob] | UnsetType = UNSET
    output_token_logprobs: list[TokenLogprob] | UnsetType = UNSET
    """Pairs with `output_ids`; cumulative or delta exactly as `output_ids` is (§1.6)."""
    output_token_logprobs_length: int | UnsetType = UNSET
    """Cumulative count of output logprob entries."""
    input_top_logprobs: list[list[TokenLogprob] | None] | UnsetType = UNSET
    output_top_logprobs: list[list[TokenLogprob] | None] | UnsetType = UNSET
    weight_versions: list[WeightVersionSpan] | UnsetType = UNSET
    """Finished responses only."""
    num_retractions: int | UnsetType = UNSET
    reasoning_tokens: int | UnsetType = UNSET
    e2e_latency: float | UnsetType = UNSET
    response_sent_to_client_ts: float | UnsetType = UNSET


class GenerateResponse(msgspec.Struct, kw_only=True):
    """A non-streaming /generate body (one item), or one SSE chunk of a stream (§1.3, §1.6)."""

    text: str = ""
    output_ids: list[int] | UnsetType = UNSET
    """Every generated token including the stop token; absent on very old servers."""
    meta_info: MetaInfo
    index: int | UnsetType = UNSET
    """Position in a streamed batch (item i, sample j at i*n + j)."""
    prompt_token_ids: list[int] | UnsetType = UNSET


class StreamErrorDetail(msgspec.Struct):
    message: str
    type: str = "invalid_request_error"
    code: int = 400
    retryable: bool = False


class StreamError(msgspec.Struct):
    """A processing-time rejection inside a stream: HTTP 200, this one event, then `[DONE]` (§1.6)."""

    error: StreamErrorDetail


class ErrorResponse(msgspec.Struct, kw_only=True):
    """The web framework's error envelope (§0 rows 1 and 4, and every /v1 error); `type` names the
    cause ("Bad Request", "BadRequestError", or the status as a string for a scheduler abort)."""

    object: str = "error"
    message: str
    type: str
    param: str | None = None
    code: int


# --- control and weight endpoints (§3, §4): every POST carries a JSON object, `{}` at least ------


class AbortRequest(msgspec.Struct, omit_defaults=True):
    """`/abort_request`: one rid (prefix match upstream) or everything; always 200, empty body."""

    rid: str | None = None
    abort_all: bool = False


class PauseRequest(msgspec.Struct):
    """`/pause_generation`: `abort` returns in-flight requests as aborted; `retract`/`in_place` hold them.
    The mode is always sent, so the body says what the caller meant."""

    mode: Literal["abort", "retract", "in_place"] = "abort"


class ContinueRequest(msgspec.Struct, omit_defaults=True):
    torch_empty_cache: bool = True


class UpdateWeightsFromDiskRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    """Set after a successful load; None leaves the version unchanged."""
    flush_cache: bool = True
    torch_empty_cache: bool = False
    recapture_cuda_graph: bool = False
    is_async: Any = None
    """This key and the three below are accepted and unused in 0.5.23 (§3.1); any value decodes."""
    keep_pause: Any = None
    token_step: Any = None
    manifest: Any = None


class InitWeightsUpdateGroupRequest(msgspec.Struct, kw_only=True):
    """Join `torch.distributed` at tcp://master_address:master_port as rank `rank_offset + tp_rank`.
    Every key is sent; the last two may be absent upstream, which gives SGLang's defaults."""

    master_address: str
    master_port: int | str
    """Upstream tests send a numeric string; both are accepted."""
    rank_offset: int
    world_size: int
    group_name: str = WEIGHT_UPDATE_GROUP
    backend: str = "nccl"
    """"nccl" on GPUs (SGLang's default), "gloo" on CPU."""


class DestroyWeightsUpdateGroupRequest(msgspec.Struct):
    group_name: str = WEIGHT_UPDATE_GROUP


class UpdateWeightsFromDistributedRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Receive one `broadcast(src=0)` per name, in order, while this call is pending (§3.3)."""

    names: list[str]
    dtypes: list[str]
    """torch dtype names without the `torch.` prefix, e.g. "bfloat16"."""
    shapes: list[list[int]]
    group_name: str | None = None
    """None: SGLang's default, `WEIGHT_UPDATE_GROUP`; tidal always names the group."""
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None
    """None: one broadcast per name; "flattened_bucket": one flat broadcast for the whole bucket."""
    selector: Literal["all", "target", "draft"] | None = None
    """None: the server's default, "all"."""
    torch_empty_cache: bool = False


class UpdateWeightsFromTensorRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Colocated (same-GPU) update by CUDA-IPC handles (§3.4): base64 of a pickled list per TP rank,
    which is why tidal never sends it; a CPU server accepts and ignores the payload."""

    serialized_named_tensors: list[str]
    load_format: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    selector: Literal["all", "target", "draft"] | None = None
    torch_empty_cache: bool = False


class UpdateWeightVersionRequest(msgspec.Struct, kw_only=True):
    """Relabel the served version. The server's default aborts all requests: tidal sends it explicitly."""

    new_version: str
    abort_all_requests: bool = True


class BeginWeightUpdateRequest(msgspec.Struct):
    selector: Literal["all", "target", "draft"] = "all"


class EndWeightUpdateRequest(msgspec.Struct):
    pass


class ControlResponse(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Weight and version endpoints: 200 with success true, 400 with success false (§3)."""

    success: bool
    message: str = ""
    num_paused_requests: int | None = None
    new_version: str | None = None


class StatusResponse(msgspec.Struct):
    """/pause_generation and /continue_generation."""

    message: str
    status: str = "ok"


class ModelInfo(msgspec.Struct, kw_only=True):
    """`GET /model_info` (alias /get_model_info): `weight_version` is the version served now."""

    model_path: str
    served_model_name: str | None = None
    tokenizer_path: str | None = None
    is_generation: bool = True
    preferred_sampling_params: dict | None = None
    weight_version: str = "default"
    load_format: str | None = None
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    disaggregation_mode: str = "null"
    has_image_understanding: bool = False
    has_audio_understanding: bool = False
    model_type: str | None = None
    architectures: list[str] | None = None


class ServerInfo(msgspec.Struct, kw_only=True):
    """The keys of `GET /server_info` a client reads; the server sends every resolved argument."""

    incremental_streaming_output: bool = False
    stream_output: bool = False
    """The flag's name before ~Mar 2026 (delta `output_ids` only)."""
    version: str = ""
    max_total_num_tokens: int | None = None
    max_req_input_len: int | None = None


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "sglang"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


# --- OpenAI-compatible /v1/completions (§5) ------------------------------------------------------


class CompletionRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    """`POST /v1/completions`: OpenAI's fields plus the SGLang/vLLM extras an RL client needs (§5).
    None means the server's default; unknown keys are ignored."""

    model: str | None = None
    """None: the served model (tidal always names it)."""
    prompt: str | list[int | str | list[int]]
    """Text, a batch of texts, token ids, or a batch of token-id lists."""
    max_tokens: int | None = None
    """None: the server's default (16)."""
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    """None: 1."""
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    """`{"include_usage": true}` adds a last chunk carrying only `usage`."""
    logprobs: int | None = None
    """k: return the sampled token's logprob and the top k per position (0 = sampled only)."""
    echo: bool = False
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    rid: str | None = None
    return_token_ids: bool = False
    """Extra: each choice also carries the generated `token_ids` (vLLM and SGLang)."""


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = []


class CompletionChoice(msgspec.Struct, kw_only=True):
    """One choice; in a stream its text, logprobs and token ids are deltas."""

    index: int = 0
    text: str = ""
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    matched_stop: int | str | None = None
    token_ids: list[int] | None | UnsetType = None
    """With `return_token_ids`: the generated ids. Absent reads as None; a server sends UNSET to leave
    it out (here and for the optional keys below)."""
    prompt_token_ids: list[int] | None | UnsetType = None
    """With `return_token_ids`: the prompt's ids, on the first chunk of a stream."""


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(msgspec.Struct, kw_only=True):
    """A /v1/completions body, or one chunk of its SSE stream (`object` "text_completion")."""

    id: str = ""
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice] = []
    usage: Usage | None | UnsetType = None
    """Whole responses, and the last chunk of a stream with `stream_options.include_usage`."""
    metadata: dict[str, Any] | None | UnsetType = None
    """SGLang: `{"weight_version": ...}` (+ `weight_versions`); on a stream's finishing chunks only."""


# --- encode / decode ----------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_generate = msgspec.json.Decoder(GenerateResponse)
_generate_batch = msgspec.json.Decoder(list[GenerateResponse])
_stream_error = msgspec.json.Decoder(StreamError)


def encode(msg: msgspec.Struct) -> bytes:
    """Compact JSON, as the server and client both send it."""
    return _encoder.encode(msg)


def decode_generate(body: bytes) -> GenerateResponse:
    """One /generate response; `ProtocolError` with msgspec's expected/got/path on anything else."""
    try:
        return _generate.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"/generate response: {exc}") from None


def decode_generate_batch(body: bytes) -> list[GenerateResponse]:
    """A batch (or n > 1) /generate response: a JSON array of items in input order (§1.5)."""
    try:
        return _generate_batch.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"/generate batch response: {exc}") from None


def decode_stream_event(payload: bytes) -> GenerateResponse | StreamError:
    """One SSE payload of a /generate stream (without `data: `): a chunk or an in-stream error."""
    try:
        return _generate.decode(payload)
    except msgspec.DecodeError as exc:
        try:
            return _stream_error.decode(payload)
        except msgspec.DecodeError:
            raise ProtocolError(f"/generate stream event: {exc}") from None


class _Envelope(msgspec.Struct):
    error: str | StreamErrorDetail | None = None
    message: str | None = None


_envelope = msgspec.json.Decoder(_Envelope)


def error_message(body: bytes) -> str:
    """The message of any of the §0 error envelopes, or the body itself (trimmed) when it is none."""
    try:
        env = _envelope.decode(body)
    except msgspec.DecodeError:
        return body[:500].decode("utf-8", "replace").strip()
    if isinstance(env.error, StreamErrorDetail):
        return env.error.message
    return env.error or env.message or body[:500].decode("utf-8", "replace").strip()


def parse_weight_version(text: str, server: str) -> int:
    """The policy version a server's `weight_version` string names; the one place it is read.

    tidal counts versions as ints (version k = the policy after k optimizer steps) and sends them as
    `str(k)`. A digit string is its int. A server never updated reports `"default"` (or `""`): that
    is version 0, the initial checkpoint, which the trainer also starts from (a resumed trainer
    republishes its weights at start, so servers catch up). Anything else, e.g. from a server launched
    with `--weight-version v7`, raises `ProtocolError` naming `server` and the value: launch SGLang
    without `--weight-version`, or with an integer.

    >>> parse_weight_version("17", "http://a:30000"), parse_weight_version("default", "http://a:30000")
    (17, 0)
    """
    if text.isdigit() and text.isascii() and len(text) <= 10:  # isdigit alone takes "²"; int() would not
        version = int(text)
        if version <= _MAX_WEIGHT_VERSION:
            return version
    elif text in INITIAL_WEIGHT_VERSIONS:
        return 0
    raise ProtocolError(
        f"{server} reports weight version {text!r}, which is not a policy version: expected an integer "
        f"<= {_MAX_WEIGHT_VERSION}, or 'default' for a server never updated (launch SGLang without "
        "--weight-version, or with an integer)")
