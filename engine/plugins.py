"""Plug-ins found through entry points: backends (`tidal.backends`) and agents (`tidal.agents`).

A plug-in is a class registered by name in an entry-point group, with a `config_type` (a strict msgspec
Struct) that its `options` are validated against when it is chosen. Discovery reads installed
distributions' metadata, so nothing is imported until a plug-in is chosen; built-ins always exist,
even in a source tree whose metadata is not installed, and win a clash of names.
"""

from importlib.metadata import EntryPoint, entry_points
from typing import Any

import msgspec
from tidal.protocol.errors import ConfigError

__all__ = ["available", "load", "instantiate"]


def available(group: str, builtin: dict[str, str]) -> dict[str, str]:
    """Plug-in name -> `module:Class`, entry points first, built-ins winning a clash."""
    return {ep.name: ep.value for ep in entry_points(group=group)} | builtin


def load(group: str, name: str, builtin: dict[str, str], base: type, what: str, base_path: str) -> type:
    """The class registered as `name` in `group`; ConfigError if unknown, unloadable or not a `base`
    (named by its public import path, `base_path`)."""
    known = available(group, builtin)
    if name not in known:
        raise ConfigError(f"{what} {name!r} is not registered (group {group}); available: {sorted(known)}")
    try:
        cls = EntryPoint(name, known[name], group).load()
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{what} {name!r} ({known[name]}) cannot be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{what} {name!r} ({known[name]}) is not a subclass of {base_path}")
    return cls


def instantiate(cls: type, options: dict[str, Any], what: str, name: str) -> Any:
    """`cls(options validated against cls.config_type)`; ConfigError naming the bad option."""
    try:
        return cls(msgspec.convert(options, cls.config_type))
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{what} {name!r} options: {exc}") from None
