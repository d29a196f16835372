"""What many agents cost the master: heartbeats alone, and progress of long running jobs.

    python -m bench.agents_cost --agents 1000 --running 4 --seconds 20
    python -m bench.agents_cost --agents 5000 --running 0
    python -m bench.agents_cost --agents 1000 --running 4 --tree before=/tmp/old --tree after=.

Issue 14's targets: PROGRESS <= 15 us of master CPU per message; 1,000 agents x 4 running jobs
streaming progress <= 15 % of a core; 5,000 agents heartbeating <= 25 % of a core.

Each run starts a real master (`ffrtmp master`, its real CLI, a fresh SQLite file, from the
source tree given by `--tree`) and one simulator process (`bench.sim --hold`: every simulated
agent speaks the real protocol on its own DEALER connection, ACCEPTs the JOBs it is given and
keeps them running, sending PROGRESS for each at the real agent's throttled rate, 0.5 s, and
HEARTBEAT with its credit when it sent nothing else for the heartbeat interval). Then:

1. **idle**: once every agent is registered and the start-up has settled, the master's CPU
   (kernel counters, user + system) over a window of `--seconds`: only heartbeats flow.
2. **running** (if `--running` > 0): `agents x running` `sleep` jobs of a day are submitted,
   each simulated agent holds `running` of them and streams their progress; after they all run
   and the start has settled, the master's CPU over a second window of the same length.

PROGRESS sent is the simulator's own count over the window; PROGRESS read is what the master
read of them: its `ffrtmp_bus_messages_total{socket="agent",direction="in"}` over the window
less the simulator's other messages (a master that falls behind reads fewer than are sent, and
its CPU then pays for fewer). The cost per PROGRESS is net of the idle baseline of the *same*
run: (master CPU s running - master CPU s idle) / PROGRESS read. That slightly *under*-states
it: while an agent streams progress it sends no HEARTBEAT of its own (any message is one), so
the running window has fewer agent heartbeats than the idle one; the master's own heartbeats to
the agents are in both. The gross figure (all master CPU / every agent message read) is printed too.

`--tree LABEL=DIR` (repeatable) runs the master from another source tree (e.g. a copy made with
`git archive HEAD | tar -x -C DIR`); with several, the runs alternate between them, `--repeat`
times each, so drift favours none. The simulator and this tool always run from this tree.
A measurement tool: it prints a table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.cluster import free_ports
from bus.client import Client

ROOT = Path(__file__).resolve().parent.parent
TARGET_PROGRESS_US = 15.0
TARGET_RUNNING_PCT = 15.0  # 1,000 agents x 4 running jobs
TARGET_IDLE_PCT = 25.0  # 5,000 agents heartbeating
SLEEP_S = 86_400.0  # the held jobs' nominal length: they never end during a run


@dataclass
class Window:
    """One measured window of one run."""

    tree: str
    phase: str  # idle | running
    agents: int
    jobs: int
    seconds: float
    master_cpu_s: float
    sim_cpu_s: float
    agent_in: float  # agent messages the master read (its own counter)
    agent_out: float
    sent: dict[str, float] = field(default_factory=dict)  # by the simulator, by command

    @property
    def master_pct(self) -> float:
        return 100.0 * self.master_cpu_s / self.seconds

    @property
    def sim_pct(self) -> float:
        return 100.0 * self.sim_cpu_s / self.seconds

    def rate(self, command: str) -> float:
        return self.sent.get(command, 0.0) / self.seconds

    @property
    def in_rate(self) -> float:
        return self.agent_in / self.seconds

    @property
    def progress_read(self) -> float:
        """PROGRESS the master read in the window: every agent message it read, less the
        simulator's other messages (a master that falls behind reads fewer than were sent)."""
        others = sum(v for k, v in self.sent.items() if k != "PROGRESS")
        return max(0.0, min(self.sent.get("PROGRESS", 0.0), self.agent_in - others))

    @property
    def us_per_message(self) -> float:
        return 1e6 * self.master_cpu_s / self.agent_in if self.agent_in else float("nan")


def _scrape(url: str) -> dict[tuple[str, str], float]:
    """ffrtmp_bus_messages_total by (socket, direction)."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = {}
    for labels, value in re.findall(r"^ffrtmp_bus_messages_total\{([^}]*)\} (\S+)$", text, re.M):
        kv = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out[(kv.get("socket", ""), kv.get("direction", ""))] = float(value)
    return out


def _read_stats(path: Path) -> dict[str, Any]:
    for _ in range(50):
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(path.read_text()))
        time.sleep(0.02)  # the simulator replaces the file atomically; a tool's retry
    raise RuntimeError(f"cannot read simulator stats {path}")


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


class Run:
    """A master (from `tree`) and a simulator (from this tree) on fresh ports and database."""

    def __init__(self, label: str, tree: Path, agents: int, running: int,
                 master_args: list[str]) -> None:
        self.label, self.tree, self.agents, self.running = label, tree, agents, running
        self.workdir = Path(tempfile.mkdtemp(prefix="ffrtmp-agents-cost-"))
        pa, pc, pe, pm = free_ports(4)
        self.agents_ep = f"tcp://127.0.0.1:{pa}"
        self.clients_ep = f"tcp://127.0.0.1:{pc}"
        self.metrics_url = f"http://127.0.0.1:{pm}/metrics"
        self.stats = self.workdir / "sim.json"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.master = self._spawn("master", self.tree, [
            "ffrtmp", "master", "--db", f"sqlite:///{self.workdir}/bench.db", "--agents",
            self.agents_ep, "--clients", self.clients_ep, "--events", f"tcp://127.0.0.1:{pe}",
            "--metrics", f"127.0.0.1:{pm}", *master_args])
        self.sim = self._spawn("sim", ROOT, [
            "bench.sim", "--master", self.agents_ep, "--agents", str(agents), "--slots",
            str(max(1, running)), "--hold", "--workloads", "sleep", "--stats", str(self.stats),
            "--min-turn", "0.005"])

    def _spawn(self, label: str, tree: Path, args: list[str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, "FFRTMP_LOG": "warning", "PYTHONPATH": str(tree)}
        with open(self.workdir / f"{label}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", *args], cwd=tree, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _alive(self) -> None:
        for label, proc in (("master", self.master), ("sim", self.sim)):
            if proc.poll() is not None:
                raise RuntimeError(f"{label} exited ({proc.returncode}); logs in "
                                   f"{self.workdir}")

    def wait(self, what: str, ok: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._alive()
            with contextlib.suppress(Exception):
                if ok():
                    return
            time.sleep(0.25)  # start-up poll of a tool
        raise RuntimeError(f"{what} not reached in {timeout:.0f}s; logs in {self.workdir}")

    def measure(self, phase: str, seconds: float) -> Window:
        master, sim = psutil.Process(self.master.pid), psutil.Process(self.sim.pid)
        m0, s0, c0, k0 = _scrape(self.metrics_url), _read_stats(self.stats), _cpu(master), \
            _cpu(sim)
        t0 = time.monotonic()
        time.sleep(seconds)  # the window
        c1, k1 = _cpu(master), _cpu(sim)
        t1 = time.monotonic()
        m1, s1 = _scrape(self.metrics_url), _read_stats(self.stats)
        self._alive()
        span = s1["t"] - s0["t"]  # the simulator's counts, scaled to the CPU window
        scale = (t1 - t0) / span if span > 0 else 1.0
        sent = {k: (v - s0["sent"].get(k, 0)) * scale for k, v in s1["sent"].items()}
        return Window(self.label, phase, self.agents, self.running * self.agents if
                      phase == "running" else 0, t1 - t0, c1 - c0, k1 - k0,
                      m1.get(("agent", "in"), 0) - m0.get(("agent", "in"), 0),
                      m1.get(("agent", "out"), 0) - m0.get(("agent", "out"), 0), sent)

    def stop(self, keep: bool = False) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if keep:
            print(f"logs kept in {self.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def one_run(label: str, tree: Path, args: argparse.Namespace) -> list[Window]:
    """Idle window, then (with --running) the running window, on one fresh master."""
    run = Run(label, tree, args.agents, args.running, args.master_arg or [])
    ok = False
    try:
        with Client(run.clients_ep, timeout=10.0) as client:
            run.wait("all agents registered", lambda: len(client.nodes(page=1000)) >= args.agents,
                     60 + args.agents / 50)
            time.sleep(args.settle)  # start-up (HELLOs, first credits) is not measured
            out = [run.measure("idle", args.seconds)]
            if args.running:
                total = args.agents * args.running
                spec = {"scenario": "sleep", "params": {"seconds": SLEEP_S}}
                for start in range(0, total, 5000):
                    client.submit([spec] * min(5000, total - start))
                run.wait("every job running",
                         lambda: _read_stats(run.stats)["running"] >= total
                         and client.stats()["live_by_state"].get("running", 0) >= total,
                         60 + total / 200)
                time.sleep(args.settle)
                out.append(run.measure("running", args.seconds))
        ok = True
        return out
    finally:
        run.stop(keep=not ok)


def _net_us(w: Window, idle: Window) -> float:
    """Master CPU per PROGRESS read, net of the same run's idle baseline (see the top)."""
    return 1e6 * (w.master_cpu_s - idle.master_cpu_s * w.seconds / idle.seconds) / \
        w.progress_read


def _row(w: Window, idle: Window | None) -> str:
    net = ""
    if w.phase == "running" and idle is not None and w.progress_read:
        net = f"{_net_us(w, idle):.1f}"
    return (f"| {w.tree} | {w.phase} | {w.agents:,} | {w.jobs:,} | {w.master_pct:.1f} | "
            f"{w.rate('PROGRESS'):,.0f} | {w.progress_read / w.seconds:,.0f} | "
            f"{w.rate('HEARTBEAT'):,.0f} | {w.in_rate:,.0f} | "
            f"{w.agent_out / w.seconds:,.0f} | {net or '–'} | {w.us_per_message:.1f} | "
            f"{w.sim_pct:.0f} |")


HEAD = ("| tree | phase | agents | running jobs | master % core | PROGRESS/s sent "
        "| PROGRESS/s read | HEARTBEAT/s (agents) | agent msgs in/s | agent msgs out/s "
        "| µs/PROGRESS (net of idle) | µs/msg (gross) | "
        "sim % core |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - a measurement tool
    p = argparse.ArgumentParser(prog="python -m bench.agents_cost",
                                description="master CPU for many agents: heartbeats, progress")
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--running", type=int, default=4, help="running jobs per agent (0: idle only)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each window, s")
    p.add_argument("--settle", type=float, default=5.0, help="wait before each window, s")
    p.add_argument("--repeat", type=int, default=1, help="runs per tree")
    p.add_argument("--tree", action="append", default=None, metavar="LABEL=DIR",
                   help="run the master from this source tree (repeatable: runs alternate)")
    p.add_argument("--master-arg", action="append", default=None, metavar="ARG",
                   help="an extra argument for the master (repeatable)")
    args = p.parse_args(argv)
    if args.agents < 1 or args.running < 0 or args.seconds <= 0 or args.repeat < 1:
        raise SystemExit("agents_cost: --agents >= 1, --running >= 0, --seconds > 0")
    trees: list[tuple[str, Path]] = []
    for item in args.tree or [f"this={ROOT}"]:
        label, _, path = item.rpartition("=")
        trees.append((label or Path(path).name, Path(path).resolve()))
    print(f"{args.agents} agents x {args.running} running jobs, {args.seconds:g} s windows, "
          f"{len(os.sched_getaffinity(0))} cores, load1 {os.getloadavg()[0]:.1f}", flush=True)
    print(HEAD, flush=True)
    windows: list[Window] = []
    for i in range(args.repeat):
        order = trees if i % 2 == 0 else trees[::-1]
        for label, tree in order:
            got = one_run(label, tree, args)
            windows += got
            idle = got[0]
            for w in got:
                print(_row(w, idle), flush=True)
    if args.repeat > 1 or len(trees) > 1:
        print("\nmedians per tree:")
        print("| tree | master % idle | master % running | µs/PROGRESS (net) "
              "| PROGRESS/s read |")
        print("|---|---|---|---|---|")
        for label, _ in trees:
            idles = [w for w in windows if w.tree == label and w.phase == "idle"]
            runs = [w for w in windows if w.tree == label and w.phase == "running"]
            nets = [_net_us(r, i) for i, r in zip(idles, runs, strict=False)
                    if r.progress_read]
            med = statistics.median
            print(f"| {label} | {med([w.master_pct for w in idles]):.1f} | "
                  + (f"{med([w.master_pct for w in runs]):.1f} | {med(nets):.1f} | "
                     f"{med([w.progress_read / w.seconds for w in runs]):,.0f} |" if runs
                     else "– | – | – |"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
