"""Leadership: which master process may write, and its fencing token (the epoch).

One master leads; the others stand by. What decides is the database the masters share, never a
protocol of our own:

- PostgreSQL (`PgLeader`): a session-level advisory lock held on a dedicated autocommit
  connection, plus a lease (the `leader_lease` row's `renewed`, by the server's clock, and the
  holder's own `lease_s`) that the leader renews every `renew_s`. A new leader takes a new
  `epoch` in the `leader` row (above the last one and at least the server's clock in ms, so a
  restored database never goes back); every group commit checks it inside its own transaction
  (storage.Store.apply), so a deposed leader cannot write. A standby takes the lock as soon as it
  is free (the holder's connection closed: its process died, or its backend was terminated); if
  the holder is there but has not renewed for its `lease_s` (a paused process, a partition), the
  standby terminates the holder's backends first.
- SQLite (`FileLeader`): one master per file, by an exclusive `flock` on `<file>.lock` taken at
  start; a second master is refused with one line. It bumps the epoch too, so agents see the same
  fencing token on both backends.

The leader steps down (`lost`) as soon as its lock connection fails, its renewal finds another
epoch, or it has not renewed for `step_down_s` (< lease_s) by its own clock: it stops before any
standby may take over.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bus.client import advertised
from storage import Store
from storage.backends import backend_for, pg_connect_args, sqlite_path
from storage.db import redact_url
from storage.errors import StorageError, one_line

log = logging.getLogger("ffrtmp.master")

# pg_try_advisory_lock(LOCK_CLASS, LOCK_OBJ): per database, so two ffrtmp databases on one
# server have a leader each. 0x66667274 is "ffrt".
LOCK_CLASS, LOCK_OBJ = 0x66667274, 1
APP_PREFIX = "ffrtmp-master-"  # application_name of every connection of a master process


class LeaderConflict(Exception):
    """Another master holds this SQLite database (one line for the operator)."""


@dataclass(frozen=True)
class Endpoints:
    """Where a master serves: what a standby names in `not_leader`."""

    agents: str
    clients: str
    events: str

    def view(self, instance: str, epoch: int) -> dict[str, Any]:
        """The leader as not_leader, INFO and STATS name it (docs/protocol.md "Masters")."""
        return {"agents": self.agents, "clients": self.clients, "events": self.events,
                "epoch": epoch, "instance": instance}


def advertised_endpoints(agents: str, clients: str, events: str,
                         host: str | None = None) -> Endpoints:
    """The endpoints as a standby names them to agents and clients: a wildcard bind host (`*`,
    0.0.0.0, ::) replaced by `host` (default: this host's name), so that the name matches the
    endpoint agents and clients were given for this master."""
    where = host or socket.gethostname()
    used = f"tcp://[{where}]:1" if ":" in where else f"tcp://{where}:1"
    return Endpoints(*(advertised(ep, used) for ep in (agents, clients, events)))


def tagged_url(url: str, instance: str) -> str:
    """The database URL with this master's application_name, so that a standby taking over
    from a stalled leader can find (and terminate) every connection of that process."""
    if not backend_for(url).servers:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "application_name"]
    query.append(("application_name", APP_PREFIX + instance))
    return urlunsplit(parts._replace(query=urlencode(query)))


class Leader(Protocol):
    """What the server asks of a leadership backend."""

    epoch: int  # this process's epoch while it leads; 0 otherwise
    why: str  # why leadership was last lost ("" if it was not)

    def try_lead(self, store: Store) -> int | None:
        """Try once to become leader: the new epoch, or None (not now). Never blocks long."""

    @property
    def lost(self) -> bool:
        """True once leadership is gone (or was never held); cheap, called every loop turn."""

    def step_down(self) -> None:
        """Give leadership up (idempotent)."""

    def known(self) -> dict[str, Any] | None:
        """The live leader as standbys name it: {agents, clients, events, epoch, instance}."""

    def close(self) -> None:
        """Step down and release everything."""


# ---- SQLite -----------------------------------------------------------------------------------

class FileLeader:
    """One master per SQLite file: an exclusive flock, held for the process's lifetime."""

    def __init__(self, url: str, instance: str, endpoints: Endpoints) -> None:
        """Take the file lock now; LeaderConflict if another master holds it."""
        self.instance, self.endpoints = instance, endpoints
        self.epoch = 0
        self.why = ""
        self._fd: int | None = None
        self._leading = False
        path = sqlite_path(url)
        if path == ":memory:":
            return
        # The resolved path: two names (a symlink, a relative path) for one file, one lock.
        lock = Path(path).expanduser().resolve()
        lock = lock.with_name(lock.name + ".lock")
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError(f"cannot open the master lock {lock}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            raise LeaderConflict(
                f"another master{f' (pid {holder})' if holder else ''} is using "
                f"{Path(path).expanduser()}: SQLite allows one master per database file "
                "(use PostgreSQL for standbys)") from e
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def try_lead(self, store: Store) -> int | None:
        """The file lock is ours: a new epoch, so agents see the restart as on PostgreSQL."""
        e = self.endpoints
        self.epoch = store.take_epoch(self.instance, e.agents, e.clients, e.events, time.time())
        self._leading = True
        return self.epoch

    @property
    def lost(self) -> bool:
        """Never, while the process lives (the lock goes with it)."""
        return not self._leading

    def step_down(self) -> None:
        """Nothing to give up but the flag: the file lock stays until the process ends."""
        self._leading = False

    def known(self) -> dict[str, Any] | None:
        """This process is the only master of its file."""
        return None

    def close(self) -> None:
        """Release the file lock."""
        self._leading = False
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return os.pread(fd, 32, 0).decode().strip()
    return ""


# ---- PostgreSQL -------------------------------------------------------------------------------

_NOW = "EXTRACT(EPOCH FROM clock_timestamp())"  # the database server's clock, s
# The lease has a table of its own: group commits hold the leader row FOR SHARE, and a renewal
# must never wait behind a slow commit (it would time out and depose a healthy leader).
_RENEW = f"UPDATE leader_lease SET renewed = {_NOW} WHERE id = 1 AND epoch = %s"
_LEASE = (f"SELECT l.epoch, l.instance, l.agents, l.clients, l.events, {_NOW} - s.renewed, "
          "s.lease_s FROM leader l, leader_lease s WHERE l.id = 1 AND s.id = 1")
# A new epoch: above the last one and at least the server's clock in ms, so that a database
# restored from a backup never hands out an epoch agents have already seen.
_TAKE = (f"UPDATE leader SET epoch = GREATEST(epoch + 1, CAST({_NOW} * 1000 AS BIGINT)), "
         f"instance = %s, agents = %s, clients = %s, events = %s, since = {_NOW} "
         "WHERE id = 1 RETURNING epoch")
_TAKE_LEASE = (f"UPDATE leader_lease SET epoch = %s, renewed = {_NOW}, lease_s = %s "
               "WHERE id = 1")
# Every backend of the stalled holder: its lock connection and its store's connections.
_TERMINATE = (
    "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a "
    "WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND ("
    " a.application_name = %s OR a.pid IN (SELECT l.pid FROM pg_locks l "
    "  WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = %s AND l.granted))")


class PgLeader:
    """Leadership by a PostgreSQL advisory lock, a lease and an epoch (module docstring)."""

    def __init__(self, url: str, instance: str, endpoints: Endpoints, lease_s: float = 3.0,
                 renew_s: float = 0.5) -> None:
        if not 0 < renew_s * 3 <= lease_s:
            raise ValueError("the lease must be at least three renewals long")
        self.url, self.instance, self.endpoints = url, instance, endpoints
        self.lease_s, self.renew_s = lease_s, renew_s
        self.step_down_s = lease_s * 0.6  # by our own clock: before any standby may take over
        self.epoch = 0
        self._conn: Any = None
        self._lock = threading.Lock()  # the connection: the renewal thread or the loop
        self._renewed = 0.0  # monotonic time of the last good renewal
        self._lost = threading.Event()
        self._lost.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._known: dict[str, Any] | None = None
        self.why = ""  # why leadership was lost, for the log

    # -- connection --------------------------------------------------------------------------

    def _connect(self) -> Any:
        import psycopg2  # here, so a SQLite-only install needs no driver

        if self._conn is not None and not self._conn.closed:
            return self._conn
        dbname, params = pg_connect_args(self.url)  # StorageError: a malformed URL
        params.update(application_name=APP_PREFIX + self.instance,
                      # a partition must not hang the renewal for TCP's two hours
                      keepalives=1, keepalives_idle=1, keepalives_interval=1,
                      keepalives_count=2, tcp_user_timeout=int(self.lease_s * 500),
                      options=f"-c statement_timeout={int(self.lease_s * 500)}")
        self._conn = psycopg2.connect(dbname=dbname, **params)
        self._conn.autocommit = True
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    # -- standby side ------------------------------------------------------------------------

    def try_lead(self, store: Store) -> int | None:
        """One attempt: take the lock if free (terminating a stalled holder first), then a new
        epoch. None if another master leads, or the database cannot be reached."""
        import psycopg2

        with self._lock:
            try:
                cur = self._connect().cursor()
                cur.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, LOCK_OBJ))
                if not cur.fetchone()[0]:
                    self._read_lease(cur, take_over=True)
                    return None
                cur.execute("BEGIN")
                cur.execute("SET LOCAL lock_timeout = %s", (f"{int(self.lease_s * 1000)}ms",))
                e = self.endpoints
                cur.execute(_TAKE, (self.instance, e.agents, e.clients, e.events))
                row = cur.fetchone()
                if row is not None:
                    cur.execute(_TAKE_LEASE, (row[0], self.lease_s))
                cur.execute("COMMIT")
            except psycopg2.Error as err:
                log.warning("leadership: %s: %s", redact_url(self.url), one_line(err))
                self._drop()  # a failed try leaves no lock behind: the session goes with it
                self._known = None  # not known from here: the database did not answer
                return None
            if row is None:
                log.error("leadership: the leader row is missing (schema not migrated?)")
                self._drop()
                return None
            self.epoch = int(row[0])
            self._renewed = time.monotonic()
            self._known = self.endpoints.view(self.instance, self.epoch)
            self._lost.clear()
            self.why = ""
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._thread.start()
        return self.epoch

    def _read_lease(self, cur: Any, take_over: bool) -> None:
        cur.execute(_LEASE)
        row = cur.fetchone()
        if row is None or row[5] is None:
            self._known = None
            return
        epoch, instance, agents, clients, events, age, lease_s = row
        # The holder's own lease length (its heartbeat x liveness), not this process's.
        fresh = float(age) <= (float(lease_s) or self.lease_s)
        self._known = (Endpoints(agents, clients, events).view(instance, int(epoch))
                       if fresh else None)
        if not fresh and take_over:
            log.warning("leadership: leader %s (epoch %d) has not renewed its lease for %.1fs; "
                        "terminating its connections", instance, epoch, float(age))
            cur.execute(_TERMINATE, (APP_PREFIX + str(instance), LOCK_CLASS, LOCK_OBJ))

    def known(self) -> dict[str, Any] | None:
        """The live leader (from the last try_lead's read of the lease), or None."""
        return self._known

    # -- leader side -------------------------------------------------------------------------

    def _renew_loop(self) -> None:
        import psycopg2

        while not self._stop.wait(self.renew_s):
            with self._lock:
                if self._lost.is_set():
                    return
                try:
                    cur = self._connect().cursor()
                    cur.execute(_RENEW, (self.epoch,))
                    if cur.rowcount != 1:
                        self._lose("another master took a newer epoch")
                        return
                    self._renewed = time.monotonic()
                except psycopg2.Error as err:
                    self._lose(f"lock connection failed: {one_line(err)}")
                    return

    def _lose(self, why: str) -> None:
        if not self._lost.is_set():
            self.why = why
            self._lost.set()
        self._drop()  # the lock goes with the session

    @property
    def lost(self) -> bool:
        """Gone: the lock connection failed, another epoch, or no renewal for step_down_s."""
        if self._lost.is_set():
            return True
        if time.monotonic() - self._renewed > self.step_down_s:
            # No lock here: the renewal may be stuck on the connection. The flag is enough to
            # stop acting; step_down() closes the session, or a standby terminates it.
            self.why = self.why or f"no lease renewal for {self.step_down_s:.1f}s"
            self._lost.set()
            return True
        return False

    def step_down(self) -> None:
        """Release the lock (by closing its session) and stop renewing."""
        self._stop.set()
        with self._lock:
            self._lose(self.why or "stepped down")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        self._thread = None
        self.epoch = 0
        self._known = None  # no longer itself; the next try reads the lease

    def close(self) -> None:
        """Step down and close the connection."""
        self.step_down()
        self._drop()


def make_leader(url: str, instance: str, endpoints: Endpoints, lease_s: float = 3.0) -> Leader:
    """The leadership backend for a database URL (FileLeader takes its lock now)."""
    if backend_for(url).servers:
        return PgLeader(url, instance, endpoints, lease_s=lease_s,
                        renew_s=min(0.5, lease_s / 4))
    return FileLeader(url, instance, endpoints)
