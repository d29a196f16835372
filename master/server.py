"""The master loop: sockets in, core and requests, one group commit per turn, then messages out."""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from typing import Any

import zmq
from prometheus_client import CollectorRegistry, start_http_server

from bus.codec import decode, encode
from bus.errors import ProtocolError
from bus.schemas import AGENT_TO_MASTER, CLIENT_TO_MASTER
from bus.security import AGENTS_DOMAIN, CLIENTS_DOMAIN, MasterSecurity
from bus.sockets import AGENT_MAX_MSG, CLIENT_MAX_MSG, BindError, bind_pub, bind_router
from master.config import MasterConfig
from master.core import AGENT, MasterCore
from master.metrics import MasterMetrics
from master.requests import Requests
from master.retention import Maintenance, Retention
from master.scenarios import load_presets, make_checks
from master.sla import SlaPolicy
from master.spec import ScenarioCheck
from storage import StorageError, Store

log = logging.getLogger("ffrtmp.master")
TICK_S = 0.05
# Plain-int flags: pyzmq's send_multipart combines enum flags per frame, which costs more than
# the send itself for our small messages (~5 µs against ~2 µs per 4-frame message).
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


def _send_frames(sock: zmq.Socket, frames: list[bytes]) -> None:
    """send_multipart(frames, NOBLOCK) without the per-frame flag arithmetic.

    Same semantics: the first frame decides (EAGAIN at the high-water mark, EHOSTUNREACH for a
    gone ROUTER peer); once it is queued the rest of a multipart message always follows.
    """
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, _LAST if i == last else _MORE)


class Master:
    """Owns the store, the sockets and the loop; `run()` blocks until `stop()`."""

    def __init__(self, cfg: MasterConfig, registry: CollectorRegistry | None = None,
                 scenarios: dict[str, ScenarioCheck] | None = None) -> None:
        self.cfg = cfg
        self.registry = registry or CollectorRegistry()
        if scenarios is None:
            scenarios = make_checks(load_presets(None))
        self.metrics = MasterMetrics(self.registry, scenarios,
                                     SlaPolicy(cfg.sla_done_s, cfg.sla_wait_s, cfg.sla_target))
        self.store = Store(cfg.db_url)
        self.core = MasterCore(cfg, self.store.max_job_id() + 1, self.metrics, random.Random())
        self.requests = Requests(self.core, self.store, scenarios)
        self.metrics.watch(self.requests.snapshot, self._nodes)
        self.retention = Retention(self.store, self.metrics, cfg.retention_days,
                                   cfg.retention_interval_s, cfg.retention_batch)
        self.maintenance = Maintenance(cfg.db_url, self.metrics, cfg.maintenance_interval_s)
        self._stop = threading.Event()
        self.ctx = zmq.Context()
        self.agents: zmq.Socket | None = None
        self.clients: zmq.Socket | None = None
        self.events: zmq.Socket | None = None
        self.metrics_server: Any = None
        self.security: MasterSecurity | None = None
        self._unreachable: list[bytes] = []  # agents a send failed to; dropped after next drain

    def bind(self) -> None:
        """Bind all sockets (and the metrics endpoint); raises BindError on a refused address."""
        try:
            if self.cfg.keys_dir:
                self.security = MasterSecurity(self.ctx, self.cfg.keys_dir)
            sec, insecure = self.security, self.cfg.insecure
            self.agents = bind_router(self.ctx, self.cfg.agents, AGENT_MAX_MSG, insecure,
                                      sec, AGENTS_DOMAIN)
            self.clients = bind_router(self.ctx, self.cfg.clients, CLIENT_MAX_MSG, insecure,
                                       sec, CLIENTS_DOMAIN)
            self.events = bind_pub(self.ctx, self.cfg.events, insecure, sec, CLIENTS_DOMAIN)
        except Exception:
            self.close()
            raise
        if self.cfg.metrics:
            host, _, port = self.cfg.metrics.rpartition(":")
            try:
                self.metrics_server = start_http_server(int(port), host or "127.0.0.1",
                                                        registry=self.registry)
            except (OSError, ValueError) as e:
                self.close()
                raise BindError(f"cannot serve metrics on {self.cfg.metrics}: {e}") from e
            log.info("metrics on http://%s:%d/metrics", host or "127.0.0.1",
                     self.metrics_server[0].server_port)

    def stop(self) -> None:
        """Ask the loop to finish its turn and shut down (safe from signal handlers)."""
        self._stop.set()

    def install_signals(self) -> None:
        """SIGTERM/SIGINT stop the loop gracefully."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def close(self) -> None:
        """Close sockets, the metrics endpoint and the store."""
        for sock in (self.agents, self.clients, self.events):
            if sock is not None:
                sock.close(linger=0)
        self.agents = self.clients = self.events = None
        if self.metrics_server is not None:
            server, thread = self.metrics_server
            server.shutdown()
            server.server_close()
            thread.join(timeout=2)
            self.metrics_server = None
        if self.security is not None:
            self.security.stop()
            self.security = None
        self.ctx.term()
        self.store.close()

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Recover, then serve until stopped; says BYE to agents on the way out."""
        if self.agents is None:
            self.bind()
        assert self.agents is not None and self.clients is not None
        now, wall = time.monotonic(), time.time()
        self.core.recover(self.store.load_unfinished(), self.store.list_agents(), now, wall)
        log.info("master up: %d unfinished jobs recovered; agents %s, clients %s, events %s",
                 len(self.core.jobs), self.cfg.agents, self.cfg.clients, self.cfg.events)
        poller = zmq.Poller()
        poller.register(self.agents, zmq.POLLIN)
        poller.register(self.clients, zmq.POLLIN)
        next_flush = next_stats = now
        self.maintenance.start()
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(int(self._timeout(time.monotonic()) * 1000)))
                now, wall = time.monotonic(), time.time()
                if self.agents in ready:
                    self._drain(self.agents, AGENT, now, wall)
                self._drop_unreachable(now, wall)
                if self.clients in ready:
                    self._drain(self.clients, "client", now, wall)
                self.core.tick(now, wall)
                if now >= next_flush:
                    self.core.flush_progress(wall)
                    next_flush = now + self.cfg.progress_flush_s
                if now >= next_stats:
                    self.core.publish("stats", "STATS", self.metrics.refresh())
                    next_stats = now + self.cfg.stats_interval_s
                self.core.dispatch(now, wall)
                self.core.flush_acks()
                self.retention.tick(now, wall, self.core.batch)
                self._commit_and_send()
        finally:
            self.maintenance.stop()
            self._goodbye()
            self.close()

    def _nodes(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [conn.node_view(now) for conn in self.core.agents.values()]

    def _timeout(self, now: float) -> float:
        due = self.core.sched.next_due()
        if due is None:
            return TICK_S
        return max(0.0, min(TICK_S, due - now))

    def _drain(self, sock: zmq.Socket, kind: str, now: float, wall: float) -> None:
        schemas = AGENT_TO_MASTER if kind == AGENT else CLIENT_TO_MASTER
        received = 0
        for _ in range(self.cfg.max_messages_per_turn):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            received += 1
            ident, rest = frames[0], frames[1:]
            try:
                msg = decode(rest, schemas)
            except ProtocolError as e:
                self.metrics.bad_frames.labels(kind, e.code).inc()
                log.debug("bad frame from %s %r: %s", kind, ident, e)
                body: dict[str, Any] = {"code": e.code, "text": e.text}
                if e.rid is not None:
                    body["rid"] = e.rid
                self.core.send(kind, ident, "ERROR", body)
                continue
            if kind == AGENT:
                self.core.on_agent(ident, msg, now, wall)
            else:
                self.requests.handle(ident, msg, now, wall)
        if received:  # one counter update per drain: labels() per message costs ~3 µs
            self.metrics.messages.labels(kind, "in").inc(received)

    def _commit_and_send(self) -> None:
        batch, outbox, published = self.core.take_output()
        if batch:
            self._commit(batch)
        self.requests.turn_committed()
        sent: dict[str, int] = {}
        for kind, ident, frames in outbox:
            sock = self.agents if kind == AGENT else self.clients
            assert sock is not None
            try:
                _send_frames(sock, [ident, *frames])
                sent[kind] = sent.get(kind, 0) + 1
            except zmq.ZMQError as e:  # EHOSTUNREACH (peer gone) or EAGAIN (HWM full)
                log.info("cannot send to %s %r: %s", kind, ident, e)
                if kind == AGENT:
                    self._unreachable.append(ident)
        for kind, n in sent.items():  # one counter update per socket and turn
            self.metrics.messages.labels(kind, "out").inc(n)
        assert self.events is not None
        for frames in published:
            try:
                _send_frames(self.events, frames)
            except zmq.Again:
                pass

    def _drop_unreachable(self, now: float, wall: float) -> None:
        """Agents a send failed to are gone, unless a HELLO read since replaced the connection.

        After a stalled turn (database down) the turn's messages go to connections that agents,
        hearing nothing, have already replaced; their HELLOs wait in the queue. Dropping first
        would requeue (and then fence) attempts that are still running fine.
        """
        for ident in self._unreachable:
            self.core.agent_unreachable(ident, now, wall)
        self._unreachable.clear()

    def _commit(self, batch: Any) -> None:
        """Commit the turn's writes; while the database is down, retry and answer nothing new."""
        delay = 0.05
        while True:
            started = time.perf_counter()
            try:
                self.store.apply(batch)
                self.metrics.commit_seconds.observe(time.perf_counter() - started)
                return
            except StorageError as e:
                self.metrics.db_errors.labels("commit").inc()
                log.error("commit failed (%s); holding %d writes and retrying", e, len(batch))
            self._refuse_clients_for(delay)
            if self._stop.is_set():
                raise SystemExit("stopped while the database was down; uncommitted turn dropped")
            delay = min(2.0, delay * 2)
            for conn in self.core.agents.values():  # our silence is not their death
                conn.last_seen = time.monotonic()

    def _refuse_clients_for(self, seconds: float) -> None:
        """While writes are stuck, answer every client request with ERROR unavailable."""
        assert self.clients is not None
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not self.clients.poll(int(left * 1000) + 1):
                continue
            frames = self.clients.recv_multipart()
            try:
                rid = decode(frames[1:], CLIENT_TO_MASTER).get("rid")
            except ProtocolError as e:
                rid = e.rid
            self.metrics.client_errors.labels("unavailable").inc()
            body = {"code": "unavailable", "text": "database unavailable: request not applied",
                    "rid": rid}
            try:
                self.clients.send_multipart([frames[0], *encode("ERROR", body)], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def _goodbye(self) -> None:
        if self.agents is None:
            return
        for conn in list(self.core.agents.values()):
            try:
                self.agents.send_multipart([conn.ident, *encode("BYE", {})], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
