"""Many simulated agents in one process: `python -m bench.sim --master EP --agents 200 --slots 4`.

Each simulated agent is its own DEALER connection speaking the real agent protocol
(docs/protocol.md): HELLO, CREDIT for its free slots, DONE for every JOB (after `job_s` seconds,
0 = at once, like the in-agent `noop`), results kept until DONE_ACK and re-sent in HELLO,
HEARTBEAT when it has been silent for the heartbeat interval, DRAIN, CANCEL, and reconnect with a
fresh identity on `ERROR unknown_agent`, `BYE` or a silent master. It advertises only the `noop`
workload, so the master never places real work on it. One process holds them all, which is what
lets a 2-core box show the master a few hundred agents.

`--hold` makes every agent ACCEPT its JOBs and keep them running until the simulator stops (or a
CANCEL), sending PROGRESS for each at the real agent's throttled rate (`--progress-s`, the
agent's `progress_interval_s`: all of an agent's running jobs every 0.5 s, figures changing each
time, as an ffmpeg job's do) and HEARTBEAT with its credit when it sent nothing else for the
heartbeat interval: the steady state of a fleet of long transcodes (`bench/agents_cost.py`).
`--stats FILE` writes the messages sent and received by command, with the time, every 0.2 s.

Per-agent work is driven by a deadline heap (an agent is looked at when it has something due or
a message arrived), so the simulator itself stays cheap with thousands of agents.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import os
import random
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from bus.codec import HEADER
from bus.sockets import AGENT_MAX_MSG, connect_dealer

_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


@dataclass(eq=False)
class SimAgent:
    """One simulated agent connection."""

    name: str
    slots: int
    sock: zmq.Socket | None = None
    registered: bool = False
    draining: bool = False
    granted: int = 0  # credit granted and not yet used by a JOB
    running: dict[int, int] = field(default_factory=dict)  # id -> attempt
    unacked: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    last_sent: float = 0.0
    last_recv: float = 0.0
    heartbeat_s: float = 1.0
    liveness: int = 3
    reconnect_at: float = 0.0
    backoff: float = 0.1
    wake: float = 0.0  # when the simulator next looks at this agent (its entry in the heap)
    next_progress: float = 0.0
    started: dict[int, float] = field(default_factory=dict)  # held job id -> when it started


class Simulator:
    """Drives `n` simulated agents on one thread; `run()` blocks until `stop()`."""

    def __init__(self, master: str, n: int, slots: int, prefix: str = "sim",
                 job_s: float = 0.0, ctx: zmq.Context | None = None, hold: bool = False,
                 progress_s: float = 0.5, workloads: list[str] | None = None,
                 stats: str | None = None, min_turn_s: float = 0.0) -> None:
        self.master = master
        self.job_s = job_s
        self.hold = hold  # ACCEPT every JOB and keep it running (PROGRESS) until stopped
        self.progress_s = progress_s
        self.workloads = workloads or ["noop"]
        self.stats_path = stats
        self.min_turn_s = min_turn_s  # at most one poll of all sockets per this many seconds
        self._rng = random.Random(1)
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        if self._own_ctx and 2 * n + 1024 > self.ctx.get(zmq.MAX_SOCKETS):
            # libzmq's default is 1,023 sockets; closed ones count until reaped (reconnects)
            self.ctx.set(zmq.MAX_SOCKETS, 2 * n + 1024)
        width = max(3, len(str(n - 1)))
        self.agents = [SimAgent(f"{prefix}{i:0{width}d}", slots) for i in range(n)]
        self._by_sock: dict[zmq.Socket, SimAgent] = {}
        self._timers: list[tuple[float, int, SimAgent, int, int]] = []  # (due, seq, agent, id, att)
        self._wakes: list[tuple[float, int, SimAgent]] = []  # (when, seq, agent)
        self._seq = itertools.count()
        self._stop = threading.Event()
        self.jobs_done = 0
        self.messages_in = 0
        self.messages_out = 0
        self.sent_by: dict[str, int] = {}
        self.recv_by: dict[str, int] = {}
        self._next_stats = 0.0

    # ---- sending ---------------------------------------------------------------------------

    def _send(self, agent: SimAgent, command: str, body: dict[str, Any], now: float) -> None:
        if agent.sock is None:
            return
        try:
            agent.sock.send(HEADER, _MORE)
            agent.sock.send(command.encode(), _MORE)
            agent.sock.send(msgpack.packb(body), _LAST)
            agent.last_sent = now
            self.messages_out += 1
            self.sent_by[command] = self.sent_by.get(command, 0) + 1
        except zmq.Again:
            pass  # the master is not reading; heartbeats and credit are resent later

    def _connect(self, agent: SimAgent, now: float) -> None:
        if agent.sock is not None:
            self._by_sock.pop(agent.sock, None)
            agent.sock.close(linger=0)
        ident = f"{agent.name}/{secrets.token_hex(4)}".encode()
        agent.sock = connect_dealer(self.ctx, self.master, ident, AGENT_MAX_MSG)
        self._by_sock[agent.sock] = agent
        agent.registered = False
        agent.granted = 0
        agent.last_recv = now
        agent.reconnect_at = 0.0
        self._send(agent, "HELLO", {
            "name": agent.name, "version": "sim", "slots": agent.slots,
            "resources": {"cpus": 1.0, "memory_mb": 1024, "disk_mb": 1024},
            "workloads": self.workloads, "encoders": [], "cgroup": "none",
            "limits": "best-effort",
            "running": [{"id": i, "attempt": a} for i, a in agent.running.items()],
            "results": list(agent.unacked.values()),
        }, now)
        self._wake(agent, now)

    def _wake(self, agent: SimAgent, when: float) -> None:
        """Look at this agent at `when` (or earlier, if it is already due earlier)."""
        if agent.wake > when or agent.wake == 0.0:
            agent.wake = when
            heapq.heappush(self._wakes, (when, next(self._seq), agent))

    # ---- the loop ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish (safe from signal handlers and other threads)."""
        self._stop.set()

    def registered(self) -> int:
        """How many simulated agents hold a WELCOME."""
        return sum(1 for a in self.agents if a.registered)

    def run(self) -> None:
        """Connect every agent, then serve until stopped; says BYE on the way out."""
        now = time.monotonic()
        for agent in self.agents:
            self._connect(agent, now)
        poller = zmq.Poller()
        polled: set[zmq.Socket] = set()
        try:
            while not self._stop.is_set():
                socks = set(self._by_sock)
                if socks != polled:  # reconnects replaced some sockets
                    for s in polled - socks:
                        poller.unregister(s)
                    for s in socks - polled:
                        poller.register(s, zmq.POLLIN)
                    polled = socks
                due = min([50.0] + [(q[0][0] - time.monotonic()) * 1000
                                    for q in (self._timers, self._wakes) if q])
                if self.min_turn_s and due > 0:  # fewer polls of thousands of sockets
                    time.sleep(min(self.min_turn_s, due / 1000))
                    due = 0.0
                ready = poller.poll(math.ceil(max(0.0, due)))
                now = time.monotonic()
                for sock, _ in ready:
                    owner = self._by_sock.get(sock)
                    if owner is not None:
                        self._drain(owner, now)
                        self._housekeep(owner, now)
                self._fire_timers(now)
                while self._wakes and self._wakes[0][0] <= now:
                    when, _, woken = heapq.heappop(self._wakes)
                    if when == woken.wake:  # else a stale entry: an earlier one replaced it
                        woken.wake = 0.0
                        self._housekeep(woken, now)
                if self.stats_path and now >= self._next_stats:
                    self._next_stats = now + 0.2
                    self._write_stats(now)
        finally:
            now = time.monotonic()
            for agent in self.agents:
                self._send(agent, "BYE", {}, now)
                if agent.sock is not None:
                    agent.sock.close(linger=100)
            if self._own_ctx:
                self.ctx.term()

    def _drain(self, agent: SimAgent, now: float) -> None:
        sock = agent.sock
        while sock is not None and agent.sock is sock:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.messages_in += 1
            agent.last_recv = now
            if len(frames) != 3:
                continue
            cmd = frames[1].decode("ascii", "replace")
            self.recv_by[cmd] = self.recv_by.get(cmd, 0) + 1
            try:
                body = msgpack.unpackb(frames[2], raw=False)
            except Exception:  # a bad frame from the master: ignore, as an agent would log it
                continue
            self._handle(agent, cmd, body, now)

    def _handle(self, agent: SimAgent, cmd: str, body: dict[str, Any], now: float) -> None:
        if cmd == "WELCOME":
            agent.registered = True
            agent.granted = 0
            agent.backoff = 0.1
            agent.heartbeat_s = float(body.get("heartbeat_s", 1.0))
            agent.liveness = int(body.get("liveness", 3))
        elif cmd == "JOB":
            agent.granted = max(0, agent.granted - 1)
            job_id, attempt = body["id"], body["attempt"]
            if job_id in agent.running or (job_id, attempt) in agent.unacked:
                return
            agent.running[job_id] = attempt
            if self.hold:  # a long job: started, reports progress, never ends on its own
                agent.started[job_id] = now
                self._send(agent, "ACCEPT", {"id": job_id, "attempt": attempt}, now)
                if not agent.next_progress:  # the agent's progress ticks, at a random phase
                    agent.next_progress = now + self._rng.uniform(0, self.progress_s)
            elif self.job_s > 0:
                heapq.heappush(self._timers, (now + self.job_s, next(self._seq), agent,
                                              job_id, attempt))
            else:
                self._finish(agent, job_id, attempt, "completed", None, now)
        elif cmd == "CANCEL":
            if agent.running.get(body["id"]) == body["attempt"]:
                self._finish(agent, body["id"], body["attempt"], "cancelled",
                             "cancelled_graceful", now)
        elif cmd == "DONE_ACK":
            for pair in body.get("acks", []):
                if isinstance(pair, list) and len(pair) == 2:
                    agent.unacked.pop((pair[0], pair[1]), None)
        elif cmd == "DRAIN":
            agent.draining = bool(body.get("on", True))
        elif cmd == "BYE":
            agent.last_recv = -1e9  # reconnect with backoff, like a real agent
        elif cmd == "ERROR" and body.get("code") == "unknown_agent":
            self._connect(agent, now)

    def _finish(self, agent: SimAgent, job_id: int, attempt: int, status: str,
                reason: str | None, now: float) -> None:
        if agent.running.get(job_id) != attempt:
            return
        del agent.running[job_id]
        agent.started.pop(job_id, None)
        result = {"id": job_id, "attempt": attempt, "status": status, "reason": reason,
                  "exit_code": 0 if status == "completed" else None, "bytes_in": 0,
                  "bytes_out": 0, "duration_s": self.job_s, "extra": {}}
        agent.unacked[(job_id, attempt)] = result
        self.jobs_done += 1
        self._send(agent, "DONE", result, now)

    def _fire_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, agent, job_id, attempt = heapq.heappop(self._timers)
            self._finish(agent, job_id, attempt, "completed", None, now)

    def _progress(self, agent: SimAgent, now: float) -> None:
        """PROGRESS for every held job, figures as an ffmpeg job's (they change every time)."""
        for job_id, attempt in agent.running.items():
            t = now - agent.started.get(job_id, now)
            self._send(agent, "PROGRESS", {
                "id": job_id, "attempt": attempt, "progress": min(0.999, t / 3600.0),
                "bytes_in": int(t * 250_000), "bytes_out": int(t * 120_000),
                "fps": 30.0 + (t % 1.0), "speed": 1.0 + (t % 0.1), "out_time_s": t}, now)

    def _housekeep(self, agent: SimAgent, now: float) -> None:
        silent_after = agent.last_recv + agent.heartbeat_s * agent.liveness
        if now > silent_after:
            if not agent.reconnect_at:
                agent.reconnect_at = now + agent.backoff
                agent.backoff = min(5.0, agent.backoff * 2)
            elif now >= agent.reconnect_at:
                self._connect(agent, now)
                return
            self._wake(agent, agent.reconnect_at)
            return
        self._wake(agent, silent_after + 0.001)
        if not agent.registered:
            return
        if self.hold and self.progress_s > 0 and agent.running:
            if now >= agent.next_progress:
                agent.next_progress = max(agent.next_progress + self.progress_s, now)
                self._progress(agent, now)
            self._wake(agent, agent.next_progress)
        free = agent.slots - len(agent.running) - agent.granted
        if free > 0 and not agent.draining:
            agent.granted += free
            self._send(agent, "CREDIT", {"n": free}, now)
        elif now - agent.last_sent >= agent.heartbeat_s:
            self._send(agent, "HEARTBEAT", {"credit": agent.granted}, now)
        self._wake(agent, agent.last_sent + agent.heartbeat_s)

    def _write_stats(self, now: float) -> None:
        """Counts by command so far, with the (system-wide monotonic) time they were taken."""
        assert self.stats_path is not None
        tmp = f"{self.stats_path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"t": now, "sent": self.sent_by, "received": self.recv_by,
                       "registered": self.registered(),
                       "running": sum(len(a.running) for a in self.agents)}, f)
        os.replace(tmp, self.stats_path)


def main(argv: list[str] | None = None) -> int:
    """Run simulated agents until SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(prog="python -m bench.sim",
                                description="many simulated agents over real DEALER sockets")
    p.add_argument("--master", required=True, help="the master's agent endpoint")
    p.add_argument("--agents", type=int, default=200, help="how many agents to simulate")
    p.add_argument("--slots", type=int, default=4, help="slots per simulated agent")
    p.add_argument("--prefix", default="sim", help="agent name prefix")
    p.add_argument("--job-seconds", type=float, default=0.0,
                   help="how long each job 'runs' before its DONE (0: at once, like noop)")
    p.add_argument("--hold", action="store_true",
                   help="ACCEPT every JOB and keep it running, with PROGRESS, until stopped")
    p.add_argument("--progress-s", type=float, default=0.5,
                   help="with --hold: PROGRESS interval per agent, s (the agent's is 0.5)")
    p.add_argument("--workloads", default="noop", help="advertised workloads, comma-separated")
    p.add_argument("--stats", default=None, metavar="FILE",
                   help="write message counts by command to FILE every 0.2 s (JSON)")
    p.add_argument("--min-turn", type=float, default=0.0, metavar="S",
                   help="poll the sockets at most once per S seconds (many agents: cheaper)")
    args = p.parse_args(argv)
    if args.agents < 1 or args.slots < 1:
        raise SystemExit("bench.sim: --agents and --slots must be at least 1")
    sim = Simulator(args.master, args.agents, args.slots, args.prefix, args.job_seconds,
                    hold=args.hold, progress_s=args.progress_s,
                    workloads=[w for w in args.workloads.split(",") if w], stats=args.stats,
                    min_turn_s=args.min_turn)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sim.stop())
    sim.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
