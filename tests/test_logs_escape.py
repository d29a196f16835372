"""Untrusted text (agent and scenario names, error texts) can neither forge a log line nor
restyle the dashboard: logs escape control characters, the dashboard never parses markup."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.text import Text
from textual.widgets import DataTable, Static

from bus.client import Client
from ffrtmp import logs
from tui.app import Dashboard
from tui.model import DashModel

FORGED = "a1\n2026-01-01 00:00:00,000 INFO ffrtmp.master: fake line"


class Captured:
    """Logs set up to a file of this test's own; the root logger is restored afterwards."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def setup(self, fmt: str) -> None:
        logs.setup("info", fmt, str(self.path))

    def getvalue(self) -> str:
        for handler in logging.getLogger().handlers:
            handler.flush()
        return self.path.read_text(encoding="utf-8")


@pytest.fixture
def captured(tmp_path: Path) -> Iterator[Captured]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        yield Captured(tmp_path / "log")
    finally:
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_text_logs_escape_control_characters(captured: Captured) -> None:
    captured.setup("text")
    log = logging.getLogger("ffrtmp.master")
    log.info("agent %s lost", FORGED)
    log.warning("bad name %r and text %s", "x", "\r\t\x1b[2J\x00\x7f\x85\x9b\u2028 end")
    lines = captured.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("agent a1\\n2026-01-01 00:00:00,000 INFO ffrtmp.master: fake line "
                             "lost")
    assert lines[1].endswith("bad name 'x' and text \\r\\t\\x1b[2J\\x00\\x7f\\x85\\x9b\\u2028 end")


def test_text_log_tracebacks_cannot_start_a_line_either(captured: Captured) -> None:
    captured.setup("text")
    try:
        raise ValueError(f"no such agent {FORGED}")
    except ValueError:
        logging.getLogger("ffrtmp.master").exception("request failed for %s", FORGED)
    lines = captured.getvalue().splitlines()
    # Only the record's own line starts at column 0 (with the date); the traceback is indented.
    assert [line for line in lines if not line.startswith(" ")] == lines[:1]
    assert "Traceback" in lines[1] and "ValueError: no such agent a1" in lines[-2] + lines[-1]


def test_json_logs_escape_control_characters(captured: Captured) -> None:
    captured.setup("json")
    text = FORGED + "\r\x1b[31m\x85\x9b\u2028\u2029"
    logging.getLogger("ffrtmp.master").info("agent %s lost", text, extra={"agent": text})
    out = captured.getvalue()
    assert len(out.splitlines()) == 1 and out.endswith("\n") and out.count("\n") == 1
    assert not any(ch in out[:-1] for ch in "\r\x1b\x85\x9b\u2028\u2029")
    record = json.loads(out)
    assert record["msg"] == f"agent {text} lost" and record["agent"] == text


# ---------------------------------------------------------------------------- dashboard

MARKUP = "[red]x[/red][link=http://e]y[/link]"
BROKEN = "[/] [bold"  # invalid markup: parsing it raised and crashed the dashboard


def _hostile_model() -> DashModel:
    """What a master could relay from peers: names, limits and scenarios with markup."""
    m = DashModel(endpoint="tcp://127.0.0.1:1")
    node = {"name": MARKUP, "state": "alive", "slots": 1, "busy": 1, "cgroup": BROKEN,
            "limits": "[b]enforced[/b]", "encoders": [BROKEN], "resources": {},
            "last_seen_s": 0.1}
    job = {"id": 7, "scenario": BROKEN, "state": "running", "priority": "normal",
           "agent": MARKUP, "progress": 0.5, "attempt": 1, "max_attempts": 3}
    m.set_snapshot({"agents": 1}, [node], [job], [], 0.0, 0.0)
    return m


def _plain(cell: Any) -> str:
    assert isinstance(cell, Text) and not cell.spans, cell  # never parsed as markup
    return cell.plain


def test_dashboard_shows_names_and_errors_as_plain_text() -> None:
    model = _hostile_model()

    async def drive() -> None:
        app = Dashboard(lambda: Client("tcp://127.0.0.1:1"), None, feed=False, model=model,
                        clock=lambda: (0.5, 0.0))
        async with app.run_test(size=(220, 40)) as pilot:
            await pilot.press("3")
            await pilot.pause()
            node = [_plain(c) for c in app.query_one("#nodes", DataTable).get_row_at(0)]
            assert node[0] == MARKUP and f"[b]enforced[/b] ({BROKEN})" in node
            assert BROKEN in node  # the encoders summary
            await pilot.press("2")
            await pilot.pause()
            job = [_plain(c) for c in app.query_one("#jobs", DataTable).get_row_at(0)]
            assert BROKEN in job and MARKUP in job
            model.heard_at = None
            model.failed_request(f"timeout: {MARKUP}")  # an error text from the network
            await pilot.pause(0.4)  # the status line is redrawn every 0.25 s
            status = str(app.query_one("#status", Static).render())
            assert status.startswith("✖ master unreachable") and f"timeout: {MARKUP}" in status

    asyncio.run(drive())
