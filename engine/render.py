"""A transcript's chat-template work as pure functions of msgspec Structs: the first prompt and an
observation's delta.

`Transcript` (engine/chat.py) calls these inline on the event loop; a render worker
(engine/render_worker.py) calls the very same functions in a child process, on the same Structs
decoded from its stdin. There is one implementation of the delta, so a transcript built through the
render pool (engine/render_pool.py) is token for token the one built inline. The Structs are also that
wire's schema: msgpack, decoded strictly (an unknown field is an error, not skipped), since engine and
workers are always the same code.

The delta (invariant: token in, token out). After a turn the conversation is rendered again with the
new message(s) and the next generation prompt. When that render starts with the previous render plus
the model's own text (with its special tokens, e.g. `Hi<|im_end|>`), the delta is the rest. Otherwise
the template did not extend its previous render exactly (Qwen3 drops earlier turns' `<think>` blocks,
Llama 3 trims whitespace of content, the model stopped on a stop token the template does not write):
the result is marked diverged, and the conversation is rendered once more with a sentinel after the
assistant's content; the delta is what follows the sentinel, less a leading stop token when the model
already ended its turn with one. The delta is encoded as a continuation and appended: the tokens
already in the sequence are never touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from tidal.engine.chat_template import ChatTemplateError

if TYPE_CHECKING:
    from tidal.engine.chat import ChatTokenizer

__all__ = ["PromptRequest", "PromptResult", "DeltaRequest", "DeltaResult", "render_prompt", "observation_delta"]

SENTINEL = "\u2060TIDAL_END_OF_CONTENT\u2060"
"""Appended to the assistant's content to find where the template puts it; no template strips it."""


class PromptRequest(msgspec.Struct, tag="prompt", forbid_unknown_fields=True):
    """Render an episode's first prompt: its messages and the generation prompt."""

    messages: list[dict[str, Any]]
    """The conversation so far (system, user, ...), as the chat template reads it."""
    tools: list[dict[str, Any]] | None = None
    """JSON-schema tool definitions passed to the template (None: no tools)."""
    template_kwargs: dict[str, Any] = {}
    """Extra template variables (e.g. enable_thinking); one overrides a special token of its name."""


class PromptResult(msgspec.Struct, tag="prompt", forbid_unknown_fields=True):
    """The rendered first prompt and its ids."""

    text: str
    """The template's text, generation prompt included."""
    ids: list[int]
    """`text` encoded (no BOS/EOS added beyond what the template writes)."""


class DeltaRequest(msgspec.Struct, tag="delta", forbid_unknown_fields=True):
    """Place an observation after a finished assistant turn: everything `Transcript.add_messages` needs."""

    messages: list[dict[str, Any]]
    """The conversation so far, ending with the assistant message of the turn just closed."""
    new: list[dict[str, Any]]
    """The observation's messages (user or tool), at least one."""
    previous: str
    """The previous render: the text the sequence held up to the start of that assistant turn."""
    turn_text: str
    """The turn's text with its special tokens, as the model wrote it (e.g. `Hi<|im_end|>`)."""
    turn_stopped: bool
    """The turn ended on a stop id (so a stop text the template writes after the content is there already)."""
    tools: list[dict[str, Any]] | None = None
    """As in `PromptRequest`: the episode's tools."""
    template_kwargs: dict[str, Any] = {}
    """As in `PromptRequest`: the episode's extra template variables."""


class DeltaResult(msgspec.Struct, tag="delta", forbid_unknown_fields=True):
    """The new render and the observation's ids to append."""

    text: str
    """The conversation with the new messages and the generation prompt, rendered: the next `previous`."""
    ids: list[int]
    """The delta's ids, encoded as a continuation of the sequence."""
    diverged: bool
    """The new render did not extend the previous render plus the turn's text (counted by the transcript)."""


def _render(tok: ChatTokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
            template_kwargs: dict[str, Any]) -> str:
    return tok.render(messages, add_generation_prompt=True, tools=tools, **template_kwargs)


def render_prompt(tok: ChatTokenizer, req: PromptRequest) -> PromptResult:
    """The first prompt's text and ids. Raises `ChatTemplateError` when the template fails."""
    text = _render(tok, req.messages, req.tools, req.template_kwargs)
    return PromptResult(text=text, ids=tok.encode(text))


def observation_delta(tok: ChatTokenizer, req: DeltaRequest) -> DeltaResult:
    """The observation's delta after the last assistant turn (see the module docstring).

    Raises `ChatTemplateError` when the template fails or does not render the assistant's content.
    """
    rendered = _render(tok, [*req.messages, *req.new], req.tools, req.template_kwargs)
    head = req.previous + req.turn_text
    if rendered.startswith(head):
        delta, diverged = rendered[len(head):], False
    else:
        delta, diverged = _delta_after_content(tok, req), True
    return DeltaResult(text=rendered, ids=tok.encode_continuation(delta), diverged=diverged)


def _delta_after_content(tok: ChatTokenizer, req: DeltaRequest) -> str:
    """What the template writes after the last assistant message's content, less a stop already made."""
    *before, last = req.messages
    probe = [*before, {**last, "content": last["content"] + SENTINEL}, *req.new]
    rendered = _render(tok, probe, req.tools, req.template_kwargs)
    at = rendered.rfind(SENTINEL)
    if at < 0:
        raise ChatTemplateError(f"chat template of {tok.name} does not render the assistant's content, "
                                "so an observation cannot be placed after it")
    delta = rendered[at + len(SENTINEL):]
    if req.turn_stopped:
        for stop in tok.stop_texts:
            if delta.startswith(stop):
                return delta[len(stop):]
    return delta
