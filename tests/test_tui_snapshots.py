"""The dashboard's layouts at 80×24 and 200×50, compared with reviewed SVG snapshots
(tests/__snapshots__/; `pytest --snapshot-update` rewrites them, then review the diff).

The app runs without a feed on a model filled here and a fixed clock, so every cell is
deterministic; the data path is tested against a real master in test_tui.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bus.client import Client
from tui.app import Dashboard
from tui.model import DashModel

WALL = 1_767_225_600.0  # a fixed epoch for ages and ETAs


def model() -> DashModel:
    m = DashModel(endpoint="tcp://127.0.0.1:5556")
    stats = {"agents": 3, "slots": 12, "slots_busy": 7, "delayed": 1,
             "queued_by_priority": {"high": 4, "normal": 120, "low": 3000},
             "dispatched_total": 15230, "completed_total": 15010, "uptime_s": 5400,
             "sla": {"met": 14800, "missed": 110, "target": 0.95, "done_s": 600.0,
                     "wait_s": 30.0}}
    nodes = [
        {"name": f"enc-{i}", "state": state, "slots": 4, "busy": busy, "limits": "enforced",
         "cgroup": "v1", "encoders": ["libx264", "libx265", "libvpx-vp9", "aac"],
         "resources": {"cpus": 16, "memory_mb": 65536}, "last_seen_s": 0.4}
        for i, (state, busy) in enumerate([("alive", 4), ("alive", 3), ("draining", 0)])]
    live: list[dict[str, Any]] = []
    for i in range(7):
        live.append({"id": 900 + i, "scenario": "1080p-h264", "state": "running",
                     "priority": "normal", "agent": f"enc-{i % 2}", "progress": 0.1 * (i + 1),
                     "attempt": 1, "max_attempts": 3, "created_at": WALL - 100,
                     "started_at": WALL - 60, "extra": {"fps": 240.0, "speed": 8.0}})
    for i, prio in enumerate(["low", "high", "normal", "high"]):
        live.append({"id": 950 + i, "scenario": "720p-h264", "state": "queued",
                     "priority": prio, "agent": None, "progress": 0.0, "attempt": 0,
                     "max_attempts": 3, "created_at": WALL - 30})
    recent = [{"id": 800 + i, "scenario": "720p-h264", "state": st, "reason": rs,
               "priority": "normal", "agent": "enc-0", "progress": 1.0 if st == "completed"
               else 0.4, "attempt": 1, "max_attempts": 3, "created_at": WALL - 300,
               "started_at": WALL - 290, "finished_at": WALL - 200}
              for i, (st, rs) in enumerate([("completed", "ok"), ("failed", "exit_code"),
                                            ("cancelled", "cancelled")])]
    m.set_snapshot(stats, nodes, live, recent, 100.0, WALL)
    for second in range(60):
        m._counts.update(completed=40 + second % 7, failed=second % 5 == 0,
                         dispatched=41 + second % 6)
        m._rate_in["enc-0"] = 2e6 + 1e5 * (second % 4)
        m._rate_out["enc-0"] = 5e5 + 3e4 * (second % 3)
        m.tick()
    for t, text in enumerate(["agent enc-2: alive -> draining", "job 801 failed (exit_code)"
                              " on enc-0", "agent enc-3 lost"]):
        m._log(WALL - 50 + t, "agent", text)
    return m


def app() -> Dashboard:
    return Dashboard(lambda: Client("tcp://127.0.0.1:1"), None, feed=False, model=model(),
                     clock=lambda: (100.5, WALL))


@pytest.mark.parametrize("size", [(80, 24), (200, 50)], ids=["80x24", "200x50"])
@pytest.mark.parametrize("keys", [[], ["2"], ["3"], ["4"]],
                         ids=["overview", "jobs", "agents", "events"])
def test_layout(snap_compare: Any, size: tuple[int, int], keys: list[str]) -> None:
    assert snap_compare(app(), terminal_size=size, press=keys)


def test_without_a_feed_the_timer_redraws_but_never_moves_the_rates() -> None:
    """The snapshots above must not depend on how long the app ran before its picture was
    taken (a slow CI run once showed completed/s 0 where the model says 43): the once-a-second
    timer closes the rates only when a feed brings them."""
    dash = app()
    before = {name: list(s.points) for name, s in dash.model.series.items()}

    async def drive() -> None:
        async with dash.run_test(size=(200, 50)):
            dash._tick()  # what the 1 s interval calls

    asyncio.run(drive())
    assert {name: list(s.points) for name, s in dash.model.series.items()} == before
