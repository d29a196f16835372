"""Database URLs: the default location, the scheme, and password redaction.

Which backend a URL names, and how that backend opens it, is storage.backends' table.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def default_db_url() -> str:
    """Return the default SQLite URL under $XDG_DATA_HOME (or ~/.local/share); creates nothing."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"sqlite:///{Path(base) / 'ffrtmp' / 'ffrtmp.db'}"


def scheme_of(url: str) -> str:
    """The URL's scheme, lower case ('' when it has none)."""
    return url.split(":", 1)[0].lower() if ":" in url else ""


def redact_url(url: str) -> str:
    """Return the URL with any password replaced by '***' (safe for logs and reprs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable database URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
