"""Finding `<tag>...</tag>` in model output in linear time.

A regex such as `<python>(.*?)</python>` retries from every unclosed opening tag, so an output of
20,000 `<python>` tags costs minutes of regex matching on the event loop. The first opening tag
that has a closing tag after it is the one the regex would match; two `str.find` calls find it.
"""

__all__ = ["first_tagged"]


def first_tagged(text: str, tag: str) -> tuple[str, int, int] | None:
    """(content, index of `<tag>`, index just past `</tag>`) of the first complete element, or None.

    >>> first_tagged("a <b>x</b> <b>y</b>", "b")
    ('x', 2, 10)
    """
    opening, closing = f"<{tag}>", f"</{tag}>"
    start = text.find(opening)
    if start < 0:
        return None
    end = text.find(closing, start + len(opening))
    if end < 0:
        return None
    return text[start + len(opening) : end], start, end + len(closing)
