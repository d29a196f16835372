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
from textual.widgets import DataTable, Static

from bus.errors import ClientError
from conftest import free_port
from ffrtmp import logs
from tui.app import Dashboard

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


class FakeClient:
    """Just what the dashboard calls, answering with hostile names."""

    keys = None

    def __init__(self) -> None:
        self.error: ClientError | None = None

    def stats(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return {"agents": 1, "jobs_by_state": {"running": 1}}

    def nodes(self) -> list[dict[str, Any]]:
        return [{"name": MARKUP, "state": "alive", "slots": 1, "busy": 1, "cgroup": BROKEN,
                 "limits": "[b]enforced[/b]", "last_seen_s": 0.1}]

    def list_jobs(self, states: list[str], limit: int) -> list[dict[str, Any]]:
        return [{"id": 7, "scenario": BROKEN, "state": "running", "priority": "normal",
                 "agent": MARKUP, "progress": 0.5, "attempt": 1, "max_attempts": 3}]


def _cells(table: DataTable[Any], row: int) -> list[str]:
    """The text of one row as the table renders it (one line per row, cells padded)."""
    strip = table.render_line(row + 1)  # line 0 is the header
    return "".join(segment.text for segment in strip).split()


def test_dashboard_shows_names_and_errors_as_plain_text() -> None:
    client = FakeClient()

    async def drive() -> None:
        app = Dashboard(client, f"tcp://127.0.0.1:{free_port()}")  # type: ignore[arg-type]
        async with app.run_test(size=(220, 40)) as pilot:
            await pilot.pause()
            nodes = app.query_one("#nodes", DataTable)
            jobs = app.query_one("#jobs", DataTable)
            node_cells = _cells(nodes, 0)
            assert node_cells[0] == MARKUP and " ".join(node_cells[4:6]) == BROKEN
            assert node_cells[6] == "[b]enforced[/b]"
            job_cells = _cells(jobs, 0)
            assert " ".join(job_cells[1:3]) == BROKEN and job_cells[5] == MARKUP
            client.error = ClientError("timeout", MARKUP)
            await pilot.press("r")
            await pilot.pause()
            summary = str(app.query_one("#summary", Static).render())
            assert summary == f"master unreachable: timeout: {MARKUP}"

    asyncio.run(drive())
