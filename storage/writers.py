"""Set-based bulk writers on the raw DB-API cursor, one per backend, named by its entry in
storage.backends (peewee's per-row cost is the bottleneck on SQLite, the per-statement round trip
on PostgreSQL)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from bus.vocab import TERMINAL
from storage.models import AGENT_COLUMNS, AGENT_GONE, EVENT_COLUMNS, JOB_COLUMNS, JOB_PG_TYPES
from storage.rows import Params

# Rows per statement on PostgreSQL: one round trip each, and a statement stays a few MB at most.
PG_PAGE = 1000
# Ids per IN list on SQLite, well under its bound-parameter limit.
SQLITE_IN_CHUNK = 500

_JOB_COLS = ", ".join(JOB_COLUMNS)
_EVENT_COLS = ", ".join(EVENT_COLUMNS)
_AGENT_COLS = ", ".join(AGENT_COLUMNS)
_AGENT_UPSERT = (
    "ON CONFLICT (name) DO UPDATE SET state = excluded.state, slots = excluded.slots, "
    "info = excluded.info, last_seen = excluded.last_seen"
)  # first_seen keeps the first sighting
# Retention may delete the newest jobs; the mark keeps the master from reusing their ids.
ID_MARK_KEY = "job_id_mark"
# Likewise for event sequence numbers: clients resume the event stream after a seq they saw.
SEQ_MARK_KEY = "event_seq_mark"
_ID_MARK = (
    "INSERT INTO meta (key, value) VALUES ({p}, {p}) ON CONFLICT (key) DO UPDATE "
    "SET value = excluded.value WHERE CAST(meta.value AS BIGINT) < CAST(excluded.value AS BIGINT)"
)
_TERMINAL = ", ".join(f"'{s}'" for s in sorted(TERMINAL))
# The epoch check of a one-trip transaction (PostgresWriter.script): FOR SHARE waits for a new
# leader's UPDATE of the row and then sees its epoch (READ COMMITTED), as Backend.fence_sql.
# The check raises its own SQLSTATE (class FF is PostgreSQL's to leave unused), so no other
# error, whatever text it quotes, is taken for it; its message is the epoch found.
FENCED_SQLSTATE = "FF001"
_FENCE_DO = (
    "DO $$DECLARE e bigint; BEGIN SELECT epoch INTO e FROM leader WHERE id = 1 FOR SHARE; "
    "IF e IS DISTINCT FROM {epoch} THEN RAISE EXCEPTION USING ERRCODE = '"
    + FENCED_SQLSTATE + "', MESSAGE = coalesce(e::text, 'none'); END IF; END$$"
)
# Agent records that may be forgotten: an agent that came back since stays.
_GONE = ", ".join(f"'{s}'" for s in AGENT_GONE)


class BulkWriter(Protocol):
    """Set-based statements on an open cursor inside the caller's transaction."""

    def insert_jobs(self, cur: Any, rows: Sequence[Params]) -> None:
        """Insert job rows given in JOB_COLUMNS order."""

    def update_jobs(self, cur: Any, cols: tuple[str, ...], rows: Sequence[Params]) -> None:
        """Set cols on each (id, *values) row; ids that do not exist are skipped."""

    def insert_events(self, cur: Any, rows: Sequence[Params]) -> None:
        """Insert job_event rows given in EVENT_COLUMNS order."""

    def upsert_agents(self, cur: Any, rows: Sequence[Params]) -> None:
        """Insert or update agent rows given in AGENT_COLUMNS order."""

    def delete_terminal_jobs(self, cur: Any, ids: Sequence[int]) -> None:
        """Delete those of ids that are terminal jobs, with their events; live jobs stay."""

    def forget_agents(self, cur: Any, names: Sequence[str]) -> None:
        """Delete the records of those of names that are lost or left; the others stay."""

    def raise_mark(self, cur: Any, key: str, value: int) -> None:
        """Raise meta's high-water mark `key` to value (never lower it)."""


class SqliteWriter:
    """executemany: SQLite runs each row in C with no per-row Python or round trip."""

    def insert_jobs(self, cur: Any, rows: Sequence[Params]) -> None:
        """Insert job rows given in JOB_COLUMNS order."""
        marks = ", ".join("?" * len(JOB_COLUMNS))
        cur.executemany(f"INSERT INTO jobs ({_JOB_COLS}) VALUES ({marks})", rows)

    def update_jobs(self, cur: Any, cols: tuple[str, ...], rows: Sequence[Params]) -> None:
        """Set cols on each (id, *values) row; ids that do not exist are skipped."""
        sets = ", ".join(f"{c} = ?" for c in cols)
        # Plain '?' marks (numbered ones with a sequence are deprecated from Python 3.12 on).
        cur.executemany(f"UPDATE jobs SET {sets} WHERE id = ?", [(*r[1:], r[0]) for r in rows])

    def insert_events(self, cur: Any, rows: Sequence[Params]) -> None:
        """Insert job_event rows given in EVENT_COLUMNS order."""
        marks = ", ".join("?" * len(EVENT_COLUMNS))
        cur.executemany(f"INSERT INTO job_events ({_EVENT_COLS}) VALUES ({marks})", rows)

    def upsert_agents(self, cur: Any, rows: Sequence[Params]) -> None:
        """Insert or update agent rows given in AGENT_COLUMNS order."""
        marks = ", ".join("?" * len(AGENT_COLUMNS))
        cur.executemany(f"INSERT INTO agents ({_AGENT_COLS}) VALUES ({marks}) {_AGENT_UPSERT}",
                        rows)

    def delete_terminal_jobs(self, cur: Any, ids: Sequence[int]) -> None:
        """Delete those of ids that are terminal jobs, with their events; live jobs stay."""
        for start in range(0, len(ids), SQLITE_IN_CHUNK):
            chunk = list(ids[start:start + SQLITE_IN_CHUNK])
            marks = ", ".join("?" * len(chunk))
            doomed = f"SELECT id FROM jobs WHERE id IN ({marks}) AND state IN ({_TERMINAL})"
            cur.execute(f"DELETE FROM job_events WHERE job_id IN ({doomed})", chunk)
            cur.execute(f"DELETE FROM jobs WHERE id IN ({doomed})", chunk)

    def forget_agents(self, cur: Any, names: Sequence[str]) -> None:
        """Delete the records of those of names that are lost or left; the others stay."""
        for start in range(0, len(names), SQLITE_IN_CHUNK):
            chunk = list(names[start:start + SQLITE_IN_CHUNK])
            marks = ", ".join("?" * len(chunk))
            cur.execute(f"DELETE FROM agents WHERE name IN ({marks}) AND state IN ({_GONE})",
                        chunk)

    def raise_mark(self, cur: Any, key: str, value: int) -> None:
        """Raise meta's high-water mark `key` to value (never lower it)."""
        cur.execute(_ID_MARK.format(p="?"), (key, str(value)))


class PostgresWriter:
    """execute_values: one multi-row statement (one round trip) per PG_PAGE rows."""

    def __init__(self) -> None:
        """Bind psycopg2's execute_values (imported here so SQLite-only installs need no driver)."""
        from psycopg2.extras import execute_values

        self._values = execute_values

    def insert_jobs(self, cur: Any, rows: Sequence[Params]) -> None:
        """Insert job rows given in JOB_COLUMNS order."""
        self._values(cur, f"INSERT INTO jobs ({_JOB_COLS}) VALUES %s", rows, page_size=PG_PAGE)

    def update_jobs(self, cur: Any, cols: tuple[str, ...], rows: Sequence[Params]) -> None:
        """Set cols on each (id, *values) row; ids that do not exist are skipped."""
        # Casts give the VALUES columns their types; an all-NULL column would be text otherwise.
        template = "(" + ", ".join(f"%s::{JOB_PG_TYPES[c]}" for c in ("id", *cols)) + ")"
        sets = ", ".join(f"{c} = v.{c}" for c in cols)
        names = ", ".join(("id", *cols))
        sql = f"UPDATE jobs SET {sets} FROM (VALUES %s) AS v({names}) WHERE jobs.id = v.id"
        self._values(cur, sql, rows, template=template, page_size=PG_PAGE)

    def insert_events(self, cur: Any, rows: Sequence[Params]) -> None:
        """Insert job_event rows given in EVENT_COLUMNS order."""
        self._values(cur, f"INSERT INTO job_events ({_EVENT_COLS}) VALUES %s", rows,
                       page_size=PG_PAGE)

    def upsert_agents(self, cur: Any, rows: Sequence[Params]) -> None:
        """Insert or update agent rows given in AGENT_COLUMNS order."""
        self._values(cur, f"INSERT INTO agents ({_AGENT_COLS}) VALUES %s {_AGENT_UPSERT}",
                       rows, page_size=PG_PAGE)

    def script(self, cur: Any, epoch: int | None, inserts: Sequence[Params],
               groups: dict[tuple[str, ...], list[Params]], events: Sequence[Params],
               agents: Sequence[Params]) -> bytes:
        """One turn's whole transaction as one query string, sent in one round trip:
        BEGIN, the epoch check (a DO block that raises FENCED_TEXT), the same statements as
        the methods above build, COMMIT. The rows are escaped client-side (mogrify), as
        execute_values does; an error aborts the rest and leaves the transaction to roll back.
        """
        values = self._rows_sql
        parts = [b"BEGIN"]
        if epoch is not None:
            parts.append(_FENCE_DO.format(epoch=int(epoch)).encode())
        if inserts:
            parts.append(f"INSERT INTO jobs ({_JOB_COLS}) VALUES ".encode()
                         + values(cur, inserts))
            parts.append(cur.mogrify(_ID_MARK.format(p="%s"),
                                     (ID_MARK_KEY, str(max(r[0] for r in inserts)))))
        for cols, rows in groups.items():
            template = "(" + ", ".join(f"%s::{JOB_PG_TYPES[c]}" for c in ("id", *cols)) + ")"
            sets = ", ".join(f"{c} = v.{c}" for c in cols)
            names = ", ".join(("id", *cols))
            parts.append(f"UPDATE jobs SET {sets} FROM (VALUES ".encode()
                         + values(cur, rows, template)
                         + f") AS v({names}) WHERE jobs.id = v.id".encode())
        if events:
            parts.append(f"INSERT INTO job_events ({_EVENT_COLS}) VALUES ".encode()
                         + values(cur, events))
        if agents:
            parts.append(f"INSERT INTO agents ({_AGENT_COLS}) VALUES ".encode()
                         + values(cur, agents) + f" {_AGENT_UPSERT}".encode())
        parts.append(b"COMMIT")
        return b";\n".join(parts)

    @staticmethod
    def _rows_sql(cur: Any, rows: Sequence[Params], template: str | None = None) -> bytes:
        mark = template or "(" + ", ".join(["%s"] * len(rows[0])) + ")"
        return b",".join([cur.mogrify(mark, row) for row in rows])

    def delete_terminal_jobs(self, cur: Any, ids: Sequence[int]) -> None:
        """Delete those of ids that are terminal jobs, with their events; live jobs stay."""
        doomed = f"SELECT id FROM jobs WHERE id = ANY(%s) AND state IN ({_TERMINAL})"
        cur.execute(f"DELETE FROM job_events WHERE job_id IN ({doomed})", (list(ids),))
        cur.execute(f"DELETE FROM jobs WHERE id IN ({doomed})", (list(ids),))

    def forget_agents(self, cur: Any, names: Sequence[str]) -> None:
        """Delete the records of those of names that are lost or left; the others stay."""
        cur.execute(f"DELETE FROM agents WHERE name = ANY(%s) AND state IN ({_GONE})",
                    (list(names),))

    def raise_mark(self, cur: Any, key: str, value: int) -> None:
        """Raise meta's high-water mark `key` to value (never lower it)."""
        cur.execute(_ID_MARK.format(p="%s"), (key, str(value)))
