"""The agent loop: one DEALER to the master, credits for free slots, children polled each turn."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil
import zmq
from prometheus_client import CollectorRegistry

from agent.admission import REJECT_REASON, Admission, reservation_for
from agent.cgroups import CgroupBackend, detect
from agent.config import AgentConfig
from agent.ffmpeg.discovery import NoFFmpeg, find_ffmpeg, list_encoders
from agent.jobs import InvalidInput, UnsupportedJob, prepare
from agent.metrics import AgentMetrics, serve, stop_serving
from agent.runner import ProcessRun, Result
from agent.workloads import WORKLOADS
from bus.codec import Message, decode, encode
from bus.errors import ProtocolError
from bus.schemas import MASTER_TO_AGENT
from bus.sockets import AGENT_MAX_MSG, check_http_bind, connect_dealer

log = logging.getLogger("ffrtmp.agent")
VERSION = "0.1.0"
TICK_S = 0.05
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
_HAVE_PIDFD = hasattr(os, "pidfd_open")  # Linux >= 5.3 with Python >= 3.9


@dataclass(eq=False)
class Attempt:
    """One attempt this agent runs."""

    id: int
    attempt: int
    run: ProcessRun
    last_progress: dict[str, Any] | None = None


class Agent:
    """Connects to the master, runs what it is given within its slots, reports results."""

    def __init__(self, cfg: AgentConfig, registry: CollectorRegistry | None = None) -> None:
        self.cfg = cfg
        self.registry = registry or CollectorRegistry()
        self.metrics = AgentMetrics(self.registry, self, VERSION, cfg.bandwidth_mbps)
        self.metrics_server: Any = None
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self.running: dict[int, Attempt] = {}
        self.unacked: dict[tuple[int, int], dict[str, Any]] = {}
        self.granted = 0
        self.registered = False
        self.draining = False
        self.heartbeat_s = cfg.heartbeat_s
        self.liveness = cfg.liveness
        self.last_recv = self.last_sent = 0.0
        self.backoff = 0.1
        self.instance = secrets.token_hex(8)  # HELLO.instance: this process, across reconnects
        self.refused: str | None = None  # the master's last refusal of our HELLO (logged once)
        self._stop = threading.Event()
        self.completed = 0
        self.ffmpeg: str | None = None
        self.encoders: list[str] = []
        try:
            self.ffmpeg = find_ffmpeg(cfg.ffmpeg)
            self.encoders = list_encoders(self.ffmpeg)
        except NoFFmpeg as e:
            if cfg.ffmpeg:
                raise
            log.warning("%s: this agent runs synthetic workloads only", e)
        self._next_progress = 0.0
        # (job id, child pid) -> a pidfd that wakes the loop when that child exits
        self._pidfds: dict[tuple[int, int | None], int | None] = {}
        # CgroupError if an explicit --cgroup v1/v2 cannot be used: never silently unlimited.
        self.cgroups: CgroupBackend = detect(cfg.cgroup, cfg.name, cfg.cgroup_parent)
        self.admission = Admission(
            float(len(os.sched_getaffinity(0))) * 100, psutil.virtual_memory().total / 2**20,
            cfg.disk_floor_mb, cfg.default_reservation, cfg.typical_reservation)

    # ---- connection ---------------------------------------------------------------------------

    def _send(self, command: str, body: dict[str, Any], now: float) -> None:
        assert self.sock is not None
        header, cmd, packed = encode(command, body)
        try:
            # Plain-int flags: send_multipart's per-frame enum arithmetic costs more than the
            # sends. The first frame decides (EAGAIN); the rest of the message always follows.
            self.sock.send(header, _MORE)
            self.sock.send(cmd, _MORE)
            self.sock.send(packed, _LAST)
            self.last_sent = now
        except zmq.Again:
            log.warning("send queue to master full; dropped %s", command)

    def _connect(self, now: float) -> None:
        """A fresh socket and identity, then HELLO with what still runs and what is unacked."""
        if self.sock is not None:
            self.sock.close(linger=0)
        ident = f"{self.cfg.name}/{secrets.token_hex(4)}".encode()
        self.sock = connect_dealer(self.ctx, self.cfg.master, ident, AGENT_MAX_MSG,
                                   self.cfg.keys)
        self.registered = False
        self.granted = 0
        self.last_recv = now
        self._send("HELLO", self._hello(), now)
        self.metrics.connected()

    def _hello(self) -> dict[str, Any]:
        disk = psutil.disk_usage(str(self.cfg.work_dir))
        return {
            "name": self.cfg.name,
            "instance": self.instance,
            "version": VERSION,
            "slots": self.cfg.slots,
            "resources": {
                "cpus": float(len(os.sched_getaffinity(0))),  # what admission can use
                "memory_mb": psutil.virtual_memory().total // 2**20,
                "disk_mb": disk.free // 2**20,
            },
            "workloads": list(WORKLOADS),
            "encoders": self.encoders,
            "cgroup": self.cgroups.name,
            "limits": self.cfg.limits,
            "running": [{"id": a.id, "attempt": a.attempt} for a in self.running.values()],
            "results": list(self.unacked.values()),
        }

    # ---- loop -----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop (safe from signal handlers)."""
        self._stop.set()

    def install_signals(self) -> None:
        """SIGTERM/SIGINT stop the agent gracefully."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def run(self) -> None:
        """Serve until stopped; on the way out kill children and say BYE."""
        self.cfg.work_dir.mkdir(parents=True, exist_ok=True)
        log.info("resource limits: %s, policy %s", self.cgroups.describe(), self.cfg.limits)
        if (n := self.cgroups.cleanup_leftovers()):
            log.warning("killed and removed %d job cgroup(s) left by a crashed agent", n)
        if self.cfg.metrics and self.metrics_server is None:
            # /metrics is plain HTTP: the bus endpoints' loopback rule (BindError); the agent
            # has no --insecure, so only CURVE keys allow a public bind.
            check_http_bind(self.cfg.metrics, insecure=False, secured=self.cfg.keys is not None)
            self.metrics_server = serve(self.registry, self.cfg.metrics)  # MetricsError
        self._connect(time.monotonic())
        reconnect_at = 0.0
        try:
            while not self._stop.is_set():
                assert self.sock is not None
                if self._wait():
                    self._drain(time.monotonic())
                now = time.monotonic()
                self._reap(now)
                if self.registered and now >= self._next_progress:
                    self._next_progress = now + self.cfg.progress_interval_s
                    self._report_progress(now)
                if now - self.last_recv > self.heartbeat_s * self.liveness:
                    if not reconnect_at:
                        reconnect_at = now + self.backoff
                        self.backoff = min(self.cfg.reconnect_max_s, self.backoff * 2)
                    if now >= reconnect_at:
                        if self.refused is None:
                            log.warning("master silent for %.1fs; reconnecting",
                                        now - self.last_recv)
                        reconnect_at = 0.0
                        self._connect(now)
                    continue
                if self.registered:
                    self._top_up(now)
                    if now - self.last_sent >= self.heartbeat_s:
                        self._send("HEARTBEAT", {}, now)
        finally:
            self._shutdown()

    def _wait(self) -> bool:
        """Wait up to a tick for the master or for a running child to exit; True if the master
        sent something. A child's exit wakes the loop at once (a pidfd per child), so a finished
        job is reported and its slot refilled without waiting out the tick: at 0.5 s jobs the
        tick alone cost ~4 % of the makespan."""
        assert self.sock is not None
        fds = self._child_fds()
        if not fds:
            return bool(self.sock.poll(int(TICK_S * 1000)))
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        for fd in fds:
            poller.register(fd, zmq.POLLIN)
        return any(item is self.sock for item, _ in poller.poll(int(TICK_S * 1000)))

    def _child_fds(self) -> list[int]:
        """Open pidfds of the running children (kept until the child leaves `running`)."""
        for key in [k for k in self._pidfds if self._child_pid(k[0]) != k[1]]:
            fd = self._pidfds.pop(key)
            if fd is not None:
                os.close(fd)
        if not _HAVE_PIDFD:
            return []
        for job_id, att in self.running.items():
            key = (job_id, att.run.pid)
            if key[1] is not None and key not in self._pidfds:
                try:
                    self._pidfds[key] = os.pidfd_open(key[1])
                except OSError:  # already reaped, or no pidfd in this kernel: the tick it is
                    self._pidfds[key] = None
        return [fd for fd in self._pidfds.values() if fd is not None]

    def _child_pid(self, job_id: int) -> int | None:
        att = self.running.get(job_id)
        return att.run.pid if att is not None else None

    def _drain(self, now: float) -> None:
        assert self.sock is not None
        for _ in range(10_000):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.last_recv = now
            try:
                msg = decode(frames, MASTER_TO_AGENT)
            except ProtocolError as e:
                log.warning("bad frame from master: %s", e)
                self._send("ERROR", {"code": e.code, "text": e.text}, now)
                continue
            self._handle(msg, now)
            if self.sock is None or msg.command in ("BYE", "ERROR"):
                break
        if self.registered:
            self._top_up(now)

    def _handle(self, msg: Message, now: float) -> None:
        cmd = msg.command
        if cmd == "WELCOME":
            # NaN or absurd timing would silence our heartbeat or liveness check for good.
            hb_ok = 0.01 <= msg["heartbeat_s"] <= 3600  # False for NaN too
            if not (hb_ok and 1 <= msg["liveness"] <= 1000):
                key = "liveness: 1 to 1000" if hb_ok else "heartbeat_s: 0.01 to 3600 s"
                self._send("ERROR", {"code": "bad_body", "text": f"WELCOME.{key}"}, now)
                return
            self.registered = True
            if self.refused is not None:
                log.info("master accepted this agent as %s", self.cfg.name)
            self.refused = None
            self.granted = 0
            self.backoff = 0.1
            self.heartbeat_s = float(msg["heartbeat_s"])
            self.liveness = int(msg["liveness"])
        elif cmd == "JOB":
            self.granted = max(0, self.granted - 1)
            self._start(msg["id"], msg["attempt"], msg["spec"], now)
        elif cmd == "CANCEL":
            att = self.running.get(msg["id"])
            if att is not None and att.attempt == msg["attempt"]:
                why = "timeout" if msg["reason"] == "timeout" else "cancel"  # master backstop
                att.run.stop(now, float(msg["grace_s"]), why)
        elif cmd == "DONE_ACK":
            for pair in msg["acks"]:
                if isinstance(pair, list) and len(pair) == 2 \
                        and all(isinstance(x, int) for x in pair):  # lists would not hash
                    self.unacked.pop((pair[0], pair[1]), None)
        elif cmd == "DRAIN":
            self.draining = bool(msg["on"])
        elif cmd == "BYE":
            log.info("master said BYE; reconnecting")
            self.last_recv = -1e9  # reconnect on the next turn, with backoff
        elif cmd == "ERROR":
            code = msg["code"]
            if code in ("name_taken", "forbidden") and not self.registered:
                # Our HELLO was refused: say so once, then retry with backoff (the name may be
                # held by our own previous process until the master declares it lost).
                if self.refused != code:
                    log.error("master refused this agent (%s): %s; retrying with backoff",
                              code, msg["text"])
                self.refused = code
                self.last_recv = -1e9
                return
            log.warning("master error %s: %s", code, msg["text"])
            if code == "unknown_agent":
                self._connect(now)

    def _start(self, job_id: int, attempt: int, spec: dict[str, Any], now: float) -> None:
        held = self.running.get(job_id)
        if held is not None and held.attempt != attempt:
            # A fenced older attempt is still being stopped: refuse (requeued, not charged).
            self._send("REJECT", {"id": job_id, "attempt": attempt, "reason": "busy"}, now)
            return
        if held is not None or (job_id, attempt) in self.unacked:
            return  # a duplicate of what we already hold
        if self.draining:
            self._send("REJECT", {"id": job_id, "attempt": attempt, "reason": "draining"}, now)
            return
        try:
            run = prepare(spec, job_id, attempt, self.cfg, self.ffmpeg, self.cgroups)
        except UnsupportedJob as e:
            self._send("REJECT", {"id": job_id, "attempt": attempt, "reason": str(e)}, now)
            return
        except InvalidInput as e:
            self._finish(job_id, attempt, Result("failed", "invalid_input", None, 0.0,
                                                 {"error": str(e)}), now)
            return
        if run is None:
            self._finish(job_id, attempt, Result("completed", None, 0, 0.0), now)
            return
        self._observe_disk()
        if not self.admission.admit(job_id, reservation_for(spec, self.cfg.default_reservation),
                                    now):
            # Not started and killed: refused before start, and no credit until a job ends.
            self._send("REJECT", {"id": job_id, "attempt": attempt, "reason": REJECT_REASON},
                       now)
            return
        try:
            run.start(now)
        except OSError as e:
            self.admission.release(job_id)
            run.cleanup()
            self._finish(job_id, attempt, Result("failed", "exit_code", None, 0.0,
                                                 {"error": f"cannot start: {e}"}), now)
            return
        self.running[job_id] = Attempt(job_id, attempt, run)
        self._send("ACCEPT", {"id": job_id, "attempt": attempt}, now)

    def _reap(self, now: float) -> None:
        for att in list(self.running.values()):
            result = att.run.poll(now)
            if result is not None:
                del self.running[att.id]
                self.admission.release(att.id)
                att.run.cleanup()
                self._finish(att.id, att.attempt, result, now)
        self.cgroups.sweep()  # job cgroups whose last processes were still exiting

    def _report_progress(self, now: float) -> None:
        """PROGRESS for each running attempt whose figures changed (at most every interval)."""
        for att in self.running.values():
            fields = att.run.progress()
            if fields and fields != att.last_progress:
                att.last_progress = fields
                self._send("PROGRESS", {"id": att.id, "attempt": att.attempt, **fields}, now)

    def _finish(self, job_id: int, attempt: int, result: Result, now: float) -> None:
        body = {"id": job_id, "attempt": attempt, "status": result.status,
                "reason": result.reason, "exit_code": result.exit_code,
                "bytes_in": result.bytes_in, "bytes_out": result.bytes_out,
                "duration_s": result.duration_s,
                "extra": result.extra}
        self.unacked[(job_id, attempt)] = body
        self.completed += 1
        self.metrics.finished(result.status, result.reason, result.duration_s,
                              result.bytes_in, result.bytes_out)
        if self.sock is not None:
            self._send("DONE", body, now)

    def _observe_disk(self) -> None:
        try:
            self.admission.observe_disk(psutil.disk_usage(str(self.cfg.work_dir)).free / 2**20)
        except OSError as e:
            log.warning("cannot read free space of %s: %s", self.cfg.work_dir, e)
            self.admission.observe_disk(0.0)  # refuse work rather than fill an unknown disk

    def _top_up(self, now: float) -> None:
        free = self.cfg.slots - len(self.running) - self.granted
        if free > 0 and not self.draining:
            self._observe_disk()
            free = self.admission.credits(free, self.granted, now)  # only work that fits
        if free > 0 and not self.draining:
            self.granted += free
            self._send("CREDIT", {"n": free}, now)

    def _shutdown(self) -> None:
        for att in self.running.values():
            att.run.kill_now()
            try:
                att.run.poll(time.monotonic())  # its hooks clean up: job cgroup killed, removed
            except Exception:  # a failing hook must not keep the others from cleaning up
                log.exception("cleanup of job %s failed", att.id)
            att.run.cleanup()
        self.running.clear()
        self._child_fds()  # closes the pidfds of what just ended
        self.cgroups.close()
        if self.sock is not None:
            self._send("BYE", {}, time.monotonic())
            self.sock.close(linger=200)
            self.sock = None
        self.ctx.term()
        stop_serving(self.metrics_server)
        self.metrics_server = None
