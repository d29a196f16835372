"""The master loop: sockets in, core and requests, one group commit per turn, then messages out."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import random
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import zmq
from prometheus_client import CollectorRegistry, start_http_server

from bus.codec import RID_PEEK, decode, echo_rid, encode, peek
from bus.errors import ProtocolError
from bus.schemas import AGENT_TO_MASTER, CLIENT_TO_MASTER
from bus.security import AGENTS_DOMAIN, CLIENTS_DOMAIN, MasterSecurity, Peer, parse_user_id
from bus.sockets import (
    AGENT_MAX_MSG,
    CLIENT_HARD_MAX,
    CLIENT_MAX_MSG,
    BindError,
    Subscriptions,
    bind_pub,
    bind_router,
    check_http_bind,
)
from master.config import MasterConfig
from master.core import MasterCore
from master.leader import advertised_endpoints, make_leader, tagged_url
from master.metrics import MasterMetrics
from master.outbox import AGENT, CLIENT
from master.requests import PROTOCOL, Requests
from master.retention import Maintenance, Retention
from master.scenarios import load_presets, make_checks
from master.sla import SlaPolicy
from master.spec import ScenarioCheck
from storage import Fenced, StorageError, Store, backend_for

log = logging.getLogger("ffrtmp.master")
TICK_S = 0.05
START_RETRY_S = 5.0  # after a leader term failed to start, stand by this long before a retry
# Plain-int flags: pyzmq's send_multipart combines enum flags per frame, which costs more than
# the send itself for our small messages (~5 µs against ~2 µs per 4-frame message).
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
_NOBLOCK = int(zmq.NOBLOCK)
MAX_FRAMES = 4  # routing identity + header, command, body: anything longer is refused
_HEARTBEAT = encode("HEARTBEAT", {})


def _libc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc: give freed heap pages back to the OS
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_trim()


class Oversize(Exception):
    """A message over the whole-message caps; its frames were read and dropped, not kept.

    `kept` is what was kept of its first frames: the identity, then the header, command and
    the first RID_PEEK bytes of the body as far as they came before the cap (for the ERROR's
    `command` and `rid`).
    """

    def __init__(self, kept: list[bytes], frames: int, size: int) -> None:
        super().__init__(f"{frames} frames, {size} bytes")
        self.ident, self.frames, self.size, self.kept = kept[0], frames, size, kept


def recv_capped(sock: zmq.Socket, max_bytes: int, secured: bool
                ) -> tuple[list[bytes], str | None]:
    """One whole message (NOBLOCK), keeping at most MAX_FRAMES frames and max_bytes in all.

    Returns the frames and the ZAP User-Id (CURVE only). Frames past a cap are read without
    being copied into Python and dropped, then Oversize says so. (libzmq has already assembled
    the whole multipart message by then; what it held is given back by the caller's trim.)
    """
    user: str | None = None
    if secured:
        raw = sock.recv(_NOBLOCK, copy=False)
        got = raw.get("User-Id")
        user = got if isinstance(got, str) else None
        first: bytes = raw.bytes
    else:
        first = sock.recv(_NOBLOCK)
    frames: list[bytes] = [first]
    size, count = 0, 1
    while sock.getsockopt(zmq.RCVMORE):
        count += 1
        if count > MAX_FRAMES or size > max_bytes:  # dropped: never copied into Python
            size += len(sock.recv(copy=False))
            continue
        frame = sock.recv()
        size += len(frame)
        frames.append(frame if size <= max_bytes else frame[:RID_PEEK])
    if count > MAX_FRAMES or size > max_bytes:
        raise Oversize(frames, count - 1, size)
    return frames, user


def _refs(body: dict[str, Any], command: str | None, rid: Any) -> dict[str, Any]:
    """An ERROR body with the `command` and `rid` it answers, those that could be read."""
    if command is not None:
        body["command"] = command
    if rid is not None:
        body["rid"] = rid
    return body


# Why a leader stood down, as the `why` label of ffrtmp_master_leadership_changes_total.
_WHY = (("commit refused", "fenced"), ("newer epoch", "newer_epoch"),
        ("no lease renewal", "lease_expired"), ("lock connection", "lock_lost"),
        ("start failed", "start_failed"))


def _why_label(why: str) -> str:
    return next((label for key, label in _WHY if key in why), "other")


def _send_frames(sock: zmq.Socket, frames: list[bytes]) -> None:
    """send_multipart(frames, NOBLOCK) without the per-frame flag arithmetic.

    Same semantics: the first frame decides (EAGAIN at the high-water mark, EHOSTUNREACH for a
    gone ROUTER peer); once it is queued the rest of a multipart message always follows.
    """
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, _LAST if i == last else _MORE)


class StepDown(Exception):
    """Leadership is gone: the term ends at once and nothing of its turn is sent."""


class Master:
    """Owns the sockets and the loop; leads or stands by; `run()` blocks until `stop()`.

    A leader term (`_lead`) builds the core from the store exactly as a restart does and serves
    until stopped or until leadership is lost (master/leader.py); then the process stands by
    (`_standby`): it changes nothing, answers agents and clients `not_leader`, and tries to lead
    again. SQLite has one master per file, so there a term lasts the process's lifetime.
    """

    def __init__(self, cfg: MasterConfig, registry: CollectorRegistry | None = None,
                 scenarios: dict[str, ScenarioCheck] | None = None) -> None:
        self.cfg = cfg
        self.registry = registry or CollectorRegistry()
        if scenarios is None:
            scenarios = make_checks(load_presets(None))
        self.scenarios = scenarios
        self.metrics = MasterMetrics(self.registry, scenarios,
                                     SlaPolicy(cfg.sla_done_s, cfg.sla_wait_s, cfg.sla_target))
        self.instance = secrets.token_hex(8)  # this master process (WELCOME, INFO)
        self.started = time.monotonic()
        self.endpoints = advertised_endpoints(cfg.agents, cfg.clients, cfg.events,
                                              cfg.advertise)
        self.kind = backend_for(cfg.db_url)
        # Every connection of this process is tagged with its instance (leader.tagged_url).
        self.db_url = tagged_url(cfg.db_url, self.instance)
        self.store: Store | None = None
        # First: on SQLite the file lock (LeaderConflict), before the store migrates anything.
        self.leader = make_leader(cfg.db_url, self.instance, self.endpoints, cfg.dead_after_s)
        if not self.kind.servers:  # a file that cannot be opened is a mistake to show at once
            try:
                self.store = Store(self.db_url)
            except BaseException:
                self.leader.close()
                raise
        self.leading = False
        # Per term (set by _start_term):
        self.core: MasterCore
        self.requests: Requests
        self.retention: Retention
        self.maintenance: Maintenance
        self.metrics.watch(self._snapshot, self._nodes)
        self._db_down_logged = False
        self._next_try = 0.0  # when a standby may next try to lead (after a failed start)
        self._stop = threading.Event()
        self.ctx = zmq.Context()
        self.agents: zmq.Socket | None = None
        self.clients: zmq.Socket | None = None
        self.events: zmq.Socket | None = None
        self.subscriptions = Subscriptions()  # what the events socket's subscribers take
        self.metrics_server: Any = None
        self.security: MasterSecurity | None = None
        self._trim_due = False  # an oversize message passed through the heap
        self._next_trim = 0.0  # when the heap may next be trimmed
        self._unreachable: list[bytes] = []  # agents a send failed to; dropped after next drain

    def bind(self) -> None:
        """Bind all sockets (and the metrics endpoint); raises BindError on a refused address."""
        try:
            if self.cfg.keys_dir:
                self.security = MasterSecurity(self.ctx, self.cfg.keys_dir)
            sec, insecure = self.security, self.cfg.insecure
            self.agents = bind_router(self.ctx, self.cfg.agents, AGENT_MAX_MSG, insecure,
                                      sec, AGENTS_DOMAIN)
            # libzmq's cap above the master's own: an over-size request is answered too_large
            self.clients = bind_router(self.ctx, self.cfg.clients, CLIENT_HARD_MAX, insecure,
                                       sec, CLIENTS_DOMAIN, sndhwm=self.cfg.client_reply_hwm)
            self.events = bind_pub(self.ctx, self.cfg.events, insecure, sec, CLIENTS_DOMAIN,
                                   sndhwm=self.cfg.events_hwm)
            if self.cfg.metrics:
                check_http_bind(self.cfg.metrics, insecure, sec is not None)
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
        if self.store is not None:
            self.store.close()
            self.store = None
        self.leader.close()

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Stand by until leading, lead until stopped or deposed, and so on; says BYE to its
        agents on the way out."""
        if self.agents is None:
            self.bind()
        try:
            while not self._stop.is_set():
                epoch = self._standby()
                if epoch is None:
                    break
                self._lead(epoch)
        finally:
            self.close()

    # ---- standing by ------------------------------------------------------------------------

    def _open_store(self) -> Store | None:
        """The store, opened (and migrated) if it can be now; None while the database is down."""
        if self.store is None:
            try:
                self.store = Store(self.db_url)
                self._db_down_logged = False
                log.info("database %s reachable", self.store.url)
            except StorageError as e:
                if not self._db_down_logged:
                    log.error("standing by: %s; retrying", e)
                    self._db_down_logged = True
                self.metrics.db_errors.labels("open").inc()
                return None
        return self.store

    def _standby(self) -> int | None:
        """Serve as a standby until this process leads (its epoch) or is stopped (None)."""
        assert self.agents is not None and self.clients is not None
        poller = self._poller()
        interval = min(0.5, self.cfg.dead_after_s / 4)
        next_stats = time.monotonic()
        next_try = max(next_stats, self._next_try)
        said = False
        while not self._stop.is_set():
            now = time.monotonic()
            if self._trim_due:
                self._trim()
            if now >= next_try:
                next_try = now + interval
                store = self._open_store()
                if store is not None:
                    epoch = self.leader.try_lead(store)
                    if epoch is not None:
                        return epoch
                    if not said:
                        known = self.leader.known()
                        log.info("standing by: the leader is %s",
                                 f"{known['clients']} (epoch {known['epoch']})" if known
                                 else "not known yet")
                        said = True
            if now >= next_stats:
                self.metrics.refresh()
                next_stats = now + self.cfg.stats_interval_s
            ready = dict(poller.poll(int(max(0.0, min(next_try, next_stats) - now) * 1000) + 1))
            if self.agents in ready:
                for ident, msg, user in self._incoming(self.agents, AGENT, AGENT_MAX_MSG,
                                                       self.cfg.max_messages_per_turn):
                    peer = parse_user_id(user) if user else None
                    if self.security is not None and (peer is None or peer.role != "agent"):
                        self._unidentified(AGENT, ident, msg)
                    elif msg.command not in ("BYE", "ERROR"):
                        self._send_now(self.agents, ident, "ERROR", self._not_leader(None, None))
            if self.clients in ready:
                self._standby_clients()
            if self.events in ready:
                self._read_subscriptions()
        return None

    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        for sock in (self.agents, self.clients, self.events):
            poller.register(sock, zmq.POLLIN)
        return poller

    def _read_subscriptions(self, most: int = 1000) -> None:
        """The events socket's (un)subscriptions waiting, at most `most` a turn (an XPUB also
        hands over whatever else a subscriber sends: that is read and ignored, bounded here)."""
        assert self.events is not None
        for _ in range(most):
            try:
                self.subscriptions.update(self.events.recv(_NOBLOCK))
            except zmq.Again:
                return

    def _standby_clients(self) -> None:
        """A standby answers STATS with its role and every other request not_leader (or
        unavailable while it cannot reach the database either)."""
        assert self.clients is not None
        for ident, msg, user in self._incoming(self.clients, CLIENT, CLIENT_MAX_MSG,
                                               self.cfg.client_turn_messages):
            rid = echo_rid(msg.get("rid"))
            peer = parse_user_id(user) if user else None
            if self.security is not None and (peer is None or peer.role == "agent"):
                self._unidentified(CLIENT, ident, msg)
            elif msg.command == "STATS":
                self._send_now(self.clients, ident, "REPLY",
                               {"stats": self._standby_view(), "rid": rid})
            elif self.store is None:
                self.metrics.client_errors.labels("unavailable").inc()
                self._send_now(self.clients, ident, "ERROR", _refs(
                    {"code": "unavailable", "text": "database unavailable: this master stands "
                     "by until it can reach it; request not applied"}, msg.command, rid))
            else:
                self.metrics.client_errors.labels("not_leader").inc()
                self._send_now(self.clients, ident, "ERROR",
                               self._not_leader(msg.command, rid))

    def _not_leader(self, command: str | None, rid: Any) -> dict[str, Any]:
        known = self.leader.known()
        where = f"the leader is at {known['clients']}" if known else "no leader is known yet"
        return _refs({"code": "not_leader", "leader": known,
                      "text": f"this master is a standby; {where}: request not applied"},
                     command, rid)

    def _standby_view(self) -> dict[str, Any]:
        known = self.leader.known()
        return {"role": "standby", "epoch": known["epoch"] if known else 0, "leader": known,
                "instance": self.instance, "version": PROTOCOL,
                "uptime_s": round(time.monotonic() - self.started, 3)}

    def _send_now(self, sock: zmq.Socket, ident: bytes, command: str,
                  body: dict[str, Any]) -> None:
        with contextlib.suppress(zmq.ZMQError):  # a gone or slow peer: nothing to keep
            _send_frames(sock, [ident, *encode(command, body)])

    def _snapshot(self) -> dict[str, Any]:
        if self.leading:
            return self.core.snapshot()
        return {"queued_by_priority": {}, "delayed": 0, "live_by_state": {}, "agents": 0,
                "slots": 0, "slots_busy": 0, **self._standby_view()}

    # ---- leading ----------------------------------------------------------------------------

    def _start_term(self, epoch: int) -> None:
        """Build live state from the store exactly as a restart does, fenced by `epoch`."""
        cfg, store = self.cfg, self.store
        assert store is not None
        store.fence(epoch)
        self.core = MasterCore(cfg, store.max_job_id() + 1, self.metrics, random.Random(),
                               store.max_event_seq() + 1, instance=self.instance, epoch=epoch)
        self.requests = Requests(self.core, store, self.scenarios,
                                 leader=self.endpoints.view(self.instance, epoch))
        self.core.agents.probe = self._probe
        self.core.out.subscriptions = self.subscriptions
        self.retention = Retention(store, self.metrics, cfg.retention_days,
                                   cfg.retention_interval_s, cfg.retention_batch,
                                   agent_retention_s=cfg.agent_retention_s)
        self.maintenance = Maintenance(self.db_url, self.metrics, cfg.maintenance_interval_s)
        now, wall = time.monotonic(), time.time()
        self.core.recover(store.load_unfinished(), store.list_agents(), now, wall)
        self.leading = True
        self._unreachable.clear()  # the last term's connections
        self.metrics.leadership.labels("leader", "elected").inc()
        log.info("master leads (epoch %d): %d unfinished jobs recovered; agents %s, clients %s, "
                 "events %s", epoch, len(self.core.jobs), cfg.agents, cfg.clients, cfg.events)

    def _lead(self, epoch: int) -> None:
        """One leader term: serve until stopped (BYE to agents) or deposed (stand by)."""
        try:
            self._start_term(epoch)
        except Exception as e:  # the database went away meanwhile, or a bug: stand by
            if isinstance(e, StorageError):
                log.error("cannot lead: %s; standing by", e)
            else:
                log.exception("cannot lead; standing by")
            self._end_term("start failed")
            # Not a new epoch every half second: the next try after a pause.
            self._next_try = time.monotonic() + START_RETRY_S
            return
        why = "stopped"
        try:
            self._serve()
        except StepDown as e:
            why = str(e)
            log.error("no longer the leader (epoch %d): %s; standing by", epoch, why)
        finally:
            self._goodbye()
            self._end_term(why)

    def _end_term(self, why: str) -> None:
        if self.leading:
            self.maintenance.stop()
        self.leading = False
        self.leader.step_down()
        if self.store is not None:
            self.store.fence(None)
            if self.kind.servers:  # a fresh connection for the next try: this one may be dead
                self.store.close()
                self.store = None
        if why != "stopped":
            self.metrics.leadership.labels("standby", _why_label(why)).inc()

    def _serve(self) -> None:
        assert self.agents is not None and self.clients is not None
        now = time.monotonic()
        poller = self._poller()
        next_flush = next_stats = now
        self.maintenance.start()
        while not self._stop.is_set():
            if self.leader.lost:
                raise StepDown(self.leader_why())
            ready = dict(poller.poll(int(self._timeout(time.monotonic()) * 1000)))
            now, wall = time.monotonic(), time.time()
            if self.events in ready:  # first: this turn's events go to who subscribed by now
                self._read_subscriptions()
            if self.agents in ready:
                self._serve_agents(now, wall)
            self._drop_unreachable(now, wall)
            if self.clients in ready:
                self._serve_clients(now, wall)
            self.core.tick(now, wall)
            if now >= next_flush:
                self.core.flush_progress(wall)
                next_flush = now + self.cfg.progress_flush_s
            if now >= next_stats:
                self.core.out.publish("stats", "STATS", self.metrics.refresh())
                next_stats = now + self.cfg.stats_interval_s
            self.core.dispatch(now, wall)
            self.core.flush_acks()
            self.retention.tick(now, wall, self.core.out.batch)
            self._commit_and_send()

    def leader_why(self) -> str:
        """Why leadership was lost, as the leadership backend says."""
        return self.leader.why or "leadership lost"

    def _nodes(self) -> list[dict[str, Any]]:
        return self.core.agents.views(time.monotonic()) if self.leading else []

    def _timeout(self, now: float) -> float:
        due = self.core.jobs.sched.next_due()
        if due is None:
            return TICK_S
        return max(0.0, min(TICK_S, due - now))

    def _probe(self, ident: bytes) -> bool:
        """Is this agent connection still there? (a HEARTBEAT is harmless to send any time)"""
        assert self.agents is not None
        try:
            _send_frames(self.agents, [ident, *_HEARTBEAT])
            return True
        except zmq.ZMQError as e:
            return e.errno == zmq.EAGAIN  # queue full: connected, just slow

    def _recv(self, sock: zmq.Socket, kind: str, max_msg: int
              ) -> tuple[bytes, list[bytes], str | None] | None:
        """One message as (identity, frames, User-Id); None once the socket is empty.

        A message over the caps is answered ERROR too_large here and skipped.
        """
        while True:
            try:
                frames, user = recv_capped(sock, max_msg, self.security is not None)
                return frames[0], frames[1:], user
            except zmq.Again:
                return None
            except Oversize as e:
                self.metrics.bad_frames.labels(kind, "too_large").inc()
                self._trim_due = True
                body: dict[str, Any] = {"code": "too_large", "text": (
                    f"message of {e.frames} frames and {e.size} bytes: at most 3 frames and "
                    f"{max_msg} bytes in all")}
                self._error(kind, e.ident, _refs(body, *peek(e.kept[1:])))

    def _decode(self, kind: str, ident: bytes, rest: list[bytes]) -> Any:
        """The decoded message, or None after answering ERROR for a bad one."""
        try:
            return decode(rest, AGENT_TO_MASTER if kind == AGENT else CLIENT_TO_MASTER)
        except ProtocolError as e:
            self.metrics.bad_frames.labels(kind, e.code).inc()
            log.debug("bad frame from %s %r: %s", kind, ident, e)
            body = _refs({"code": e.code, "text": e.text}, e.command, e.rid)
            self._error(kind, ident, body)
            return None

    def _incoming(self, sock: zmq.Socket, kind: str, max_msg: int, most: int,
                  deadline: float = float("inf")) -> Iterator[tuple[bytes, Any, str | None]]:
        """Decoded messages waiting on a socket as (identity, message, User-Id): at most `most`
        read, none started after `deadline` (perf_counter); bad ones are answered and skipped."""
        received = 0
        while received < most and time.perf_counter() < deadline:
            got = self._recv(sock, kind, max_msg)
            if got is None:
                break
            received += 1
            ident, rest, user = got
            msg = self._decode(kind, ident, rest)
            if msg is not None:
                yield ident, msg, user
        if received:  # one counter update per drain: labels() per message costs ~3 µs
            self.metrics.messages.labels(kind, "in").inc(received)

    def _error(self, kind: str, ident: bytes, body: dict[str, Any]) -> None:
        """An ERROR about a message that could not be served: after the turn's commit while
        leading (persist, then act), at once while standing by (a standby has no turn)."""
        if self.leading:
            self.core.out.send(kind, ident, "ERROR", body)
        else:
            sock = self.agents if kind == AGENT else self.clients
            assert sock is not None
            self._send_now(sock, ident, "ERROR", body)

    def _unidentified(self, kind: str, ident: bytes, msg: Any) -> None:
        """With keys, a message whose key names no peer of this socket is refused (fail closed)."""
        self.metrics.bad_frames.labels(kind, "forbidden").inc()
        self.core.out.send(kind, ident, "ERROR", _refs({
            "code": "forbidden", "text": "this connection's key names no peer of this socket"},
            msg.command, echo_rid(msg.get("rid"))))

    def _serve_agents(self, now: float, wall: float) -> None:
        """Every agent message waiting, up to max_messages_per_turn."""
        assert self.agents is not None
        for ident, msg, user in self._incoming(self.agents, AGENT, AGENT_MAX_MSG,
                                               self.cfg.max_messages_per_turn):
            peer: Peer | None = parse_user_id(user) if user else None
            if self.security is not None and (peer is None or peer.role != "agent"):
                self._unidentified(AGENT, ident, msg)
                continue
            self.core.on_agent(ident, msg, now, wall, peer)

    def _serve_clients(self, now: float, wall: float) -> None:
        """Client requests within the turn's budget (count and time); fair share per client.

        ZeroMQ's ROUTER reads its peers round robin, so every waiting client gets its turn; one
        client past its share of a turn is answered ERROR busy, and the rest waits in the socket
        for the next turn (after the agents are served again).
        """
        assert self.clients is not None
        cfg = self.cfg
        deadline = time.perf_counter() + cfg.client_turn_s
        per_client: dict[bytes, int] = {}
        for ident, msg, user in self._incoming(self.clients, CLIENT, CLIENT_MAX_MSG,
                                               cfg.client_turn_messages, deadline):
            seen = per_client[ident] = per_client.get(ident, 0) + 1
            if seen > cfg.client_messages_per_turn:
                self.metrics.client_busy.inc()
                self.core.out.send(CLIENT, ident, "ERROR", {
                    "code": "busy", "rid": msg.get("rid"), "command": msg.command,
                    "text": f"more than {cfg.client_messages_per_turn} requests in one turn: "
                            "retry after the replies you are waiting for"})
                continue
            peer = parse_user_id(user) if user else None
            if self.security is not None and (peer is None or peer.role == "agent"):
                self._unidentified(CLIENT, ident, msg)
                continue
            self.requests.handle(ident, msg, now, wall, peer.role if peer else None)

    def _trim(self) -> None:
        """libzmq assembles a multipart message whole before handing it over, so an oversize
        one passed through the heap: give that back to the OS (at most 10 times a second)."""
        now = time.monotonic()
        if _MALLOC_TRIM is not None and now >= self._next_trim:
            self._trim_due = False
            self._next_trim = now + 0.1
            _MALLOC_TRIM(0)

    def _commit_and_send(self) -> None:
        if self._trim_due:
            self._trim()
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
                if kind == AGENT:
                    log.info("cannot send to agent %r: %s", ident, e)
                    self._unreachable.append(ident)
                elif e.errno == zmq.EAGAIN:  # a client that does not read its replies
                    self.metrics.replies_dropped.inc()
        for kind, n in sent.items():  # one counter update per socket and turn
            self.metrics.messages.labels(kind, "out").inc(n)
        assert self.events is not None
        for frames in published:
            try:
                _send_frames(self.events, frames)
            except zmq.Again:
                pass
        if published:
            self.metrics.messages.labels("events", "out").inc(len(published))

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
            assert self.store is not None
            try:
                self.store.apply(batch)
                self.metrics.commit_seconds.observe(time.perf_counter() - started)
                return
            except Fenced as e:
                self.metrics.db_errors.labels("fenced").inc()
                raise StepDown(str(e)) from e
            except StorageError as e:
                self.metrics.db_errors.labels("commit").inc()
                log.error("commit failed (%s); holding %d writes and retrying", e, len(batch))
            if self.leader.lost:  # a standby may lead by now: this turn is not ours to write
                raise StepDown(f"{self.leader_why()} while the database was failing")
            self._refuse_clients_for(delay)
            if self._stop.is_set():
                raise SystemExit("stopped while the database was down; uncommitted turn dropped")
            delay = min(2.0, delay * 2)
            self.core.agents.seen_all(time.monotonic())  # our silence is not their death

    def _refuse_clients_for(self, seconds: float) -> None:
        """While writes are stuck, answer every client request with ERROR unavailable."""
        assert self.clients is not None
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not self.clients.poll(int(left * 1000) + 1):
                continue
            got = self._recv(self.clients, CLIENT, CLIENT_MAX_MSG)
            if got is None:
                continue
            ident, rest, _ = got
            command: str | None
            try:
                msg = decode(rest, CLIENT_TO_MASTER)
                command, rid = msg.command, msg.get("rid")
            except ProtocolError as e:
                command, rid = e.command, e.rid
            self.metrics.client_errors.labels("unavailable").inc()
            body = _refs({"code": "unavailable",
                          "text": "database unavailable: request not applied"}, command, rid)
            try:
                _send_frames(self.clients, [ident, *encode("ERROR", body)])
            except zmq.ZMQError:
                pass

    def _goodbye(self) -> None:
        """BYE to every agent of the term: they move on (to the next master, if any)."""
        if self.agents is None or not self.leading:
            return
        for conn in self.core.agents:
            try:
                self.agents.send_multipart([conn.ident, *encode("BYE", {})], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
