"""Agent record expiry on SQLite and PostgreSQL: exactly the agents lost or left before the
cutoff are found and forgotten (never an alive or draining one), in bounded batches, through
the same one-transaction WriteBatch as every other write; Retention does it at its interval."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from bus.vocab import COMPLETED, NODE_ALIVE, NODE_DRAINING, NODE_LEFT, NODE_LOST, QUEUED
from master.metrics import MasterMetrics
from master.retention import Retention
from storage import StorageError, Store, WriteBatch

T0 = 1_700_000_000.0
HOUR = 3600.0


def agent(state: str, last_seen: float, **kw: Any) -> dict[str, Any]:
    return {"state": state, "slots": 2, "info": {"v": 1}, "last_seen": last_seen, **kw}


def job(job_id: int, state: str = QUEUED, **kw: Any) -> dict[str, Any]:
    return {"id": job_id, "scenario": "noop", "spec": {}, "state": state, "priority": 1,
            "created_at": T0 - 30 * 24 * HOUR, **kw}


def names(store: Store) -> list[str]:
    return [a["name"] for a in store.list_agents()]


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    yield s
    s.close()


def seed(store: Store) -> None:
    """Old and recent agents in every state; 'edge' was last seen exactly at T0."""
    batch = WriteBatch()
    for state in (NODE_ALIVE, NODE_DRAINING, NODE_LOST, NODE_LEFT):
        batch.agent(f"{state}-old", **agent(state, T0 - 48 * HOUR))
        batch.agent(f"{state}-new", **agent(state, T0 + HOUR))
    batch.agent("edge", **agent(NODE_LOST, T0))
    batch.agent("lost-older", **agent(NODE_LOST, T0 - 72 * HOUR))
    store.apply(batch)


def test_expired_agents_are_lost_or_left_before_the_cutoff_longest_gone_first(
        store: Store) -> None:
    seed(store)
    assert store.expired_agents(T0, 10) == ["lost-older", "left-old", "lost-old"]
    assert store.expired_agents(T0 + 2 * HOUR, 10) == [
        "lost-older", "left-old", "lost-old", "edge", "left-new", "lost-new"]
    assert store.expired_agents(T0 - 100 * HOUR, 10) == []


def test_expired_agents_bounded_by_limit(store: Store) -> None:
    store.apply(WriteBatch(agents={f"a{i:02}": agent(NODE_LEFT, T0 - i) for i in range(12)}))
    assert store.expired_agents(T0 + 1, 3) == ["a11", "a10", "a09"]
    assert len(store.expired_agents(T0 + 1, 100)) == 12
    assert store.expired_agents(T0 + 1, 0) == []


def test_forget_agent_goes_in_one_transaction_with_other_writes(store: Store) -> None:
    seed(store)
    store.apply(WriteBatch(inserts=[job(1), job(2, COMPLETED, finished_at=T0 - HOUR)],
                           events=[{"id": 1, "job_id": 1, "at": T0, "to_state": QUEUED}]))
    batch = WriteBatch()
    batch.insert(**job(3))
    batch.update(1, state="assigned", agent="fresh")
    batch.event(id=2, job_id=1, at=T0, from_state=QUEUED, to_state="assigned", agent="fresh")
    batch.agent("fresh", **agent(NODE_ALIVE, T0))
    batch.delete(2)
    for name in ("lost-old", "left-old", "alive-old", "draining-old", "nobody"):
        batch.forget_agent(name)
    assert len(batch) == 10 and batch
    store.apply(batch)
    # Alive and draining records are not expiry's to delete, even when asked; unknown is fine.
    assert names(store) == ["alive-new", "alive-old", "draining-new", "draining-old", "edge",
                            "fresh", "left-new", "lost-new", "lost-older"]
    assert [(j["id"], j["state"]) for j in store.get_jobs([1, 2, 3])] == [
        (1, "assigned"), (3, QUEUED)]
    assert [e["to_state"] for e in store.events_for(1)] == [QUEUED, "assigned"]


def test_a_failing_batch_forgets_nothing_and_stays_retryable(store: Store) -> None:
    seed(store)
    store.apply(WriteBatch(inserts=[job(1)]))
    bad = WriteBatch(inserts=[job(1)])  # job 1 exists: the whole batch must fail
    bad.forget_agent("lost-old")
    with pytest.raises(StorageError):
        store.apply(bad)
    assert "lost-old" in names(store)
    bad.inserts.clear()
    store.apply(bad)
    assert "lost-old" not in names(store)


def test_an_agent_upserted_in_the_same_batch_wins_by_its_state(store: Store) -> None:
    seed(store)
    back = WriteBatch()
    back.agent("lost-old", **agent(NODE_ALIVE, T0))  # it came back in the very turn
    back.forget_agent("lost-old")
    gone = WriteBatch()
    gone.agent("alive-old", **agent(NODE_LEFT, T0))  # it left in the very turn
    gone.forget_agent("alive-old")
    store.apply(back)
    store.apply(gone)
    rows = {a["name"]: a for a in store.list_agents()}
    assert rows["lost-old"]["state"] == NODE_ALIVE
    assert rows["lost-old"]["first_seen"] == T0 - 48 * HOUR  # the same record, updated
    assert "alive-old" not in rows


# --------------------------------------------------------------------------- Retention


def test_retention_forgets_expired_agents_in_bounded_batches(store: Store) -> None:
    seed(store)
    store.apply(WriteBatch(inserts=[job(1, COMPLETED, finished_at=T0 - 10 * 24 * HOUR),
                                    job(2, QUEUED)]))
    metrics = MasterMetrics(CollectorRegistry())
    ret = Retention(store, metrics, days=7, interval_s=60, batch=2, catch_up_s=1,
                    agent_retention_s=24 * HOUR)
    wall = T0 + 24 * HOUR  # lost-older, left-old, lost-old are over a day gone
    forgotten: list[str] = []
    deleted: list[int] = []
    now, turns = 1000.0, 0
    while True:
        batch = WriteBatch()
        n = ret.tick(now, wall, batch)
        assert n == len(batch.forgets) + len(batch.deletes) and len(batch.forgets) <= 2
        if n == 0:
            break
        store.apply(batch)  # jobs and agents in the one group commit
        forgotten += batch.forgets
        deleted += batch.deletes
        assert ret.tick(now + 0.5, wall, WriteBatch()) == 0
        assert ret.next_at == now + (1 if len(batch.forgets) == 2 else 60)
        now = ret.next_at
        turns += 1
    assert forgotten == ["lost-older", "left-old", "lost-old"] and turns == 2
    assert deleted == [1]
    assert names(store) == ["alive-new", "alive-old", "draining-new", "draining-old", "edge",
                            "left-new", "lost-new"]
    assert [j["id"] for j in store.get_jobs([1, 2])] == [2]
    assert metrics.registry.get_sample_value("ffrtmp_retention_deleted_jobs_total") == 1


def test_agent_retention_zero_keeps_agents_and_jobs_retention_is_separate(
        store: Store) -> None:
    seed(store)
    store.apply(WriteBatch(inserts=[job(1, COMPLETED, finished_at=T0 - 10 * 24 * HOUR)]))
    metrics = MasterMetrics(CollectorRegistry())
    keep_agents = Retention(store, metrics, days=7, agent_retention_s=0)
    batch = WriteBatch()
    assert keep_agents.tick(0.0, T0 + 1e6, batch) == 1 and batch.forgets == []
    keep_jobs = Retention(store, metrics, days=0, agent_retention_s=HOUR)
    batch = WriteBatch()
    assert keep_jobs.tick(0.0, T0, batch) == 3 and batch.deletes == []
    assert Retention(store, metrics, days=0, agent_retention_s=0).tick(
        0.0, T0 + 1e6, WriteBatch()) == 0


def test_agent_scan_error_queues_nothing_and_is_counted(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(store)
    store.apply(WriteBatch(inserts=[job(1, COMPLETED, finished_at=T0 - 10 * 24 * HOUR)]))
    metrics = MasterMetrics(CollectorRegistry())
    ret = Retention(store, metrics, days=7, interval_s=30, agent_retention_s=HOUR)

    def down(cutoff_wall: float, limit: int) -> list[str]:
        raise StorageError("agent expiry scan failed: server closed the connection")

    monkeypatch.setattr(store, "expired_agents", down)
    batch = WriteBatch()
    assert ret.tick(5.0, T0, batch) == 0 and not batch  # not even the job deletion
    assert ret.next_at == 35.0
    assert metrics.registry.get_sample_value("ffrtmp_db_errors_total", {"op": "retention"}) == 1


def test_a_version_1_database_gains_the_last_seen_index(db_url: str) -> None:
    with Store(db_url) as s:
        s.db.execute_sql("DROP INDEX agents_last_seen")  # as a schema-1 file has it
        meta = s.models.Meta
        meta.update(value="1").where(meta.key == "schema_version").execute()
        assert "agents_last_seen" not in {i.name for i in s.db.get_indexes("agents")}
    with Store(db_url) as s:
        assert "agents_last_seen" in {i.name for i in s.db.get_indexes("agents")}
        assert s.expired_agents(T0, 1) == []
