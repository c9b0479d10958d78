"""Env ids and how to build them: `envs.make("games:Mastermind-v0", code_length=3)`.

Ids are `suite:Name-vN` (Gymnasium's `namespace/Name-vN`, with GEM's `:`). Entry points are
`"module:Class"` strings imported only when an env is made, so listing ids imports no suite code.
Three sources of ids:
- built-in suites (`BUILTIN_SUITES`), each a module that calls `register(...)` when imported;
- prefix adapters (`register_prefix`): `gem:<any GEM id>` and `agentgym:...` build envs for ids
  that another system owns, so they are resolved by a factory rather than listed one by one;
- third-party packages, through the entry-point group `tidal.envs`: each entry point names a
  module (imported) or a callable (called) that registers its suite.

Invariant: an id is registered once; registering it again is an error, not a silent override.
"""

import builtins
import difflib
import importlib
import importlib.metadata
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tidal.envs.core import Env, EnvNotFound

__all__ = [
    "EnvSpec",
    "register",
    "register_prefix",
    "make",
    "list",
    "spec",
    "BUILTIN_SUITES",
    "ENTRY_POINT_GROUP",
    "ID_PATTERN",
]

ID_PATTERN = re.compile(r"^(?P<suite>[a-z][a-z0-9_]*):(?P<name>[A-Za-z][A-Za-z0-9_]*)-v(?P<version>\d+)$")
"""`suite:Name-vN`: a lowercase suite, a CamelCase name, a version bumped when results would change."""

BUILTIN_SUITES = ("tidal.envs.games", "tidal.envs.math", "tidal.envs.code", "tidal.envs.qa", "tidal.envs.synthetic",
                  "tidal.envs.adapters.gem", "tidal.envs.adapters.agentgym")
"""Modules that register the built-in ids; a module not present in this build is skipped."""

ENTRY_POINT_GROUP = "tidal.envs"


@dataclass(frozen=True)
class EnvSpec:
    """One registered id: what to build and with which default keyword arguments."""

    id: str
    entry_point: str | Callable[..., Env]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def suite(self) -> str:
        return self.id.split(":", 1)[0]

    def load(self) -> Callable[..., Env]:
        if callable(self.entry_point):
            return self.entry_point
        module, _, attr = self.entry_point.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise EnvNotFound(f"env {self.id}: entry point {self.entry_point!r} cannot be loaded: {exc}") from exc


_specs: dict[str, EnvSpec] = {}
_prefixes: dict[str, tuple[Callable[..., Env], Callable[[], builtins.list[str]] | None]] = {}
_loaded = False


def register(env_id: str, entry_point: str | Callable[..., Env], **kwargs: Any) -> EnvSpec:
    """Register `env_id` -> `entry_point(**kwargs)`; later `make` kwargs override these defaults."""
    if not ID_PATTERN.match(env_id):
        raise ValueError(f"env id {env_id!r}: expected 'suite:Name-vN', e.g. 'games:Wordle-v0'")
    if isinstance(entry_point, str) and ":" not in entry_point:
        raise ValueError(f"env {env_id}: entry point {entry_point!r} must be 'module:Class'")
    if env_id in _specs:
        raise ValueError(f"env id {env_id!r} is already registered (by {_specs[env_id].entry_point!r})")
    if env_id.split(":", 1)[0] in _prefixes:
        raise ValueError(f"env id {env_id!r}: suite {env_id.split(':', 1)[0]!r} is owned by an adapter")
    new = EnvSpec(env_id, entry_point, dict(kwargs))
    _specs[env_id] = new
    return new


def register_prefix(
    prefix: str,
    factory: Callable[..., Env],
    ids: Callable[[], builtins.list[str]] | None = None,
) -> None:
    """Route every id `prefix:REST` to `factory(REST, **kwargs)`; `ids()` lists known RESTs, if it can."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", prefix):
        raise ValueError(f"env id prefix {prefix!r}: expected lowercase letters, digits, _")
    if prefix in _prefixes:
        raise ValueError(f"env id prefix {prefix!r} is already registered")
    _prefixes[prefix] = (factory, ids)


def _load_suites() -> None:
    """Import built-in suites and third-party plugins once, on first use of the registry."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_SUITES:
        try:
            present = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is not in this build
            present = False
        if present:
            importlib.import_module(module)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        target = ep.load()
        if callable(target):
            target()


def spec(env_id: str) -> EnvSpec:
    """The spec of a registered id; `EnvNotFound` naming the closest ids otherwise."""
    _load_suites()
    found = _specs.get(env_id)
    if found is None:
        close = difflib.get_close_matches(env_id, _specs, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `tidal envs list` shows them all"
        raise EnvNotFound(f"no env registered as {env_id!r}{hint}")
    return found


def make(env_id: str, *, offload: str = "auto", **kwargs: Any) -> Env:
    """Build the env registered as `env_id` (or routed by its prefix) with defaults updated by kwargs.

    The object built gets the spec, so its `id` is `env_id`; when an entry point returns a `Wrapper`,
    the wrapper keeps the spec as its own and the env inside keeps whatever it had.

    `offload`: "auto" runs the env in this process (inline, or on the thread pool if it declares
    `blocking`); "process" hosts it in a child process of its own (`tidal.envs.process.ProcessEnv`), which
    a timeout can kill, for envs that hang, crash or share global state.
    """
    if offload == "process":
        from tidal.envs.process import ProcessEnv

        env = ProcessEnv(env_id, **kwargs)
        env.spec = EnvSpec(env_id, "tidal.envs.process:ProcessEnv", dict(kwargs))
        return env
    if offload != "auto":
        raise ValueError(f"make({env_id!r}): offload must be 'auto' or 'process', got {offload!r}")
    _load_suites()
    prefix, _, rest = env_id.partition(":")
    if prefix in _prefixes and rest:
        env = _prefixes[prefix][0](rest, **kwargs)
        env.spec = EnvSpec(env_id, _prefixes[prefix][0], dict(kwargs))
        return env
    found = spec(env_id)
    env = found.load()(**{**found.kwargs, **kwargs})
    env.spec = found
    return env


def list(prefix: str | None = None) -> builtins.list[str]:  # noqa: A001 - the API is `envs.list()`
    """Registered ids, sorted; with `prefix` ("games", "gem") only that suite's or adapter's ids."""
    _load_suites()
    ids = sorted(_specs) if prefix is None else sorted(i for i in _specs if i.split(":", 1)[0] == prefix)
    if prefix in _prefixes and _prefixes[prefix][1] is not None:
        ids += [f"{prefix}:{rest}" for rest in _prefixes[prefix][1]()]
    return ids
