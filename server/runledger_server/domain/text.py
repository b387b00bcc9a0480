"""Rules for text that reaches storage."""

from __future__ import annotations


def is_utf8(text: str) -> bool:
    """Whether the text can be stored as UTF-8: strings off the wire always can, but a lone surrogate (a local
    file name that is not UTF-8, a JSON escape like "\\ud800" in a page token) cannot."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
