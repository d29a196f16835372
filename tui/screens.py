"""The dashboard's modal screens: a confirmation and the job detail."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Static

from bus.client import Client
from bus.errors import ClientError
from tui.model import bar, eta, human_bytes

DETAIL_REFRESH_S = 1.0


def in_background(app: Any, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
    """Run fn on a daemon thread and hand its result (or its ClientError) to done on the UI
    thread. Not a Textual worker: those run on asyncio's default executor, which the app's exit
    waits for, and a bus call to a master that is down would hold `q` for its whole timeout."""

    def run() -> None:
        try:
            result: Any = fn()
        except ClientError as e:
            result = e
        try:
            app.call_from_thread(done, result)
        except RuntimeError:
            pass  # the app has exited meanwhile: nobody to tell

    threading.Thread(target=run, name="dash-action", daemon=True).start()


class Confirm(ModalScreen[bool]):
    """Ask before acting: the question names exactly what will be acted on."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n", "answer(False)", "No"),
                Binding("escape", "answer(False)", "No", show=False)]

    def __init__(self, question: str) -> None:
        super().__init__(id="confirm")
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(Text(self.question), id="question")  # names come from peers: no markup
            with Horizontal(id="confirm-buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


def when(epoch: Any) -> str:
    """Local time of an epoch value, or '-'."""
    if not isinstance(epoch, int | float):
        return "-"
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def detail_text(job: dict[str, Any], wall: float) -> Text:
    """Everything about one job but its trail, as plain text (values come from peers)."""
    spec = job.get("spec") or {}
    extra = job.get("extra") or {}
    lines = [
        f"job {job['id']}: {job['state']}"
        + (f" ({job['reason']})" if job.get("reason") else ""),
        f"scenario   {job.get('scenario')}   priority {job.get('priority')}   attempt "
        f"{job.get('attempt')}/{job.get('max_attempts')}   agent {job.get('agent') or '-'}",
        f"input      {spec.get('input') or '-'}",
        f"output     {job.get('output') or spec.get('output') or '-'}"
        + (f"  -> {extra['output_path']}" if extra.get("output_path") else ""),
        f"progress   {bar(job.get('progress') or 0.0, 20)}"
        + (f"   fps {extra['fps']:.0f}" if isinstance(extra.get("fps"), int | float) else "")
        + (f"   speed {extra['speed']:.2f}x" if isinstance(extra.get("speed"), int | float)
           else "")
        + (f"   ETA {eta(job, wall)}" if eta(job, wall) else ""),
        f"bytes      in {human_bytes(job.get('bytes_in') or 0)}B   out "
        f"{human_bytes(job.get('bytes_out') or 0)}B   exit code {job.get('exit_code')}",
        f"times      created {when(job.get('created_at'))}   started "
        f"{when(job.get('started_at'))}   finished {when(job.get('finished_at'))}",
        f"limits     {json.dumps(job.get('resource_limits') or {})}   timeout "
        f"{job.get('timeout_s') or 'agent default'}",
    ]
    if extra.get("argv"):
        lines.append("ffmpeg     " + " ".join(str(a) for a in extra["argv"]))
    if extra.get("error"):
        lines.append(f"error      {extra['error']}")
    if extra.get("retry_of"):
        lines.append(f"retry of   job {extra['retry_of']}")
    lines.append("spec       " + json.dumps(spec, sort_keys=True, default=str))
    if extra.get("stderr"):
        lines.append("stderr tail:")
        lines += [f"  | {line}" for line in str(extra["stderr"]).splitlines()[-30:]]
    return Text("\n".join(lines))


class Detail(ModalScreen[None]):
    """One job: its spec, figures, audit trail and stderr tail, refreshed every second."""

    BINDINGS = [Binding("escape", "dismiss_detail", "Close"),
                Binding("q", "dismiss_detail", "Close", show=False)]

    def __init__(self, job_id: int, make_client: Callable[[], Client]) -> None:
        super().__init__(id="detail")
        self.job_id = job_id
        self.make_client = make_client
        self.loaded = False
        self._loading = False

    def compose(self) -> ComposeResult:
        with Vertical(id="detail-box"):
            yield Static(Text(f"job {self.job_id}: loading…"), id="detail-title")
            with VerticalScroll(id="detail-scroll"):
                yield Static(Text(""), id="detail-body")
                yield DataTable(id="trail", cursor_type="none", zebra_stripes=True)
            yield Static(Text("escape: close"), id="detail-help")

    def on_mount(self) -> None:
        self.query_one("#trail", DataTable).add_columns(
            "seq", "at", "from", "to", "reason", "agent", "attempt")
        self.load()
        self.set_interval(DETAIL_REFRESH_S, self.load)

    def load(self) -> None:
        """GET the job with its events, off the UI thread (one request at a time)."""
        if self._loading:
            return
        self._loading = True

        def get() -> tuple[list[dict[str, Any]], list[int]]:
            with self.make_client() as client:
                return client.get([self.job_id], events=True)

        in_background(self.app, get, self._loaded)

    def _loaded(self, result: Any) -> None:
        self._loading = False
        if isinstance(result, ClientError):
            self._show_error(f"{result.code}: {result.text}")
            return
        jobs, missing = result
        if missing or not jobs:
            self._show_error("not found (deleted by retention?)")
            return
        self._show(jobs[0])

    def _show_error(self, text: str) -> None:
        if self.is_attached:
            self.query_one("#detail-title", Static).update(
                Text(f"job {self.job_id}: {text}", style="bold red"))

    def _show(self, job: dict[str, Any]) -> None:
        if not self.is_attached:
            return
        self.loaded = True
        now = time.time()
        self.query_one("#detail-title", Static).update(
            Text(f"job {self.job_id} · {job.get('scenario')} · {job['state']}", style="bold"))
        self.query_one("#detail-body", Static).update(detail_text(job, now))
        trail = self.query_one("#trail", DataTable)
        trail.clear()
        for e in job.get("events") or []:
            trail.add_row(*(Text(str(v)) for v in (
                e.get("seq"), when(e.get("at")), e.get("from_state") or "-", e.get("state"),
                e.get("reason") or "", e.get("agent") or "", e.get("attempt"))))

    def action_dismiss_detail(self) -> None:
        self.dismiss(None)

