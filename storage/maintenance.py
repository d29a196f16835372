"""Database upkeep: retention deletes, online optimisation, and the full VACUUM an operator runs.

What each backend does for an operation is its entry in storage.backends; this file connects,
calls it and turns the driver's errors into StorageError. None of these run inside a transaction
(VACUUM cannot); callers use their own Store, never the master's while it is inside `apply`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import peewee

from bus.vocab import TERMINAL
from storage.batch import WriteBatch
from storage.errors import StorageError, one_line
from storage.repository import Store

T = TypeVar("T")

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
        return int(job.select().where(job.state.in_(sorted(TERMINAL))
                                      & (job.finished_at < cutoff)).count())
    except store.errors as e:
        raise StorageError(f"count failed on {store.url}: {one_line(e)}") from e


def _upkeep(store: Store, what: str, op: Callable[[peewee.Database], T]) -> T:
    try:
        store.db.connect(reuse_if_open=True)
        return op(store.db)
    except store.errors as e:
        raise StorageError(f"{what} failed on {store.url}: {one_line(e)}") from e


def optimize(store: Store, pages: int = INCREMENTAL_PAGES) -> str:
    """Cheap online upkeep, safe while the master runs; returns the operation's name.

    SQLite: `PRAGMA optimize` (refreshes planner statistics where useful) and, in incremental
    auto-vacuum mode, hands up to `pages` free pages back to the file system. PostgreSQL:
    `ANALYZE` of the job tables (autovacuum does the vacuuming).
    """
    return _upkeep(store, "optimize", lambda db: store.kind.optimize(db, pages))


def vacuum(store: Store) -> None:
    """Full VACUUM, by hand: SQLite rewrites the file (and switches it to incremental
    auto-vacuum, so the master's scheduled passes can shrink it from then on); it blocks
    writers while it runs. PostgreSQL: `VACUUM (ANALYZE)` of the job tables, online."""
    _upkeep(store, "vacuum", store.kind.vacuum)


def auto_vacuum(store: Store) -> str | None:
    """The auto-vacuum mode ('none', 'full' or 'incremental' on SQLite); None on a backend
    that has no such setting (PostgreSQL)."""
    return _upkeep(store, "auto_vacuum", store.kind.vacuum_mode)


def size_bytes(store: Store) -> int:
    """Size of the database on disk: the SQLite file's pages, or pg_database_size."""
    return _upkeep(store, "size", store.kind.size_bytes)
