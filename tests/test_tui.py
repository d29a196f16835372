"""The dashboard against a real master and agents (Textual's Pilot), and its pure model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Log, Static

from bus.client import Client
from conftest import wait_for
from harness import Cluster
from tui.app import JOB_COLUMNS, Dashboard, fitting
from tui.model import LOG_LINES, DashModel, Filter
from tui.screens import Confirm, Detail


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path}/db.sqlite")
    try:
        c.start_master()
        yield c
    finally:
        c.close()


def dashboard(cluster: Cluster) -> Dashboard:
    ep = cluster.client.endpoint
    return Dashboard(lambda: Client(ep, timeout=1.0), cluster.events_ep, ep)


async def until(pilot: Any, predicate: Callable[[], object], timeout: float, what: str) -> None:
    """wait_for for the app's event loop: let it run between checks."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pilot.pause(0.05)


def column(table: DataTable, index: int) -> list[str]:
    return [str(table.get_row_at(i)[index]) for i in range(table.row_count)]


def status(app: Dashboard) -> str:
    return str(app.query_one("#status", Static).render())


def test_selection_follows_the_job_and_cancel_confirms_that_id(cluster: Cluster) -> None:
    """Jobs above the selected one finish; the cursor stays on its id; `c` asks, naming it,
    and cancels exactly it."""
    cluster.start_agent("dash-a", slots=4)
    short = cluster.client.submit([{"scenario": "sleep", "params": {"seconds": 1.5}}] * 3)
    long_ = cluster.client.submit([{"scenario": "sleep", "params": {"seconds": 60}}])[0]
    wait_for(lambda: all(j["state"] == "running" for j in cluster.jobs([*short, long_]).values()),
             20)

    async def drive() -> None:
        app = dashboard(cluster)
        async with app.run_test(size=(120, 40)) as pilot:
            jobs = app.query_one("#jobs", DataTable)
            await pilot.press("2")
            await until(pilot, lambda: jobs.row_count == 4, 10, "4 rows")
            order = column(jobs, 0)
            assert order[:4] == [str(i) for i in (*short, long_)], order  # running, by id
            while jobs.cursor_row != 3:  # select the last running job: the long one
                await pilot.press("down")
            assert (app.selected_job() or {}).get("id") == long_
            # the three above it finish; finished jobs go below the running one
            await until(pilot, lambda: column(jobs, 0)[0] == str(long_), 15,
                        "the long job first")
            assert (app.selected_job() or {}).get("id") == long_, column(jobs, 0)
            assert str(jobs.get_row_at(jobs.cursor_row)[0]) == str(long_)
            await pilot.press("c")
            await until(pilot, lambda: isinstance(app.screen, Confirm), 5, "the confirmation")
            assert isinstance(app.screen, Confirm)
            assert f"Cancel job {long_} (sleep, running on dash-a)?" in app.screen.question
            await pilot.press("y")
            await until(pilot, lambda: not isinstance(app.screen, Confirm), 5, "dismissed")

    asyncio.run(drive())
    wait_for(lambda: cluster.jobs([long_])[long_]["state"] == "cancelled", 40)
    assert all(j["state"] == "completed" for j in cluster.jobs(short).values())
    sla = cluster.client.stats()["sla"]  # the overview's SLA line: cancelled is not judged
    assert (sla["met"], sla["missed"], sla["target"]) == (3, 0, 0.95), sla


def test_declined_confirmation_cancels_nothing_and_drain_names_the_agent(
        cluster: Cluster) -> None:
    cluster.start_agent("dash-a", slots=1)
    job = cluster.client.submit([{"scenario": "sleep", "params": {"seconds": 30}}])[0]
    wait_for(lambda: cluster.jobs([job])[job]["state"] == "running", 15)

    async def drive() -> None:
        app = dashboard(cluster)
        async with app.run_test(size=(120, 40)) as pilot:
            jobs = app.query_one("#jobs", DataTable)
            await pilot.press("2")
            await until(pilot, lambda: jobs.row_count == 1, 10, "the job")
            await pilot.press("c")
            await until(pilot, lambda: isinstance(app.screen, Confirm), 5, "the confirmation")
            await pilot.press("c")  # the app's keys do nothing over a confirmation
            await pilot.pause()
            assert len(app.screen_stack) == 2
            await pilot.press("n")
            await until(pilot, lambda: not isinstance(app.screen, Confirm), 5, "dismissed")
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, Detail) and app.screen.loaded, 10,
                        "the detail screen")
            body = str(app.screen.query_one("#detail-body", Static).render())
            assert f"job {job}: running" in body and '"seconds": 30' in body
            trail = app.screen.query_one("#trail", DataTable)
            assert column(trail, 3)[:3] == ["queued", "assigned", "running"]
            await pilot.press("escape")
            await pilot.press("3")
            nodes = app.query_one("#nodes", DataTable)
            await until(pilot, lambda: nodes.row_count == 1, 10, "the agent")
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, Confirm), 5, "the confirmation")
            assert isinstance(app.screen, Confirm)
            assert app.screen.question.startswith("Drain agent dash-a (")
            await pilot.press("y")
            await until(pilot, lambda: not isinstance(app.screen, Confirm), 5, "dismissed")

    asyncio.run(drive())
    wait_for(lambda: cluster.client.nodes()[0]["state"] == "draining", 10)
    assert cluster.jobs([job])[job]["state"] == "running"  # the declined cancel did nothing


def test_master_down_is_shown_within_2s_and_q_still_quits_at_once(cluster: Cluster) -> None:
    cluster.start_agent("dash-a", slots=1)
    cluster.client.submit([{"scenario": "sleep", "params": {"seconds": 30}}])
    timings: dict[str, float] = {}

    async def drive() -> None:
        app = dashboard(cluster)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: status(app).startswith("● live"), 10, "live")
            await pilot.press("2")
            await until(pilot, lambda: app.query_one("#jobs", DataTable).row_count == 1, 10,
                        "the job")
            assert cluster.master is not None
            cluster.kill9(cluster.master)
            t0 = time.monotonic()
            await until(pilot, lambda: "master unreachable" in status(app), 5, "unreachable")
            timings["shown"] = time.monotonic() - t0
            assert "stale" in status(app) and app.has_class("stale")
            await pilot.press("2")  # keys still work while the master is down
            t1 = time.monotonic()
            await pilot.press("q")
            await until(pilot, lambda: not app.is_running, 2, "exit")
            timings["quit"] = time.monotonic() - t1

    asyncio.run(drive())
    assert timings["shown"] <= 2.0, timings
    assert timings["quit"] < 0.5, timings


def test_markup_from_peers_is_shown_literally() -> None:
    """Text from the network is drawn as is. (A real agent cannot be named with markup: the
    master refuses such a HELLO, so the model is filled directly here.)"""
    name, text = "[reverse]evil[bold]", "[red]x[/]"
    model = DashModel(endpoint="tcp://127.0.0.1:1")
    node = {"name": name, "state": "alive", "slots": 1, "busy": 0, "limits": text,
            "cgroup": "v1", "encoders": [text], "resources": {}, "last_seen_s": 0.1}
    model.set_snapshot({}, [node], [job(1, "running", scenario=text, agent=name)], [], 0, 0)

    async def drive() -> None:
        app = Dashboard(lambda: Client("tcp://127.0.0.1:1"), None, feed=False, model=model,
                        clock=lambda: (0.5, 0.0))
        async with app.run_test(size=(200, 40)) as pilot:
            await pilot.press("3")
            await pilot.pause()
            cell = app.query_one("#nodes", DataTable).get_row_at(0)[0]
            assert str(cell) == name and not cell.spans  # plain Text: no markup parsed
            await pilot.press("2")
            await pilot.pause()
            row = app.query_one("#jobs", DataTable).get_row_at(0)
            assert name in [str(c) for c in row] and text in [str(c) for c in row]

    asyncio.run(drive())


# ---- the pure model -------------------------------------------------------------------------

def job(i: int, state: str, prio: str = "normal", **kw: object) -> dict[str, object]:
    return {"id": i, "scenario": "720p-h264", "state": state, "priority": prio, "agent": "a",
            "progress": 0.0, "attempt": 1, "max_attempts": 3, **kw}


def test_model_orders_running_first_then_the_queue_as_served() -> None:
    m = DashModel()
    m.set_snapshot({}, [], [job(1, "queued", "low"), job(2, "queued", "high"),
                            job(3, "running"), job(4, "queued")], [job(0, "failed")], 0, 0)
    assert [j["id"] for j in m.jobs()] == [3, 2, 4, 1, 0]


def test_model_folds_events_and_progress() -> None:
    m = DashModel()
    m.set_snapshot({}, [], [job(1, "running")], [], 0, 0)
    assert m.apply_progress({"id": 1, "progress": 0.5, "fps": 90.0, "bytes_out": 2048})
    assert "50%" in m.job_cells(m.live[1], 0)["progress"]
    assert not m.apply_progress({"id": 2, "progress": 0.5})
    assert m.apply_events([{"seq": 7, "id": 1, "state": "failed", "reason": "exit_code",
                            "agent": "a", "at": 1.0}], 1.0)
    assert m.jobs()[0]["state"] == "failed" and 1 in m.recent and not m.live
    m.tick()
    assert m.series["failed/s"].last == 1 and m.series["out B/s"].last == 0
    assert m.log_lines()[-1][2] == "job 1 failed (exit_code) on a"


def test_down_after_silence_and_filter_parsing() -> None:
    m = DashModel()
    m.heard(10.0, 0.0)
    assert m.down_for(11.0) is None and m.down_for(11.6) == pytest.approx(1.6)
    f = Filter.parse("state:failed,timed_out agent:a1 12")
    assert f.matches({"id": 12, "state": "failed", "agent": "a1"})
    assert not f.matches({"id": 12, "state": "queued", "agent": "a1"})
    with pytest.raises(ValueError, match="unknown state"):
        Filter.parse("state:bogus")


def test_columns_give_way_by_priority_at_80_cells() -> None:
    keys = [c[0] for c in fitting(JOB_COLUMNS, 78)]
    assert keys[:4] == ["id", "state", "progress", "agent"] and "age" not in keys
    assert len(fitting(JOB_COLUMNS, 300)) == len(JOB_COLUMNS)


def test_event_log_keeps_showing_lines_after_its_ring_is_full() -> None:
    """The model keeps the last LOG_LINES lines; the Events pane must still get every new one
    once that ring is full (it used to compare lengths, which stop changing then)."""
    model = DashModel(endpoint="tcp://127.0.0.1:1")
    for i in range(LOG_LINES):
        model._log(float(i), "job", f"old {i}")

    async def drive() -> None:
        app = Dashboard(lambda: Client("tcp://127.0.0.1:1"), None, feed=False, model=model,
                        clock=lambda: (0.5, 0.0))
        async with app.run_test(size=(120, 30)) as pilot:
            app._write_log()
            for i in range(3):
                model._log(0.0, "job", f"new {i}")
            app._write_log()
            await pilot.pause()
            shown = "\n".join(app.query_one("#log", Log).lines)
            assert all(f"new {i}" in shown for i in range(3)), shown[-200:]

    asyncio.run(drive())
