"""`ffrtmp dash`: a Textual dashboard that reads the master only through the bus client."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Footer, Header, Static

from bus.client import Client, Subscriber
from bus.errors import ClientError
from bus.vocab import OPEN
from tui.model import DashModel

REFRESH_S = 1.0


def _plain(row: Sequence[str]) -> list[Text]:
    """Cells as plain Text: a DataTable parses str cells as markup, and names come from peers."""
    return [Text(cell) for cell in row]


class Dashboard(App[None]):
    """Queue, agents and live jobs, refreshed every second and on events."""

    TITLE = "ffrtmp"
    CSS = """
    #summary { height: 3; padding: 0 1; }
    DataTable { height: 1fr; }
    #nodes { height: 10; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("r", "refresh", "Refresh"),
        Binding("c", "cancel_job", "Cancel job"),
        Binding("d", "drain_node", "Drain/undrain node"),
    ]

    def __init__(self, client: Client, events_ep: str) -> None:
        super().__init__()
        self.client = client
        self.events_ep = events_ep
        self.model = DashModel()
        self.sub: Subscriber | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical():
            yield Static("connecting…", id="summary")
            yield DataTable(id="nodes", cursor_type="row")
            yield DataTable(id="jobs", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        nodes = self.query_one("#nodes", DataTable)
        nodes.add_columns("agent", "state", "slots", "busy", "cgroup", "limits", "last seen")
        jobs = self.query_one("#jobs", DataTable)
        jobs.add_columns("id", "scenario", "state", "prio", "agent", "progress", "fps", "speed",
                         "attempt")
        self.sub = Subscriber(["job.", "agent."], self.events_ep, keys=self.client.keys)
        self.set_interval(REFRESH_S, self.action_refresh)
        self.set_interval(0.1, self._events)
        self.action_refresh()

    def on_unmount(self) -> None:
        if self.sub is not None:
            self.sub.close()
            self.sub = None

    def _events(self) -> None:
        """Apply queued events (progress between refreshes) without blocking the UI."""
        if self.sub is None:
            return
        changed = False
        for _ in range(500):
            item = self.sub.recv(0)
            if item is None:
                break
            changed |= self.model.apply_event(item[1].command, item[1].body)
        if changed:
            self._render_jobs()

    def action_refresh(self) -> None:
        """Poll stats, nodes and live jobs."""
        try:
            self.model.stats = self.client.stats()
            self.model.nodes = self.client.nodes()
            self.model.set_jobs(self.client.list_jobs(
                states=list(OPEN), limit=200))
            self.model.error = None
        except ClientError as e:
            self.model.error = f"{e.code}: {e.text}"
        self.query_one("#summary", Static).update(self.model.summary())
        nodes = self.query_one("#nodes", DataTable)
        nodes.clear()
        for row in self.model.node_rows():
            nodes.add_row(*_plain(row), key=row[0])
        self._render_jobs()

    def _render_jobs(self) -> None:
        jobs = self.query_one("#jobs", DataTable)
        jobs.clear()
        for row in self.model.job_rows():
            jobs.add_row(*_plain(row), key=row[0])

    def _selected(self, table_id: str) -> str | None:
        table = self.query_one(table_id, DataTable)
        if table.row_count == 0:
            return None
        row: list[Any] = table.get_row_at(table.cursor_row)
        return str(row[0])  # str() of a Text cell is its plain text

    def action_cancel_job(self) -> None:
        """Cancel the selected job."""
        job_id = self._selected("#jobs")
        if job_id is not None:
            result = self.client.cancel([int(job_id)])
            self.notify(f"job {job_id}: {result[0]['result']}", markup=False)
            self.action_refresh()

    def action_drain_node(self) -> None:
        """Drain the selected agent, or undrain it if it is draining."""
        name = self._selected("#nodes")
        if name is not None:
            node = next((n for n in self.model.nodes if n["name"] == name), None)
            on = node is None or node["state"] != "draining"
            self.client.drain(name, on=on)
            self.notify(f"agent {name}: {'draining' if on else 'accepting work'}", markup=False)
            self.action_refresh()


def run(client: Client, events_ep: str) -> int:
    """Run the dashboard until the user quits."""
    Dashboard(client, events_ep).run()
    return 0
