"""Many simulated agents in one process: `python -m bench.sim --master EP --agents 200 --slots 4`.

Each simulated agent is its own DEALER connection speaking the real agent protocol
(docs/protocol.md): HELLO, CREDIT for its free slots, DONE for every JOB (after `job_s` seconds,
0 = at once, like the in-agent `noop`), results kept until DONE_ACK and re-sent in HELLO,
HEARTBEAT when it has been silent for the heartbeat interval, DRAIN, CANCEL, and reconnect with a
fresh identity on `ERROR unknown_agent`, `BYE` or a silent master. It advertises only the `noop`
workload, so the master never places real work on it. One process holds them all, which is what
lets a 2-core box show the master a few hundred agents.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
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


class Simulator:
    """Drives `n` simulated agents on one thread; `run()` blocks until `stop()`."""

    def __init__(self, master: str, n: int, slots: int, prefix: str = "sim",
                 job_s: float = 0.0, ctx: zmq.Context | None = None) -> None:
        self.master = master
        self.job_s = job_s
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        width = max(3, len(str(n - 1)))
        self.agents = [SimAgent(f"{prefix}{i:0{width}d}", slots) for i in range(n)]
        self._by_sock: dict[zmq.Socket, SimAgent] = {}
        self._timers: list[tuple[float, int, SimAgent, int, int]] = []  # (due, seq, agent, id, att)
        self._seq = itertools.count()
        self._stop = threading.Event()
        self.jobs_done = 0
        self.messages_in = 0
        self.messages_out = 0

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
            "workloads": ["noop"], "encoders": [], "cgroup": "none", "limits": "best-effort",
            "running": [{"id": i, "attempt": a} for i, a in agent.running.items()],
            "results": list(agent.unacked.values()),
        }, now)

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
                timeout = 50.0
                if self._timers:
                    timeout = max(0.0, min(timeout, (self._timers[0][0] - time.monotonic())
                                           * 1000))
                ready = poller.poll(timeout)
                now = time.monotonic()
                for sock, _ in ready:
                    agent = self._by_sock.get(sock)
                    if agent is not None:
                        self._drain(agent, now)
                self._fire_timers(now)
                for agent in self.agents:
                    self._housekeep(agent, now)
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
            try:
                body = msgpack.unpackb(frames[2], raw=False)
            except Exception:  # a bad frame from the master: ignore, as an agent would log it
                continue
            self._handle(agent, frames[1].decode("ascii", "replace"), body, now)

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
            if self.job_s > 0:
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

    def _housekeep(self, agent: SimAgent, now: float) -> None:
        if now - agent.last_recv > agent.heartbeat_s * agent.liveness:
            if not agent.reconnect_at:
                agent.reconnect_at = now + agent.backoff
                agent.backoff = min(5.0, agent.backoff * 2)
            elif now >= agent.reconnect_at:
                self._connect(agent, now)
            return
        if not agent.registered:
            return
        free = agent.slots - len(agent.running) - agent.granted
        if free > 0 and not agent.draining:
            agent.granted += free
            self._send(agent, "CREDIT", {"n": free}, now)
        elif now - agent.last_sent >= agent.heartbeat_s:
            self._send(agent, "HEARTBEAT", {}, now)


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
    args = p.parse_args(argv)
    if args.agents < 1 or args.slots < 1:
        raise SystemExit("bench.sim: --agents and --slots must be at least 1")
    sim = Simulator(args.master, args.agents, args.slots, args.prefix, args.job_seconds)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sim.stop())
    sim.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
