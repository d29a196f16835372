"""`ffrtmp dash --serve`: the dashboard as a web page, loaded by Debian's headless Chromium.

A real master and agent; `python -m ffrtmp ... dash --serve 127.0.0.1:PORT` as a subprocess; a
headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: no port,
no extra package). `chromium --screenshot URL` is not enough: it shoots when the page has loaded,
which is before the websocket has brought the first screen (virtual time does not wait for it),
so it always shows textual-serve's loading card. Over DevTools the test waits for the app itself:

- the websocket frames the page received carry the overview (issue 12's status line and the
  Overview tab), which is what the browser's terminal draws;
- the page left its loading card (textual.js sets `-first-byte` on the first screen) and is not
  showing "Session ended";
- a screenshot is not uniform (weak on its own: the loading card is not uniform either), and
  the server ran exactly one dashboard process while the page was open.

Then the processes: closing the tab ends its dashboard; a browser killed while its dashboard hangs
(SIGSTOP) still gets that dashboard ended; SIGINT or SIGTERM ends the server and the dashboards of
open tabs, hung or not, with no traceback. It also checks the bind rule: a non-loopback --serve
is refused (exit 2, one line naming --insecure) and starts with --insecure.

DASH_SERVE_SCREENSHOT=PATH saves the screenshot of the first test there. (docs/img/dash-serve.png
was taken the same way, with two agents and jobs flowing so that the plots show something.)
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import free_port, wait_for
from harness import ROOT, Cluster

pytestmark = [pytest.mark.ui, pytest.mark.slow]  # slow: run once, in the full stage

# What the first screen of the dashboard shows (issue 12's UI contract): the status line and the
# Overview tab, the first one.
OVERVIEW = ("● live", "agents 1", "completed/s", "queued high")
WIDTH, HEIGHT = 1280, 800
START_S = 20  # server up; the page's first screen (a cold Python + Textual start on a busy CI)
STOP_S = 10  # the server and its dashboards gone after a signal
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


# --------------------------------------------------------------------------- the server


class DashServer:
    """`python -m ffrtmp [--master EP --events-ep EP] dash --serve ...`, output in a file."""

    def __init__(self, tmp: Path, serve: str, *extra: str, cluster: Cluster | None = None) -> None:
        self.log = tmp / f"serve-{serve.replace(':', '_')}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        for name in ("FFRTMP_MASTER", "FFRTMP_EVENTS", "FFRTMP_CLIENT_KEY", "FFRTMP_MASTER_KEY"):
            env.pop(name, None)
        client = ["--master", cluster.clients_ep, "--events-ep", cluster.events_ep] if cluster \
            else []
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ffrtmp", *client, "dash", "--serve", serve, *extra],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        self.ps = psutil.Process(self.proc.pid)
        self.seen: list[psutil.Process] = []  # every dashboard process it was seen to run

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def answers(self, port: int) -> bool:
        """True once GET / on 127.0.0.1:port gives textual-serve's page."""
        assert self.proc.poll() is None, f"the server exited:\n{self.text()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as resp:
                return resp.status == 200 and b"textual-terminal" in resp.read()
        except (urllib.error.URLError, OSError):
            return False

    def dashboards(self) -> list[psutil.Process]:
        """The server's live child processes that run `ffrtmp ... dash` (one per open tab)."""
        found = []
        try:
            children = self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for child in children:
            try:
                cmd = child.cmdline()
                if "dash" in cmd and "--serve" not in cmd and \
                        child.status() != psutil.STATUS_ZOMBIE:
                    found.append(child)
            except psutil.NoSuchProcess:
                continue
        self.seen.extend(p for p in found if p not in self.seen)
        return found

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the server, wait for it; every dashboard it ran must be gone with it."""
        self.dashboards()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the server outlived {sig!r} by {STOP_S}s:\n{self.text()}") from None
        left = [p for p in self.seen if not gone(p)]
        assert not left, f"dashboard processes left after the server ended: {left}"
        return rc

    def close(self) -> None:
        """Whatever happened: no server, no dashboard process left."""
        self.dashboards()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_S)
        for p in self.seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


# --------------------------------------------------------------------------- the browser


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (NUL-separated JSON on the
    browser's fds 3 and 4), with one page attached."""

    def __init__(self, tmp: Path) -> None:
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()
        self.err = tmp / "chromium.log"
        with open(self.err, "wb") as err:
            # bash puts the pipes on fds 3 and 4, where --remote-debugging-pipe wants them (dash
            # takes one-digit fds only).
            self.proc = subprocess.Popen(
                ["bash", "-c", f'exec "$0" "$@" 3<&{to_r} 4>&{from_w}', "chromium",
                 "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--remote-debugging-pipe", f"--user-data-dir={tmp / 'chromium-profile'}",
                 f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars", "about:blank"],
                pass_fds=(to_r, from_w), stdout=err, stderr=subprocess.STDOUT,
                start_new_session=True)
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        self.session = ""

    def _read(self, timeout: float) -> dict[str, Any] | None:
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._from], [], [], max(timeout, 0))
            if not ready:
                return None
            chunk = os.read(self._from, 1 << 20)
            if not chunk:
                raise AssertionError(f"chromium went away:\n{self.err.read_text()[-2000:]}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, page: bool = True, timeout: float = 20,
             **params: Any) -> dict[str, Any]:
        """One DevTools command (on the attached page unless page=False); its result."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if page:
            msg["sessionId"] = self.session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline - time.monotonic())
            if reply is None:
                raise AssertionError(f"no reply to {method} within {timeout}s")
            if reply.get("id") == self._id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply.get("result", {})
            self.events.append(reply)

    def open(self, url: str) -> None:
        """A new page (tab) of WIDTH x HEIGHT, attached, with network events on, loading url."""
        target = self.call("Target.createTarget", page=False, url="about:blank")["targetId"]
        self.target = target
        self.session = self.call("Target.attachToTarget", page=False, targetId=target,
                                 flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                  deviceScaleFactor=1, mobile=False)
        self.call("Network.enable")
        self.events.clear()
        self.frames = ""
        self.call("Page.navigate", url=url)

    def screen_text(self) -> str:
        """Everything the page's websocket received so far, as text without escape sequences."""
        while (msg := self._read(0)) is not None:
            self.events.append(msg)
        for event in self.events:
            if event.get("method") == "Network.webSocketFrameReceived":
                response = event["params"]["response"]
                data = response["payloadData"]
                self.frames += (base64.b64decode(data).decode("utf-8", "replace")
                                if response["opcode"] == 2 else data)
        self.events.clear()
        return ANSI.sub("", self.frames)

    def shows(self, *texts: str) -> bool:
        """True once the page's terminal has received every one of texts (polled a little);
        AssertionError if the page says the session ended."""
        msg = self._read(0.05)
        if msg is not None:
            self.events.append(msg)
        screen = self.screen_text()
        if all(t in screen for t in texts):
            return True
        assert "-closed" not in self.body_class(), "the page says: Session ended"
        return False

    def js(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression,
                         returnByValue=True)["result"].get("value")

    def body_class(self) -> str:
        """The page's body classes: textual.js adds -first-byte on the first screen, -closed
        when the websocket closed ("Session ended")."""
        return self.js("document.body ? document.body.className : ''") or ""

    def screenshot(self, scale: float = 1.0) -> bytes:
        clip = {"x": 0, "y": 0, "width": WIDTH, "height": HEIGHT, "scale": scale}
        data = self.call("Page.captureScreenshot", format="png", clip=clip)["data"]
        return base64.b64decode(data)

    def close_tab(self) -> None:
        self.call("Target.closeTarget", page=False, targetId=self.target)

    def kill(self) -> None:
        """SIGKILL the browser and its processes (a crash, a laptop lid closing)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=5)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.call("Browser.close", page=False, timeout=5)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        for fd in (self._to, self._from):
            with contextlib.suppress(OSError):
                os.close(fd)


def gone(proc: psutil.Process) -> bool:
    """True once a process has ended (a zombie counts: its parent reaps it)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def png_colours(png: bytes) -> int:
    """How many distinct colours an 8-bit RGB/RGBA non-interlaced PNG (Chromium's) has."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    channels = 4
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        body = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, _, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and not interlace, (depth, colour, interlace)
            channels = 4 if colour == 6 else 3
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    prev = bytearray(stride)
    colours = set()
    for row in range(len(raw) // (stride + 1)):
        kind, line = raw[row * (stride + 1)], bytearray(raw[row * (stride + 1) + 1:
                                                            (row + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) \
                    & 0xFF
        colours.update(bytes(line[i:i + 3]) for i in range(0, stride, channels))
        prev = line
    return len(colours)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path}/db.sqlite")
    try:
        c.start_master()
        c.start_agent("web-a", slots=1)
        yield c
    finally:
        c.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[DashServer]]:
    started: list[DashServer] = []
    try:
        yield started
    finally:
        for server in started:
            server.close()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    browser = Chromium(tmp_path)
    try:
        yield browser
    finally:
        browser.close()


# --------------------------------------------------------------------------- tests


def test_serve_shows_the_overview_in_chromium(cluster: Cluster, servers: list[DashServer],
                                              chromium: Chromium, tmp_path: Path) -> None:
    port = free_port()
    t0 = time.monotonic()
    server = DashServer(tmp_path, f"127.0.0.1:{port}", cluster=cluster)
    servers.append(server)
    wait_for(lambda: server.answers(port), START_S, interval=0.1, message="the page")
    assert server.text().splitlines()[0] == \
        f"serving the dashboard at http://127.0.0.1:{port} (loopback only)"
    assert not server.dashboards()  # nothing runs until a tab opens the websocket

    chromium.open(f"http://127.0.0.1:{port}/")
    try:
        wait_for(lambda: chromium.shows(*OVERVIEW), START_S, interval=0.05,
                 message=f"the overview {OVERVIEW} in the page's websocket")
    except AssertionError as e:
        raise AssertionError(f"{e}\nthe page received: {chromium.screen_text()[-3000:]!r}\n"
                             f"server:\n{server.text()[-3000:]}") from None
    shown = time.monotonic() - t0
    # The browser drew it: the loading card is gone, the session did not end.
    wait_for(lambda: "-first-byte" in chromium.body_class(), 5,
             message="textual.js to leave the loading card")
    assert "-closed" not in chromium.body_class()
    wait_for(lambda: len(server.dashboards()) == 1, 5, message="one dashboard process")
    # Give xterm.js a frame or two to paint what arrived, then look at it.
    wait_for(lambda: png_colours(chromium.screenshot(scale=0.25)) > 8, 5, interval=0.2,
             message="a screenshot that is not uniform")
    if out := os.environ.get("DASH_SERVE_SCREENSHOT"):
        Path(out).write_bytes(chromium.screenshot())
    first = server.dashboards()[0]

    chromium.close_tab()  # a closed tab ends its dashboard
    wait_for(lambda: gone(first), STOP_S, message="the closed tab's dashboard to end")

    # A browser that dies, and a dashboard that hangs (SIGSTOP: it cannot quit when asked, nor
    # on SIGTERM): the server still ends it. (textual-serve alone left such a one running.)
    chromium.open(f"http://127.0.0.1:{port}/")
    wait_for(lambda: chromium.shows("agents 1"), START_S, interval=0.05, message="second tab")
    second = wait_for(lambda: server.dashboards(), 5, message="the second tab's dashboard")[0]
    second.suspend()
    chromium.kill()
    wait_for(lambda: gone(second), STOP_S, message="the dead browser's hung dashboard to end")
    assert server.proc.poll() is None and not server.dashboards()
    assert server.stop(signal.SIGTERM) == 0
    print(f"overview in the browser {shown:.1f}s after the server started; "
          f"test {time.monotonic() - t0:.1f}s")


@pytest.mark.parametrize(("sig", "hung"), [(signal.SIGINT, False), (signal.SIGTERM, True)],
                         ids=["SIGINT", "SIGTERM-hung-dashboard"])
def test_serve_stops_with_a_tab_open(cluster: Cluster, servers: list[DashServer],
                                     chromium: Chromium, tmp_path: Path,
                                     sig: signal.Signals, hung: bool) -> None:
    port = free_port()
    server = DashServer(tmp_path, f"127.0.0.1:{port}", cluster=cluster)
    servers.append(server)
    wait_for(lambda: server.answers(port), START_S, interval=0.1, message="the page")
    chromium.open(f"http://127.0.0.1:{port}/")
    wait_for(lambda: chromium.shows("agents 1"), START_S, interval=0.05, message="the page")
    dashboard = wait_for(lambda: server.dashboards(), 5, message="the tab's dashboard")[0]
    if hung:
        dashboard.suspend()
    t0 = time.monotonic()
    assert server.stop(sig) == 0
    print(f"server and {'hung ' if hung else ''}dashboard gone {time.monotonic() - t0:.2f}s "
          f"after {sig.name}")
    assert "Traceback" not in server.text(), server.text()
    if not hung:
        wait_for(lambda: "-closed" in chromium.body_class(), 5, message="the page to say so")


def test_serve_refuses_a_non_loopback_bind_without_insecure(servers: list[DashServer],
                                                            tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    refused = subprocess.run(
        [sys.executable, "-m", "ffrtmp", "dash", "--serve", f"0.0.0.0:{port}"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=30, check=False)
    assert refused.returncode == 2, refused
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and "--insecure" in lines[0] and "not loopback" in lines[0], lines
    assert "CURVE keys protect the bus, not this page" in lines[0]
    assert refused.stdout == ""

    server = DashServer(tmp_path, f"0.0.0.0:{port}", "--insecure")
    servers.append(server)
    wait_for(lambda: server.answers(port), START_S, interval=0.1, message="the page")
    first = server.text().splitlines()[0]
    assert first.startswith(f"serving the dashboard at http://0.0.0.0:{port} (NOT loopback"), first
    assert server.stop(signal.SIGTERM) == 0
