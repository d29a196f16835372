"""Database URLs: the default location, parsing, and opening a peewee Database."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import peewee

from storage.errors import StorageError

SQLITE_PRAGMAS: dict[str, object] = {
    # First: it only takes on a new file. Lets scheduled upkeep shrink the file online
    # (storage.maintenance); older files switch with `ffrtmp db vacuum`.
    "auto_vacuum": "incremental",
    "journal_mode": "wal",
    "synchronous": "normal",
    "busy_timeout": 5000,
    "foreign_keys": 1,
    "cache_size": -64000,
}
PG_SCHEMES = ("postgresql", "postgres")
# Without a connect timeout a black-holed host would hang the master for minutes.
PG_CONNECT_TIMEOUT_S = 5


def default_db_url() -> str:
    """Return the default SQLite URL under $XDG_DATA_HOME (or ~/.local/share); creates nothing."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"sqlite:///{Path(base) / 'ffrtmp' / 'ffrtmp.db'}"


def backend_of(url: str) -> str:
    """Return 'sqlite' or 'postgresql' for a database URL; StorageError for any other scheme."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        return "sqlite"
    if scheme in PG_SCHEMES:
        return "postgresql"
    raise StorageError(
        f"unsupported database URL scheme {scheme or '(none)'!r}: "
        "use sqlite:///PATH or postgresql://USER@HOST:PORT/DBNAME"
    )


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


def sqlite_path(url: str) -> str:
    """Return the file path (or ':memory:') of a sqlite:/// URL; StorageError if malformed."""
    prefix = "sqlite:///"
    if not url.lower().startswith(prefix):
        raise StorageError(f"malformed SQLite URL {url!r}: expected sqlite:///PATH")
    path = unquote(url[len(prefix):])
    if not path:
        raise StorageError(f"malformed SQLite URL {url!r}: empty path")
    return path


def _open_sqlite(url: str) -> peewee.SqliteDatabase:
    path = sqlite_path(url)
    if path != ":memory:":
        try:
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create directory for {path}: {e}") from e
        path = str(Path(path).expanduser())
    return peewee.SqliteDatabase(path, pragmas=SQLITE_PRAGMAS)


def _open_postgresql(url: str) -> peewee.PostgresqlDatabase:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise StorageError(f"malformed PostgreSQL URL {redact_url(url)!r}: {e}") from e
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname:
        raise StorageError(f"PostgreSQL URL {redact_url(url)!r} names no database")
    params: dict[str, Any] = {
        "connect_timeout": PG_CONNECT_TIMEOUT_S,
        "application_name": "ffrtmp",
    }
    # Query parameters (sslmode=…, connect_timeout=…) pass straight to libpq.
    params.update(parse_qsl(parts.query))
    if parts.hostname:
        params["host"] = unquote(parts.hostname)
    if port is not None:
        params["port"] = port
    if parts.username:
        params["user"] = unquote(parts.username)
    if parts.password is not None:
        params["password"] = unquote(parts.password)
    return peewee.PostgresqlDatabase(dbname, **params)


def open_database(url: str) -> peewee.Database:
    """Return an unconnected peewee Database for a sqlite:/// or postgresql:// URL."""
    if backend_of(url) == "sqlite":
        return _open_sqlite(url)
    return _open_postgresql(url)
