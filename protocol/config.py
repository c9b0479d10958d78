"""The one configuration loader every daemon uses: defaults in code < TOML file < `--set` overrides.

Layers merge section by section; setting a tagged union's `type` (in TOML or with `--set`) switches
to that variant with its own defaults, and the other keys given for that section apply on top.

Each daemon's configuration is a msgspec Struct with one Struct per section (`forbid_unknown_fields`,
bounds via `Annotated[..., Meta(ge=...)]`, variants as tagged unions on `type`). Unknown keys, wrong
types and out-of-range values raise `ConfigError` naming the dotted key and what was expected: the
valid keys of that section with the closest ones first, the variants of a union, a field's choices.
`--print-config` prints TOML with every field's docstring as a comment above it, and works before
the required keys are given: they are marked `# required:` and everything else is shown resolved.
Environment variables are read only where a daemon documents one.

>>> class Optim(msgspec.Struct, forbid_unknown_fields=True):
...     lr: float = 1e-5
>>> class Cfg(msgspec.Struct, forbid_unknown_fields=True):
...     optim: Optim = msgspec.field(default_factory=Optim)
>>> load_config(Cfg, overrides=["optim.lr=3e-4"]).optim.lr
0.0003
"""


import argparse
import difflib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import msgspec.inspect as mi
from tidal.protocol import config_schema as schema
from tidal.protocol.errors import ConfigError

__all__ = ["load_config", "load_partial", "add_config_args", "config_from_args", "to_toml", "example_override",
           "Strict"]

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
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, a dotted key and a TOML value (SECTION.KEY=3)")
    node = data
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: {key!r} has an empty part; expected a dotted key, SECTION.KEY")
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
    the fields with a default only, if it has required ones."""
    try:
        return msgspec.to_builtins(cls())
    except TypeError:
        pass
    out = {}
    if cls.__struct_config__.tag is not None:
        out[cls.__struct_config__.tag_field] = cls.__struct_config__.tag
    for field in msgspec.structs.fields(cls):
        if field.default is not msgspec.NODEFAULT:
            out[field.encode_name] = msgspec.to_builtins(field.default)
        elif field.default_factory is not msgspec.NODEFAULT:
            out[field.encode_name] = msgspec.to_builtins(field.default_factory())
    return out


def _with_defaults(t: mi.Type, value: Any) -> Any:
    """`value` with the defaults of each required section it gives (a required section has no
    default to start from, so a variant named inside it would otherwise lack its tag)."""
    struct = schema.struct_of(t, value)
    if struct is None or not isinstance(value, dict):
        return value
    for field in struct.fields:
        given = value.get(field.encode_name)
        if field.required and isinstance(given, dict) and (sub := schema.struct_of(field.type, given)):
            value[field.encode_name] = _with_defaults(field.type, _merge(_defaults(sub.cls), given))
    return value


# --- error messages ------------------------------------------------------------------------------

_PATH_TEXT = r"(?:\.[^`\[.]+|\[\d+\]|\[\.\.\.\])*"
_PATH = re.compile(rf"`\$({_PATH_TEXT})`")
_AT = rf"(?: - at `\$(?P<path>{_PATH_TEXT})`)?"
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]*)`" + _AT)
_MISSING = re.compile(r"Object missing required field `(?P<key>[^`]*)`" + _AT)
_BAD_VALUE = re.compile(r"Invalid (?P<enum>enum )?value (?P<value>.+?)" + _AT + "$")


def _parts(path: str | None) -> list[str | int] | None:
    """`.a.b[0]` as ["a", "b", 0]; None where a dict key is not named (`[...]`)."""
    parts: list[str | int] = []
    for name, index in re.findall(r"\.([^`\[.]+)|\[(\d+|\.\.\.)\]", path or ""):
        if index == "...":
            return None
        parts.append(int(index) if index else name)
    return parts


def _dotted_path(parts: list[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def _dotted(msg: str) -> str:
    """msgspec's "at `$.trainer.lr`" as "at trainer.lr"."""
    return _PATH.sub(lambda m: m.group(1).lstrip(".") or "<top level>", msg)


def _data_at(data: Any, parts: list[str | int]) -> Any:
    for part in parts:
        if isinstance(part, int):
            data = data[part] if isinstance(data, list) and part < len(data) else None
        else:
            data = data.get(part) if isinstance(data, dict) else None
    return data


def _quoted(values) -> str:
    """Values as TOML writes them: `"sgd", "adam"`."""
    return ", ".join(json.dumps(v) for v in values)


def _explain(cls: type, data: dict, msg: str) -> str:
    """msgspec's message with dotted paths, and what the schema accepts there: for an unknown key
    the closest valid keys and all of them, for a bad tag or Literal value the valid ones."""
    if m := _UNKNOWN.fullmatch(msg):
        parts = _parts(m["path"])
        if parts is None:
            return _dotted(msg)
        where = _dotted_path(parts)
        valid = schema.keys(schema.node_at(cls, parts, data), _data_at(data, parts))
        full = f"{where}.{m['key']}".lstrip(".")
        text = f"unknown key {full}"
        close = difflib.get_close_matches(m["key"], valid, n=3, cutoff=0.6)
        if close:
            text += "; did you mean " + " or ".join(f"{where}.{k}".lstrip(".") for k in close) + "?"
        if valid:
            text += f" ({where or 'the top level'} takes: {', '.join(valid)})"
        return text
    if (m := _BAD_VALUE.fullmatch(msg)) and (parts := _parts(m["path"])):
        if not m["enum"] and parts[-1] == TAG:
            valid = schema.tags(schema.node_at(cls, parts[:-1], data))
        else:
            valid = schema.choices(schema.node_at(cls, parts, data))
        if valid:
            return f"{_dotted(msg)}; expected one of {_quoted(valid)}"
    return _dotted(msg)


# --- loading ---------------------------------------------------------------------------------------


def _layers(cls: type, path: "str | Path | None", overrides) -> dict:
    """Defaults, the TOML file and the overrides, merged as plain data."""
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
    return _with_defaults(mi.type_info(cls), _merge(data, update))


def _invalid(cls: type, data: dict, path, exc: msgspec.ValidationError, suffix: str = "") -> ConfigError:
    where = f" in {path}" if path else ""
    return ConfigError(f"invalid configuration{where}: {_explain(cls, data, str(exc))}{suffix}")


def load_config(cls: "type[T]", path: "str | Path | None" = None, overrides: list[str] = ()) -> T:
    """Resolve a config of type `cls` from its defaults, an optional TOML file and dotted overrides."""
    data = _layers(cls, path, overrides)
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        raise _invalid(cls, data, path, exc) from None


def _missing_field(cls: type, data: dict, msg: str) -> "tuple[mi.Field, dict, str] | None":
    """For msgspec's "Object missing required field `k` - at `$.a`": the field's schema, the section
    of `data` that lacks it and its dotted key; None for any other message."""
    m = _MISSING.fullmatch(msg)
    parts = _parts(m["path"]) if m else None
    section = _data_at(data, parts) if parts is not None else None
    if not isinstance(section, dict) or m["key"] in section:
        return None
    struct = schema.struct_of(schema.node_at(cls, parts, data), section)
    field = next((f for f in struct.fields if f.encode_name == m["key"]), None) if struct else None
    return None if field is None else (field, section, _dotted_path([*parts, m["key"]]))


def load_partial(cls: "type[T]", path: "str | Path | None" = None, overrides: list[str] = ()) -> "tuple[T, list[str]]":
    """As `load_config`, but a required key that is not given gets a stand-in value within its bounds
    (a required section: its defaults), so everything else is still checked and resolved. Returns
    the config and the dotted keys that were stood in for. For showing (`--print-config`), never for
    running: `to_toml(cfg, missing=keys)` prints those keys as `# required:` comments."""
    data = _layers(cls, path, overrides)
    missing: list[str] = []
    while True:
        try:
            return msgspec.convert(data, cls), missing
        except msgspec.ValidationError as exc:
            found = _missing_field(cls, data, str(exc))
            if found is None:
                suffix = f" (checked without the required {', '.join(missing)})" if missing else ""
                raise _invalid(cls, data, path, exc, suffix) from None
            field, section, key = found
            section[field.encode_name] = schema.placeholder(field.type)
            if not isinstance(section[field.encode_name], dict):  # a section: its defaults are real
                missing.append(key)


# --- printing --------------------------------------------------------------------------------------


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.splitlines()]


def _is_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _type_name(t: mi.Type) -> str:
    names = {mi.StrType: "a string", mi.IntType: "an integer", mi.FloatType: "a number", mi.BoolType: "true or false",
             mi.ListType: "an array", mi.DictType: "a table"}
    while isinstance(t, mi.Metadata):
        t = t.type
    if choices := schema.choices(t):
        return f"one of {_quoted(choices)}"
    if isinstance(t, mi.UnionType):
        return " or ".join(_type_name(m) for m in t.types if not isinstance(m, mi.NoneType))
    return names.get(type(t), "a value")


def _table(out: list[str], cls: type, header: list[str], parts: list, t: mi.Type | None, value: dict,
           data: dict, missing: set[str]) -> None:
    """Append one table: its plain keys (each under its docstring), then its sub-tables."""
    import tomli_w

    struct = schema.struct_of(t, value) if t is not None else None
    docs = schema.field_docs(struct.cls) if struct is not None else {}
    variants = schema.tags(t)

    def child_type(key: str) -> mi.Type | None:
        return schema.node_at(cls, [*parts, key], data)

    later = []
    for key, v in value.items():
        if isinstance(v, dict) or _is_tables(v):
            later.append((key, v))
            continue
        doc = docs.get(key, "")
        if struct is not None and key == struct.tag_field and len(variants) > 1:
            doc = f"one of {_quoted(variants)}: each has its own keys"
        if doc and out and out[-1] != "" and not out[-1].startswith("["):
            out.append("")
        out += _comment(doc)
        dotted = _dotted_path([*parts, key])
        if dotted in missing:
            out.append(f"# required: {key} = {_type_name(child_type(key))}  (not given)")
        elif v is None:
            out.append(f"# {_key(key)}: not set")
        else:
            out.append(tomli_w.dumps({key: v}).rstrip("\n"))
    for key, v in later:
        doc = docs.get(key) or (schema.class_doc(s.cls) if (s := schema.struct_of(child_type(key), v)) else "")
        if isinstance(v, dict):
            out += ["", *_comment(doc), f"[{'.'.join(map(_key, [*header, key]))}]"]
            _table(out, cls, [*header, key], [*parts, key], child_type(key), v, data, missing)
            continue
        for i, item in enumerate(v):
            out += ["", *(_comment(doc) if i == 0 else []), f"[[{'.'.join(map(_key, [*header, key]))}]]"]
            _table(out, cls, [*header, key], [*parts, key, i], schema.node_at(cls, [*parts, key, i], data),
                   item, data, missing)


def to_toml(cfg: msgspec.Struct, *, missing: list[str] = ()) -> str:
    """The configuration as TOML, each key under its field's docstring (as comments), which
    `load_config` reads back to an equal value. A key that is None is shown as a comment (TOML has
    no null; it reads back as its default None); keys in `missing` (`load_partial`) as `# required:`."""
    data = msgspec.to_builtins(cfg)
    cls = type(cfg)
    out = _comment(schema.class_doc(cls))
    _table(out, cls, [], [], mi.type_info(cls), data, data, set(missing))
    while out and out[0] == "":
        out.pop(0)
    return "\n".join(out) + "\n"


# --- command line ----------------------------------------------------------------------------------


def example_override(cls: type) -> str:
    """A real `--set` example for `cls`: the first numeric key in its sections, with its default."""
    def walk(t: mi.Type, parts: list[str]) -> str | None:
        struct = schema.struct_of(t, {})
        for field in struct.fields if struct is not None else []:
            default = field.default
            if isinstance(default, int | float) and not isinstance(default, bool) and parts:
                return f"{'.'.join([*parts, field.encode_name])}={default}"
            if (found := walk(field.type, [*parts, field.encode_name])) is not None:
                return found
        return None

    return walk(mi.type_info(cls), []) or "KEY=VALUE"


def add_config_args(parser: argparse.ArgumentParser, cls: type | None = None, *, required: bool = False) -> None:
    """Add CONFIG, repeatable `--set KEY=VALUE` and `--print-config` to a daemon's parser; with its
    config class `cls`, the `--set` help shows a key that exists."""
    example = example_override(cls) if cls is not None else "seed=1"
    parser.add_argument("config", nargs=None if required else "?", help="TOML configuration file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override one key by its dotted path (a TOML value), e.g. --set {example} (repeatable)",
    )
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration, documented, and exit (works before the "
                             "required keys are given: they are marked)")


def config_from_args(cls: type[T], args: argparse.Namespace) -> T | None:
    """Load the config named by parsed args; with --print-config, print it and return None (keys
    still required are printed as `# required:` comments instead of failing)."""
    if args.print_config:
        cfg, missing = load_partial(cls, args.config, args.overrides)
        print(to_toml(cfg, missing=missing), end="")
        return None
    return load_config(cls, args.config, args.overrides)
