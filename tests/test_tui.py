"""The dashboard against a real master: it shows agents and live jobs and acts on keys."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from textual.widgets import DataTable, Static

from conftest import wait_for
from harness import Cluster
from tui.app import Dashboard
from tui.model import DashModel


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path}/db.sqlite")
    try:
        c.start_master()
        c.start_agent("dash-a", slots=1)
        yield c
    finally:
        c.close()


def test_dashboard_shows_agents_and_jobs_and_cancels(cluster: Cluster) -> None:
    running, queued = cluster.client.submit([
        {"scenario": "sleep", "params": {"seconds": 30}},
        {"scenario": "sleep", "params": {"seconds": 30}}])
    wait_for(lambda: cluster.jobs([running])[running]["state"] == "running", 15)

    async def drive() -> None:
        app = Dashboard(cluster.client, cluster.events_ep)
        async with app.run_test() as pilot:
            await pilot.pause()
            nodes = app.query_one("#nodes", DataTable)
            jobs = app.query_one("#jobs", DataTable)
            assert nodes.row_count == 1 and str(nodes.get_row_at(0)[0]) == "dash-a"
            assert [str(jobs.get_row_at(i)[2]) for i in range(jobs.row_count)] == ["running",
                                                                              "queued"]
            assert "agents 1" in str(app.query_one("#summary", Static).render())
            await pilot.press("d")  # cursor on the only agent: drain it (first, so the slot
            await pilot.press("c")  # freed by cancelling the running job takes nothing new)
            await pilot.pause()

    asyncio.run(drive())
    wait_for(lambda: cluster.jobs([running])[running]["state"] == "cancelled", 40)
    assert cluster.client.nodes()[0]["state"] == "draining"
    assert cluster.jobs([queued])[queued]["state"] == "queued"  # drained: nothing new started


def test_model_folds_events() -> None:
    model = DashModel()
    model.set_jobs([{"id": 1, "scenario": "720p-h264", "state": "running", "priority": "normal",
                     "agent": "a", "progress": 0.1, "attempt": 1, "max_attempts": 3}])
    assert model.apply_event("PROGRESS", {"id": 1, "progress": 0.5, "fps": 90.0})
    assert "50.0%" in model.job_rows()[0][5] and model.job_rows()[0][6] == "90"
    assert not model.apply_event("PROGRESS", {"id": 2, "progress": 0.5})
    assert model.apply_event("STATE", {"id": 1, "state": "completed"})
    assert model.job_rows() == []
