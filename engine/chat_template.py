"""Chat templates rendered exactly as transformers renders them, without importing transformers.

The engine process imports no torch or transformers, yet the prompt it sends must be the one a user
gets from `tokenizer.apply_chat_template(messages, tokenize=False)`. This module mirrors transformers
5's `chat_template_utils`: the same sandbox (`ImmutableSandboxedEnvironment`, `trim_blocks`,
`lstrip_blocks`, the loop-controls extension), the same globals (`raise_exception`, `strftime_now`,
a `namespace` that refuses underscore names, a `dict` constructor), the same `tojson` filter (no HTML
escaping; `ensure_ascii`, `indent`, `separators`, `sort_keys`), the `{% generation %}` tag (rendered as
its body; the engine has no use for assistant masks), and the same inputs: messages with None-valued
keys dropped and reasoning aliased to `reasoning_content` (and `thinking`), `tools`, `documents`,
`add_generation_prompt`, then the checkpoint's special tokens (`bos_token`, `eos_token`, ...) and any
extra keyword, a keyword overriding a special token of the same name.

Departure: transformers turns Python callables in `tools` into JSON schemas; here a tool must already
be its JSON-schema dict. tests/engine/test_chat.py renders real templates both ways and compares.
"""

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tidal.protocol.errors import TidalError

__all__ = ["ChatTemplateError", "compile_template", "render_template"]

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
"""Names a message's reasoning comes under; the first is the one templates read (as transformers)."""


class ChatTemplateError(TidalError, ValueError):
    """A chat template that does not compile, raises (`raise_exception`) or fails while rendering."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates need the JSON as written.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` inside a template, without exposing the dict type itself to attribute tricks."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes (no route to CPython internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for masks; here it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


_ENV = _environment()


def compile_template(source: str, where: str) -> jinja2.Template:
    """Compile `source`; a syntax error becomes a `ChatTemplateError` naming `where` and the line."""
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template of {where}: line {exc.lineno}: {exc.message}") from None


def _template_messages(messages: Sequence[Mapping[str, Any]], where: str) -> list[dict]:
    """The messages as transformers hands them to a template: None values dropped, reasoning aliased."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"{where}: messages[{i}] is {type(message).__name__}, expected a dict")
        if any(value is None for value in message.values()):
            message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_template(
    template: jinja2.Template,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    variables: Mapping[str, Any] | None = None,
    where: str = "the checkpoint",
) -> str:
    """Render as `apply_chat_template(..., tokenize=False)`; `variables` holds special tokens + extra kwargs.

    Any failure inside the template (its own `raise_exception`, an undefined attribute, a type error) is
    foreign code failing on these inputs: it becomes one `ChatTemplateError` naming `where`.
    """
    if tools is not None:
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping):
                raise ChatTemplateError(f"{where}: tools[{i}] is {type(tool).__name__}, expected a JSON-schema dict")
    if documents is not None:
        for i, document in enumerate(documents):
            if not isinstance(document, Mapping):
                raise ChatTemplateError(f"{where}: documents[{i}] is {type(document).__name__}, expected a dict")
    chat = _template_messages(messages, where)
    try:
        return template.render(
            messages=chat, tools=tools, documents=documents,
            add_generation_prompt=add_generation_prompt, **(variables or {}),
        )
    except Exception as exc:  # the template is foreign code: every failure in it is reported as its own
        raise ChatTemplateError(f"chat template of {where}: {type(exc).__name__}: {exc}") from exc
