"""Real-process cluster for integration tests: a master and agents as `python -m ffrtmp` children.

Every process gets its own log file under the test's tmp dir (printed on failure by `dump_logs`);
`Cluster.close()` kills whatever is left, including the agents' process groups.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from bus.client import Client
from bus.security import PeerKeys
from conftest import free_port, free_ports, wait_for

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = ("completed", "failed", "timed_out", "cancelled")


class Cluster:
    """One master plus named agents on random loopback ports."""

    def __init__(self, tmp: Path, db_url: str, heartbeat: float = 1.0, liveness: int = 3,
                 master_args: list[str] | None = None, metrics: bool = False,
                 masters: int = 1) -> None:
        self.tmp = tmp
        # metrics=True: the master and each agent serve /metrics on a port of their own.
        self.metrics_ports: dict[str, int] | None = {} if metrics else None
        self.db_url = db_url
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.master_args = master_args or []
        # masters > 1: each master has endpoints of its own (agents, clients, events); agents
        # and `self.client` are given all of them (master failover, docs/OPERATIONS.md).
        ports = free_ports(3 * masters)
        self.master_eps: list[tuple[str, str, str]] = [
            (f"tcp://127.0.0.1:{ports[i]}", f"tcp://127.0.0.1:{ports[i + 1]}",
             f"tcp://127.0.0.1:{ports[i + 2]}") for i in range(0, 3 * masters, 3)]
        self.agents_ep, self.clients_ep, self.events_ep = self.master_eps[0]
        self.masters: list[subprocess.Popen[bytes] | None] = [None] * masters
        self.master: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self._client: Client | None = None
        self._logs: list[Path] = []
        self._starts = 0
        self.client_keys: PeerKeys | None = None  # CURVE keys for self.client, if the master has

    def _spawn(self, label: str, args: list[str]) -> subprocess.Popen[bytes]:
        self._starts += 1
        log = self.tmp / f"{label}.{self._starts}.log"
        self._logs.append(log)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FFRTMP_LOG": "info"}
        with open(log, "wb") as out:
            return subprocess.Popen([sys.executable, "-m", "ffrtmp", *args], stdout=out,
                                    stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    start_new_session=True)

    def start_master(self, wait: bool = True, index: int = 0) -> subprocess.Popen[bytes]:
        """Start (or restart) master `index` and wait until it answers (as leader or standby);
        its log label is "master" for the first, "master-N" for the others."""
        label = "master" if index == 0 else f"master-{index}"
        agents, clients, events = self.master_eps[index]
        proc = self._spawn(label, [
            "master", "--db", self.db_url, "--agents", agents,
            "--clients", clients, "--events", events,
            "--metrics", self._metrics_arg(label),
            "--heartbeat", str(self.heartbeat), "--liveness", str(self.liveness),
            *self.master_args])
        self.masters[index] = proc
        if index == 0:
            self.master = proc
        if wait:
            wait_for(lambda: self._answers(clients), 20, message=f"{label} did not answer")
        return proc

    @property
    def all_clients(self) -> str:
        """Every master's client endpoint, comma-separated (what an HA client is given)."""
        return ",".join(e[1] for e in self.master_eps)

    def roles(self) -> list[str]:
        """Each master's role from its STATS: "leader", "standby" or "down"."""
        out = []
        for _, clients, _ in self.master_eps:
            try:
                with Client(clients, timeout=0.5, keys=self.client_keys) as c:
                    out.append(str(c.request("STATS")["stats"].get("role", "leader")))
            except Exception:
                out.append("down")
        return out

    def _metrics_arg(self, label: str) -> str:
        if self.metrics_ports is None:
            return "off"
        port = self.metrics_ports.setdefault(label, free_port())  # the same across restarts
        return f"127.0.0.1:{port}"

    def scrape(self, label: str = "master") -> str:
        """The text of GET /metrics of "master" or "agent-NAME" (needs metrics=True)."""
        assert self.metrics_ports is not None, "Cluster(metrics=True) serves metrics"
        url = f"http://127.0.0.1:{self.metrics_ports[label]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()

    def _answers(self, clients: str | None = None, leading: bool = False) -> bool:
        try:
            with Client(clients or self.clients_ep, timeout=0.5, keys=self.client_keys) as c:
                stats = c.request("STATS")["stats"]
            return not leading or stats.get("role", "leader") == "leader"
        except Exception:
            return False

    def answers(self) -> bool:
        """True if the (first) master answers STATS within 0.5 s right now, as the leader (a
        standby, e.g. one waiting for its database, answers STATS too)."""
        return self._answers(leading=True)

    def start_agent(self, name: str, slots: int = 4, *extra: str,
                    wait: bool = True) -> subprocess.Popen[bytes]:
        """Start an agent and (by default) wait until the master lists it alive."""
        proc = self._spawn(f"agent-{name}", [
            "agent", "--master", ",".join(e[0] for e in self.master_eps), "--name", name,
            "--slots", str(slots),
            "--work-dir", str(self.tmp / f"work-{name}"),
            # Stopping a test cluster should not wait for jobs (a test gives its own grace).
            "--stop-grace", "0",
            "--metrics", self._metrics_arg(f"agent-{name}"), *extra])
        self.agents[name] = proc
        if wait:
            wait_for(lambda: self.node(name) is not None, 20,
                     message=f"agent {name} did not register")
        return proc

    @property
    def client(self) -> Client:
        """A client connected to this cluster's master."""
        if self._client is None:
            self._client = Client(self.all_clients, timeout=10, keys=self.client_keys)
        return self._client

    def node(self, name: str) -> dict[str, Any] | None:
        """The master's view of an agent if it is connected (alive or draining)."""
        for n in self.client.nodes():
            if n["name"] == name and n["state"] in ("alive", "draining"):
                return n
        return None

    def jobs(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """Current views of jobs by id (chunked GETs)."""
        out: dict[int, dict[str, Any]] = {}
        for i in range(0, len(ids), 1000):
            jobs, _ = self.client.get(ids[i:i + 1000])
            out.update({j["id"]: j for j in jobs})
        return out

    def wait_terminal(self, ids: list[int], timeout: float) -> dict[int, dict[str, Any]]:
        """Wait until every job is terminal; returns their views."""
        final: dict[int, dict[str, Any]] = {}

        def done() -> bool:
            pending = [i for i in ids if i not in final]
            for job_id, job in self.jobs(pending).items():
                if job["state"] in TERMINAL:
                    final[job_id] = job
            return len(final) == len(ids)

        try:
            wait_for(done, timeout, interval=0.2)
        except AssertionError as e:
            raise AssertionError(f"{len(ids) - len(final)} of {len(ids)} jobs not terminal: "
                                 f"{e}\n{self.dump_logs()}") from None
        return final

    def cli(self, *args: str, timeout: float = 30.0, master: str | None = None,
            events: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `python -m ffrtmp --master <clients> --events-ep <events> ARGS`, output captured."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("FFRTMP_MASTER", None)
        argv = [sys.executable, "-m", "ffrtmp", "--master", master or self.clients_ep,
                "--events-ep", events or self.events_ep, *args]
        return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=timeout, check=False)

    def synthetic_children(self) -> list[Any]:
        """Live synthetic workload processes (psutil) whose work dir is under this cluster's tmp."""
        import psutil

        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                cmd = proc.info["cmdline"] or []
                if "agent.synthetic" not in cmd or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                if Path(proc.cwd()).is_relative_to(self.tmp):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError):
                continue
        return found

    def signal(self, proc: subprocess.Popen[bytes], sig: int) -> None:
        """Send a signal to one process (not its group)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)

    def kill9(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a process and reap it."""
        self.signal(proc, signal.SIGKILL)
        proc.wait(timeout=10)

    def job(self, job_id: int, events: bool = False) -> dict[str, Any]:
        """The master's view of one job (with its event history if asked)."""
        jobs, missing = self.client.get([job_id], events=events)
        assert not missing and len(jobs) == 1, f"job {job_id} unknown to the master"
        return jobs[0]

    def log_text(self, label: str) -> str:
        """Everything the processes started as `label` (e.g. "master", "agent-a1") logged so far."""
        parts = []
        for log in self._logs:
            if log.name.startswith(f"{label}."):
                with contextlib.suppress(OSError):
                    parts.append(log.read_text(errors="replace"))
        return "".join(parts)

    def dump_logs(self) -> str:
        """All process logs, for failure messages."""
        parts = []
        for log in self._logs:
            with contextlib.suppress(OSError):
                parts.append(f"==== {log.name}\n{log.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        """Stop everything: SIGCONT (in case of SIGSTOP), SIGTERM, then SIGKILL the groups."""
        if self._client is not None:
            self._client.close()
            self._client = None
        procs = [p for p in [*self.masters, *self.agents.values()] if p is not None]
        for proc in procs:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group, if any


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a process's group, SIGKILL it if it is still there 10 s later; reaped."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def workload_children(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The live synthetic workloads (`python -m agent.synthetic ...`) an agent process started."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for kid in kids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if "agent.synthetic" in kid.cmdline() and not process_gone(kid):
                found.append(kid)
    return found


def process_gone(proc: psutil.Process) -> bool:
    """True once a process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def ignores_sigterm(pid: int) -> bool:
    """True once the process has set SIGTERM to ignored (read from /proc/<pid>/status)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & (1 << (15 - 1)))
    except OSError:
        pass
    return False
