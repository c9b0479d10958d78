"""Backends by name: the built-ins plus whatever is registered under the entry-point group `tidal.backends`.

A third-party package declares, in its pyproject.toml,

    [project.entry-points."tidal.backends"]
    mybackend = "mypkg.backend:MyBackend"

and is chosen with `backend = {type = "plugin", name = "mybackend", options = {...}}`. Discovery reads
installed distributions' metadata (`importlib.metadata`), so nothing is imported until it is chosen.
"""

from tidal.engine import plugins
from tidal.engine.backends.base import Backend
from tidal.engine.backends.config import BackendConfig, PluginConfig

__all__ = ["GROUP", "BUILTIN", "available_backends", "load_backend", "create_backend"]

GROUP = "tidal.backends"

BUILTIN = {
    "sglang": "tidal.engine.backends.sglang:SGLangBackend",
    "openai": "tidal.engine.backends.openai:OpenAIBackend",
}
"""Always available, even from a source tree whose metadata is not installed; not overridable."""


def available_backends() -> dict[str, str]:
    """Backend name -> `module:Class`, entry points first, built-ins winning a clash."""
    return plugins.available(GROUP, BUILTIN)


def load_backend(name: str) -> type[Backend]:
    """Import the backend class registered as `name`; `ConfigError` if unknown or not a `Backend`."""
    return plugins.load(GROUP, name, BUILTIN, Backend, "backend", "tidal.engine.backends.Backend")


def create_backend(cfg: BackendConfig) -> Backend:
    """The backend a config section names, built from its options (validated here, at load time)."""
    match cfg:
        case PluginConfig(name=name, options=options):
            return plugins.instantiate(load_backend(name), options, "backend", name)
        case _:
            return load_backend(type(cfg).__struct_config__.tag)(cfg)
