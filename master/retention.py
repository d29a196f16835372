"""Retention and scheduled database upkeep for the master.

`Retention` runs inside the master loop: every `interval_s` it looks up at most `batch` terminal
jobs that finished more than `days` ago, and at most `batch` agents lost or left more than
`agent_retention_s` ago (indexed scans), and queues their deletion in the turn's WriteBatch, so
they go out with the normal group commit; a full batch means more are due and the next one
follows after `catch_up_s`. Dispatch is never held up by more than one bounded batch of each.

`Maintenance` is a thread with its own database connection that runs `storage.maintenance.optimize`
(SQLite `PRAGMA optimize` + incremental vacuum; PostgreSQL `ANALYZE`) every `interval_s`, outside
the loop. The full `VACUUM` is an operator's `ffrtmp db vacuum`.
"""

from __future__ import annotations

import logging
import threading
import time

from master.metrics import MasterMetrics
from storage import StorageError, Store, WriteBatch
from storage.maintenance import DAY_S, optimize

log = logging.getLogger("ffrtmp.master")


class Retention:
    """Queues deletions of old terminal jobs and expired agent records into the master's turn
    batch (loop thread only). days <= 0 keeps jobs, agent_retention_s <= 0 keeps agents."""

    def __init__(self, store: Store, metrics: MasterMetrics, days: float,
                 interval_s: float = 60.0, batch: int = 1000, catch_up_s: float = 1.0, *,
                 agent_retention_s: float = 86400.0) -> None:
        self.store = store
        self.metrics = metrics
        self.days = days
        self.interval_s = interval_s
        self.batch = batch
        self.catch_up_s = catch_up_s
        self.agent_retention_s = agent_retention_s
        self.next_at = 0.0

    def tick(self, now: float, wall: float, batch: WriteBatch) -> int:
        """If due, add up to `self.batch` job deletions and as many agent forgets to batch;
        returns how many of both (now monotonic s, wall epoch s)."""
        if now < self.next_at or (self.days <= 0 and self.agent_retention_s <= 0):
            return 0
        try:  # both scans before queueing anything: a turn queues all of it or none
            ids = (self.store.terminal_older_than(wall - self.days * DAY_S, self.batch)
                   if self.days > 0 else [])
            names = (self.store.expired_agents(wall - self.agent_retention_s, self.batch)
                     if self.agent_retention_s > 0 else [])
        except StorageError as e:
            self.metrics.db_errors.labels("retention").inc()
            log.warning("retention scan failed (%s); next try in %.0fs", e, self.interval_s)
            self.next_at = now + self.interval_s
            return 0
        for job_id in ids:
            batch.delete(job_id)
        for name in names:
            batch.forget_agent(name)
        if ids:
            self.metrics.retention_deleted.inc(len(ids))
            log.info("retention: deleting %d terminal jobs finished over %g days ago",
                     len(ids), self.days)
        if names:
            self.metrics.retention_forgotten_agents.inc(len(names))
            log.info("retention: forgetting %d agents lost or left over %gs ago",
                     len(names), self.agent_retention_s)
        full = len(ids) >= self.batch or len(names) >= self.batch
        self.next_at = now + (self.catch_up_s if full else self.interval_s)
        return len(ids) + len(names)


class Maintenance:
    """A thread that runs online database upkeep every interval_s on its own connection."""

    def __init__(self, db_url: str, metrics: MasterMetrics, interval_s: float) -> None:
        self.db_url = db_url
        self.metrics = metrics
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Store | None = None

    def start(self) -> None:
        """Start the thread (nothing happens when interval_s <= 0)."""
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="ffrtmp-db-maintenance",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (waiting for a pass in progress) and close its connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self.run_once()
        finally:
            if self._store is not None:
                self._store.close()
                self._store = None

    def run_once(self) -> str | None:
        """One upkeep pass; returns the operation run, or None if it failed (logged, counted)."""
        started = time.perf_counter()
        op = "optimize"
        try:
            if self._store is None:
                self._store = Store(self.db_url)
            op = optimize(self._store)
        except StorageError as e:
            self.metrics.maintenance.labels(op, "error").inc()
            log.warning("database maintenance failed: %s", e)
            if self._store is not None:
                self._store.close()
            return None
        self.metrics.maintenance.labels(op, "ok").inc()
        log.info("database maintenance: %s in %.3fs", op, time.perf_counter() - started)
        return op
