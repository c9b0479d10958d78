"""Backends by name: the built-ins plus whatever is registered under the entry-point group `tidal.backends`.

A third-party package declares, in its pyproject.toml,

    [project.entry-points."tidal.backends"]
    mybackend = "mypkg.backend:MyBackend"

and is chosen with `backend = {type = "plugin", name = "mybackend", options = {...}}`. Discovery reads
installed distributions' metadata (`importlib.metadata`), so nothing is imported until it is chosen.
"""

from importlib.metadata import EntryPoint, entry_points

import msgspec
from tidal.engine.backends.base import Backend
from tidal.engine.backends.config import BackendConfig, PluginConfig
from tidal.protocol.errors import ConfigError

__all__ = ["GROUP", "BUILTIN", "available_backends", "load_backend", "create_backend"]

GROUP = "tidal.backends"

BUILTIN = {
    "sglang": "tidal.engine.backends.sglang:SGLangBackend",
    "openai": "tidal.engine.backends.openai:OpenAIBackend",
}
"""Always available, even from a source tree whose metadata is not installed; not overridable."""


def available_backends() -> dict[str, str]:
    """Backend name -> `module:Class`, entry points first, built-ins winning a clash."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)} | BUILTIN


def load_backend(name: str) -> type[Backend]:
    """Import the backend class registered as `name`; `ConfigError` if unknown or not a `Backend`."""
    known = available_backends()
    if name not in known:
        raise ConfigError(f"backend {name!r} is not registered (group {GROUP}); available: {sorted(known)}")
    try:
        cls = EntryPoint(name, known[name], GROUP).load()
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"backend {name!r} ({known[name]}) cannot be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"backend {name!r} ({known[name]}) is not a subclass of tidal.engine.backends.Backend")
    return cls


def create_backend(cfg: BackendConfig) -> Backend:
    """The backend a config section names, built from its options (validated here, at load time)."""
    match cfg:
        case PluginConfig(name=name, options=options):
            cls = load_backend(name)
            try:
                return cls(msgspec.convert(options, cls.config_type))
            except msgspec.ValidationError as exc:
                raise ConfigError(f"backend {name!r} options: {exc}") from None
        case _:
            return load_backend(type(cfg).__struct_config__.tag)(cfg)
