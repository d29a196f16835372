"""Database upkeep: retention deletes, online optimisation, and the full VACUUM an operator runs.

None of these run inside a transaction (VACUUM cannot); callers use their own Store, never the
master's while it is inside `apply`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from storage.batch import WriteBatch
from storage.errors import StorageError, one_line
from storage.models import TERMINAL_STATES
from storage.repository import _DB_ERRORS, Store

log = logging.getLogger("ffrtmp.storage")

# Pages (4 KiB each by default) one online pass hands back to the file system: a few ms of work.
INCREMENTAL_PAGES = 2000
DAY_S = 86_400.0


@dataclass(frozen=True)
class CleanupResult:
    """What one cleanup did."""

    deleted: int
    batches: int


def cleanup(store: Store, older_than_days: float, batch: int = 1000,
            now: float | None = None, dry_run: bool = False) -> CleanupResult:
    """Delete terminal jobs (and their events) finished more than older_than_days ago, in
    transactions of at most `batch` jobs; live jobs are never touched. dry_run only counts."""
    if older_than_days < 0 or batch < 1:
        raise ValueError("older_than_days >= 0 and batch >= 1 required")
    cutoff = (time.time() if now is None else now) - older_than_days * DAY_S
    if dry_run:
        n = count_terminal_older_than(store, cutoff)
        return CleanupResult(n, -(-n // batch))
    deleted = batches = 0
    while True:
        ids = store.terminal_older_than(cutoff, batch)
        if not ids:
            return CleanupResult(deleted, batches)
        store.apply(WriteBatch(deletes=ids))
        deleted += len(ids)
        batches += 1


def count_terminal_older_than(store: Store, cutoff: float) -> int:
    """How many terminal jobs finished before cutoff (epoch s)."""
    job = store.models.Job
    try:
        return int(job.select().where(job.state.in_(sorted(TERMINAL_STATES))
                                      & (job.finished_at < cutoff)).count())
    except _DB_ERRORS as e:
        raise StorageError(f"count failed on {store.url}: {one_line(e)}") from e


def _execute(store: Store, sql: str, script: bool = False) -> None:
    try:
        if script:  # sqlite3 steps a PRAGMA that returns nothing only once unless run as script
            store.db.connection().executescript(sql)
        else:
            store.db.execute_sql(sql)
    except _DB_ERRORS as e:
        raise StorageError(f"{sql.split('(')[0]} failed on {store.url}: {one_line(e)}") from e


def optimize(store: Store, pages: int = INCREMENTAL_PAGES) -> str:
    """Cheap online upkeep, safe while the master runs; returns the operation's name.

    SQLite: `PRAGMA optimize` (refreshes planner statistics where useful) and, in incremental
    auto-vacuum mode, hands up to `pages` free pages back to the file system. PostgreSQL:
    `ANALYZE` of the job tables (autovacuum does the vacuuming).
    """
    store.db.connect(reuse_if_open=True)
    if store.backend == "sqlite":
        _execute(store, "PRAGMA optimize")
        if auto_vacuum(store) == "incremental":
            _execute(store, f"PRAGMA incremental_vacuum({int(pages)});", script=True)
        return "optimize"
    for table in ("jobs", "job_events", "agents"):
        _execute(store, f"ANALYZE {table}")
    return "analyze"


def vacuum(store: Store) -> None:
    """Full VACUUM, by hand: SQLite rewrites the file (and switches it to incremental
    auto-vacuum, so the master's scheduled passes can shrink it from then on); it blocks
    writers while it runs. PostgreSQL: `VACUUM (ANALYZE)` of the job tables, online."""
    store.db.connect(reuse_if_open=True)
    if store.backend == "sqlite":
        _execute(store, "PRAGMA auto_vacuum = INCREMENTAL")
        _execute(store, "VACUUM")
        _execute(store, "PRAGMA optimize")
        return
    for table in ("jobs", "job_events", "agents"):
        _execute(store, f"VACUUM (ANALYZE) {table}")


def auto_vacuum(store: Store) -> str:
    """SQLite's auto-vacuum mode: 'none', 'full' or 'incremental'."""
    cur = store.db.execute_sql("PRAGMA auto_vacuum")
    return {0: "none", 1: "full", 2: "incremental"}.get(int(cur.fetchone()[0]), "none")


def size_bytes(store: Store) -> int:
    """Size of the database on disk: the SQLite file's pages, or pg_database_size."""
    store.db.connect(reuse_if_open=True)
    if store.backend == "sqlite":
        count = store.db.execute_sql("PRAGMA page_count").fetchone()[0]
        size = store.db.execute_sql("PRAGMA page_size").fetchone()[0]
        return int(count) * int(size)
    return int(store.db.execute_sql("SELECT pg_database_size(current_database())").fetchone()[0])
