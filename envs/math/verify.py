r"""Is a model's answer to a maths question right? Extraction, normalisation and comparison.

The answer is the last `\boxed{...}`, else the final non-empty line with any "answer:" / "the
answer is" / "####" label removed. Numbers compare exactly as fractions, so `1/2`, `0.5`,
`\frac{1}{2}`, `\dfrac12` and `$0.50$` are all one half, `1.5 \times 10^{3}` is 1500; thousands separators (`1,234`, `1{,}234`,
`1 234`), a trailing period, surrounding `$...$`, `\text{units}` or a unit word, and a trailing `%`
are ignored. Anything that is not a number compares as normalised text, and comma-separated lists
compare element by element. Nothing here raises on any input: garbage is just "no answer" or wrong.
"""

import re
from fractions import Fraction

from tidal.envs.answers import MAX_ACTION_CHARS, extract_boxed

__all__ = ["extract_answer", "parse_number", "normalize_text", "is_correct"]

_LABEL = re.compile(
    r"^(?:####|(?:so,?\s+)?(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:=]?|therefore,?|thus,?)\s*", re.IGNORECASE
)
_FRAC = re.compile(r"(-?)\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_TIMES_TEN = re.compile(r"^([+-]?\d+(?:\.\d+)?)\s*(?:\\times|\\cdot|x|\*)\s*10\s*\^\s*\{?\s*([+-]?\d+)\s*\}?$")
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?$", re.IGNORECASE)
_UNIT_SUFFIX = re.compile(r"^(.*?\d)\s*[a-zA-Z][a-zA-Z ]*$")
_PLAIN_INT = re.compile(r"\s*-?\d{1,50}\s*")
_MAX_ANSWER_CHARS = 200
"""Longer "answers" are essays, not answers: they are never parsed as one."""


def extract_answer(text: str) -> str | None:
    r"""The answer part of a response: last `\boxed{}` content, else the labelled final line.

    None when there is none, or when it is longer than an answer can be (an essay, a flood).
    """
    answer = extract_boxed(text)
    if answer is None:
        line = next((ln.strip() for ln in reversed(text[-MAX_ACTION_CHARS:].splitlines()) if ln.strip()), "")
        answer = _LABEL.sub("", line).strip()
    return answer if answer and len(answer) <= _MAX_ANSWER_CHARS else None


def _strip_latex(s: str) -> str:
    s = s.strip()
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) > len(left) + len(right) - 1:
            s = s[len(left) : len(s) - len(right)].strip()
    s = _TEXT.sub(r" \1", s)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\%", "\\$", "^\\circ", "^{\\circ}"):
        s = s.replace(token, "" if token not in ("\\%", "\\$") else token[1])
    s = s.replace("{,}", ",").replace("−", "-")
    return s.strip()


def parse_number(text: str) -> Fraction | None:
    """The exact value of a numeric answer (int, decimal, fraction, LaTeX fraction), or None."""
    if len(text) > _MAX_ANSWER_CHARS:
        return None
    s = _strip_latex(text).rstrip(".").strip()
    s = s.replace("$", "").strip()
    s = re.sub(r"^[a-zA-Z]\w*\s*=\s*", "", s)
    m = _FRAC.fullmatch(s)
    if m is not None:
        sign, num, den = m.group(1), m.group(2) or m.group(3), m.group(4) or m.group(5)
        top, bottom = parse_number(num), parse_number(den)
        if top is None or not bottom:
            return None
        return (-1 if sign else 1) * top / bottom
    s = s.rstrip("%").strip()
    sci = _TIMES_TEN.match(s)
    if sci is not None:
        mantissa, exponent = Fraction(sci.group(1)), int(sci.group(2))
        return mantissa * Fraction(10) ** exponent if abs(exponent) <= 400 else None
    unit = _UNIT_SUFFIX.match(s)
    if unit is not None:
        s = unit.group(1)
    s = re.sub(r"(?<=\d) (?=\d{3}\b)", "", s)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if "/" in s:
        top, _, bottom = s.partition("/")
        a, b = parse_number(top), parse_number(bottom)
        return a / b if a is not None and b else None
    if _NUMBER.match(s):
        exponent = s.lower().partition("e")[2]
        if exponent and abs(int(exponent)) > 400:  # 1e99999999 would take minutes to build exactly
            return None
        try:
            return Fraction(s)
        except (ValueError, ZeroDivisionError, OverflowError):
            return None
    return None


def normalize_text(text: str) -> str:
    """Lower-case text answer with LaTeX wrappers, spaces and a trailing period removed."""
    s = _strip_latex(text).rstrip(".").lower()
    return re.sub(r"\s+", "", s)


def _split_list(s: str) -> list[str] | None:
    s = _strip_latex(s).rstrip(".").strip()
    if s[:1] in "([{" and s[-1:] in ")]}":
        s = s[1:-1]
    parts = [p.strip() for p in s.split(",")]
    return parts if len(parts) > 1 and all(parts) else None


def is_correct(given: str | None, expected: str) -> bool:
    """Whether the extracted answer `given` matches the reference answer `expected`."""
    if given is None or not given.strip() or len(given) > _MAX_ANSWER_CHARS:
        return False
    if _PLAIN_INT.fullmatch(given) and _PLAIN_INT.fullmatch(expected):  # the common case, without Fraction
        return int(given) == int(expected)
    want, got = parse_number(expected), parse_number(given)
    if want is not None:
        return got == want
    want_list, got_list = _split_list(expected), _split_list(given)
    if want_list is not None and got_list is not None:
        return len(want_list) == len(got_list) and all(
            is_correct(g, w) for g, w in zip(got_list, want_list, strict=True)
        )
    return normalize_text(given) == normalize_text(expected)
