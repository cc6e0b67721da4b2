"""Error messages on one line."""

from __future__ import annotations

LINE_LIMIT = 1000  # characters of a message sculpt prints on its one error line
DETAIL_LIMIT = 400  # characters of another library's message quoted inside one of sculpt's


def one_line(error: BaseException | str, limit: int = DETAIL_LIMIT) -> str:
    """The message of ``error`` on one line: every run of whitespace (newlines included) becomes one
    space; an exception without a message gives its type name; past ``limit`` characters the text is
    cut and ends in " ..." (some libraries put whole tracebacks in their messages)."""
    text = " ".join(str(error).split())
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    return text if len(text) <= limit else text[:limit] + " ..."
