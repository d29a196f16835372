"""Start a local master and agents as real processes for a benchmark run, and stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bus.client import Client


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalCluster:
    """A master plus `agents` agents of `slots` each, on random loopback ports."""

    def __init__(self, db_url: str | None, agents: int, slots: int,
                 workdir: Path | None = None, master_args: list[str] | None = None) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="ffrtmp-bench-"))
        self.db_url = db_url or f"sqlite:///{self.workdir}/bench.db"
        pa, pc, pe = _free_ports(3)
        self.agents_ep = f"tcp://127.0.0.1:{pa}"
        self.clients_ep = f"tcp://127.0.0.1:{pc}"
        self.events_ep = f"tcp://127.0.0.1:{pe}"
        self.n_agents, self.slots = agents, slots
        self.master_args = master_args or []
        self.master: subprocess.Popen[bytes] | None = None
        self.agents: list[subprocess.Popen[bytes]] = []

    def _spawn(self, label: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{label}.log", "wb")  # noqa: SIM115 - owned by the child
        env = {**os.environ, "FFRTMP_LOG": "warning"}
        return subprocess.Popen([sys.executable, "-m", "ffrtmp", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def start(self, timeout: float = 30.0) -> None:
        """Start everything and wait until all agents are registered."""
        self.master = self._spawn("master", [
            "master", "--db", self.db_url, "--agents", self.agents_ep, "--clients",
            self.clients_ep, "--events", self.events_ep, "--metrics", "off", *self.master_args])
        for i in range(self.n_agents):
            self.agents.append(self._spawn(f"agent{i}", [
                "agent", "--master", self.agents_ep, "--name", f"bench{i}", "--slots",
                str(self.slots), "--work-dir", str(self.workdir / f"agent{i}"),
                "--metrics", "off"]))
        deadline = time.monotonic() + timeout
        with Client(self.clients_ep, timeout=1.0) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    if len(client.nodes()) >= self.n_agents:
                        return
                time.sleep(0.1)  # start-up poll in a tool, not a test
        raise RuntimeError(f"cluster did not come up; logs in {self.workdir}")

    def processes(self) -> dict[str, psutil.Process]:
        """psutil handles of master and agents, for CPU and RSS figures."""
        out = {}
        if self.master is not None:
            out["master"] = psutil.Process(self.master.pid)
        for i, proc in enumerate(self.agents):
            out[f"agent{i}"] = psutil.Process(proc.pid)
        return out

    def stop(self) -> None:
        """SIGTERM everything, then SIGKILL what lingers."""
        procs = [p for p in [*self.agents, self.master] if p is not None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
