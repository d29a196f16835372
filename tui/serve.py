"""`ffrtmp dash --serve HOST:PORT`: the same dashboard as a web page, served by textual-serve.

textual-serve answers `GET /` with a page that opens a websocket back to `/ws`; for each websocket
(each browser tab) it starts the dashboard command as a subprocess under Textual's web driver and
relays the screen and the keys. So the browser shows the terminal app itself: there is no second UI.

The page has no authentication and every tab can cancel jobs and drain agents, so a bind that is
not loopback needs `--insecure` (the rule of the other HTTP endpoints; CURVE keys protect the bus,
not this page). Put a reverse proxy that authenticates in front of it to share it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import signal
import socket
import sys
from typing import Any

import psutil

from bus.sockets import BindError, check_http_bind, is_loopback

log = logging.getLogger("ffrtmp.dash.serve")

QUIT_S = 2.0  # what a tab's dashboard gets to quit when asked (its tab closed) before SIGTERM
STOP_GRACE_S = 3.0  # and after SIGTERM, before SIGKILL
SHUTDOWN_S = 2.0  # what open tabs' handlers get to finish when the server stops


class ServeError(ValueError):
    """A --serve HOST:PORT that is not one."""


def parse_bind(text: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT (`[v6]:PORT` too; an empty host is 127.0.0.1)."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]") if host.startswith("[") and host.endswith("]") else host
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536 \
            or (":" in host and not text.strip().startswith("[")):
        raise ServeError(f"--serve {text!r}: expected HOST:PORT (e.g. 127.0.0.1:8088)")
    return host or "127.0.0.1", int(port_text)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def dash_command(args: argparse.Namespace) -> list[str]:
    """The `ffrtmp ... dash` argv each browser tab runs: this interpreter (so a venv works without
    PATH), the global client and log options the server got, and no --serve."""
    argv = [sys.executable, "-m", "ffrtmp"]
    options: list[tuple[str, Any]] = [
        ("--master", getattr(args, "master_ep", None)),
        ("--events-ep", getattr(args, "events_ep", None)),
        ("--timeout", getattr(args, "request_timeout", None)),
        ("--client-key", getattr(args, "client_key", None)),
        ("--master-key", getattr(args, "master_public_key", None)),
        ("--log-level", getattr(args, "log_level", None)),
        ("--log-format", getattr(args, "log_format", None)),
        ("--log-file", getattr(args, "log_file", None)),
    ]
    paths = {"--client-key", "--master-key", "--log-file"}
    for flag, value in options:
        if value is None or value == "":
            continue
        text = os.path.abspath(value) if flag in paths else str(value)
        argv += [flag, text]
    return [*argv, "dash"]


def _stop_children(grace: float = STOP_GRACE_S) -> int:
    """Terminate every process this server started that is still running (the dashboards of tabs
    still open, and anything they started); SIGKILL after `grace`. Returns how many there were."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    return len(children)


def _server_class() -> type:
    """textual-serve's Server, adapted (imported only when serving): ffrtmp's logging, one line
    once the port is bound instead of its banner, each tab's dashboard run without a shell in a
    session of its own and always ended with its tab, and open tabs closed on shutdown."""
    from aiohttp import WSCloseCode, web
    from textual_serve.app_service import AppService
    from textual_serve.server import Server, to_int

    class DashProcess(AppService):
        """One tab's dashboard process."""

        def __init__(self, argv: list[str], **kw: Any) -> None:
            super().__init__(shlex.join(argv), **kw)
            self.argv = argv
            self._stopping: asyncio.Future[None] | None = None

        async def _open_app_process(self, width: int = 80, height: int = 24) -> Any:
            # AppService runs the command through /bin/sh, which stays as the parent: ending
            # "the process" ended the shell and left the dashboard running. Its stderr (the
            # dashboard's log, a crash) goes to the server's stderr as it comes: AppService
            # buffered it and lost it when the app died early.
            self._process = process = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=None, start_new_session=True,
                env=self._build_environment(width=width, height=height))
            self._stdin = process.stdin
            return process

        async def run(self) -> None:
            """Relay the app's output to the tab (AppService.run, with stderr left alone);
            when it ends (the app quit, crashed or never started) close the tab's websocket,
            so the page says "Session ended" instead of loading forever."""
            assert self._process is not None and self._process.stdout is not None
            stdout = self._process.stdout
            handlers = {b"D": self.on_data, b"M": self.on_meta, b"P": self.on_packed}
            try:
                for _ in range(10):  # Textual's web driver starts with this line
                    line = await stdout.readline()
                    if not line or line == b"__GANGLION__\n":
                        break
                if line != b"__GANGLION__\n":
                    log.error("the dashboard did not start (its stderr is above)")
                    return
                while True:
                    kind = await stdout.readexactly(1)
                    size = int.from_bytes(await stdout.readexactly(4), "big")
                    payload = await stdout.readexactly(size)
                    if handler := handlers.get(kind):
                        await handler(payload)
            except asyncio.IncompleteReadError:
                pass  # the app ended
            except ConnectionResetError:  # the browser went away: keep the app from blocking
                while await stdout.read(1 << 16):  # on a full pipe until it has quit (stop())
                    pass
            finally:
                with contextlib.suppress(ConnectionResetError):
                    await self.remote_close()

        async def stop(self) -> None:
            """End the app (once, however many ask: the tab's handler and the server's
            shutdown; a cancelled caller does not cancel the stopping)."""
            if self._stopping is None:
                self._stopping = asyncio.ensure_future(self._stop())
            await asyncio.shield(self._stopping)

        async def _stop(self) -> None:
            """Ask the app to quit and wait for it; then SIGTERM, then SIGKILL its session.
            (AppService.stop only waits for the app's output to end, which it does at once when
            the browser has gone, and never for the process: a closed tab's dashboard ran on.)"""
            loop = asyncio.get_running_loop()
            deadline = loop.time() + QUIT_S
            task, self._task = self._task, None
            if task is not None:
                await self._download_manager.cancel_app_downloads(
                    app_service_id=self.app_service_id)
                await self.send_meta({"type": "quit"})
                try:  # the relay ends when the app has quit (or the browser has gone)
                    await asyncio.wait_for(task, QUIT_S)
                except asyncio.TimeoutError:
                    pass
            process = self._process
            if process is None or process.returncode is not None:
                return
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    try:
                        os.killpg(process.pid, sig)
                    except ProcessLookupError:
                        pass
                wait = max(deadline - loop.time(), 0.05) if sig is None else STOP_GRACE_S
                try:
                    await asyncio.wait_for(process.wait(), wait)
                    return
                except asyncio.TimeoutError:
                    log.warning("dashboard process %d did not end%s", process.pid,
                                f" on {signal.Signals(sig).name}" if sig else " when asked")

    class DashServer(Server):
        def __init__(self, argv: list[str], *, banner: str, **kw: Any) -> None:
            super().__init__(shlex.join(argv), **kw)
            self.argv = argv
            self.banner = banner
            self.sockets: set[web.WebSocketResponse] = set()
            self.services: set[DashProcess] = set()

        def initialize_logging(self) -> None:
            """ffrtmp's logging is set up already (--log-level, --log-format, --log-file)."""

        async def on_startup(self, app: web.Application) -> None:
            """No banner here: the line is printed once the socket is bound."""

        async def on_shutdown(self, app: web.Application) -> None:
            """Close the open tabs and end their dashboards, before aiohttp cancels the tabs'
            handlers and closes the loop (a subprocess left to that printed tracebacks)."""
            for ws in list(self.sockets):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server stopping")
            await asyncio.gather(*(service.stop() for service in list(self.services)))

        async def handle_websocket(self, request: web.Request) -> web.WebSocketResponse:
            """Server.handle_websocket with DashProcess, and the process ended in every case."""
            websocket = web.WebSocketResponse(heartbeat=15)
            width = to_int(request.query.get("width", "80"), 80)
            height = to_int(request.query.get("height", "24"), 24)
            service: DashProcess | None = None
            try:
                await websocket.prepare(request)
                self.sockets.add(websocket)
                service = DashProcess(self.argv, write_bytes=websocket.send_bytes,
                                      write_str=websocket.send_str, close=websocket.close,
                                      download_manager=self.download_manager, debug=self.debug)
                self.services.add(service)
                await service.start(width, height)
                await self._process_messages(websocket, service)
            except asyncio.CancelledError:
                await websocket.close()
                raise
            except Exception as e:  # a malformed message from the page, a dead process
                log.warning("dashboard tab ended: %r", e)
            finally:
                self.sockets.discard(websocket)
                if service is not None:
                    await service.stop()
                    self.services.discard(service)
            return websocket

        def serve(self, debug: bool = False) -> None:
            """Server.serve with signals that stop it, and our line once the port is bound."""
            self.debug = debug
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_exit)
            web.run_app(self._make_app(), host=self.host, port=self.port, loop=loop,
                        handle_signals=False, shutdown_timeout=SHUTDOWN_S,
                        print=lambda *_: print(self.banner, flush=True))

    return DashServer


def serve(args: argparse.Namespace) -> int:
    """Serve the dashboard on args.serve until SIGINT/SIGTERM; 2 on a refused or failed bind."""
    try:
        host, port = parse_bind(args.serve)
    except ServeError as e:
        print(f"ffrtmp dash: {e}", file=sys.stderr)
        return 2
    url = f"http://{_url_host(host)}:{port}"
    try:
        check_http_bind(f"{_url_host(host)}:{port}", bool(args.insecure), secured=False)
    except BindError:
        print(f"ffrtmp dash: refusing to serve the dashboard on {args.serve}: not loopback, and "
              "the page has no authentication (CURVE keys protect the bus, not this page); bind "
              "127.0.0.1 behind an authenticating reverse proxy, or pass --insecure",
              file=sys.stderr)
        return 2
    loopback = is_loopback(f"tcp://{_url_host(host)}:1")
    public_url = args.public_url or url
    if not args.public_url and host in ("0.0.0.0", "::", "*"):  # what a browser can reach
        name = socket.getfqdn()
        name = socket.gethostname() if name.startswith("localhost") else name
        public_url = f"http://{_url_host(name)}:{port}"
    argv = dash_command(args)
    where = "loopback only" if loopback else "NOT loopback: unauthenticated, anyone who reaches it"
    banner = f"serving the dashboard at {url} ({where})"
    if public_url.rstrip("/") != url:
        banner += f", pages connect back to {public_url.rstrip('/')}"
    server = _server_class()(argv, host="::" if host == "*" else host, port=port,
                             title="ffrtmp", public_url=public_url.rstrip("/"), banner=banner)
    log.debug("each tab runs: %s", shlex.join(argv))
    try:
        server.serve()
    except OSError as e:
        print(f"ffrtmp dash: cannot serve the dashboard on {args.serve}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    finally:
        stopped = _stop_children()
        if stopped:
            log.info("stopped %d dashboard process(es) of open tabs", stopped)
    return 0
