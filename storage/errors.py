"""The storage package's one error type."""

from __future__ import annotations


class StorageError(Exception):
    """Any failure of the database or of a request to it; the driver's error is the __cause__."""


class Fenced(StorageError):
    """A commit refused because another master has taken a newer epoch (master/leader.py):
    this process no longer leads, and nothing of the commit was written."""


def one_line(e: BaseException) -> str:
    """First line of an exception's text (drivers add DETAIL/HINT lines), or its type name."""
    lines = str(e).strip().splitlines()
    return lines[0].strip() if lines else type(e).__name__
