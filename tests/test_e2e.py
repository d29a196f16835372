"""End to end with real processes: 1 master + 3 agents, noop and sleep jobs, on both backends."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import Cluster
from storage import Store


@pytest.fixture
def cluster(tmp_path: Path, db_url: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, db_url)
    try:
        yield c
    finally:
        c.close()


def test_noop_and_sleep_jobs_all_complete_exactly_once(cluster: Cluster, db_url: str) -> None:
    cluster.start_master()
    for name in ("a1", "a2", "a3"):
        cluster.start_agent(name, slots=4)
    ids = cluster.client.submit([{"scenario": "noop"}] * 2000)
    ids += cluster.client.submit([{"scenario": "sleep", "params": {"seconds": 0.2}}] * 50)
    assert len(set(ids)) == 2050
    final = cluster.wait_terminal(ids, timeout=120)
    states = Counter(j["state"] for j in final.values())
    assert states == {"completed": 2050}, (states, cluster.dump_logs())
    agents = Counter(j["agent"] for j in final.values())
    assert set(agents) == {"a1", "a2", "a3"}
    cluster.close()
    store = Store(db_url)
    try:
        rows = store.get_jobs(ids)
        assert len(rows) == 2050 and all(r["state"] == "completed" for r in rows)
        for job_id in ids[::97] + ids[-50:]:
            events = store.events_for(job_id)
            assert [e["to_state"] for e in events].count("completed") == 1
            assert events[0]["to_state"] == "queued"
    finally:
        store.close()
