"""Text to token ids and back for the agent loop: the checkpoint's tokenizer, its chat template, and
`Transcript`, one episode's token sequence.

Invariant (token in, token out): the engine keeps the exact ids the server returned; a multi-turn
trajectory is one growing token sequence: the prompt, then per turn the model's tokens (loss mask 1)
and the environment's observation tokens (loss mask 0). Text is never re-tokenized after generation:
an observation's tokens are the template's *delta*, the text the chat template puts between the end
of the assistant's generated text and the start of the next assistant generation, encoded on its own
and appended; the tokens already in the sequence are never touched.

The delta. After a turn the conversation is rendered again with the new message(s) and the next
generation prompt; what the template writes after the model's own text is the observation's delta,
encoded on its own and appended (engine/render.py computes it; a template that does not extend its
previous render exactly is a divergence, counted). That work is pure: `Transcript` runs it inline, or
its async methods hand it to a `RenderPool` of worker processes (engine/render_pool.py) so that the
event loop does not render templates; both call the same functions of engine/render.py.

Loading needs tokenizer.json (the `tokenizers` library, no transformers) and a chat template:
chat_template.jinja (+ additional_chat_templates/*.jinja), chat_template.json, or tokenizer_config.json's
`chat_template` (a string, or a list of named templates). Stop ids are the tokenizer's eos plus every
`eos_token_id` of generation_config.json (or config.json).
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tidal.engine.chat_template import ChatTemplateError, compile_template, render_template
from tidal.engine.render import (
    DeltaRequest,
    DeltaResult,
    PromptRequest,
    PromptResult,
    observation_delta,
    render_prompt,
)
from tidal.protocol.errors import TidalError
from tokenizers import Tokenizer

if TYPE_CHECKING:
    from tidal.engine.render_pool import RenderPool

__all__ = ["ChatTemplateError", "ChatTokenizer", "TokenizerLoadError", "Transcript", "TranscriptStateError"]

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
"""The named special tokens transformers passes to every template (plus a config's other `*_token` keys)."""


class TokenizerLoadError(TidalError, ValueError):
    """A checkpoint directory that lacks, or has unreadable, tokenizer.json or a chat template."""


class TranscriptStateError(TidalError, RuntimeError):
    """A `Transcript` method called out of order (e.g. an observation while a turn is still open)."""


def _scrub(text: str) -> str:
    """`text` with each lone surrogate (JSON's "\\ud800" decodes to one) as U+FFFD: neither a tokenizer
    nor the UTF-8 of a wire takes one, and a tool's output must not fail the episode for it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def _message(m: Mapping[str, Any]) -> dict:
    """A copy of one chat message whose text fields are scrubbed of lone surrogates."""
    return {k: _scrub(v) if isinstance(v, str) else v for k, v in m.items()}


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerLoadError(f"{path}: not readable JSON: {exc}") from None


def _named_templates(value: Any, where: Path) -> dict[str, str]:
    """A config's `chat_template`: a string (the default) or a list of {"name", "template"}."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise TokenizerLoadError(f"{where}: chat_template is {type(value).__name__}, expected a string or a "
                             "list of {\"name\", \"template\"} objects")


def _find_templates(root: Path, config: dict) -> dict[str, str]:
    """Template files take priority over config entries, as transformers loads them."""
    files: dict[str, str] = {}
    if (root / "chat_template.jinja").is_file():
        files["default"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
    extra = root / "additional_chat_templates"
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            files[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if files:
        return files
    legacy = _read_json(root / "chat_template.json")
    if isinstance(legacy, dict) and legacy.get("chat_template") is not None:
        return _named_templates(legacy["chat_template"], root / "chat_template.json")
    return _named_templates(config.get("chat_template"), root / "tokenizer_config.json")


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # a serialized AddedToken
        return value["content"]
    return None


def _special_tokens(root: Path, config: dict) -> dict[str, str]:
    """What a template sees as bos_token, eos_token, ...: the named tokens, then model-specific `*_token`s."""
    legacy = _read_json(root / "special_tokens_map.json") or {}
    found: dict[str, str] = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(name, legacy.get(name)))
        if text is not None:
            found[name] = text
    extra = config.get("extra_special_tokens")
    named_extra = extra.items() if isinstance(extra, dict) else ()
    for name, value in [*config.items(), *named_extra]:
        if name.endswith("_token") and name not in found and _token_text(value) is not None:
            found[name] = _token_text(value)
    return found


def _config_eos_ids(root: Path) -> list[int]:
    for name in ("generation_config.json", "config.json"):
        eos = (_read_json(root / name) or {}).get("eos_token_id")
        if isinstance(eos, int):
            return [eos]
        if isinstance(eos, list) and eos and all(isinstance(i, int) for i in eos):
            return list(eos)
    return []


class ChatTokenizer:
    """A checkpoint's fast tokenizer and chat template(s), with the ids that end an assistant turn.

    >>> tok = ChatTokenizer.load("/path/to/checkpoint")                                # doctest: +SKIP
    >>> tok.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)  # doctest: +SKIP
    '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
    """

    def __init__(self, tokenizer: Tokenizer, templates: Mapping[str, str], *, template: str = "default",
                 special_tokens: Mapping[str, str] | None = None, eos_token_ids: Iterable[int] = (),
                 name: str = "the checkpoint"):
        if template not in templates:
            raise TokenizerLoadError(f"{name}: no chat template named {template!r} (has {sorted(templates)})")
        self.name = name
        self._tok = tokenizer
        self._template = compile_template(templates[template], f"{name} ({template})")
        self._tool_template = (compile_template(templates["tool_use"], f"{name} (tool_use)")
                               if template == "default" and "tool_use" in templates else self._template)
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        """Template variables bos_token, eos_token, ...: what transformers passes as `special_tokens_map`."""
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))
        """Every id that ends an assistant turn: the tokenizer's eos and the generation config's."""
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        """Tokens the tokenizer knows (added tokens included); a model's embedding may be larger."""
        self.stop_texts: tuple[str, ...] = tuple(sorted(
            {self.decode([i], skip_special_tokens=False) for i in self.eos_token_ids} - {""}, key=len, reverse=True))
        """The text of each stop id, longest first (what a template writes where the model stopped)."""
        newline = self.encode("\n")
        # SentencePiece-style tokenizers prefix a space to the start of every encode: a delta encoded
        # alone would gain one. Those encode "\n" + delta and drop the newline again, as transformers does.
        self._newline = newline if self.encode("\na") != newline + self.encode("a") else None

    @classmethod
    def load(cls, path: str | Path, *, template: str | None = None) -> ChatTokenizer:
        """Load tokenizer.json and the chat template from a checkpoint directory.

        Args:
            template: the name of one of several named templates; by default "default", and "tool_use"
                (when the checkpoint has one) for renders that pass tools, as transformers picks.
        """
        root = Path(path)
        if not root.is_dir():
            raise TokenizerLoadError(f"{root}: no such checkpoint directory")
        if not (root / "tokenizer.json").is_file():
            raise TokenizerLoadError(f"{root}: no tokenizer.json (the engine needs the fast tokenizer file)")
        try:
            tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        except Exception as exc:  # the tokenizers library raises its own Exception type for any bad file
            raise TokenizerLoadError(f"{root / 'tokenizer.json'}: not a tokenizers file: {exc}") from None
        config = _read_json(root / "tokenizer_config.json") or {}
        if not isinstance(config, dict):
            raise TokenizerLoadError(f"{root / 'tokenizer_config.json'}: expected a JSON object")
        templates = _find_templates(root, config)
        if not templates:
            raise TokenizerLoadError(
                f"{root}: no chat template (looked for chat_template.jinja, additional_chat_templates/, "
                "chat_template.json and tokenizer_config.json's chat_template)")
        if template is None and "default" not in templates:
            raise TokenizerLoadError(f"{root}: several chat templates and none named 'default'; pass "
                                     f"template= one of {sorted(templates)}")
        special = _special_tokens(root, config)
        eos = [tokenizer.token_to_id(special["eos_token"])] if "eos_token" in special else []
        eos = [i for i in eos + _config_eos_ids(root) if i is not None]
        return cls(tokenizer, templates, template=template or "default", special_tokens=special,
                   eos_token_ids=eos, name=str(root))

    def encode(self, text: str) -> list[int]:
        """Ids of `text`: no BOS/EOS added; the text of an added token (`<|im_end|>`) becomes its id."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` as it continues a sequence (no prefix space a tokenizer adds at a start)."""
        if self._newline is None:
            return self.encode(text)
        ids = self.encode("\n" + text)
        n = len(self._newline)
        return ids[n:] if ids[:n] == self._newline else self.encode(text)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (no clean-up of spaces before punctuation: the text is what the model wrote)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool,
               tools: Sequence[Mapping[str, Any]] | None = None,
               documents: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any) -> str:
        """The chat template's text for `messages`, as `apply_chat_template(..., tokenize=False)`."""
        template = self._tool_template if tools is not None else self._template
        return render_template(template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                               documents=documents, variables={**self.special_tokens, **kwargs}, where=self.name)


class Transcript:
    """One episode's token sequence (token in, token out): prompt, model turns, observation deltas.

    Order: `append_generation` (any number of chunks), `end_turn`, `add_message`/`add_messages`, repeat.
    `tokens`, `loss_mask`, `behav_logp` and `versions` always have one entry per token; `versions` is -1
    and `behav_logp` 0.0 where the mask is 0. `turns` holds each assistant turn's [start, end) in `tokens`.
    The four are `array.array`s (uint32, uint8, float64: the server's logprobs exactly, int32): an
    episode idle at the server or the env holds ~17 bytes per token instead of ~110, none of it
    tracked by the cyclic GC, so thousands of episodes cost little memory and no collection time.

    The template work (the first render, each observation's delta) runs inline in the constructor and
    `add_messages`; `await Transcript.create(...)` and `await add_messages_async(...)` hand it to a
    `RenderPool` of worker processes instead (inline when the pool is None), with the same result.
    """

    def __init__(self, tok: ChatTokenizer, messages: Sequence[Mapping[str, Any]], *,
                 tools: Sequence[Mapping[str, Any]] | None = None,
                 template_kwargs: Mapping[str, Any] | None = None, prompt: PromptResult | None = None):
        """`prompt`: the first render of `messages`, already made (by `create` through a pool)."""
        self.tok = tok
        self.messages: list[dict] = [_message(m) for m in messages]
        self.tools = tools
        self.template_kwargs = dict(template_kwargs or {})
        self.tokens = array("I")
        self.loss_mask = array("B")
        self.behav_logp = array("d")
        self.versions = array("i")
        self.turns: list[tuple[int, int]] = []
        self.divergences = 0
        """Times the template did not extend its previous render by the model's text exactly."""
        if prompt is None:
            prompt = render_prompt(tok, self._prompt_request())
        self._render = prompt.text
        self._append_context(prompt.ids)
        self.prompt_len = len(self.tokens)
        self._turn_start: int | None = None  # where the open (or last) turn's tokens start
        self._open = False                   # a turn is being generated
        self._prompted = True                # the sequence ends with the generation prompt
        self._turn_text = ""                 # the last turn's text with its special tokens
        self._turn_stopped = False           # the last turn ended on a stop id

    @classmethod
    async def create(cls, tok: ChatTokenizer, messages: Sequence[Mapping[str, Any]], *,
                     tools: Sequence[Mapping[str, Any]] | None = None,
                     template_kwargs: Mapping[str, Any] | None = None, pool: RenderPool | None = None) -> Transcript:
        """A transcript whose first prompt `pool`'s workers render (inline when `pool` is None)."""
        kw = {"tools": tools, "template_kwargs": template_kwargs}
        if pool is None:
            return cls(tok, messages, **kw)
        request = PromptRequest(messages=[_message(m) for m in messages], tools=tools,
                                template_kwargs=dict(template_kwargs or {}))
        return cls(tok, messages, **kw, prompt=await pool.prompt(request))

    def __len__(self) -> int:
        return len(self.tokens)

    def _prompt_request(self) -> PromptRequest:
        return PromptRequest(messages=self.messages, tools=self.tools, template_kwargs=self.template_kwargs)

    def _append_context(self, ids: list[int]) -> None:
        n = len(ids)
        self.tokens.extend(ids)
        self.loss_mask.frombytes(bytes(n))
        self.behav_logp.frombytes(bytes(8 * n))  # 0.0
        self.versions.frombytes(b"\xff" * (4 * n))  # -1

    def append_generation(self, token_ids: Sequence[int], logprobs: Sequence[float], version: int) -> None:
        """Append the server's exact tokens (mask 1) with their behaviour logprobs; once per stream chunk."""
        if not (self._open or self._prompted):
            raise TranscriptStateError("append_generation after end_turn: add the observation first "
                                       "(add_message), which writes the next generation prompt")
        if len(token_ids) != len(logprobs):
            raise ValueError(f"append_generation: {len(token_ids)} token ids but {len(logprobs)} logprobs")
        if not self._open:
            self._open, self._prompted, self._turn_start = True, False, len(self.tokens)
        self.tokens.extend(token_ids)
        self.loss_mask.frombytes(b"\x01" * len(token_ids))
        self.behav_logp.extend(logprobs)
        self.versions.extend(array("i", (version,)) * len(token_ids))

    def end_turn(self) -> str:
        """Close the assistant turn; its action text (special tokens skipped) joins `messages`."""
        if not (self._open or self._prompted):
            raise TranscriptStateError("end_turn: no assistant turn is open (end_turn was already called)")
        if not self._open:  # the model produced nothing: an empty turn
            self._turn_start = len(self.tokens)
        start = self._turn_start
        ids = self.tokens[start:]
        text = self.tok.decode(ids, skip_special_tokens=True)
        self._turn_text = self._decode_in_context(start)
        self._turn_stopped = bool(ids) and ids[-1] in self.tok.eos_token_ids
        self.messages.append({"role": "assistant", "content": text})
        self.turns.append((start, len(self.tokens)))
        self._open = self._prompted = False
        return text

    def _decode_in_context(self, start: int) -> str:
        """This turn's text with special tokens, decoded after the token before it (no start-of-text strip)."""
        ids = self.tokens[start:]
        if start > 0 and ids:
            left = self.tok.decode(self.tokens[start - 1:start], skip_special_tokens=False)
            both = self.tok.decode(self.tokens[start - 1:], skip_special_tokens=False)
            if both.startswith(left):
                return both[len(left):]
        return self.tok.decode(ids, skip_special_tokens=False)

    def add_message(self, role: str, content: str, **extra: Any) -> int:
        """Append one user/tool message and the next generation prompt (mask 0); return tokens added."""
        return self.add_messages([{"role": role, "content": content, **extra}])

    def add_messages(self, messages: Sequence[Mapping[str, Any]]) -> int:
        """Append several messages at once (e.g. one tool response per call) and the generation prompt."""
        request = self._delta_request(messages)
        return self._extend(request, observation_delta(self.tok, request))

    async def add_messages_async(self, messages: Sequence[Mapping[str, Any]], pool: RenderPool | None) -> int:
        """`add_messages` with the template work done by `pool`'s workers (inline when `pool` is None)."""
        request = self._delta_request(messages)
        if pool is None:
            return self._extend(request, observation_delta(self.tok, request))
        length = len(self.tokens)
        result = await pool.delta(request)
        if len(self.tokens) != length or self._prompted:
            raise TranscriptStateError("add_messages_async: the transcript changed while its observation was "
                                       "being rendered (one episode's calls must not overlap)")
        return self._extend(request, result)

    def _delta_request(self, messages: Sequence[Mapping[str, Any]]) -> DeltaRequest:
        if self._open:
            raise TranscriptStateError("add_messages: the assistant turn is still open; call end_turn first")
        if self._prompted:
            raise TranscriptStateError("add_messages: the next generation prompt is already in the sequence; "
                                       "pass every message of one observation in a single add_messages call")
        if not messages:
            raise ValueError("add_messages: no messages")
        return DeltaRequest(messages=self.messages, new=[_message(m) for m in messages], previous=self._render,
                            turn_text=self._turn_text, turn_stopped=self._turn_stopped, tools=self.tools,
                            template_kwargs=self.template_kwargs)

    def _extend(self, request: DeltaRequest, result: DeltaResult) -> int:
        self.divergences += result.diverged
        self._append_context(result.ids)
        self.messages += request.new
        self._render, self._prompted = result.text, True
        return len(result.ids)
