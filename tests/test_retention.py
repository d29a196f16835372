"""Retention and database upkeep on SQLite and PostgreSQL: exactly the old terminal jobs go (with
their events), never a live one; the master does it in the background while it dispatches;
`ffrtmp db migrate|cleanup|vacuum` by hand."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from conftest import wait_for
from harness import ROOT, Cluster
from master.metrics import MasterMetrics
from master.retention import Maintenance, Retention
from storage import StorageError, Store, WriteBatch
from storage.maintenance import DAY_S, auto_vacuum, cleanup, optimize, vacuum

NOW = time.time()
TERMINAL = ("completed", "failed", "timed_out", "cancelled")


def row(job_id: int, state: str, finished_days_ago: float | None, **kw: Any) -> dict[str, Any]:
    finished = None if finished_days_ago is None else NOW - finished_days_ago * DAY_S
    created = NOW - 30 * DAY_S
    r = {"id": job_id, "scenario": "noop", "spec": {"scenario": "noop", "params": {},
                                                     "max_attempts": 3},
         "state": state, "priority": 1, "created_at": created, "finished_at": finished,
         "extra": {"requires": "workload:noop"}}
    r.update(kw)
    return r


def seed(store: Store) -> dict[str, set[int]]:
    """Old and recent terminal jobs of every state, and live jobs that look old, with events."""
    rows: list[dict[str, Any]] = []
    groups: dict[str, set[int]] = {"old": set(), "recent": set(), "live": set()}
    next_id = 1
    for state in TERMINAL:
        for days, group in ((8.0, "old"), (30.0, "old"), (6.9, "recent"), (0.01, "recent")):
            rows.append(row(next_id, state, days))
            groups[group].add(next_id)
            next_id += 1
    # Live jobs are never retention's business, even with an ancient finished_at (a retried
    # job keeps what an earlier attempt wrote) or none at all.
    live: list[tuple[str, float | None]] = [("queued", None), ("queued", 20.0),
                                            ("running", 20.0), ("assigned", None),
                                            ("cancelling", 15.0)]
    for state, ago in live:
        rows.append(row(next_id, state, ago, agent="gone" if state != "queued" else None))
        groups["live"].add(next_id)
        next_id += 1
    batch = WriteBatch(inserts=rows)
    for r in rows:
        batch.event(id=r["id"], job_id=r["id"], at=r["created_at"] + 1, from_state="queued",
                    to_state=r["state"], reason=None, agent=None, attempt=1)
    store.apply(batch)
    return groups


def present(store: Store, ids: set[int]) -> set[int]:
    return {r["id"] for r in store.get_jobs(ids)}


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    yield s
    s.close()


def test_retention_deletes_exactly_old_terminal_jobs_in_bounded_batches(store: Store) -> None:
    groups = seed(store)
    metrics = MasterMetrics(CollectorRegistry())
    ret = Retention(store, metrics, days=7, interval_s=60, batch=3, catch_up_s=1)
    deleted, now, turns = [], 1000.0, 0
    while True:
        batch = WriteBatch()
        n = ret.tick(now, NOW, batch)
        assert n == len(batch.deletes) <= 3 and not (batch.inserts or batch.updates)
        if n == 0:
            break
        store.apply(batch)
        deleted += batch.deletes
        # A full batch means more may be due: the next one comes after catch_up_s, not before.
        assert ret.tick(now + 0.5, NOW, WriteBatch()) == 0
        assert ret.next_at == now + (1 if n == 3 else 60)
        now = ret.next_at
        turns += 1
    assert sorted(deleted) == sorted(groups["old"]) and turns == 3  # 8 jobs, 3 per turn
    everything = groups["old"] | groups["recent"] | groups["live"]
    assert present(store, everything) == groups["recent"] | groups["live"]
    for job_id in groups["old"]:
        assert store.events_for(job_id) == []
    for job_id in groups["recent"] | groups["live"]:
        assert len(store.events_for(job_id)) == 1  # ours (an insert writes no event itself)
    assert metrics.registry.get_sample_value("ffrtmp_retention_deleted_jobs_total") == 8
    assert store.max_job_id() == max(everything)  # ids are never reused after retention


def test_retention_off_and_store_errors_are_contained(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(store)
    metrics = MasterMetrics(CollectorRegistry())
    assert Retention(store, metrics, days=0).tick(0.0, NOW, WriteBatch()) == 0
    ret = Retention(store, metrics, days=7, interval_s=30)

    def down(cutoff: float, limit: int) -> list[int]:
        raise StorageError("retention scan failed: server closed the connection")

    monkeypatch.setattr(store, "terminal_older_than", down)
    assert ret.tick(5.0, NOW, WriteBatch()) == 0
    assert ret.next_at == 35.0
    assert metrics.registry.get_sample_value("ffrtmp_db_errors_total", {"op": "retention"}) == 1


def test_cleanup_by_hand_and_dry_run(store: Store) -> None:
    groups = seed(store)
    dry = cleanup(store, 7, batch=2, now=NOW, dry_run=True)
    assert (dry.deleted, dry.batches) == (8, 4)
    assert present(store, groups["old"]) == groups["old"]
    res = cleanup(store, 7, batch=5, now=NOW)
    assert (res.deleted, res.batches) == (8, 2)
    assert present(store, groups["old"]) == set()
    assert present(store, groups["live"] | groups["recent"]) == groups["live"] | groups["recent"]
    assert cleanup(store, 7, now=NOW).deleted == 0


def test_optimize_and_vacuum(store: Store, db_url: str) -> None:
    seed(store)
    cleanup(store, 0, now=NOW + 1)
    assert optimize(store) == ("optimize" if store.backend == "sqlite" else "analyze")
    vacuum(store)
    if store.backend == "sqlite":
        assert auto_vacuum(store) == "incremental"
    store.apply(WriteBatch(inserts=[row(1000, "completed", 1.0)]))  # still a working store
    assert present(store, {1000}) == {1000}


def test_new_sqlite_files_use_incremental_auto_vacuum(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path}/new.db") as s:
        assert auto_vacuum(s) == "incremental"


def test_maintenance_thread_runs_on_its_own_connection(db_url: str) -> None:
    metrics = MasterMetrics(CollectorRegistry())
    m = Maintenance(db_url, metrics, interval_s=0.05)
    m.start()
    try:
        op = "optimize" if db_url.startswith("sqlite") else "analyze"
        wait_for(lambda: metrics.registry.get_sample_value(
            "ffrtmp_db_maintenance_total", {"op": op, "result": "ok"}), 10)
    finally:
        m.stop()
    assert m._thread is None


def ffrtmp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ffrtmp", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, check=False)


def test_db_cli_migrate_cleanup_vacuum(db_url: str) -> None:
    with Store(db_url) as s:
        groups = seed(s)
    out = ffrtmp("db", "migrate", "--db", db_url)
    assert out.returncode == 0 and "schema version" in out.stdout, out.stderr
    out = ffrtmp("db", "cleanup", "--db", db_url, "--dry-run")
    assert out.returncode == 0 and "would delete 8 terminal jobs" in out.stdout, out.stderr
    out = ffrtmp("db", "cleanup", "--db", db_url, "--older-than", "7", "--batch", "3")
    assert out.returncode == 0 and "deleted 8 terminal jobs" in out.stdout, out.stderr
    out = ffrtmp("db", "vacuum", "--db", db_url)
    assert out.returncode == 0 and out.stdout.startswith("vacuumed"), out.stderr
    with Store(db_url) as s:
        assert present(s, groups["old"]) == set()
        assert present(s, groups["live"] | groups["recent"]) == groups["live"] | groups["recent"]
    bad = ffrtmp("db", "cleanup", "--db", db_url, "--batch", "0")
    assert bad.returncode != 0 and "--batch" in bad.stderr


@pytest.mark.timeout(120)
def test_master_deletes_old_jobs_in_the_background_while_it_dispatches(
        tmp_path: Path, db_url: str) -> None:
    old = 2500
    with Store(db_url) as s:
        s.apply(WriteBatch(inserts=[row(i, "completed", 10.0) for i in range(1, old + 1)]))
        s.apply(WriteBatch(inserts=[row(old + 1, "queued", 10.0)]))  # old but live
    c = Cluster(tmp_path, db_url, metrics=True,
                master_args=["--retention-days", "7", "--retention-interval", "30"])
    try:
        c.start_master()
        c.start_agent("a1", 4)
        ids = c.client.submit([{"scenario": "noop"}] * 300)
        final = c.wait_terminal(ids + [old + 1], 60)
        assert all(j["state"] == "completed" for j in final.values())

        def deleted() -> float:
            for line in c.scrape().splitlines():
                if line.startswith("ffrtmp_retention_deleted_jobs_total "):
                    return float(line.split()[1])
            return 0.0

        wait_for(lambda: deleted() == old, 30, message="retention to delete the old jobs")
        jobs, missing = c.client.get([1, old, old + 1, *ids[:5]])
        assert sorted(missing) == [1, old]
        assert {j["id"] for j in jobs} == {old + 1, *ids[:5]}
    finally:
        c.close()
