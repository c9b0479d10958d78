"""The one configuration loader every daemon uses: defaults in code < TOML file < `--set` overrides.

Layers merge section by section; setting a tagged union's `type` (in TOML or with `--set`) switches
to that variant with its own defaults, and the other keys given for that section apply on top.

Each daemon's configuration is a msgspec Struct with one Struct per section (`forbid_unknown_fields`,
bounds via `Annotated[..., Meta(ge=...)]`, variants as tagged unions on `type`). Unknown keys, wrong
types and out-of-range values raise `ConfigError` naming the dotted key and what was expected.
Environment variables are read only where a daemon documents one.

>>> class Optim(msgspec.Struct, forbid_unknown_fields=True):
...     lr: float = 1e-5
>>> class Cfg(msgspec.Struct, forbid_unknown_fields=True):
...     optim: Optim = msgspec.field(default_factory=Optim)
>>> load_config(Cfg, overrides=["optim.lr=3e-4"]).optim.lr
0.0003
"""


import argparse
import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from tidal.protocol.errors import ConfigError

__all__ = ["load_config", "add_config_args", "config_from_args", "to_toml", "Strict"]

T = TypeVar("T")


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base for config sections: unknown keys are errors, fields are keyword-only."""


def _parse_value(text: str) -> Any:
    """A TOML value (`1e-6`, `true`, `[1, 2]`, `"x"`), or the bare text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply_override(data: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. trainer.lr=1e-6")
    node = data
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: {key!r} has an empty part; expected e.g. trainer.lr")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = _parse_value(value.strip())


TAG = "type"
"""The field that picks a variant of a tagged union (msgspec's default tag field)."""


def _merge(base: dict, update: dict) -> dict:
    """`update` laid over `base`, section by section. A section whose `type` changes is another
    variant: it replaces the base section instead of inheriting fields the new variant may not have."""
    if TAG in update and base.get(TAG) != update[TAG]:
        return update
    merged = dict(base)
    for key, value in update.items():
        old = merged.get(key)
        merged[key] = _merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
    return merged


def _defaults(cls: type) -> dict:
    """The defaults of `cls` as plain data, so overrides reach into defaulted sections and variants;
    empty if `cls` has required fields."""
    try:
        return msgspec.to_builtins(cls())
    except TypeError:
        return {}


_PATH = re.compile(r"`\$((?:\.[^`\[]+|\[\d+\])*)`")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`(?: - at `\$((?:\.[^`\[]+|\[\d+\])*)`)?")


def _dotted(msg: str) -> str:
    """msgspec's "at `$.trainer.lr`" as "at trainer.lr"; an unknown field as "unknown key trainer.lrr"."""
    msg = _UNKNOWN.sub(lambda m: f"unknown key {((m.group(2) or '') + '.' + m.group(1)).lstrip('.')}", msg)
    return _PATH.sub(lambda m: m.group(1).lstrip(".") or "<top level>", msg)


def load_config(cls: "type[T]", path: "str | Path | None" = None, overrides: list[str] = ()) -> T:
    """Resolve a config of type `cls` from its defaults, an optional TOML file and dotted overrides."""
    data = _defaults(cls)
    if path is not None:
        try:
            data = _merge(data, tomllib.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    update: dict = {}
    for item in overrides:
        _apply_override(update, item)
    data = _merge(data, update)
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}: {_dotted(str(exc))}") from None


def _drop_none(value: Any) -> Any:
    """TOML has no null: a key whose value is None is left out (it reads back as its default None)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def to_toml(cfg: msgspec.Struct) -> str:
    """The resolved configuration as TOML, which `load_config` reads back to an equal value."""
    import tomli_w

    return tomli_w.dumps(_drop_none(msgspec.to_builtins(cfg)))


def add_config_args(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """Add CONFIG, repeatable `--set KEY=VALUE` and `--print-config` to a daemon's parser."""
    parser.add_argument("config", nargs=None if required else "?", help="TOML configuration file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one key by its dotted path, e.g. --set trainer.lr=1e-6 (repeatable)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")


def config_from_args(cls: type[T], args: argparse.Namespace) -> T | None:
    """Load the config named by parsed args; with --print-config, print it and return None."""
    cfg = load_config(cls, args.config, args.overrides)
    if args.print_config:
        print(to_toml(cfg), end="")
        return None
    return cfg
