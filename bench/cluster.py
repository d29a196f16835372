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


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports on 127.0.0.1 that were free a moment ago."""
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
    """A master plus `agents` agents of `slots` each, on random loopback ports.

    `simulated=True` runs the agents as simulated ones, all in one `bench.sim` process (real
    DEALER connections and protocol, `noop` work only). `metrics=True` gives the master a
    metrics endpoint on a random port (`metrics_url`).
    """

    def __init__(self, db_url: str | None, agents: int, slots: int,
                 workdir: Path | None = None, master_args: list[str] | None = None,
                 *, simulated: bool = False, metrics: bool = False,
                 agent_args: list[str] | None = None, agent_prefix: str | None = None) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="ffrtmp-bench-"))
        self.db_url = db_url or f"sqlite:///{self.workdir}/bench.db"
        pa, pc, pe, pm = free_ports(4)
        self.agents_ep = f"tcp://127.0.0.1:{pa}"
        self.clients_ep = f"tcp://127.0.0.1:{pc}"
        self.events_ep = f"tcp://127.0.0.1:{pe}"
        self.metrics_addr = f"127.0.0.1:{pm}" if metrics else None
        self.n_agents, self.slots = agents, slots
        self.simulated = simulated
        self.master_args = master_args or []
        self.agent_args = agent_args or []
        # agents are named <prefix>0, <prefix>1, ... (simulated ones <prefix>000, ...)
        self.agent_prefix = agent_prefix or ("sim" if simulated else "bench")
        self.master: subprocess.Popen[bytes] | None = None
        self.agents: list[subprocess.Popen[bytes]] = []

    @property
    def metrics_url(self) -> str | None:
        """The master's /metrics URL, if it was started with one."""
        return f"http://{self.metrics_addr}/metrics" if self.metrics_addr else None

    def _spawn(self, label: str, args: list[str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, "FFRTMP_LOG": "warning"}
        with open(self.workdir / f"{label}.log", "wb") as log:  # the child keeps its own copy
            return subprocess.Popen([sys.executable, "-m", *args], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def start(self, timeout: float = 30.0) -> None:
        """Start everything and wait until all agents are registered."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.master = self._spawn("master", [
            "ffrtmp", "master", "--db", self.db_url, "--agents", self.agents_ep, "--clients",
            self.clients_ep, "--events", self.events_ep, "--metrics", self.metrics_addr or "off",
            *self.master_args])
        if self.simulated:
            self.agents.append(self._spawn("sim", [
                "bench.sim", "--master", self.agents_ep, "--agents", str(self.n_agents),
                "--slots", str(self.slots), "--prefix", self.agent_prefix]))
        else:
            for i in range(self.n_agents):
                self.agents.append(self._spawn(f"agent{i}", [
                    "ffrtmp", "agent", "--master", self.agents_ep, "--name",
                    f"{self.agent_prefix}{i}",
                    "--slots", str(self.slots), "--work-dir", str(self.workdir / f"agent{i}"),
                    "--metrics", "off", "--stop-grace", "0", *self.agent_args]))
        deadline = time.monotonic() + timeout
        with Client(self.clients_ep, timeout=1.0) as client:
            while time.monotonic() < deadline:
                self._check_alive()
                with contextlib.suppress(Exception):
                    if len(client.nodes()) >= self.n_agents:
                        return
                time.sleep(0.1)  # start-up poll in a tool, not a test
        raise RuntimeError(f"cluster did not come up; logs in {self.workdir}")

    def _check_alive(self) -> None:
        for label, proc in [("master", self.master), *(("agent", a) for a in self.agents)]:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{label} exited with status {proc.returncode} during start; "
                                   f"logs in {self.workdir}")

    def processes(self) -> dict[str, psutil.Process]:
        """psutil handles of master and agents (or the one simulator), for CPU and RSS."""
        out = {}
        if self.master is not None:
            out["master"] = psutil.Process(self.master.pid)
        for i, proc in enumerate(self.agents):
            out["sim" if self.simulated else f"agent{i}"] = psutil.Process(proc.pid)
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
