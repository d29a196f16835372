"""Store: the job repository. One transaction per apply(); reads return plain dicts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import peewee

from bus.vocab import TERMINAL
from storage.backends import backend_for
from storage.batch import WriteBatch
from storage.db import redact_url
from storage.errors import Fenced, StorageError, one_line
from storage.migrations import migrate
from storage.models import AGENT_GONE, AGENT_JSON, JOB_JSON, make_models
from storage.rows import (
    agent_params,
    decode_json,
    event_params,
    job_insert_params,
    job_update_groups,
)
from storage.writers import FENCED_SQLSTATE, ID_MARK_KEY, SEQ_MARK_KEY, BulkWriter

# Ids per IN list in reads, well under SQLite's bound-parameter limit.
_READ_CHUNK = 500
Row = dict[str, Any]


def _decode(row: Row, json_cols: frozenset[str]) -> Row:
    for col in json_cols:
        row[col] = decode_json(row[col])
    return row


class Store:
    """The job repository on one database URL; single-threaded use by the master."""

    def __init__(self, url: str) -> None:
        """Open the database at url and migrate it; StorageError if that fails."""
        self.url = redact_url(url)
        self.kind = backend_for(url)
        # What a failing database call may raise: turned into StorageError at this boundary.
        self.errors: tuple[type[BaseException], ...] = (peewee.PeeweeException,
                                                         *self.kind.errors)
        self.db = self.kind.open(url)
        self.models = make_models(self.db, strict=self.kind.strict_tables)
        self._writer: BulkWriter = self.kind.writer()
        self.epoch: int | None = None  # the leader's epoch every apply() checks (fence())
        failures: tuple[type[BaseException], ...] = (StorageError, *self.errors)
        try:
            self.db.connect(reuse_if_open=True)
            migrate(self.db, self.models)
        except failures as e:
            self.close()
            raise StorageError(f"cannot open {self.url}: {one_line(e)}") from e

    @property
    def backend(self) -> str:
        """The backend's name ('sqlite', 'postgresql'); its table entry is `kind`."""
        return self.kind.name

    def __repr__(self) -> str:
        """Show backend and URL, never a password."""
        return f"Store(backend={self.backend!r}, url={self.url!r})"

    def __enter__(self) -> Store:
        """Use as a context manager that closes the store."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Close the store."""
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent; a later call reconnects)."""
        try:
            self.db.close()
        except self.errors:
            self.db.dispose()  # a dead connection: just forget it

    @contextmanager
    def _guard(self, what: str, extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
        """Turn driver/peewee errors into StorageError and drop a connection that died."""
        try:
            yield
        except StorageError:
            self._drop_if_broken()
            raise
        except self.errors + extra as e:
            self._drop_if_broken()
            raise StorageError(f"{what} failed on {self.url}: {one_line(e)}") from e

    def _drop_if_broken(self) -> None:
        # After a lost server the next call must reconnect rather than reuse a dead socket.
        if not self.db.is_closed() and not self.db.is_connection_usable():
            self.close()

    # -- writes ----------------------------------------------------------------------------

    def apply(self, batch: WriteBatch) -> None:
        """Write the whole batch in ONE transaction, or nothing and raise StorageError."""
        # Order: inserts (+ their 'submitted' events), updates, events, agent upserts, deletes,
        # agent forgets. Updates of missing ids are skipped; deletes remove terminal jobs only,
        # forgets lost or left agents only (so one upserted alive in this batch stays). The
        # batch is never modified, so the caller can retry it as is.
        if not batch:
            return
        with self._guard("apply", (Exception,)):
            inserts = job_insert_params(batch.inserts)
            groups = job_update_groups(batch.updates)
            events = event_params(batch)
            agents = agent_params(batch.agents)
            deletes = list(batch.deletes)
            forgets = list(batch.forgets)
            w = self._writer
            script = getattr(w, "script", None)
            if script is not None and not deletes and not forgets:
                self._one_trip(script, inserts, groups, events, agents)
                return
            with self.db.atomic():
                cur = self.db.cursor()
                if self.epoch is not None:
                    cur.execute(self.kind.fence_sql)
                    row = cur.fetchone()
                    found = int(row[0]) if row else None
                    if found != self.epoch:
                        raise Fenced(f"commit refused: this master's epoch is {self.epoch}, "
                                     f"the database's {found}: another master leads")
                if inserts:
                    w.insert_jobs(cur, inserts)
                    w.raise_mark(cur, ID_MARK_KEY, max(r[0] for r in inserts))
                for cols, rows in groups.items():
                    w.update_jobs(cur, cols, rows)
                if events:
                    w.insert_events(cur, events)
                if agents:
                    w.upsert_agents(cur, agents)
                if deletes:  # the newest events may go: keep their seq from being reused
                    cur.execute("SELECT MAX(id) FROM job_events")
                    w.raise_mark(cur, SEQ_MARK_KEY, int(cur.fetchone()[0] or 0))
                    w.delete_terminal_jobs(cur, deletes)
                if forgets:
                    w.forget_agents(cur, forgets)

    def _one_trip(self, script: Any, inserts: list[Any], groups: dict[Any, Any],
                  events: list[Any], agents: list[Any]) -> None:
        """The batch as one query string (PostgreSQL: one round trip for the whole commit);
        on any error the transaction is rolled back, a failed epoch check raises Fenced."""
        conn = self.db.connection()
        cur = conn.cursor()
        try:
            cur.execute(script(cur, self.epoch, inserts, groups, events, agents))
        except self.errors as e:
            with contextlib.suppress(*self.errors):
                if not conn.closed:
                    cur.execute("ROLLBACK")
            if getattr(e, "pgcode", None) == FENCED_SQLSTATE:
                found = getattr(getattr(e, "diag", None), "message_primary", None) or "?"
                raise Fenced(f"commit refused: this master's epoch is {self.epoch}, the "
                             f"database's {found}: another master leads") from e
            raise
        finally:
            cur.close()

    def fence(self, epoch: int | None) -> None:
        """Check from now on, inside every apply(), that the leader row's epoch is `epoch`
        (None: no check, for tools that are not a master)."""
        self.epoch = epoch

    def take_epoch(self, instance: str, agents: str, clients: str, events: str,
                   wall: float) -> int:
        """Lead with a new epoch (SQLite: the file lock makes this process the only master) and
        name this master; returns the epoch: above the last one and at least `wall` in ms, so
        a database restored from a backup never hands out an epoch agents have seen."""
        leader = self.models.Leader
        with self._guard("take epoch"), self.db.atomic():
            old = int(leader.get_by_id(1).epoch)
            epoch = max(old + 1, int(wall * 1000))
            (leader.update(epoch=epoch, instance=instance, agents=agents, clients=clients,
                           events=events, since=wall).where(leader.id == 1).execute())
            return epoch

    def leader_row(self) -> Row | None:
        """The leader row as stored (epoch, instance, endpoints, since), or None."""
        leader = self.models.Leader
        rows = self._rows("read leader", leader.select().where(leader.id == 1))
        return rows[0] if rows else None

    # -- reads -----------------------------------------------------------------------------

    def _rows(self, what: str, query: Any, json_cols: frozenset[str] = frozenset()) -> list[Row]:
        # Built by peewee, run on the raw cursor: peewee's per-row conversion would cost ~10 µs.
        with self._guard(what, (ValueError,)):
            cur = self.db.execute(query)
            cols = [d[0] for d in cur.description]
            return [_decode(dict(zip(cols, r, strict=True)), json_cols) for r in cur.fetchall()]

    def _jobs(self, query: Any) -> list[Row]:
        return self._rows("read jobs", query, JOB_JSON)

    def get_jobs(self, ids: Iterable[int]) -> list[Row]:
        """Jobs with these ids, id ascending; unknown ids are left out."""
        job = self.models.Job
        wanted = sorted(set(ids))
        out: list[Row] = []
        for start in range(0, len(wanted), _READ_CHUNK):
            chunk = wanted[start:start + _READ_CHUNK]
            out += self._jobs(job.select().where(job.id.in_(chunk)).order_by(job.id))
        return out

    def list_jobs(self, states: list[str] | None = None, limit: int = 100,
                  before_id: int | None = None, scenarios: list[str] | None = None,
                  agent: str | None = None, since: float | None = None) -> list[Row]:
        """Up to limit jobs, newest (highest id) first, filtered by every filter given: in
        states, of scenarios (None: any; an empty list matches nothing), last placed on agent,
        created at or after since (epoch s), below before_id."""
        job = self.models.Job
        query = job.select()
        for column, values in ((job.state, states), (job.scenario, scenarios)):
            if values is not None:
                if not values:
                    return []
                query = query.where(column.in_(list(values)))
        if agent is not None:
            query = query.where(job.agent == agent)
        if since is not None:
            query = query.where(job.created_at >= since)
        if before_id is not None:
            query = query.where(job.id < before_id)
        return self._jobs(query.order_by(job.id.desc()).limit(limit))

    def load_unfinished(self) -> list[Row]:
        """Every job not in a terminal state, id ascending (the master's restart load)."""
        job = self.models.Job
        query = job.select().where(job.state.not_in(sorted(TERMINAL)))
        return self._jobs(query.order_by(job.id))

    def events_for(self, job_id: int) -> list[Row]:
        """The job's events in the order they were written (id ascending)."""
        return self.events(job_ids=[job_id])

    def events(self, after: int = 0, limit: int | None = None,
               job_ids: Iterable[int] | None = None) -> list[Row]:
        """Events with sequence number (id) above `after`, ascending, at most `limit`;
        only those of `job_ids` if given."""
        ev = self.models.JobEvent
        query = ev.select().where(ev.id > after)
        if job_ids is not None:
            wanted = sorted(set(job_ids))
            if not wanted:
                return []
            if len(wanted) > _READ_CHUNK:  # one IN list per chunk, merged in seq order
                out = [r for start in range(0, len(wanted), _READ_CHUNK)
                       for r in self.events(after, limit, wanted[start:start + _READ_CHUNK])]
                out.sort(key=lambda r: r["id"])
                return out[:limit] if limit is not None else out
            query = query.where(ev.job_id.in_(wanted))
        query = query.order_by(ev.id)
        if limit is not None:
            query = query.limit(limit)
        return self._rows("read events", query)

    def max_event_seq(self) -> int:
        """Highest event sequence number ever written (even if retention deleted it since)."""
        return self._highest(self.models.JobEvent, SEQ_MARK_KEY, "max event seq")

    def _highest(self, model: Any, mark_key: str, what: str) -> int:
        """The larger of model's highest id and meta's high-water mark `mark_key`; 0 if none."""
        meta = self.models.Meta
        with self._guard(what):
            present = model.select(peewee.fn.MAX(model.id)).scalar() or 0
            mark = meta.get_or_none(meta.key == mark_key)
            return max(int(present), int(mark.value) if mark else 0)

    def find_idempotent(self, key: str) -> list[int]:
        """Ids of jobs submitted with this idempotency key, ascending."""
        job = self.models.Job
        with self._guard("idempotency lookup"):
            query = job.select(job.id).where(job.idem_key == key).order_by(job.id)
            return [r[0] for r in query.tuples().iterator()]

    def list_agents(self) -> list[Row]:
        """Every known agent, by name, with info decoded."""
        agent = self.models.Agent
        return self._rows("read agents", agent.select().order_by(agent.name), AGENT_JSON)

    def counts_by_state(self) -> dict[str, int]:
        """Number of jobs per state (states with no job are absent)."""
        job = self.models.Job
        with self._guard("count jobs"):
            query = job.select(job.state, peewee.fn.COUNT(job.id)).group_by(job.state)
            return {state: int(n) for state, n in query.tuples().iterator()}

    def max_job_id(self) -> int:
        """Highest job id ever inserted, even if retention deleted it since; 0 for a fresh db."""
        return self._highest(self.models.Job, ID_MARK_KEY, "max job id")

    def terminal_older_than(self, cutoff: float, limit: int) -> list[int]:
        """Up to limit ids of terminal jobs with finished_at < cutoff (epoch s), oldest first."""
        job = self.models.Job
        with self._guard("retention scan"):
            query = (job.select(job.id)
                     .where(job.state.in_(sorted(TERMINAL)) & (job.finished_at < cutoff))
                     .order_by(job.finished_at, job.id).limit(limit))
            return [r[0] for r in query.tuples().iterator()]

    def expired_agents(self, cutoff_wall: float, limit: int) -> list[str]:
        """Up to limit names of agents lost or left with last_seen < cutoff_wall (epoch s),
        longest gone first."""
        agent = self.models.Agent
        with self._guard("agent expiry scan"):
            query = (agent.select(agent.name)
                     .where(agent.state.in_(AGENT_GONE) & (agent.last_seen < cutoff_wall))
                     .order_by(agent.last_seen, agent.name).limit(limit))
            return [r[0] for r in query.tuples().iterator()]
