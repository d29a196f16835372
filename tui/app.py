"""`ffrtmp dash`: an operator console (Textual) that reads the master only through the bus.

Data comes from tui/feed.py (a background thread) and is folded into tui/model.py on the UI
thread; actions (cancel, retry, drain, detail) run on their own threads. So the screen never
waits on the master: when it is down the status line says so and the keys keep working.
"""

from __future__ import annotations

import functools
import queue
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical
from textual.coordinate import Coordinate
from textual.css.query import NoMatches
from textual.widgets import (
    DataTable,
    Footer,
    Header,
    Input,
    Log,
    Sparkline,
    Static,
    TabbedContent,
    TabPane,
)

from bus.client import Client
from bus.errors import ClientError
from bus.vocab import TERMINAL
from tui.feed import Feed, Snapshot
from tui.model import SERIES, DashModel, Filter, human_bytes
from tui.screens import Confirm, Detail, in_background

# (key, label, width): columns in the order they are given up when the table is narrow.
JOB_COLUMNS = [("id", "id", 7), ("state", "state", 10), ("progress", "progress", 15),
               ("agent", "agent", 10), ("scenario", "scenario", 11), ("prio", "prio", 6),
               ("eta", "eta", 5), ("fps", "fps", 5), ("speed", "speed", 6),
               ("attempt", "try", 5), ("age", "age", 5)]
NODE_COLUMNS = [("agent", "agent", 12), ("state", "state", 9), ("busy", "busy", 4),
                ("slots", "slots", 5), ("in/s", "in/s", 6), ("out/s", "out/s", 6),
                ("seen", "seen", 8), ("cpu", "cpu", 4), ("mem", "mem", 6),
                ("limits", "limits", 22), ("encoders", "encoders", 24)]
PUMP_S = 0.1  # how often the feed's updates are folded in
RENDER_S = 0.3  # tables are redrawn at most this often
F = TypeVar("F", bound=Callable[..., None])


def while_shown(fn: F) -> F:
    """For timer callbacks: a tick that lands while the app is exiting (its widgets already
    gone) does nothing instead of raising NoMatches out of the exit."""

    @functools.wraps(fn)
    def run(*args: Any, **kw: Any) -> None:
        try:
            fn(*args, **kw)
        except NoMatches:
            pass

    return run  # type: ignore[return-value]


def fitting(columns: Sequence[tuple[str, str, int]], width: int) -> list[tuple[str, str, int]]:
    """The leading columns that fit in `width` cells (each takes its width plus 2 of padding);
    the first always."""
    out: list[tuple[str, str, int]] = []
    used = 0
    for col in columns:
        if out and used + col[2] + 2 > width:
            break
        out.append(col)
        used += col[2] + 2
    return out


class SeriesView(Vertical):
    """A titled sparkline with its latest value."""

    def __init__(self, name: str, index: int) -> None:
        super().__init__(id=f"series-{index}", classes="series")
        self.series_name = name

    def compose(self) -> ComposeResult:
        yield Static(Text(self.series_name), classes="series-title")
        yield Sparkline([0.0], classes="series-line")

    def show(self, points: Sequence[float]) -> None:
        last = points[-1] if points else 0.0
        text = human_bytes(last) if "B/s" in self.series_name else f"{last:g}"
        self.query_one(".series-title", Static).update(
            Text.assemble(self.series_name, "  ", (text, "bold")))
        self.query_one(Sparkline).data = list(points)[-120:]


class Dashboard(App[None]):
    """Overview, jobs, agents and events of one master."""

    TITLE = "ffrtmp"
    CSS_PATH = "dash.tcss"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("1", "tab('overview')", "Overview", show=False),
        Binding("2", "tab('jobs-tab')", "Jobs", show=False),
        Binding("3", "tab('agents-tab')", "Agents", show=False),
        Binding("4", "tab('events-tab')", "Events", show=False),
        Binding("slash", "filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("enter", "detail", "Detail"),
        Binding("c", "cancel_job", "Cancel"),
        Binding("C", "cancel_view", "Cancel all shown"),
        Binding("t", "retry_job", "Retry"),
        Binding("d", "drain_node", "Drain/undrain"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self, make_client: Callable[[], Client], events_ep: str | None,
                 endpoint: str = "",
                 feed: bool = True, model: DashModel | None = None,
                 clock: Callable[[], tuple[float, float]] | None = None) -> None:
        """`make_client` makes a new Client (one per thread: ZeroMQ sockets are not shared).
        Tests pass feed=False with a filled `model` and a fixed `clock` (monotonic, epoch)."""
        super().__init__()
        self.make_client = make_client
        self.model = model or DashModel(endpoint=endpoint)
        self.feed = Feed(make_client, events_ep) if feed else None
        self.clock = clock or (lambda: (time.monotonic(), time.time()))
        self._dirty = True
        self._stale: bool | None = None
        self._widths: dict[str, int] = {}
        self._logged = 0

    # ---- layout ---------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(Text("… connecting"), id="status")
        with TabbedContent(initial="overview"):
            with TabPane("Overview", id="overview"):
                with Grid(id="series"):
                    for i, name in enumerate(SERIES):
                        yield SeriesView(name, i)
                yield Static(Text(""), id="overview-text")
                yield Log(id="recent-log", max_lines=200)
            with TabPane("Jobs", id="jobs-tab"):
                yield Input(placeholder="filter: state:failed scenario:720p-h264 agent:a1 123 "
                                        "(enter applies, escape clears)", id="filter")
                yield Static(Text(""), id="filter-line")
                yield DataTable(id="jobs", cursor_type="row", zebra_stripes=True)
            with TabPane("Agents", id="agents-tab"):
                yield DataTable(id="nodes", cursor_type="row", zebra_stripes=True)
            with TabPane("Events", id="events-tab"):
                yield Log(id="log", max_lines=2000)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.model.endpoint
        self.query_one("#filter", Input).display = False
        self.set_interval(PUMP_S, self._pump)
        self.set_interval(1.0, self._tick)
        self.set_interval(0.25, self._status)
        self.set_interval(RENDER_S, self._render)
        if self.feed is not None:
            self.feed.start()
        self._status()
        self._render()
        self._tick(advance=False)

    def on_unmount(self) -> None:
        if self.feed is not None:
            self.feed.stop()  # never joined here: `q` must not wait on the bus

    def on_resize(self) -> None:
        self._dirty = True

    # ---- data -----------------------------------------------------------------------------

    @while_shown
    def _pump(self) -> None:
        """Fold in what the feed has brought since the last call."""
        if self.feed is None:
            return
        now, wall = self.clock()
        m = self.model
        while True:
            try:
                kind, payload = self.feed.updates.get_nowait()
            except queue.Empty:
                break
            if kind == "snapshot":
                snap: Snapshot = payload
                m.set_snapshot(snap.stats, snap.nodes, snap.live, snap.recent, now, snap.wall)
                self._dirty = True
            elif kind == "events":
                self._dirty |= m.apply_events(payload, wall)
            elif kind == "progress":
                for body in payload:
                    self._dirty |= m.apply_progress(body)
            elif kind == "agent":
                m.apply_agent_event(payload, wall)
            elif kind == "heard":
                m.heard(now, payload)
            elif kind == "down":
                m.failed_request(str(payload))
        self._write_log()

    @while_shown
    def _tick(self, advance: bool = True) -> None:
        """Once a second: close the rates and redraw the overview. Without a feed (a model
        filled by its caller, under a fixed clock) the rates are the caller's: redraw only, so
        what is shown never depends on how long the app has been up."""
        if advance and self.feed is not None:
            self.model.tick()
        for view in self.query(SeriesView):
            view.show(self.model.series[view.series_name].points)
        self.query_one("#overview-text", Static).update(self.model.overview())

    @while_shown
    def _status(self) -> None:
        now, _ = self.clock()
        self.query_one("#status", Static).update(self.model.status(now))
        stale = self.model.down_for(now) is not None
        if stale != self._stale:
            self._stale = stale
            self._dirty = True
            self.set_class(stale, "stale")

    def _write_log(self) -> None:
        new = self.model.log_lines(self._logged)
        self._logged = self.model.logged
        for at, _, text in new:
            line = f"{time.strftime('%H:%M:%S', time.localtime(at))}  {text}"
            self.query_one("#log", Log).write_line(line)  # Log is plain text: never markup
            self.query_one("#recent-log", Log).write_line(line)

    # ---- tables ---------------------------------------------------------------------------

    @while_shown
    def _render(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        _, wall = self.clock()
        style = "dim" if self._stale else ""
        jobs = self.query_one("#jobs", DataTable)
        self._fill(jobs, JOB_COLUMNS, [
            (str(j["id"]), self.model.job_cells(j, wall)) for j in self.model.jobs()], style)
        nodes = self.query_one("#nodes", DataTable)
        self._fill(nodes, NODE_COLUMNS, [
            (n["name"], self.model.node_cells(n)) for n in sorted(
                self.model.nodes.values(), key=lambda n: n["name"])], style)
        f = self.model.filter
        shown = jobs.row_count
        self.query_one("#filter-line", Static).update(Text(
            (f"filter: {f.text}   " if f else "") + f"{shown} jobs shown "
            f"({len(self.model.live)} open, {len(self.model.recent)} recently finished)"
            "   / filter · enter detail · c cancel · C cancel shown · t retry"))

    def _fill(self, table: DataTable, columns: Sequence[tuple[str, str, int]],
              rows: list[tuple[str, dict[str, str]]], style: str) -> None:
        """Redraw a table keeping the cursor on the same row key (a job id or an agent name),
        so the selection follows the job, not the position, as rows above it come and go."""
        width = table.size.width or self.size.width or 80
        cols = fitting(columns, width - 2)
        if self._widths.get(table.id or "") != len(cols) or not table.columns:
            table.clear(columns=True)
            for key, label, w in cols:
                table.add_column(label, width=w, key=key)
            self._widths[table.id or ""] = len(cols)
        selected, index = self._cursor_key(table), table.cursor_row
        table.clear()
        for key, cells in rows:
            table.add_row(*(Text(cells[c[0]], style=style) for c in cols), key=key)
        if not rows:
            return
        keys = [key for key, _ in rows]
        row = keys.index(selected) if selected in keys else min(max(index, 0), len(rows) - 1)
        table.move_cursor(row=row, animate=False)

    @staticmethod
    def _cursor_key(table: DataTable) -> str | None:
        if table.row_count == 0:
            return None
        try:
            key = table.coordinate_to_cell_key(Coordinate(table.cursor_row, 0)).row_key.value
        except Exception:  # cursor outside the rows
            return None
        return str(key) if key is not None else None

    def selected_job(self) -> dict[str, Any] | None:
        """The job under the cursor of the jobs table (what the operator sees highlighted)."""
        key = self._cursor_key(self.query_one("#jobs", DataTable))
        if key is None:
            return None
        job_id = int(key)
        return self.model.live.get(job_id) or self.model.recent.get(job_id)

    def selected_node(self) -> dict[str, Any] | None:
        key = self._cursor_key(self.query_one("#nodes", DataTable))
        return None if key is None else self.model.nodes.get(key)

    # ---- actions --------------------------------------------------------------------------

    def _active(self) -> str:
        """The tab shown, or "" while a confirmation or a detail is open over it (the app's
        keys then do nothing: a `c` pressed at a confirmation must not stack a second one)."""
        if len(self.screen_stack) > 1:
            return ""
        return self.query_one(TabbedContent).active

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        table = {"jobs-tab": "#jobs", "agents-tab": "#nodes"}.get(tab)
        if table:
            self.query_one(table, DataTable).focus()

    def action_refresh(self) -> None:
        if self.feed is not None:
            self.feed.poll_now.set()

    def action_filter(self) -> None:
        if not self._active():
            return
        self.action_tab("jobs-tab")
        box = self.query_one("#filter", Input)
        box.display = True
        box.value = self.model.filter.text
        box.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        try:
            f = Filter.parse(event.value)
        except ValueError as e:
            self.notify(str(e), severity="error", markup=False)
            return
        self._set_filter(f)
        event.input.display = False
        self.query_one("#jobs", DataTable).focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = False
        self._set_filter(Filter())
        self.query_one("#jobs", DataTable).focus()

    def _set_filter(self, f: Filter) -> None:
        self.model.filter = f
        if self.feed is not None:
            self.feed.filter = f
            self.feed.poll_now.set()
        self._dirty = True
        self._render()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a table: the DataTable takes the key itself and says so with this."""
        if event.data_table.id == "jobs":
            self.action_detail()

    def action_detail(self) -> None:
        if self._active() != "jobs-tab":
            return
        job = self.selected_job()
        if job is not None:
            self.push_screen(Detail(job["id"], self.make_client))

    def _call(self, what: str, fn: Callable[[Client], Any],
              done: Callable[[Any], str]) -> None:
        """Run one bus call off the UI thread and say how it went."""

        def run() -> Any:
            with self.make_client() as client:
                return fn(client)

        def report(result: Any) -> None:
            if isinstance(result, ClientError):
                self.notify(f"{what}: {result.code}: {result.text}", severity="error",
                            markup=False)
            else:
                self.notify(done(result), markup=False)
            self.action_refresh()

        in_background(self, run, report)

    def action_cancel_job(self) -> None:
        job = self.selected_job() if self._active() == "jobs-tab" else None
        if job is None:
            return
        job_id = job["id"]  # captured now: the confirmation acts on exactly this job
        if job["state"] in TERMINAL:
            self.notify(f"job {job_id} is already {job['state']}", markup=False)
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._call(f"cancel job {job_id}", lambda c: c.cancel([job_id]),
                           lambda r: f"job {job_id}: {r[0]['result']}")

        self.push_screen(Confirm(f"Cancel job {job_id} ({job.get('scenario')}, "
                                 f"{job['state']} on {job.get('agent') or 'no agent'})?"),
                         answered)

    def action_cancel_view(self) -> None:
        if self._active() != "jobs-tab":
            return
        ids = self.model.open_ids()
        if not ids:
            self.notify("no open jobs in this view", markup=False)
            return
        f = self.model.filter

        def answered(yes: bool | None) -> None:
            if yes:
                self._call(f"cancel {len(ids)} jobs", lambda c: c.cancel(ids),
                           lambda r: f"cancel of {len(ids)} jobs: " + ", ".join(
                               f"{n} {k}" for k, n in sorted(_count(r).items())))

        if len(ids) == 1:
            question = f"Cancel job {ids[0]}, the one open job shown?"
        else:
            question = (f"Cancel {len(ids)} open jobs shown ("
                        + (f"filter: {f.text}" if f else "no filter: every open job shown")
                        + f"; ids {min(ids)}…{max(ids)})?")
        self.push_screen(Confirm(question), answered)

    def action_retry_job(self) -> None:
        job = self.selected_job() if self._active() == "jobs-tab" else None
        if job is None:
            return
        job_id = job["id"]
        if job["state"] not in TERMINAL:
            self.notify(f"job {job_id} is {job['state']}: only a finished job is retried",
                        markup=False)
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._call(f"retry job {job_id}", lambda c: c.retry(job_id),
                           lambda new: f"job {job_id} submitted again as job {new}")

        self.push_screen(Confirm(f"Retry job {job_id} ({job.get('scenario')}, {job['state']}) "
                                 "as a new job?"), answered)

    def action_drain_node(self) -> None:
        node = self.selected_node() if self._active() == "agents-tab" else None
        if node is None:
            if self._active() not in ("agents-tab", ""):
                self.notify("drain: pick an agent on the Agents tab (3)", markup=False)
            return
        name = node["name"]
        on = node["state"] != "draining"

        def answered(yes: bool | None) -> None:
            if yes:
                self._call(f"drain {name}", lambda c: c.drain(name, on=on),
                           lambda r: f"agent {name}: "
                           + ("draining" if r.get("draining") else "accepting work"))

        verb = "Drain" if on else "Undrain"
        what = ("no new jobs; running ones finish" if on else "accept new jobs again")
        self.push_screen(Confirm(f"{verb} agent {name} ({what})?"), answered)


def _count(results: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        out[r["result"]] = out.get(r["result"], 0) + 1
    return out


def run(make_client: Callable[[], Client], events_ep: str | None, endpoint: str) -> int:
    """Run the dashboard until the user quits."""
    Dashboard(make_client, events_ep, endpoint).run()
    return 0
