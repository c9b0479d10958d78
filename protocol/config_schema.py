"""What a configuration class says about itself: field docstrings, the keys and variants at a path.

msgspec keeps a Struct's types but not the docstrings written under its fields, so `field_docs`
reads them from the class source (once per class, cached): the string literal right below an
annotated field is that field's documentation. `node_at` walks a config class along a dotted path
the way msgspec decodes the data there (a tagged union is read as the variant its `type` names),
so error messages and `--print-config` can name the valid keys, variants and values of any section.
The invariant: everything here only reads classes; nothing imports torch or builds a config.

>>> import msgspec
>>> class Optim(msgspec.Struct):
...     lr: float = 1e-5
...     '''Learning rate.'''
>>> class Cfg(msgspec.Struct):
...     optim: Optim = msgspec.field(default_factory=Optim)
>>> keys(node_at(Cfg, ["optim"], {}), {})
['lr']
"""

import ast
import functools
import inspect
import textwrap
from typing import Any

import msgspec
import msgspec.inspect as mi

__all__ = ["field_docs", "class_doc", "node_at", "struct_of", "keys", "tags", "choices", "placeholder"]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring, for `cls` and the classes it inherits fields from."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or klass is msgspec.Struct:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # built in C, defined in a REPL, or source not shipped
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def class_doc(cls: type) -> str:
    """The class docstring, if it has its own (not one inherited from a base)."""
    doc = cls.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _bare(t: mi.Type) -> mi.Type:
    """The type without its constraints (`Annotated[int, Meta(ge=1)]` is an int)."""
    while isinstance(t, mi.Metadata):
        t = t.type
    return t


def _members(t: mi.Type) -> list[mi.Type]:
    t = _bare(t)
    return [_bare(m) for m in t.types] if isinstance(t, mi.UnionType) else [t]


def struct_of(t: mi.Type, value: Any) -> mi.StructType | None:
    """The Struct a dict `value` is decoded as where the schema says `t`: a tagged union picks the
    variant its tag field names; None when `t` holds no Struct or the tag names none."""
    variants = [m for m in _members(t) if isinstance(m, mi.StructType)]
    if len(variants) <= 1:
        return variants[0] if variants else None
    tag = value.get(variants[0].tag_field) if isinstance(value, dict) else None
    return next((v for v in variants if v.tag == tag), None)


def node_at(cls: type, path: list[str | int], data: Any) -> mi.Type | None:
    """The schema type at `path` (keys and list indices) below `cls`, reading tagged unions by the
    tags in `data` (the plain data being decoded); None if the path leaves the schema."""
    t: mi.Type = mi.type_info(cls)
    for part in path:
        if isinstance(part, int):
            bare = next((m for m in _members(t) if isinstance(m, mi.ListType)), None)
            if bare is None:
                return None
            t = bare.item_type
            data = data[part] if isinstance(data, list) and part < len(data) else None
            continue
        struct = struct_of(t, data)
        if struct is not None:
            field = next((f for f in struct.fields if f.encode_name == part), None)
            if field is None:
                return None
            t = field.type
        else:
            mapping = next((m for m in _members(t) if isinstance(m, mi.DictType)), None)
            if mapping is None:
                return None
            t = mapping.value_type
        data = data.get(part) if isinstance(data, dict) else None
    return t


def keys(t: mi.Type | None, value: Any) -> list[str]:
    """The keys a section of type `t` takes (its tag field first), in declaration order."""
    struct = struct_of(t, value) if t is not None else None
    if struct is None:
        return []
    return ([struct.tag_field] if struct.tag is not None else []) + [f.encode_name for f in struct.fields]


def tags(t: mi.Type | None) -> list[str]:
    """The variants of a tagged union, by tag; empty for anything else."""
    if t is None:
        return []
    return [m.tag for m in _members(t) if isinstance(m, mi.StructType) and m.tag is not None]


def choices(t: mi.Type | None) -> list:
    """The values a Literal (or enum) field accepts; empty for anything else."""
    out: list = []
    for m in _members(t) if t is not None else []:
        if isinstance(m, mi.LiteralType):
            out += list(m.values)
        elif isinstance(m, mi.EnumType):
            out += [e.value for e in m.cls]
    return out


def placeholder(t: mi.Type) -> Any:
    """Some value of type `t` within its bounds: stands in for a required field that is not given,
    so the rest of a configuration can still be checked (`--print-config` without it)."""
    t = _bare(t)
    if isinstance(t, mi.UnionType):
        return placeholder(next((m for m in t.types if not isinstance(_bare(m), mi.NoneType)), t.types[0]))
    match t:
        case mi.StructType():
            return {t.tag_field: t.tag} if t.tag is not None else {}
        case mi.LiteralType():
            return t.values[0]
        case mi.EnumType():
            return next(iter(t.cls)).value
        case mi.BoolType():
            return False
        case mi.IntType() | mi.FloatType():
            low = next((v for v in (t.ge, t.gt) if v is not None), 0)
            value = max(low, 0) + (1 if t.gt is not None else 0)
            return int(value) if isinstance(t, mi.IntType) else float(value)
        case mi.StrType():
            return "x" * (t.min_length or 0)
        case mi.ListType() | mi.SetType() | mi.FrozenSetType() | mi.VarTupleType():
            return []
        case mi.DictType():
            return {}
        case mi.NoneType():
            return None
    return ""
