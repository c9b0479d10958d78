"""Configuration of `tidal serve` and the state one server process holds.

Loaded with the project's loader (protocol/config.py): defaults here < TOML < `--set` < the usual
flags (`--model`, `--port`, `--simulate`, ...), which `server.main` turns into overrides.
"""

import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web
from msgspec import Meta
from tidal.engine.reference.scheduler import Scheduler
from tidal.engine.reference.simulate import SimulateConfig
from tidal.protocol.config import Strict
from tidal.protocol.errors import ConfigError

__all__ = ["ServeConfig", "ServerSection", "ModelSection", "ServerState", "STATE"]


class ServerSection(Strict):
    """HTTP front end."""

    host: str = "127.0.0.1"
    """Address to bind; loopback unless you mean otherwise (docs/architecture.md invariant 7)."""
    port: Annotated[int, Meta(ge=0, le=65535)] = 30000
    """Port to bind; 0 picks a free one (printed on the readiness line)."""
    api_key: str | None = None
    """Bearer key for every endpoint except /health*, /ready, /metrics."""
    admin_api_key: str | None = None
    """When set, the only key accepted on weight and control endpoints."""
    incremental_streaming_output: bool = False
    """Stream deltas (text, output_ids, logprobs) instead of cumulative chunks (docs/sglang.md §1.6)."""
    stream_interval: Annotated[int, Meta(ge=1)] = 1
    """Tokens per streamed event unless a request sets its own."""
    weight_version: str = "default"
    """The version string served at startup (§3.6)."""
    served_model_name: str | None = None
    """Name in /model_info and /v1/models; default: the model path."""
    require_weight_update_session: bool = False
    """Make distributed/tensor updates fail outside begin/end_weight_update (0.5.23 behaviour, §3.5)."""
    max_queued_requests: Annotated[int, Meta(ge=1)] = 65536
    """Most requests waiting for a batch slot; beyond it /generate answers 503 "The request queue
    is full." (SGLang's --max-queued-requests), so a flood costs bounded memory."""
    health_timeout_s: Annotated[float, Meta(gt=0)] = 20.0
    """How long the /health probe may wait (it blocks while paused) before answering 503."""


class ModelSection(Strict):
    """The transformers model (ignored with mode = "simulate")."""

    path: str | None = None
    """Directory of a causal LM and its tokenizer, loaded with from_pretrained."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when present)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype."""
    max_running: Annotated[int, Meta(ge=1)] = 64
    """Most sequences in one decode batch; further requests queue."""
    seed: int = 0
    """Seed of sampling for requests without sampling_seed."""
    threads: Annotated[int, Meta(ge=0)] = 1
    """torch intra-op CPU threads (0 = torch's default, one per core). One by default: the server
    shares the cores with the engine and trainer, and on a busy machine extra threads spin and
    wait (a 64-sequence decode step of the tiny model took 7x longer with 2 threads than with 1)."""
    prefix_cache_tokens: Annotated[int, Meta(ge=0)] = 0
    """Keep finished sequences' KV for reuse by later prompts sharing their prefix, up to this many
    tokens (0 = off). Off by default: as in SGLang, a weight update with flush_cache false then
    leaves KV of the old weights in use."""


class ServeConfig(Strict):
    """`tidal serve`."""

    mode: Literal["model", "simulate"] = "model"
    """Serve a real model, or the cost model of simulate.py."""
    server: ServerSection = msgspec.field(default_factory=ServerSection)
    model: ModelSection = msgspec.field(default_factory=ModelSection)
    simulate: SimulateConfig = msgspec.field(default_factory=SimulateConfig)

    def check(self) -> None:
        """Cross-field rule, run after loading (the loader builds a bare default first)."""
        if self.mode == "model" and not self.model.path:
            raise ConfigError("mode = 'model' needs model.path: --model DIR (a checkpoint directory or a hub id; "
                              "`tidal model tiny DIR` writes a tiny one), or --simulate for the cost model")


@dataclass
class ServerState:
    """Everything the route handlers share: one per server process."""

    cfg: ServeConfig
    stepper: Any
    scheduler: Scheduler
    model_path: str
    served_model_name: str
    startup_time: float = field(default_factory=time.time)
    launch_command: str = ""
    bound_port: int | None = None
    groups: dict[str, Any] = field(default_factory=dict)
    update_session_open: bool = False
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    @property
    def simulated(self) -> bool:
        return self.cfg.mode == "simulate"


STATE = web.AppKey("state", ServerState)
"""Where the app keeps its `ServerState` (a typed aiohttp key)."""
