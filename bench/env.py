"""The run's surroundings: a fresh database per run, and what machine and software ran it."""

from __future__ import annotations

import contextlib
import os
import platform
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psutil

from bench.profiles import BenchError

DEFAULT_PG_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
ROOT = Path(__file__).resolve().parent.parent


def pg_server(explicit: str | None = None) -> str:
    """The PostgreSQL server fresh bench databases are created on."""
    return explicit or os.environ.get("FFRTMP_BENCH_PG") or DEFAULT_PG_SERVER


def _pg_admin(server: str, sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(server, connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def fresh_db(db: str | None, workdir: Path,
             pg: str | None = None) -> tuple[str, str, Callable[[], None]]:
    """(url, backend, cleanup) for `sqlite` (a new file), `postgresql` (a new database on the
    bench server, dropped by cleanup) or a full URL (used as it is)."""
    choice = (db or "sqlite").strip()
    if choice == "sqlite":
        workdir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{workdir}/bench.db", "sqlite", lambda: None
    if choice in ("postgresql", "postgres", "pg"):
        import psycopg2

        server = pg_server(pg)
        name = f"ffrtmp_bench_{uuid.uuid4().hex[:10]}"
        try:
            _pg_admin(server, f'CREATE DATABASE "{name}" TEMPLATE template0')
        except psycopg2.Error as e:
            raise BenchError(f"cannot create a database on {_redact(server)}: "
                             f"{' '.join(str(e).split())}") from e
        parts = urlsplit(server)
        url = urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))

        def drop() -> None:
            with contextlib.suppress(Exception):
                _pg_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        return url, "postgresql", drop
    if choice.startswith("sqlite://"):
        return choice, "sqlite", lambda: None
    if choice.startswith(("postgresql://", "postgres://")):
        return choice, "postgresql", lambda: None
    raise BenchError(f"unknown --db {choice!r} (sqlite, postgresql, or a sqlite:// or "
                     "postgresql:// URL)")


def pg_reachable(pg: str | None = None) -> str | None:
    """None if the bench PostgreSQL server answers, else why not (one line)."""
    try:
        import psycopg2

        psycopg2.connect(pg_server(pg), connect_timeout=3).close()
        return None
    except Exception as e:  # driver missing, refused, auth: all mean "skip PostgreSQL"
        return " ".join(str(e).split()) or type(e).__name__


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@",
                                                                 ":***@", 1)))


def db_version(url: str) -> str:
    """The database server's version string."""
    if url.startswith("sqlite"):
        return f"SQLite {sqlite3.sqlite_version}"
    try:
        import psycopg2

        conn = psycopg2.connect(url, connect_timeout=3)
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW server_version")
                return f"PostgreSQL {cur.fetchone()[0]}"
        finally:
            conn.close()
    except Exception:  # a version string is nice to have, never worth failing a run
        return "PostgreSQL (version unknown)"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if head.returncode != 0:
        return {}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def machine() -> dict[str, Any]:
    """What ran the bench: CPU, memory, OS, Python and the libraries that matter here."""
    import msgpack
    import peewee
    import zmq

    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_mb": psutil.virtual_memory().total // 2**20,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "peewee": peewee.__version__,
        "sqlite": sqlite3.sqlite_version,
        "loadavg_at_start": [round(x, 2) for x in load],
        "git": _git(),
        "argv": sys.argv[1:],
    }
