"""Contract tests for storage.Store, run on SQLite and PostgreSQL alike (fixture db_url)."""

from __future__ import annotations

import copy
import itertools
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus.vocab import NODE_LEFT, NODE_LOST
from storage import TERMINAL_STATES, StorageError, Store, WriteBatch
from storage.migrations import SCHEMA_VERSION, migrate
from storage.models import EVENT_COLUMNS, JOB_COLUMNS, JOB_DEFAULTS

T0 = 1_700_000_000.0


def job(job_id: int, **kw: Any) -> dict[str, Any]:
    """A minimal insert row; keyword arguments override or add columns."""
    row: dict[str, Any] = {"id": job_id, "scenario": "720p-h264", "spec": {"input": "testsrc"},
                           "state": "queued", "priority": 1, "created_at": T0 + job_id}
    row.update(kw)
    return row


def full(row: dict[str, Any]) -> dict[str, Any]:
    """What the store must return for an inserted row: every column, defaults filled."""
    return {c: row.get(c, JOB_DEFAULTS.get(c)) for c in JOB_COLUMNS}


SEQ = itertools.count(1)  # event sequence numbers: the master gives them, so the tests do too


def created(row: dict[str, Any]) -> dict[str, Any]:
    """The creation event the master writes with an insert."""
    return {"id": next(SEQ), "job_id": row["id"], "at": row["created_at"], "from_state": None,
            "to_state": row["state"], "reason": "submitted", "agent": None, "attempt": 0}


def insert(store: Store, *rows: dict[str, Any]) -> None:
    store.apply(WriteBatch(inserts=list(rows), events=[created(r) for r in rows]))


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    yield s
    s.close()


def test_migrate_is_idempotent_and_keeps_data(db_url: str) -> None:
    with Store(db_url) as s:
        insert(s, job(1))
        assert migrate(s.db, s.models) == SCHEMA_VERSION
    with Store(db_url) as s:
        assert [j["id"] for j in s.get_jobs([1])] == [1]
        meta = s.models.Meta
        assert meta.get(meta.key == "schema_version").value == str(SCHEMA_VERSION)


def test_newer_schema_is_refused(db_url: str) -> None:
    with Store(db_url) as s:
        meta = s.models.Meta
        meta.update(value=str(SCHEMA_VERSION + 1)).where(meta.key == "schema_version").execute()
    with pytest.raises(StorageError, match="newer"):
        Store(db_url)


def test_insert_get_round_trip_with_json_and_nulls(store: Store) -> None:
    rich = job(7, spec={"input": "testsrc:duration=5", "params": {"bitrate": "5M"}, "n": [1, 2]},
               priority=0, attempt=1, max_attempts=5, agent="a1", progress=0.25, bytes_in=2**40,
               exit_code=0, reason="exit_code", started_at=T0 + 8.5, finished_at=T0 + 9.25,
               not_before=None, timeout_s=600.0, output="renders/a.mp4", idem_key="k",
               updated_at=T0 + 9.5, extra={"fps": 29.97, "speed": "1.5x"}, state="completed")
    plain = job(8)
    insert(store, rich, plain)
    got = store.get_jobs([8, 7, 99])
    assert got == [full(rich), full(plain)]
    assert list(got[0]) == list(JOB_COLUMNS)
    assert got[1]["extra"] is None and got[1]["agent"] is None and got[1]["max_attempts"] == 3
    assert store.get_jobs([]) == []
    assert store.max_job_id() == 8


def test_list_jobs_pages_newest_first_and_filters_states(store: Store) -> None:
    insert(store, *(job(i, state="completed" if i % 3 == 0 else "queued") for i in range(1, 11)))
    assert [j["id"] for j in store.list_jobs(limit=4)] == [10, 9, 8, 7]
    assert [j["id"] for j in store.list_jobs(limit=4, before_id=7)] == [6, 5, 4, 3]
    assert [j["id"] for j in store.list_jobs(limit=4, before_id=3)] == [2, 1]
    assert [j["id"] for j in store.list_jobs(states=["completed"])] == [9, 6, 3]
    assert [j["id"] for j in store.list_jobs(states=["completed"], before_id=9)] == [6, 3]
    assert [j["id"] for j in store.list_jobs(states=["completed", "queued"], limit=2)] == [10, 9]
    assert store.list_jobs(states=[]) == []
    assert store.counts_by_state() == {"completed": 3, "queued": 7}


def test_updates_grouped_by_columns_with_nulls_in_one_apply(store: Store) -> None:
    insert(store, job(1), job(2, agent="a9", exit_code=3, reason="x"), job(3), job(4))
    b = WriteBatch()
    b.update(1, state="assigned", agent="a1", attempt=1)
    b.update(2, agent=None, exit_code=None, reason=None, progress=1.0)
    b.update(3, state="assigned", agent="a2", attempt=1)  # same column set as job 1
    b.update(4, extra={"fps": 30}, spec={"new": True}, not_before=None, priority=2)
    b.update(99, state="running")  # unknown id: skipped
    store.apply(b)
    j1, j2, j3, j4 = store.get_jobs([1, 2, 3, 4])
    assert (j1["state"], j1["agent"], j1["attempt"]) == ("assigned", "a1", 1)
    assert (j2["agent"], j2["exit_code"], j2["reason"], j2["progress"]) == (None, None, None, 1.0)
    assert (j3["state"], j3["agent"]) == ("assigned", "a2")
    assert (j4["extra"], j4["spec"], j4["priority"]) == ({"fps": 30}, {"new": True}, 2)
    assert j4["state"] == "queued" and j2["scenario"] == "720p-h264"
    assert store.get_jobs([99]) == []


def test_writebatch_update_merges_later_value_wins() -> None:
    b = WriteBatch()
    assert not b and b.is_empty() and len(b) == 0
    b.update(5, state="assigned", agent="a")
    b.update(5, state="running", progress=0.1)
    b.update(6, state="queued")
    b.event(job_id=5, at=T0, to_state="running")
    assert b.updates == {5: {"state": "running", "agent": "a", "progress": 0.1},
                         6: {"state": "queued"}}
    assert len(b) == 3 and b and not b.is_empty()


def test_events_keep_their_sequence_numbers_and_read_in_order(store: Store) -> None:
    one, two = job(1, attempt=0), job(2)
    b = WriteBatch(inserts=[one, two], events=[created(one), created(two)])
    b.update(1, state="assigned", agent="a1", attempt=1)
    b.event(id=next(SEQ), job_id=1, at=T0 + 2, from_state="queued", to_state="assigned",
            agent="a1", attempt=1)
    store.apply(b)
    b = WriteBatch()
    b.event(id=next(SEQ), job_id=1, at=T0 + 3, from_state="assigned", to_state="running",
            agent="a1", attempt=1, reason=None)
    store.apply(b)
    evs = store.events_for(1)
    assert [{c: e[c] for c in EVENT_COLUMNS if c != "id"} for e in evs] == [
        {"job_id": 1, "at": T0 + 1, "from_state": None, "to_state": "queued",
         "reason": "submitted", "agent": None, "attempt": 0},
        {"job_id": 1, "at": T0 + 2, "from_state": "queued", "to_state": "assigned",
         "reason": None, "agent": "a1", "attempt": 1},
        {"job_id": 1, "at": T0 + 3, "from_state": "assigned", "to_state": "running",
         "reason": None, "agent": "a1", "attempt": 1},
    ]
    seqs = [e["id"] for e in store.events()]
    assert seqs == sorted(seqs) and len(seqs) == 4
    assert [e["id"] for e in store.events(after=seqs[1])] == seqs[2:]
    assert [e["id"] for e in store.events(after=seqs[0], limit=2)] == seqs[1:3]
    assert [e["job_id"] for e in store.events(job_ids=[2])] == [2]
    assert [e["to_state"] for e in store.events_for(2)] == ["queued"]
    assert store.events_for(3) == [] and store.events(job_ids=[]) == []
    assert store.max_event_seq() == seqs[-1]


def test_the_event_seq_mark_survives_retention(store: Store) -> None:
    insert(store, job(1, state="completed", finished_at=T0))
    top = store.max_event_seq()
    store.apply(WriteBatch(deletes=[1]))
    assert store.events() == [] and store.max_event_seq() == top  # never reused


def test_agents_upsert_twice_keeps_first_seen(store: Store) -> None:
    store.apply(WriteBatch(agents={
        "b": {"state": "ready", "slots": 2, "info": {"enc": ["libx264"]}, "first_seen": T0,
              "last_seen": T0},
        "a": {"state": "ready", "slots": 1, "last_seen": T0},
    }))
    b = WriteBatch()
    b.agent("b", state="draining", slots=4, info={"enc": []}, first_seen=T0 + 50,
            last_seen=T0 + 60)
    store.apply(b)
    assert store.list_agents() == [
        {"name": "a", "state": "ready", "slots": 1, "info": {}, "first_seen": T0,
         "last_seen": T0},
        {"name": "b", "state": "draining", "slots": 4, "info": {"enc": []}, "first_seen": T0,
         "last_seen": T0 + 60},
    ]


def test_load_unfinished_excludes_terminal(store: Store) -> None:
    states = ["queued", "assigned", "running", "cancelling", *sorted(TERMINAL_STATES)]
    insert(store, *(job(i, state=s) for i, s in enumerate(states, start=1)))
    assert [(j["id"], j["state"]) for j in store.load_unfinished()] == [
        (1, "queued"), (2, "assigned"), (3, "running"), (4, "cancelling")]


def test_find_idempotent(store: Store) -> None:
    insert(store, job(3, idem_key="k1"), job(1, idem_key="k1"), job(2, idem_key="k2"), job(4))
    assert store.find_idempotent("k1") == [1, 3]
    assert store.find_idempotent("k2") == [2]
    assert store.find_idempotent("nope") == []


def test_retention_deletes_old_terminal_jobs_with_events_never_live_ones(store: Store) -> None:
    insert(store, job(1, state="completed", finished_at=T0 + 10),
           job(2, state="failed", finished_at=T0 + 20),
           job(3, state="cancelled", finished_at=T0 + 200),
           job(4, state="running", finished_at=T0 + 5),  # stale figure on a live job
           job(5, state="timed_out", finished_at=None))
    assert store.terminal_older_than(T0 + 100, limit=10) == [1, 2]
    assert store.terminal_older_than(T0 + 100, limit=1) == [1]
    store.apply(WriteBatch(deletes=[*store.terminal_older_than(T0 + 100, 10), 4, 77]))
    assert [j["id"] for j in store.get_jobs(range(1, 6))] == [3, 4, 5]
    assert store.events_for(1) == [] and store.events_for(2) == []
    assert len(store.events_for(4)) == 1 and len(store.events_for(3)) == 1
    store.apply(WriteBatch(updates={4: {"state": "completed"}}, deletes=[3, 4, 5]))
    assert store.get_jobs(range(1, 6)) == [] and store.max_job_id() == 5  # ids never reused


def test_failing_batch_rolls_back_everything_and_stays_retryable(store: Store) -> None:
    insert(store, job(1))
    bad = WriteBatch(inserts=[job(2), job(1)])  # job 1 exists: the whole batch must fail
    bad.update(1, state="assigned")
    bad.event(id=next(SEQ), job_id=1, at=T0, to_state="assigned")
    bad.agent("a", state="ready", slots=1, last_seen=T0)
    before = copy.deepcopy(bad)
    with pytest.raises(StorageError) as err:
        store.apply(bad)
    assert not isinstance(err.value, type(err.value.__cause__))
    assert bad == before
    assert [j["state"] for j in store.get_jobs([1, 2])] == ["queued"]
    assert len(store.events_for(1)) == 1 and store.list_agents() == []
    bad.inserts.pop()
    store.apply(bad)  # the same batch, fixed, goes through on the same connection
    assert [j["state"] for j in store.get_jobs([1, 2])] == ["assigned", "queued"]


@pytest.mark.parametrize("batch", [
    WriteBatch(inserts=[job(1, colour="red")]),
    WriteBatch(inserts=[{"id": 1, "state": "queued"}]),
    WriteBatch(updates={1: {"nope": 1}}),
    WriteBatch(updates={1: {"id": 2}}),
    WriteBatch(events=[{"id": 1, "job_id": 1, "at": T0}]),
    WriteBatch(events=[{"job_id": 1, "at": T0, "to_state": "queued"}]),
    WriteBatch(agents={"a": {"state": "ready"}}),
    WriteBatch(inserts=[job(1, spec={"x": object()})]),
    pytest.param(WriteBatch(inserts=[job(1, priority="normal")]), marks=pytest.mark.skipif(
        sqlite3.sqlite_version_info < (3, 37), reason="SQLite without STRICT tables")),
], ids=["unknown-col", "missing-col", "bad-update", "update-id", "bad-event", "event-no-seq",
        "bad-agent",
        "bad-json", "bad-type"])
def test_malformed_batch_raises_storage_error(store: Store, batch: WriteBatch) -> None:
    with pytest.raises(StorageError):
        store.apply(batch)
    assert store.max_job_id() == 0


def test_bad_url_scheme_raises_storage_error() -> None:
    with pytest.raises(StorageError, match="'mysql'"):
        Store("mysql://root@localhost/x")


def test_dead_postgresql_raises_storage_error() -> None:
    with pytest.raises(StorageError) as err:
        Store("postgresql://postgres:s3cret@127.0.0.1:1/ffrtmp")
    assert err.value.__cause__ is not None
    assert "s3cret" not in str(err.value)


@pytest.mark.postgres
def test_lost_postgresql_connection_raises_then_recovers(pg_url: str) -> None:
    import psycopg2

    with Store(pg_url) as s:
        insert(s, job(1))
        pid = s.db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
        admin = psycopg2.connect(pg_url, connect_timeout=3)
        try:
            admin.autocommit = True
            with admin.cursor() as cur:  # waits (up to 5 s) until the backend is gone
                cur.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        finally:
            admin.close()
        with pytest.raises(StorageError):
            insert(s, job(2))
        insert(s, job(2))  # reconnected
        assert [j["id"] for j in s.get_jobs([1, 2])] == [1, 2]


# --------------------------------------------------------------------------- property test

IDS = st.integers(1, 12)
STATES = st.sampled_from(["queued", "assigned", "running", "completed", "failed", "cancelled"])
TEXT = st.text("abcxyz", max_size=4)
FLOAT = st.floats(0, 1e9, allow_nan=False, allow_infinity=False)
OPT_FLOAT = st.none() | FLOAT
UPDATE = st.fixed_dictionaries({}, optional={
    "state": STATES, "agent": st.none() | TEXT, "progress": st.floats(0, 1), "attempt":
    st.integers(0, 5), "exit_code": st.none() | st.integers(-9, 255), "finished_at": OPT_FLOAT,
    "extra": st.none() | st.dictionaries(TEXT, st.integers() | TEXT, max_size=2)})
INSERT = st.builds(lambda i, s, f, k: job(i, state=s, finished_at=f, idem_key=k),
                   IDS, STATES, OPT_FLOAT, st.none() | TEXT)
EVENT = st.fixed_dictionaries({"job_id": IDS, "at": FLOAT, "to_state": STATES},
                              optional={"from_state": st.none() | STATES, "reason": st.none()
                                        | TEXT, "agent": st.none() | TEXT,
                                        "attempt": st.integers(0, 5)})
AGENT = st.fixed_dictionaries({"state": st.sampled_from(["ready", "draining", NODE_LOST,
                                                         NODE_LEFT]),
                               "slots": st.integers(0, 8), "last_seen": FLOAT},
                              optional={"info": st.dictionaries(TEXT, st.integers(), max_size=2),
                                        "first_seen": FLOAT})

def _numbered(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**e, "id": next(SEQ)} for e in events]


BATCH = st.builds(WriteBatch, st.lists(INSERT, max_size=4),
                  st.dictionaries(IDS, UPDATE, max_size=4),
                  st.lists(EVENT, max_size=3).map(_numbered),
                  st.dictionaries(st.sampled_from(["a", "b"]), AGENT, max_size=2),
                  st.lists(IDS, max_size=3), st.lists(st.sampled_from(["a", "b", "c"]),
                                                      max_size=2))


class Model:
    """The contract as plain dicts: what Store must hold after the same batches."""

    def __init__(self) -> None:
        self.jobs: dict[int, dict[str, Any]] = {}
        self.events: dict[int, list[dict[str, Any]]] = {}
        self.agents: dict[str, dict[str, Any]] = {}
        self.max_id = 0

    def apply(self, b: WriteBatch) -> bool:
        """Apply b and return True, or return False (unchanged) where Store must refuse it."""
        ids = [r["id"] for r in b.inserts]
        if len(set(ids)) < len(ids) or self.jobs.keys() & set(ids):
            return False
        self.max_id = max([self.max_id, *ids])
        for r in b.inserts:
            self.jobs[r["id"]] = full(r)
        for job_id, fields in b.updates.items():
            if job_id in self.jobs:
                self.jobs[job_id].update(fields)
        for ev in b.events:
            self.events.setdefault(ev["job_id"], []).append(
                {c: ev.get(c, 0 if c == "attempt" else None) for c in EVENT_COLUMNS})
        for name, row in b.agents.items():
            old = self.agents.get(name)
            first = old["first_seen"] if old else row.get("first_seen", row["last_seen"])
            self.agents[name] = {"name": name, "state": row["state"], "slots": row["slots"],
                                 "info": row.get("info", {}), "first_seen": first,
                                 "last_seen": row["last_seen"]}
        for job_id in b.deletes:
            if job_id in self.jobs and self.jobs[job_id]["state"] in TERMINAL_STATES:
                del self.jobs[job_id]
                self.events.pop(job_id, None)
        for name in b.forgets:  # after the upserts; only records still lost or left go
            if name in self.agents and self.agents[name]["state"] in (NODE_LOST, NODE_LEFT):
                del self.agents[name]
        return True


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batches=st.lists(BATCH, min_size=1, max_size=4))
def test_store_matches_dict_model(store: Store, batches: list[WriteBatch]) -> None:
    for table in ("jobs", "job_events", "agents", "meta WHERE key = 'job_id_mark'"):
        store.db.execute_sql(f"DELETE FROM {table}")  # one store serves all examples: reset
    model = Model()
    for b in batches:
        if model.apply(b):
            store.apply(b)
        else:
            with pytest.raises(StorageError):
                store.apply(b)
    assert store.get_jobs(range(1, 13)) == [model.jobs[i] for i in sorted(model.jobs)]
    for i in range(1, 13):
        got = [{c: e[c] for c in EVENT_COLUMNS} for e in store.events_for(i)]
        assert got == model.events.get(i, [])
    assert store.list_agents() == [model.agents[n] for n in sorted(model.agents)]
    assert [j["id"] for j in store.load_unfinished()] == sorted(
        i for i, j in model.jobs.items() if j["state"] not in TERMINAL_STATES)
    assert store.max_job_id() == model.max_id
