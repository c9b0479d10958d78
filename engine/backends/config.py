"""Backend configuration: a tagged union on `type`, so each backend's fields only exist where they mean
something (docs/contributing.md, Configuration).

    [backend]                      [backend]                     [backend]
    type = "sglang"                type = "openai"               type = "plugin"
    urls = ["http://h1:30000",     urls = ["http://h:8000"]      name = "echo"   # entry point
            "http://h2:30000"]     model = "Qwen/Qwen3-8B"       options = { delay_s = 0.0 }

`sglang` and `openai` share the routing fields (`Routed`): several servers behind one client, the
same `tidal.engine.backends.routing.Router` policy, health probes and retries.

A plugin's `options` are validated against its class's `config_type` when the backend is created.
"""

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
from tidal.protocol.config import Strict

__all__ = ["Routed", "SGLangConfig", "OpenAIConfig", "PluginConfig", "BackendConfig"]

Seconds = Annotated[float, Meta(gt=0)]


def _check_url(key: str, url: str) -> None:
    scheme, sep, rest = url.partition("://")
    if scheme not in ("http", "https") or not sep or not rest.strip("/"):
        raise ValueError(f"{key}: expected a base URL like http://127.0.0.1:30000, got {url!r}")


class Routed(Strict):
    """Fields of a client of several servers: routing (engine/backends/routing.py), the connection
    pool, timeouts, retries, ejection and health probes. Subclasses add `urls` and their own fields."""

    balance: Literal["tokens", "requests"] = "tokens"
    """Load measure for routing: in-flight tokens (prompt + budget) or in-flight requests."""
    affinity: bool = True
    """Send later requests of a session to the server that served its earlier ones (its prefix is cached)."""
    affinity_slack: Annotated[int, Meta(ge=0)] = 16384
    """Affinity yields when the holder's load exceeds the least-loaded server's by more than this
    (in units of `balance`); a cache hit is worth less than a long queue."""
    affinity_capacity: Annotated[int, Meta(ge=1)] = 1 << 17
    """Sessions remembered (least recently used forgotten first): bounds the affinity table."""
    max_connections: Annotated[int, Meta(ge=1)] = 8192
    """Connection-pool size over all servers: a request beyond it waits for a free connection."""
    connect_timeout_s: Seconds = 5.0
    read_timeout_s: Seconds = 300.0
    """Longest silence allowed between two stream events (or before a non-stream body)."""
    max_response_bytes: Annotated[int, Meta(ge=1024)] = 64 << 20
    """Largest stream event or response body read; a bigger one is refused (a bad response, counted as
    errors_too_large) before it is buffered whole. Cumulative streams of very long generations with
    top logprobs may need more."""
    max_retries: Annotated[int, Meta(ge=0)] = 3
    """Times a failed request moves to another server, continuing from the tokens received."""
    eject_after: Annotated[int, Meta(ge=1)] = 3
    """Consecutive failed requests (5xx, timeout, bad response) that eject a server; a lost connection
    ejects at once. An ejected server gets no requests until a health probe passes."""
    health_interval_s: Seconds = 2.0
    """Period of /health probes; an ejected server is re-admitted on its first healthy probe."""
    health_timeout_s: Seconds = 5.0

    def _check_urls(self, urls: list[str], key: str = "urls") -> None:
        for i, url in enumerate(urls):
            _check_url(f"{key}[{i}]", url)
        if len(set(urls)) != len(urls):
            raise ValueError(f"{key}: each server once, got {urls}")


class SGLangConfig(Routed, tag="sglang", tag_field="type"):
    """SGLang's native /generate on one or more servers (or one sglang-router URL)."""

    urls: Annotated[list[str], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["http://127.0.0.1:30000"])
    """Server base URLs; each request goes to one of them (see `balance`, `affinity`)."""
    control_urls: list[str] = []
    """With one sglang-router URL in `urls`: the workers behind it, which receive abort, pause and
    weight-update calls (the router has no such routes). Empty: `urls` receive them."""
    api_key: str | None = None
    """Sent as `Authorization: Bearer` (use the admin key if the servers set one: tidal calls weight routes)."""
    stream: bool = True
    """Stream tokens as they are generated (SSE); False waits for each whole response."""
    stream_interval: Annotated[int, Meta(ge=1)] | None = None
    """Tokens per stream event (SGLang's `stream_interval`); None: the server's `--stream-interval`.
    Larger values cut the client's per-event cost at thousands of concurrent streams."""
    control_timeout_s: Seconds = 600.0
    """Budget of one control call (pause, weight update, group init) per server."""
    pause_mode: Literal["abort", "retract", "in_place"] = "in_place"
    """`/pause_generation` mode. abort: in-flight requests end and are resubmitted after resume with
    the tokens received; retract/in_place: they stay open and continue under the new weights.
    in_place keeps their KV cache and the server's prefix cache (the update sends flush_cache false):
    later tokens attend to context the old weights encoded, and each logprob is still the one the
    token was sampled with. retract drops that KV and flushes the cache, so everything in flight
    prefills again under the new weights: exact, at the cost of one re-prefill of every running
    context per update (23% of the simulated GPU's time with an update per batch in `tidal bench
    async-vs-sync`)."""
    weight_update: Literal["pause", "abort", "wait"] = "pause"
    """pause: pause -> update -> continue; abort: update with `abort_all_requests` (aborted requests are
    resubmitted); wait: the server waits for in-flight requests before loading."""
    tp_size: Annotated[int, Meta(ge=1)] = 1
    """GPUs per server: ranks each server takes in a distributed weight-update group."""
    coalesce: Annotated[int, Meta(ge=1)] = 1
    """Most requests sent as one batched /generate (docs/sglang.md §1.5; engine/backends/coalesce.py).
    The requests for one server made in the same event-loop iteration go out together, each with its
    own rid (an abort still reaches it alone) and its own stream. 1: one HTTP request each. Where turns
    are a few tokens, the HTTP work of a request costs client and server as much CPU as the model's
    work on it, and a batch pays it once. The cost: a fault of the exchange (connection lost, timeout)
    reaches every request of the batch, each then retrying as it would alone; a batch refused as a
    whole (4xx) is sent again one request at a time. Needs `stream`; not behind a router
    (`control_urls`), whose affinity key is per request."""

    def __post_init__(self):
        self._check_urls(self.urls)
        self._check_urls(self.control_urls, "control_urls")
        if self.coalesce > 1 and not self.stream:
            raise ValueError(f"coalesce = {self.coalesce} needs stream = true (a batch's items stream apart)")
        if self.coalesce > 1 and self.control_urls:
            raise ValueError(f"coalesce = {self.coalesce} behind a router (control_urls set): the router's "
                             "affinity key is per request; keep coalesce = 1")


class OpenAIConfig(Routed, tag="openai", tag_field="type"):
    """OpenAI-compatible `/v1/completions` servers that return token ids (vLLM, SGLang)."""

    urls: Annotated[list[str], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["http://127.0.0.1:8000"])
    """Server base URLs; each request goes to one of them (see `balance`, `affinity`)."""
    model: str = "default"
    """The `model` field of each request (vLLM checks it against its served model name)."""
    api_key: str | None = None
    """Sent as `Authorization: Bearer`."""

    def __post_init__(self):
        self._check_urls(self.urls)


class PluginConfig(Strict, tag="plugin", tag_field="type"):
    """A backend registered by another package under the entry-point group `tidal.backends`."""

    name: str
    """The entry point's name."""
    options: dict[str, Any] = {}
    """Validated against the backend class's `config_type`."""


BackendConfig = SGLangConfig | OpenAIConfig | PluginConfig
