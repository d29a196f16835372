"""Fault injection with real processes: kill -9 / SIGSTOP / SIGTERM of master and agents, dead DB.

Every test runs a real master and real agents (`python -m ffrtmp ...`) on loopback ports with
heartbeat 1 s and liveness 3 (a peer silent for 3 s is dead), waits on conditions with deadlines
(never bare sleeps) and leaves nothing behind (Cluster.close in the fixture finalizer).
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest

from bus.client import Client
from bus.errors import ClientError
from conftest import wait_for
from harness import TERMINAL, Cluster, process_gone, workload_children
from storage import Store

pytestmark = pytest.mark.slow

LIVENESS_S = 3.0  # heartbeat 1 s x liveness 3 (the Cluster defaults)
LIVE = ("assigned", "running")


@pytest.fixture
def cluster(tmp_path: Path, db_url: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, db_url, heartbeat=1.0, liveness=3)
    try:
        yield c
    finally:
        c.close()


# ---------------------------------------------------------------------------- helpers


def sleep_spec(seconds: float) -> dict[str, Any]:
    return {"scenario": "sleep", "params": {"seconds": seconds}}


def reasons(job: dict[str, Any]) -> list[str | None]:
    return [e["reason"] for e in job["events"]]


def completed_events(store: Store, job_id: int) -> int:
    return [e["to_state"] for e in store.events_for(job_id)].count("completed")


def wait_running(cluster: Cluster, job_id: int, agent: str, attempt: int = 1,
                 timeout: float = 15) -> dict[str, Any]:
    """Wait until the job runs on `agent` as `attempt`."""
    def running() -> dict[str, Any] | None:
        job = cluster.job(job_id)
        ok = job["state"] == "running" and job["agent"] == agent and job["attempt"] == attempt
        return job if ok else None
    return wait_for(running, timeout, interval=0.05,
                    message=f"job {job_id} running on {agent} as attempt {attempt}")


def one_child(cluster: Cluster, agent: str) -> psutil.Process:
    """The single workload process an agent runs right now."""
    kids = wait_for(lambda: workload_children(cluster.agents[agent]), 10,
                    message=f"a workload process under agent {agent}")
    assert len(kids) == 1, kids
    return kids[0]


def requeued_away_from(cluster: Cluster, ids: list[int], agent: str,
                       reason: str = "agent_lost") -> Callable[[], bool]:
    """Predicate: every job has a `reason` event and is queued or placed on another agent."""
    def check() -> bool:
        jobs, missing = cluster.client.get(ids, events=True)
        assert not missing
        for job in jobs:
            assert job["state"] not in TERMINAL, job  # must not finish on the lost agent
            if reason not in reasons(job):
                return False
            if not (job["state"] == "queued"
                    or (job["state"] in LIVE and job["agent"] not in (None, agent))):
                return False
        return True
    return check


# ---------------------------------------------------------------------------- 1. master kill -9


def test_master_kill9_mid_run_loses_nothing_and_completes_each_job_once(
        cluster: Cluster, db_url: str) -> None:
    cluster.start_master()
    for name in ("a1", "a2", "a3"):
        cluster.start_agent(name, slots=4)
    # 1500 noop with 40 sleep(0.5 s) spread among them, so work remains whenever we strike.
    specs: list[dict[str, Any]] = []
    for i in range(1540):
        specs.append(sleep_spec(0.5) if i % 38 == 19 and i < 1520 else {"scenario": "noop"})
    assert sum(s["scenario"] == "sleep" for s in specs) == 40
    ids = cluster.client.submit(specs)
    total = len(ids)
    assert len(set(ids)) == total == 1540

    wait_for(lambda: cluster.client.stats()["completed_total"] >= total // 5, 30,
             message="a fifth of the jobs completed")
    cluster.kill9(cluster.master)
    with Store(db_url) as store:
        at_kill = store.counts_by_state()
    done_at_kill = at_kill.get("completed", 0)
    assert 0 < done_at_kill < total, at_kill  # really mid-run
    assert sum(at_kill.values()) == total, at_kill  # every acknowledged job is in the store

    cluster.start_master()  # same database, same ports; the agents reconnect on their own
    final = cluster.wait_terminal(ids, timeout=45)
    assert len(final) == total
    states = Counter(j["state"] for j in final.values())
    assert states == {"completed": total}, (states, cluster.dump_logs())
    _, missing = cluster.client.get(ids)
    assert missing == []
    cluster.close()

    with Store(db_url) as store:
        rows = store.get_jobs(ids)
        assert [r["id"] for r in rows] == sorted(ids)  # no job lost
        assert all(r["state"] == "completed" for r in rows)
        twice = {i: n for i in ids if (n := completed_events(store, i)) != 1}
    assert twice == {}, f"jobs without exactly one 'completed' event: {twice}"


# ---------------------------------------------------------------------------- 2. agent kill -9


def test_agent_kill9_requeues_its_jobs_within_liveness_and_kills_its_children(
        cluster: Cluster, db_url: str) -> None:
    cluster.start_master()
    a1 = cluster.start_agent("a1", slots=2)
    cluster.start_agent("a2", slots=2)
    wait_for(lambda: all(cluster.node(n)["credit"] == 2 for n in ("a1", "a2")), 10,
             message="both agents granted their 2 credits")
    ids = cluster.client.submit([sleep_spec(5)] * 4)

    def all_running() -> dict[int, dict[str, Any]] | None:
        jobs = cluster.jobs(ids)
        return jobs if all(j["state"] == "running" for j in jobs.values()) else None
    jobs = wait_for(all_running, 10, interval=0.05, message="4 jobs running")
    on_a1 = sorted(i for i, j in jobs.items() if j["agent"] == "a1")
    on_a2 = sorted(i for i, j in jobs.items() if j["agent"] == "a2")
    assert len(on_a1) == len(on_a2) == 2, jobs
    kids = wait_for(lambda: (k := workload_children(a1)) and len(k) == 2 and k, 10,
                    message="a1's two workload processes")

    killed = time.monotonic()
    cluster.kill9(a1)
    wait_for(requeued_away_from(cluster, on_a1, "a1"), 10, interval=0.05,
             message="a1's jobs requeued with agent_lost")
    latency = time.monotonic() - killed
    print(f"\n[faults] requeue latency after kill -9 of an agent: {latency:.2f} s")
    assert latency <= LIVENESS_S + 1.5, f"requeue took {latency:.2f}s"

    # PR_SET_PDEATHSIG: the children die with their agent.
    wait_for(lambda: all(process_gone(k) for k in kids), 5,
             message="the killed agent's workload processes are gone")

    final = cluster.wait_terminal(ids, timeout=30)
    assert all(j["state"] == "completed" for j in final.values()), final
    for job_id in on_a1:
        assert final[job_id]["agent"] == "a2" and final[job_id]["attempt"] == 2, final[job_id]
    for job_id in on_a2:
        assert final[job_id]["agent"] == "a2" and final[job_id]["attempt"] == 1, final[job_id]
    jobs_with_events, _ = cluster.client.get(ids, events=True)
    for job in jobs_with_events:
        assert [e["state"] for e in job["events"]].count("completed") == 1, job["events"]


# ---------------------------------------------------------------------------- 3. SIGSTOP + fencing


def test_frozen_agent_loses_its_attempt_and_is_fenced_when_it_wakes(
        cluster: Cluster, db_url: str) -> None:
    cluster.start_master()
    a1 = cluster.start_agent("a1", slots=1)
    [job_id] = cluster.client.submit([sleep_spec(12)])
    wait_running(cluster, job_id, "a1", attempt=1)
    stale = one_child(cluster, "a1")

    cluster.signal(a1, signal.SIGSTOP)
    frozen = time.time()
    cluster.start_agent("a2", slots=1)
    # The master declares a1 lost after 3 s of silence and hands the job to a2 as attempt 2.
    wait_running(cluster, job_id, "a2", attempt=2, timeout=15)
    job = cluster.job(job_id, events=True)
    [lost] = [e for e in job["events"] if e["reason"] == "agent_lost"]
    silent = lost["at"] - frozen
    print(f"\n[faults] frozen agent declared lost {silent:.2f} s after SIGSTOP")
    # a1 last spoke at most one heartbeat before the freeze: lost 2..3 s after it, not sooner.
    assert LIVENESS_S - 1.2 <= silent <= LIVENESS_S + 0.5, silent
    assert [n["state"] for n in cluster.client.nodes() if n["name"] == "a1"] == ["lost"]
    assert not process_gone(stale)  # the frozen agent's child kept running meanwhile

    cluster.signal(a1, signal.SIGCONT)
    # a1 hears ERROR unknown_agent (or notices the silence), says HELLO listing (job, 1), and the
    # master fences that stale attempt: CANCEL reason=fenced stops the child.
    wait_for(lambda: process_gone(stale), 10, message="the stale attempt's child is stopped")
    wait_for(lambda: cluster.node("a1") is not None, 10, message="a1 registered again")
    assert a1.poll() is None, "the woken agent must survive fencing"

    final = cluster.wait_terminal([job_id], timeout=30)[job_id]
    assert final["state"] == "completed" and final["agent"] == "a2", final
    assert final["attempt"] >= 2, final
    job = cluster.job(job_id, events=True)
    assert [e["state"] for e in job["events"]].count("completed") == 1, job["events"]
    assert workload_children(a1) == []


# ---------------------------------------------------------------------------- 4. master restart


def test_graceful_master_restart_is_invisible_to_a_running_job(
        cluster: Cluster, db_url: str) -> None:
    master = cluster.start_master()
    a1 = cluster.start_agent("a1", slots=1)
    [job_id] = cluster.client.submit([sleep_spec(4)])
    wait_running(cluster, job_id, "a1", attempt=1)
    child = one_child(cluster, "a1")

    cluster.signal(master, signal.SIGTERM)
    stopped = time.monotonic()
    assert master.wait(timeout=10) == 0
    cluster.start_master()
    print(f"\n[faults] master down (SIGTERM to answering again): "
          f"{time.monotonic() - stopped:.2f} s")

    final = cluster.wait_terminal([job_id], timeout=20)[job_id]
    assert final["state"] == "completed" and final["agent"] == "a1", final
    assert final["attempt"] == 1, final  # never re-run
    job = cluster.job(job_id, events=True)
    assert "agent_lost" not in reasons(job), job["events"]
    assert [e["state"] for e in job["events"]].count("assigned") == 1, job["events"]
    assert process_gone(child) and workload_children(a1) == []
    # Only a live connection has credit: a1 said HELLO to the new master.
    wait_for(lambda: (n := cluster.node("a1")) is not None and n["credit"] == 1, 10,
             message="a1 re-registered with the restarted master")
    assert a1.poll() is None


# ---------------------------------------------------------------------------- 5. agent SIGTERM


def test_agent_sigterm_requeues_its_job_at_once(cluster: Cluster, db_url: str) -> None:
    cluster.start_master()
    a1 = cluster.start_agent("a1", slots=1)
    [job_id] = cluster.client.submit([sleep_spec(5)])
    wait_running(cluster, job_id, "a1", attempt=1)
    child = one_child(cluster, "a1")
    cluster.start_agent("a2", slots=1)

    stopped = time.monotonic()
    cluster.signal(a1, signal.SIGTERM)
    # A clean stop hands the job back (agent_shutdown: not charged), then says BYE.
    wait_for(requeued_away_from(cluster, [job_id], "a1", "agent_shutdown"), 5, interval=0.05,
             message="job handed back by a1's clean stop")
    latency = time.monotonic() - stopped
    print(f"\n[faults] requeue latency after SIGTERM of an agent: {latency:.2f} s")
    assert latency < 1.5, f"requeue took {latency:.2f}s: the BYE was not honoured"
    assert a1.wait(timeout=10) == 0
    assert process_gone(child), "the agent left its child behind"

    final = cluster.wait_terminal([job_id], timeout=20)[job_id]
    assert final["state"] == "completed", final
    assert final["agent"] == "a2" and final["attempt"] == 2, final
    job = cluster.job(job_id, events=True)
    assert [e["state"] for e in job["events"]].count("completed") == 1, job["events"]


# ---------------------------------------------------------------------------- 6. dead database


def _pg_admin(server_url: str, *statements: str) -> None:
    import psycopg2

    conn = psycopg2.connect(server_url, connect_timeout=3)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for sql in statements:
                cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture
def pg_cluster(tmp_path: Path, pg_url: str, pg_server_url: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, pg_url, heartbeat=1.0, liveness=3)
    name = urlsplit(pg_url).path.lstrip("/")
    try:
        yield c
    finally:
        c.close()
        _pg_admin(pg_server_url, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


@pytest.mark.postgres
def test_database_outage_refuses_requests_and_recovers_without_loss(
        pg_cluster: Cluster, pg_url: str, pg_server_url: str) -> None:
    cluster = pg_cluster
    name = urlsplit(pg_url).path.lstrip("/")
    master = cluster.start_master()
    a1 = cluster.start_agent("a1", slots=4)
    before = cluster.client.submit([{"scenario": "noop"}] * 5)
    assert all(j["state"] == "completed" for j in cluster.wait_terminal(before, 15).values())
    # One job ends while the database is down (its DONE must wait), one runs across the outage.
    [short, long] = cluster.client.submit([sleep_spec(1), sleep_spec(9)])
    wait_for(lambda: all(j["state"] == "running" for j in cluster.jobs([short, long]).values()),
             10, message="2 sleep jobs running")
    kids = wait_for(lambda: (k := workload_children(a1)) and len(k) == 2 and k, 10,
                    message="2 workload processes")

    _pg_admin(pg_server_url,
              f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false',
              "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
              f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")
    with Client(cluster.clients_ep, timeout=3) as c:
        # The first write cannot commit: no SUBMITTED (it is held until the commit), or ERROR.
        with pytest.raises(ClientError) as first:
            c.submit([{"scenario": "noop"}])
        assert first.value.code in ("unavailable", "timeout"), first.value
        # From now on the master refuses every request at once: first while it holds its
        # turn, then as a standby that cannot reach its database (its lease is gone with the
        # connection: docs/OPERATIONS.md "High availability").
        with pytest.raises(ClientError) as second:
            c.submit([{"scenario": "noop"}], idempotency_key="during-outage")
        assert second.value.code == "unavailable", second.value

        def refused() -> bool:
            with pytest.raises(ClientError) as e:
                c.list_jobs(limit=1)
            assert e.value.code == "unavailable", e.value
            return True

        # Keep the database away past the agents' liveness: the short job ends meanwhile and
        # a1, hearing nothing from the stuck master, reconnects and says HELLO again.
        wait_for(lambda: refused() and len(workload_children(a1)) == 1, 10,
                 message="the short job's process ended during the outage")
        wait_for(lambda: refused() and "reconnecting" in cluster.log_text("agent-a1"), 10,
                 message="a1 reconnected while the database was down")
    assert master.poll() is None, "the master died with its database\n" + cluster.dump_logs()

    _pg_admin(pg_server_url, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    wait_for(lambda: master.poll() is None and cluster.answers(), 20,
             message="master answering again after the database came back")
    specs = [{"scenario": "noop"}] * 3 + [sleep_spec(0.2)]
    after = cluster.client.submit(specs, idempotency_key="during-outage")
    assert cluster.client.submit(specs, idempotency_key="during-outage") == after
    with pytest.raises(ClientError) as reused:  # the same key for other specs: refused
        cluster.client.submit([{"scenario": "noop"}], idempotency_key="during-outage")
    assert reused.value.code == "conflict", reused.value
    acknowledged = before + [short, long] + after
    final = cluster.wait_terminal(acknowledged, timeout=30)
    assert all(j["state"] == "completed" for j in final.values()), final
    # A database outage is not an agent loss: both jobs ran once, on a1, as attempt 1.
    for job in cluster.client.get([short, long], events=True)[0]:
        assert job["attempt"] == 1 and job["agent"] == "a1", job
        assert "agent_lost" not in reasons(job), job["events"]
    assert all(process_gone(k) for k in kids)
    assert master.poll() is None
    cluster.close()

    with Store(pg_url) as store:
        rows = {r["id"]: r for r in store.get_jobs(range(1, max(acknowledged) + 1))}
        assert set(acknowledged) <= set(rows), "an acknowledged job was lost"
        # At most the one unanswered SUBMIT of the outage can add a job nobody saw acknowledged.
        assert len(rows) - len(acknowledged) <= 1, sorted(set(rows) - set(acknowledged))
        assert all(r["state"] == "completed" for r in rows.values()), rows
        for job_id in rows:
            assert completed_events(store, job_id) == 1, job_id
