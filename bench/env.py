"""The run's surroundings: a fresh database per run, and what machine and software ran it."""

from __future__ import annotations

import contextlib
import os
import platform
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench.profiles import BenchError
from storage import StorageError, backend_for
from storage.backends import KNOWN, backend_named

DEFAULT_PG_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
ROOT = Path(__file__).resolve().parent.parent


def pg_server(explicit: str | None = None) -> str:
    """The PostgreSQL server fresh bench databases are created on."""
    return explicit or os.environ.get("FFRTMP_BENCH_PG") or DEFAULT_PG_SERVER


def fresh_db(db: str | None, workdir: Path,
             pg: str | None = None) -> tuple[str, str, Callable[[], None]]:
    """(url, backend, cleanup) for a backend's name (`sqlite`: a new file; `postgresql`: a new
    database on the bench server, dropped by cleanup) or a full URL (used as it is)."""
    choice = (db or "sqlite").strip()
    if "://" in choice:
        try:
            return choice, backend_for(choice).name, lambda: None
        except StorageError:
            pass
    elif (backend := backend_named(choice)) is not None:
        try:
            url, drop = backend.scratch(pg_server(pg), workdir, "bench")
        except StorageError as e:
            raise BenchError(str(e)) from e
        return url, backend.name, drop
    names = ", ".join(b.name for b in KNOWN)
    urls = " or ".join(f"{b.schemes[0]}://" for b in KNOWN)
    raise BenchError(f"unknown --db {choice!r} ({names}, or a {urls} URL)")


def pg_reachable(pg: str | None = None) -> str | None:
    """None if the bench PostgreSQL server answers, else why not (one line)."""
    try:
        import psycopg2

        psycopg2.connect(pg_server(pg), connect_timeout=3).close()
        return None
    except Exception as e:  # driver missing, refused, auth: all mean "skip PostgreSQL"
        return " ".join(str(e).split()) or type(e).__name__


def db_version(url: str) -> str:
    """The database server's version string, for a URL fresh_db returned (never raises: it
    is only for the report)."""
    return backend_for(url).version(url)


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
