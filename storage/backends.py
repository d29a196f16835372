"""The table of storage backends: everything that differs between SQLite and PostgreSQL.

One `Backend` per database: its URL schemes, how it opens a peewee Database, its bulk writer,
its driver's error types and its upkeep. Nothing else in ffrtmp compares backend names; it asks
the entry (`backend_for(url)`, `Store.kind`). Adding a backend is one entry in `KNOWN` plus its
writer in storage.writers.

The upkeep functions take a connected Database and raise the driver's (or peewee's) errors;
storage.maintenance turns those into StorageError. None of them runs inside a transaction.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import peewee

from storage.db import redact_url, scheme_of
from storage.errors import StorageError
from storage.writers import BulkWriter, PostgresWriter, SqliteWriter

# Tables that upkeep (ANALYZE, VACUUM) covers, besides meta.
UPKEEP_TABLES = ("jobs", "job_events", "agents")


@dataclass(frozen=True)
class Backend:
    """One storage backend: plain data and functions, no state."""

    name: str  # what Store.backend and bench reports show
    schemes: tuple[str, ...]  # URL schemes, lower case; the first is the canonical one
    url_form: str  # what a URL looks like, for error messages
    open: Callable[[str], peewee.Database]  # unconnected Database; StorageError if malformed
    writer: Callable[[], BulkWriter]
    errors: tuple[type[BaseException], ...]  # the driver's own error types
    strict_tables: bool  # rejects wrongly typed values itself (STRICT tables)
    # Online upkeep, safe while the master runs: returns the operation's name (a metric label).
    optimize: Callable[[peewee.Database, int], str]
    vacuum: Callable[[peewee.Database], None]  # the full vacuum an operator runs
    size_bytes: Callable[[peewee.Database], int]
    vacuum_mode: Callable[[peewee.Database], str | None]  # auto-vacuum mode, None if none
    version: Callable[[str], str]  # "Name x.y" for a URL, for reports; never raises
    # A fresh empty database (url, drop) for a bench run: on `server` where the backend has
    # servers, else under `workdir`; `tag` names it. StorageError if it cannot be made.
    scratch: Callable[[str, Path, str], tuple[str, Callable[[], None]]]
    # Reads the leader row's epoch inside a group commit's transaction, locked so that a new
    # leader's epoch bump waits for the commit or the commit sees the new epoch (fencing).
    fence_sql: str = "SELECT epoch FROM leader WHERE id = 1"
    servers: bool = False  # several processes on several hosts share it (standbys possible)
    aliases: tuple[str, ...] = ()  # short names accepted besides name and schemes

    def __repr__(self) -> str:
        """Just the name: the functions say nothing useful in a log."""
        return f"Backend({self.name!r})"


# ---- SQLite -----------------------------------------------------------------------------------

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
_AUTO_VACUUM = {0: "none", 1: "full", 2: "incremental"}


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


def _sqlite_auto_vacuum(db: peewee.Database) -> str | None:
    return _AUTO_VACUUM.get(int(db.execute_sql("PRAGMA auto_vacuum").fetchone()[0]), "none")


def _sqlite_optimize(db: peewee.Database, pages: int) -> str:
    # Refreshes planner statistics where useful and, in incremental auto-vacuum mode, hands up
    # to `pages` free pages back to the file system.
    db.execute_sql("PRAGMA optimize")
    if _sqlite_auto_vacuum(db) == "incremental":
        # sqlite3 steps a PRAGMA that returns nothing only once unless run as a script.
        db.connection().executescript(f"PRAGMA incremental_vacuum({int(pages)});")
    return "optimize"


def _sqlite_vacuum(db: peewee.Database) -> None:
    # Rewrites the file, blocking writers meanwhile, and switches it to incremental
    # auto-vacuum so the master's scheduled passes can shrink it from then on.
    db.execute_sql("PRAGMA auto_vacuum = INCREMENTAL")
    db.execute_sql("VACUUM")
    db.execute_sql("PRAGMA optimize")


def _sqlite_size(db: peewee.Database) -> int:
    count = db.execute_sql("PRAGMA page_count").fetchone()[0]
    size = db.execute_sql("PRAGMA page_size").fetchone()[0]
    return int(count) * int(size)


def _sqlite_version(url: str) -> str:
    return f"SQLite {sqlite3.sqlite_version}"  # the library linked in: no file is touched


def _sqlite_scratch(server: str, workdir: Path, tag: str) -> tuple[str, Callable[[], None]]:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create {workdir}: {e}") from e
    return f"sqlite:///{workdir}/{tag}.db", lambda: None


SQLITE = Backend(
    name="sqlite",
    schemes=("sqlite",),
    url_form="sqlite:///PATH",
    open=_open_sqlite,
    writer=SqliteWriter,
    errors=(sqlite3.Error,),
    # STRICT makes SQLite reject wrongly typed values as PostgreSQL does, so a bug shows up on
    # the default backend too (SQLite >= 3.37; older versions get ordinary tables).
    strict_tables=sqlite3.sqlite_version_info >= (3, 37),
    optimize=_sqlite_optimize,
    vacuum=_sqlite_vacuum,
    size_bytes=_sqlite_size,
    vacuum_mode=_sqlite_auto_vacuum,
    version=_sqlite_version,
    scratch=_sqlite_scratch,
)


# ---- PostgreSQL -------------------------------------------------------------------------------

# Without a connect timeout a black-holed host would hang the master for minutes.
PG_CONNECT_TIMEOUT_S = 5
try:
    import psycopg2

    _PG_ERRORS: tuple[type[BaseException], ...] = (psycopg2.Error,)
except ImportError:  # pragma: no cover - SQLite-only install
    _PG_ERRORS = ()


def pg_connect_args(url: str) -> tuple[str, dict[str, Any]]:
    """(database name, libpq keyword arguments) of a postgresql:// URL; StorageError if it is
    malformed or names no database. Query parameters (sslmode=…, connect_timeout=…,
    application_name=…) pass straight to libpq."""
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
    params.update(parse_qsl(parts.query))
    if parts.hostname:
        params["host"] = unquote(parts.hostname)
    if port is not None:
        params["port"] = port
    if parts.username:
        params["user"] = unquote(parts.username)
    if parts.password is not None:
        params["password"] = unquote(parts.password)
    return dbname, params


def _open_postgresql(url: str) -> peewee.PostgresqlDatabase:
    dbname, params = pg_connect_args(url)
    return peewee.PostgresqlDatabase(dbname, **params)


def _pg_optimize(db: peewee.Database, pages: int) -> str:
    for table in UPKEEP_TABLES:  # autovacuum does the vacuuming
        db.execute_sql(f"ANALYZE {table}")
    return "analyze"


def _pg_vacuum(db: peewee.Database) -> None:
    for table in UPKEEP_TABLES:  # online
        db.execute_sql(f"VACUUM (ANALYZE) {table}")


def _pg_size(db: peewee.Database) -> int:
    return int(db.execute_sql("SELECT pg_database_size(current_database())").fetchone()[0])


def _pg_vacuum_mode(db: peewee.Database) -> str | None:
    return None


def _pg_version(url: str) -> str:
    try:
        db = _open_postgresql(url)
        try:
            return f"PostgreSQL {db.execute_sql('SHOW server_version').fetchone()[0]}"
        finally:
            db.close()
    except Exception:  # a version string is nice to have, never worth failing a run
        return "PostgreSQL (version unknown)"


def _pg_admin(server: str, sql: str) -> None:
    import psycopg2  # here, so a SQLite-only install fails only when it asks for PostgreSQL

    # Autocommit: CREATE/DROP DATABASE cannot run inside a transaction.
    conn = psycopg2.connect(server, connect_timeout=PG_CONNECT_TIMEOUT_S)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def _pg_scratch(server: str, workdir: Path, tag: str) -> tuple[str, Callable[[], None]]:
    name = f"ffrtmp_{tag}_{uuid.uuid4().hex[:10]}"
    failures: tuple[type[BaseException], ...] = (*_PG_ERRORS, ImportError)  # or no driver
    try:
        _pg_admin(server, f'CREATE DATABASE "{name}" TEMPLATE template0')
    except failures as e:
        raise StorageError(f"cannot create a database on {redact_url(server)}: "
                           f"{' '.join(str(e).split())}") from e
    parts = urlsplit(server)

    def drop() -> None:
        with contextlib.suppress(Exception):  # cleanup: the run's result matters more
            _pg_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, "")), drop


POSTGRESQL = Backend(
    name="postgresql",
    schemes=("postgresql", "postgres"),
    url_form="postgresql://USER@HOST:PORT/DBNAME",
    open=_open_postgresql,
    writer=PostgresWriter,
    errors=_PG_ERRORS,
    strict_tables=False,  # typed columns already
    optimize=_pg_optimize,
    vacuum=_pg_vacuum,
    size_bytes=_pg_size,
    vacuum_mode=_pg_vacuum_mode,
    version=_pg_version,
    scratch=_pg_scratch,
    # FOR SHARE conflicts with the new leader's UPDATE of the row (master/leader.py): in READ
    # COMMITTED a commit that waited on it re-reads the row and sees the new epoch.
    fence_sql="SELECT epoch FROM leader WHERE id = 1 FOR SHARE",
    servers=True,
    aliases=("pg",),
)


# ---- the registry -----------------------------------------------------------------------------

KNOWN: tuple[Backend, ...] = (SQLITE, POSTGRESQL)
BACKENDS: Mapping[str, Backend] = MappingProxyType({s: b for b in KNOWN for s in b.schemes})


def backend_for(url: str) -> Backend:
    """The backend a database URL's scheme names; StorageError for any other scheme."""
    scheme = scheme_of(url)
    backend = BACKENDS.get(scheme)
    if backend is None:
        raise StorageError(
            f"unsupported database URL scheme {scheme or '(none)'!r}: "
            f"use {' or '.join(b.url_form for b in KNOWN)}"
        )
    return backend


def backend_named(name: str) -> Backend | None:
    """The backend called name (its name, a URL scheme or an alias, any case), or None."""
    wanted = name.strip().lower()
    return next((b for b in KNOWN if wanted in (b.name, *b.schemes, *b.aliases)), None)


def open_database(url: str) -> peewee.Database:
    """Return an unconnected peewee Database for a URL of any known backend."""
    return backend_for(url).open(url)
