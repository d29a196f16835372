"""The storage package's one error type."""

from __future__ import annotations


class StorageError(Exception):
    """Any failure of the database or of a request to it; the driver's error is the __cause__."""


def one_line(e: BaseException) -> str:
    """First line of an exception's text (drivers add DETAIL/HINT lines), or its type name."""
    lines = str(e).strip().splitlines()
    return lines[0].strip() if lines else type(e).__name__
