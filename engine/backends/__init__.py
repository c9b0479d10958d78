"""Inference backends: one interface (`Backend`), the `sglang` and `openai` clients, and a registry of
third-party backends under the entry-point group `tidal.backends`. Nothing here imports torch."""

from tidal.engine.backends.base import Backend, Chunk, Finish, Request, Sampling
from tidal.engine.backends.config import BackendConfig, OpenAIConfig, PluginConfig, SGLangConfig
from tidal.engine.backends.errors import (
    BackendError,
    BackendTimeout,
    BadResponse,
    HTTPStatusError,
    RequestRejected,
    ServerUnavailable,
    Unsupported,
)
from tidal.engine.backends.openai import OpenAIBackend
from tidal.engine.backends.registry import available_backends, create_backend, load_backend
from tidal.engine.backends.routing import Router
from tidal.engine.backends.sglang import SGLangBackend

__all__ = [
    "Backend", "Chunk", "Finish", "Request", "Sampling",
    "BackendConfig", "SGLangConfig", "OpenAIConfig", "PluginConfig",
    "BackendError", "BackendTimeout", "BadResponse", "HTTPStatusError", "RequestRejected",
    "ServerUnavailable", "Unsupported",
    "available_backends", "create_backend", "load_backend",
    "Router", "SGLangBackend", "OpenAIBackend",
]
