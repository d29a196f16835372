"""The agent's event loop: moves bytes, reaps children, keeps time; `AgentCore` decides.

One DEALER to the master. Each turn: wait (at most a tick) for the master, a child's exit (a
pidfd per child) or a finished preparation; feed what arrived to the core; poll the running
children (timers, hooks, exit); execute the core's actions; send its messages. Preparing a job
(paths, name resolution, building the argv and hooks) runs in a small worker pool so that no
job's preparation can delay a heartbeat; everything else the loop does per turn is bounded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import zmq
from prometheus_client import CollectorRegistry

from agent.admission import Admission
from agent.config import AgentConfig
from agent.core import (
    AgentCore,
    Discard,
    Identity,
    Prepare,
    Reconnect,
    Start,
    Stop,
    Timing,
)
from agent.host import Host
from agent.kinds import Context, Prepared, failed, in_agent, prepare
from agent.metrics import AgentMetrics, serve, stop_serving
from agent.runner import Result
from bus import vocab
from bus.codec import decode, encode
from bus.errors import ProtocolError
from bus.schemas import MASTER_TO_AGENT
from bus.sockets import AGENT_MAX_MSG, EndpointError, check_http_bind, connect_dealer, endpoint

log = logging.getLogger("ffrtmp.agent")
VERSION = "0.1.0"
TICK_S = 0.05
DISK_EVERY_S = 0.5
START_BUDGET_S = 0.02  # spawning prepared attempts stops for this turn after this long
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
_HAVE_PIDFD = hasattr(os, "pidfd_open")  # Linux >= 5.3 with Python >= 3.9


def pick_master(masters: tuple[str, ...], current: int, hop: Reconnect,
                avoid: str | None = None) -> tuple[int, bool]:
    """(index in masters of the next connection's endpoint, False if `hop.to` named one that is
    not in masters): the leader a standby named if it is one of ours, else (not named, not ours,
    or avoided) the next master if `hop.rotate`, else the same one. Never an endpoint the
    operator did not give. `avoid`: a master just left for its silence: a standby naming it
    (its lease has not run out yet) is not followed there, since it is about to take over."""
    nxt = (current + 1) % len(masters) if hop.rotate else current
    if hop.to is not None:
        try:
            target = endpoint(hop.to)
        except EndpointError:
            return nxt, False
        if target == avoid:
            return nxt, True
        return (masters.index(target), True) if target in masters else (nxt, False)
    return nxt, True


def identity(cfg: AgentConfig, host: Host) -> Identity:
    """What this agent's HELLO says about it."""
    return Identity(name=cfg.name, instance=secrets.token_hex(8), version=VERSION,
                    slots=cfg.slots, cpus=host.cpus, memory_mb=host.memory_mb,
                    workloads=tuple(vocab.WORKLOADS), encoders=tuple(host.encoders),
                    cgroup=host.cgroups.name, limits=cfg.limits)


class Agent:
    """The loop around one AgentCore: a socket, children, a preparation pool and a clock."""

    def __init__(self, cfg: AgentConfig, host: Host,
                 registry: CollectorRegistry | None = None) -> None:
        self.cfg = cfg
        self.host = host
        self.registry = registry or CollectorRegistry()
        admission = Admission(host.cpus * 100, host.memory_mb, cfg.disk_floor_mb,
                              cfg.default_reservation, cfg.typical_reservation)
        timing = Timing(heartbeat_s=cfg.heartbeat_s, liveness=cfg.liveness,
                        progress_interval_s=cfg.progress_interval_s,
                        reconnect_max_s=cfg.reconnect_max_s, stop_grace_s=cfg.stop_grace_s,
                        kill_grace_s=cfg.kill_grace_s, ack_wait_s=cfg.ack_wait_s)
        self.metrics = AgentMetrics(self.registry, cfg, VERSION, cfg.bandwidth_mbps)
        self.core = AgentCore(identity(cfg, host), admission, timing, self.metrics)
        self.metrics.observe(self.core.view, admission.snapshot)
        self.ctx_prepare = Context(cfg, host.ffmpeg, host.cgroups)
        self.metrics_server: Any = None
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self._ep = 0  # index of the master endpoint in use (cfg.masters)
        self._unlisted: set[str] = set()  # leader endpoints named that are not ours (logged)
        self._silent: tuple[str, float] = ("", 0.0)  # a master left for silence, until when
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(4, cfg.slots)),
                                        thread_name_prefix="prepare")
        self._prepared: queue.SimpleQueue[tuple[int, int, Prepared]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pidfds: dict[int, int] = {}  # child pid -> a pidfd that wakes the loop on exit
        self._next_disk = 0.0

    # ---- signals --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask for a graceful stop (a second call stops running jobs at once); signal-safe."""
        self._signals.put(signal.SIGTERM)
        self._wake()

    def install_signals(self) -> None:
        """SIGTERM/SIGINT stop the agent gracefully (docs/OPERATIONS.md "Stopping an agent")."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    # ---- connection -----------------------------------------------------------------------------

    def _connect(self, now: float, hop: Reconnect | None = None) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        if hop is not None:
            self._aim(hop)
        ident = f"{self.cfg.name}/{secrets.token_hex(4)}".encode()
        self.sock = connect_dealer(self.ctx, self.master, ident, AGENT_MAX_MSG,
                                   self.cfg.keys)
        self.core.connected(now)

    @property
    def master(self) -> str:
        """The master endpoint this agent talks to now."""
        return self.cfg.masters[self._ep]

    def _aim(self, hop: Reconnect) -> None:
        """Choose the endpoint of the next connection (pick_master) and say which and why."""
        old = self.master
        now = time.monotonic()
        avoid = self._silent[0] if now < self._silent[1] else None
        self._ep, listed = pick_master(self.cfg.masters, self._ep, hop, avoid)
        if hop.rotate and hop.why.startswith("silent"):  # for two liveness windows
            self._silent = (old, now + 2 * self.core.heartbeat_s * self.core.liveness)
        why = f"master {old} {hop.why}" if hop.why else f"master {old}"
        level = logging.DEBUG if hop.repeat else \
            logging.WARNING if hop.why.startswith("silent") else logging.INFO
        if not listed:
            assert hop.to is not None
            if hop.to not in self._unlisted:  # said once at warning level per endpoint
                if len(self._unlisted) < 64:
                    self._unlisted.add(hop.to)
                level = logging.WARNING
            log.log(level, "%s: the leader it names, %s, is not in --master (%s); trying %s "
                    "again", why, hop.to[:200], ", ".join(self.cfg.masters), old)
        elif hop.to is not None and self.master != old:
            log.log(level, "%s: following the leader to %s", why, self.master)
        elif self.master != old:
            log.log(level, "%s; reconnecting: trying %s", why, self.master)
        else:
            log.log(level, "%s; reconnecting", why)

    def _flush(self, now: float) -> None:
        """Execute the core's actions, then send its messages (in the order it queued them)."""
        while True:
            out, actions = self.core.take()
            if not out and not actions:
                return
            reconnect: Reconnect | None = None
            for action in actions:
                if isinstance(action, Reconnect):
                    reconnect = action  # after this batch's messages: they were for the old one
                else:
                    self._act(action, now)
            for command, body in out:
                self._send(command, body)
            if reconnect is not None:
                self._connect(now, reconnect)

    def _send(self, command: str, body: dict[str, Any]) -> None:
        if self.sock is None:
            return
        header, cmd, packed = encode(command, body)
        try:
            # Plain-int flags: send_multipart's per-frame enum arithmetic costs more than the
            # sends. The first frame decides (EAGAIN); the rest of the message always follows.
            self.sock.send(header, _MORE)
            self.sock.send(cmd, _MORE)
            self.sock.send(packed, _LAST)
        except zmq.Again:
            log.warning("send queue to master full; dropped %s", command)

    # ---- actions --------------------------------------------------------------------------------

    def _act(self, action: Any, now: float) -> None:
        if isinstance(action, Prepare):
            if in_agent(action.spec):  # no I/O: two thread hops would cost more than it
                self._prepare(action)
            else:
                self._pool.submit(self._prepare, action)
        elif isinstance(action, Start):
            try:
                action.run.start(now)
            except Exception as e:  # OSError, or a hook's bug: that attempt fails, not us
                self.core.start_failed(action.id, action.attempt, str(e), now)
        elif isinstance(action, Stop):
            try:
                action.run.stop(now, action.grace_s, action.why)
            except Exception:
                log.exception("job %s: stopping failed; killing it", action.id)
                self._kill(action.run)
        elif isinstance(action, Discard):
            self._discard(action.run)

    def _prepare(self, action: Prepare) -> None:  # a worker thread
        try:
            outcome = prepare(action.spec, action.id, action.attempt, self.ctx_prepare)
        except BaseException as e:  # prepare() never raises; this is the last fence
            outcome = failed(vocab.AGENT_ERROR, f"preparing failed: {e!r}")
        self._prepared.put((action.id, action.attempt, outcome))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"w")

    @staticmethod
    def _kill(run: Any) -> None:
        with contextlib.suppress(Exception):
            run.kill_now()

    @staticmethod
    def _discard(run: Any) -> None:
        if run is None:
            return
        try:
            run.cleanup()
        except Exception:
            log.exception("removing a job's work directory failed")

    # ---- children -------------------------------------------------------------------------------

    def _reap(self, now: float) -> None:
        """Advance every running child (timers, hooks); report the ones that exited."""
        for job_id, attempt, run in self.core.running():
            try:
                result = run.poll(now)
            except Exception as e:  # a hook's bug ends this attempt, never the agent
                log.exception("job %s attempt %s: supervision failed", job_id, attempt)
                self._kill(run)
                with contextlib.suppress(Exception):
                    run.poll(now)  # let the hooks clean up (job cgroup killed, removed)
                result = Result(vocab.FAILED, vocab.AGENT_ERROR, None,
                                round(now - (run.started or now), 6),
                                {"error": f"supervision failed: {type(e).__name__}: {e}"[:2000]})
            if result is not None:
                self.core.exited(job_id, attempt, result, now)
        try:
            self.host.cgroups.sweep()  # job cgroups whose last processes were still exiting
        except Exception:
            log.exception("sweeping job cgroups failed")

    def _progress(self, now: float) -> None:
        if not self.core.progress_due(now):
            return
        for job_id, attempt, run in self.core.running():
            try:
                fields = run.progress()
            except Exception:
                log.exception("job %s: reading progress failed", job_id)
                continue
            self.core.progress(job_id, attempt, fields, now)

    def _child_fds(self) -> list[int]:
        """Open pidfds of the running children (closed once a child leaves the core)."""
        if not _HAVE_PIDFD:
            return []
        live = {run.pid for _, _, run in self.core.running() if run.pid is not None}
        for pid in [p for p in self._pidfds if p not in live]:
            with contextlib.suppress(OSError):
                os.close(self._pidfds.pop(pid))
        for pid in live - self._pidfds.keys():
            try:
                self._pidfds[pid] = os.pidfd_open(pid)
            except OSError:  # already reaped, or no pidfd in this kernel: the tick finds it
                self._pidfds[pid] = -1
        return [fd for fd in self._pidfds.values() if fd >= 0]

    # ---- loop -----------------------------------------------------------------------------------

    def _wait(self) -> bool:
        """Wait up to a tick for the master, a child's exit, a preparation or a signal; True if
        the master sent something."""
        assert self.sock is not None
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        for fd in self._child_fds():
            poller.register(fd, zmq.POLLIN)
        ready = dict(poller.poll(int(TICK_S * 1000)))
        if self._wake_r in ready:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)
        return self.sock in ready

    def _recv(self, now: float) -> None:
        assert self.sock is not None
        for _ in range(10_000):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(frames, MASTER_TO_AGENT)
            except ProtocolError as e:
                log.warning("bad frame from master: %s", e)
                self.core.bad_frame(e.code, e.text, now)
                continue
            try:
                self.core.message(msg, now)
            except Exception:  # a bug of ours must not end the agent and its running jobs
                log.exception("handling %s from the master failed", msg.command)
            self._flush(now)
            if msg.command in ("BYE", "ERROR"):
                return

    def _observe_disk(self, now: float) -> None:
        if now < self._next_disk:
            return
        self._next_disk = now + DISK_EVERY_S
        try:
            self.core.observe_disk(psutil.disk_usage(str(self.cfg.work_dir)).free / 2**20)
        except OSError as e:
            log.warning("cannot read free space of %s: %s", self.cfg.work_dir, e)
            self.core.observe_disk(0.0)  # refuse work rather than fill an unknown disk

    def run(self) -> None:
        """Serve until stopped; on the way out hand back what runs and say BYE."""
        self.cfg.work_dir.mkdir(parents=True, exist_ok=True)
        log.info("agent %s: resource limits: %s, policy %s", self.cfg.name,
                 self.host.cgroups.describe(), self.cfg.limits)
        if (n := self.host.cgroups.cleanup_leftovers()):
            log.warning("killed and removed %d job cgroup(s) left by a crashed agent", n)
        if self.cfg.metrics and self.metrics_server is None:
            # /metrics is plain HTTP: the bus endpoints' loopback rule (BindError); the agent
            # has no public bind without CURVE keys.
            check_http_bind(self.cfg.metrics, insecure=False, secured=self.cfg.keys is not None)
            self.metrics_server = serve(self.registry, self.cfg.metrics,
                                        self.cfg.metrics_tries)  # MetricsError
        now = time.monotonic()
        self._observe_disk(now)
        self._connect(now)
        self._flush(now)
        try:
            while not self.core.finished:
                heard = self._wait()
                start = now = time.monotonic()
                while not self._signals.empty():
                    self._signals.get()
                    self.core.shutdown(now)
                if heard:
                    self._recv(now)
                while not self._prepared.empty():  # spawning is the costly part of a turn
                    self.core.prepared(*self._prepared.get(), now)
                    self._flush(now)  # start it before polling the children
                    if time.monotonic() - start >= START_BUDGET_S:
                        self._wake()  # the rest next turn, at once: the turn stays short
                        break
                self._reap(now)
                self._progress(now)
                self._observe_disk(now)
                self.core.tick(now)
                self._flush(now)
                self.metrics.turn(time.monotonic() - start)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        """Exit path (also after an error): kill what still runs, clean up, say BYE."""
        for _, _, run in list(self.core.running()):
            self._kill(run)
            with contextlib.suppress(Exception):
                run.poll(time.monotonic())  # its hooks clean up: job cgroup killed, removed
            self._discard(run)
        self._pool.shutdown(wait=True, cancel_futures=True)
        while not self._prepared.empty():
            outcome = self._prepared.get()[2]
            run = getattr(outcome, "run", None)
            self._discard(run)
        for fd in self._pidfds.values():
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pidfds.clear()
        with contextlib.suppress(Exception):
            self.host.cgroups.close()
        if self.sock is not None:
            self._send("BYE", {})
            self.sock.close(linger=200)
            self.sock = None
        self.ctx.term()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        stop_serving(self.metrics_server)
        self.metrics_server = None
