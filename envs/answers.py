r"""Lenient answer extraction from model output: the last `\boxed{...}`, else the final line.

GEM's games and math envs read actions as `\boxed{...}`; we match that so the same prompts work,
and fall back to the last non-empty line for models that answer plainly. Parsing is linear in the
action's length and never raises, so a huge or garbled action is just "no answer".
"""

import re

__all__ = ["MAX_ACTION_CHARS", "extract_boxed", "final_answer", "clip"]

MAX_ACTION_CHARS = 65536
r"""Only the last this-many characters are parsed: answers come last, and a 10 MB action stays cheap."""

_BOXED = re.compile(r"\\boxed\s*\{")
_BRACE = re.compile(r"[{}]")


def extract_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` that closes (nested braces allowed), stripped; else None."""
    text = text[-MAX_ACTION_CHARS:]
    last = text.rfind("\\boxed{")
    if last >= 0:  # the common case: one flat \boxed{...}, found without a regex
        end = text.find("}", last + 7)
        if end >= 0 and "{" not in text[last + 7 : end]:
            return text[last + 7 : end].strip()
    starts = [m.end() - 1 for m in _BOXED.finditer(text)]
    if not starts:
        return None
    closing: dict[int, int] = {}
    opened: list[int] = []
    for m in _BRACE.finditer(text, starts[0]):
        if m.group() == "{":
            opened.append(m.start())
        elif opened:
            closing[opened.pop()] = m.start()
    for brace in reversed(starts):
        if brace in closing:
            return text[brace + 1 : closing[brace]].strip()
    return None


def final_answer(text: str) -> str | None:
    r"""`\boxed{}` content if any, else the last non-empty line (minus an "answer:" label); None if empty."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    for line in reversed(text[-MAX_ACTION_CHARS:].splitlines()):
        line = line.strip()
        if line:
            return re.sub(r"^(final\s+)?answer\s*[:=]\s*", "", line, flags=re.IGNORECASE).strip() or None
    return None


def clip(text: str, limit: int = 80) -> str:
    """A short, single-line rendering of an action for feedback messages."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
