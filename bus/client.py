"""The client library: request/reply over a DEALER and event subscription over SUB.

A Client may be given several master endpoints (one leader, standbys: docs/protocol.md
"Masters: leader and standbys"); it talks to one at a time (`endpoint`) and follows the leader.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import zmq

from bus.codec import Message, decode, encode
from bus.errors import ClientError, ProtocolError
from bus.schemas import EVENTS, MASTER_TO_CLIENT
from bus.security import PeerKeys
from bus.sockets import (
    CLIENT_MAX_MSG,
    DEFAULT_CLIENTS,
    DEFAULT_EVENTS,
    EndpointError,
    connect_dealer,
    connect_sub,
)
from bus.sockets import endpoint as parse_endpoint

Event = dict[str, Any]  # docs/protocol.md "Events": {seq, id, at, from_state, state, reason, …}
Endpoints = str | Sequence[str]  # one endpoint, several as a list, or a comma-separated str
_WILDCARDS = ("*", "0.0.0.0", "::", "")
EVENT_IDS = 500  # jobs one EVENTS request may filter by (docs/protocol.md)
# Requests a client may send again to another master when one did not answer: repeating them
# changes nothing (SUBMIT only with an idempotency_key). RETRY, a key-less SUBMIT: never.
RESENDABLE = frozenset({"GET", "LIST", "EVENTS", "INFO", "NODES", "STATS", "CANCEL", "DRAIN"})
NOT_LEADER_PAUSE_S = 0.2  # before the next endpoint when a standby knows no leader in the list
MIN_TRY_S = 1.0  # with several endpoints, the least time one try waits for a reply


def endpoint_list(endpoints: Endpoints) -> list[str]:
    """The endpoints of `endpoints` (a list, or a str with commas between them), stripped,
    each once, in order. Nothing given stays one (empty) endpoint, refused at connect as an
    empty endpoint always was."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = list(dict.fromkeys(e.strip() for e in items if e.strip()))
    return out or [endpoints if isinstance(endpoints, str) else ""]


def resendable(command: str, body: dict[str, Any]) -> bool:
    """True if sending this request again (to another master) cannot apply it twice."""
    if command == "SUBMIT":
        return body.get("idempotency_key") is not None
    return command in RESENDABLE


class NotLeader(ClientError):
    """ERROR not_leader: the master asked is a standby; `leader` is the leader it knows
    ({agents, clients, events, epoch, instance}) or None."""

    def __init__(self, text: str, leader: dict[str, Any] | None) -> None:
        super().__init__("not_leader", text)
        self.leader = leader


def _leader_of(body: dict[str, Any]) -> dict[str, Any] | None:
    leader = body.get("leader")
    return leader if isinstance(leader, dict) else None


def _clients_of(leader: dict[str, Any] | None) -> str | None:
    clients = (leader or {}).get("clients")
    return clients if isinstance(clients, str) and clients else None


class Client:
    """A connection to a master's client endpoint; every call waits at most `timeout` s.

    With several endpoints (masters on one database: one leader, standbys) the client talks to
    one at a time, `endpoint`, and within one call follows `ERROR not_leader` to the leader
    and, for a request safe to repeat (`resendable`), moves on from a master that does not
    answer. With one endpoint a call is one try of `timeout` s.
    """

    def __init__(
        self, endpoint: Endpoints = DEFAULT_CLIENTS, timeout: float = 10.0,
        ctx: zmq.Context | None = None, keys: PeerKeys | None = None,
    ) -> None:
        self.endpoints = endpoint_list(endpoint)
        self._index = 0
        self.keys = keys
        self.timeout = timeout
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self._sock: zmq.Socket | None = None
        self._rids = itertools.count(1)

    @property
    def endpoint(self) -> str:
        """The endpoint in use now (the one that answered last)."""
        return self.endpoints[self._index]

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (and the context if this client made it)."""
        self._drop()
        if self._own_ctx:
            # destroy, not term: term() waits forever for any socket of the context still
            # open (one left behind by a failed connect hung the CLI past its --timeout).
            self._ctx.destroy(linger=0)

    def _drop(self) -> None:
        """Close the socket: a late reply must not be taken for a later request's."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _use(self, index: int) -> None:
        if index != self._index:
            self._drop()
            self._index = index

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = connect_dealer(self._ctx, self.endpoint, keys=self.keys)
        return self._sock

    def _listed(self, target: str | None) -> int | None:
        """The index of `target` (a leader's clients endpoint, as the leader advertises it:
        `ffrtmp master --advertise`) in this client's list, if it is there."""
        if not target:
            return None
        normal = {}
        for i, ep in enumerate(self.endpoints):
            try:
                normal[parse_endpoint(ep)] = i
            except EndpointError:
                continue
        try:
            return normal.get(parse_endpoint(target))
        except EndpointError:
            return None

    def _await(self, sock: zmq.Socket, rid: int, wait: float) -> Message | None:
        """The reply to `rid` within `wait` s, or None (and the socket dropped)."""
        end = time.monotonic() + wait
        while True:
            left = end - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                self._drop()
                return None
            try:
                msg = decode(sock.recv_multipart(), MASTER_TO_CLIENT)
            except ProtocolError as e:
                raise ClientError(e.code, f"bad reply from master: {e.text}") from e
            if msg.get("rid") == rid:
                return msg

    def request(self, command: str, **body: Any) -> dict[str, Any]:
        """Send one request and return the reply body; raises ClientError on ERROR or timeout
        (NotLeader for a standby that names no leader this client may use)."""
        rid = next(self._rids)
        frames = encode(command, {**body, "rid": rid})
        size = sum(len(f) for f in frames)
        if size > CLIENT_MAX_MSG:  # the master would refuse it: say so without sending it
            raise ClientError("too_large", f"{command} of {size} bytes is over the "
                                           f"{CLIENT_MAX_MSG}-byte message limit: send less")
        deadline = time.monotonic() + self.timeout
        many = len(self.endpoints) > 1
        safe = resendable(command, body)
        hops = 0  # immediate not_leader redirects in this call (at most 2 per endpoint)
        silent: list[str] = []  # endpoints that did not answer a try, in order
        standbys: dict[str, NotLeader] = {}  # endpoints that answered not_leader, last answer
        unavailable: dict[str, ClientError] = {}  # endpoints that answered unavailable
        while True:
            ep = self.endpoint
            left = deadline - time.monotonic()
            # One endpoint, or a request that may not go elsewhere: one try of all the time.
            wait = min(left, max(MIN_TRY_S, self.timeout / len(self.endpoints))) \
                if many and safe else left
            sock = self._socket()
            sock.send_multipart(frames)
            msg = self._await(sock, rid, wait)
            if msg is None:
                if ep not in silent:
                    silent.append(ep)
                standbys.pop(ep, None)
                if many:  # the next call starts at the next endpoint either way
                    self._use((self._index + 1) % len(self.endpoints))
                if many and safe and deadline - time.monotonic() > 0:
                    continue
                raise self._gave_up(command, safe, silent, standbys)
            if msg.command != "ERROR":
                return msg.body
            if msg["code"] == "unavailable" and many:
                # Not applied (database down there, or a standby cut off from it): another
                # master may lead; each endpoint is asked once before this is the answer.
                unavailable[ep] = ClientError("unavailable", f"{ep}: {msg['text']}")
                rest = [i for i, e in enumerate(self.endpoints)
                        if e not in unavailable and e not in silent]
                if not rest or deadline - time.monotonic() <= 0:
                    raise unavailable[ep]
                self._use(rest[0])
                continue
            if msg["code"] != "not_leader":
                raise ClientError(msg["code"], msg["text"])
            refusal = self._not_leader(ep, msg.body)
            standbys[ep] = refusal
            silent = [s for s in silent if s != ep]
            target = self._listed(_clients_of(refusal.leader))
            if target is not None and target != self._index and hops < 2 * len(self.endpoints):
                hops += 1  # not applied there: resend to the leader at once
                self._use(target)
                continue
            if not many:
                raise refusal
            pause = min(NOT_LEADER_PAUSE_S, deadline - time.monotonic())
            if pause <= 0:
                raise self._gave_up(command, safe, silent, standbys)
            time.sleep(pause)
            ahead = (self._index + 1) % len(self.endpoints)
            self._use(target if target is not None and target != self._index else ahead)

    def _not_leader(self, ep: str, body: dict[str, Any]) -> NotLeader:
        """The error for a standby's ERROR not_leader, naming the leader it knows."""
        leader = _leader_of(body)
        clients = _clients_of(leader)
        if clients is None:
            return NotLeader(f"{ep} is a standby and knows no leader yet (a takeover may be "
                             "under way): request not applied, retry shortly", leader)
        if self._listed(clients) is None:
            return NotLeader(f"{ep} is a standby; the leader is at {clients}: add it to "
                             "--master (FFRTMP_MASTER)", leader)
        return NotLeader(f"{ep} is a standby; the leader is at {clients}", leader)

    def _gave_up(self, command: str, safe: bool, silent: list[str],
                 standbys: dict[str, NotLeader]) -> ClientError:
        """The error at the end of a call that got no usable answer."""
        if not standbys:
            text = f"no reply from master at {', '.join(silent)} within {self.timeout:g}s"
            if len(self.endpoints) > 1 and not safe:
                text += (f" ({command} is not sent to another master: it might have been "
                         "applied; check before trying again)")
            return ClientError("timeout", text)
        last = list(standbys.values())[-1]
        if len(standbys) == 1 and not silent:
            return last
        parts = [e.text for e in standbys.values()]
        if silent:
            parts.append(f"no reply from {', '.join(silent)}")
        return NotLeader(f"no leader answered within {self.timeout:g}s: " + "; ".join(parts),
                         last.leader)

    def _from_leader(self, command: str, key: str | None = None) -> dict[str, Any]:
        """A request a standby answers too (INFO, STATS): asked again of the leader it names
        when that leader is one of this client's endpoints."""
        reply = self.request(command)
        view = reply.get(key, {}) if key else reply
        if isinstance(view, dict) and view.get("role") == "standby":
            target = self._listed(_clients_of(_leader_of(view)))
            if target is not None and target != self._index:
                self._use(target)
                reply = self.request(command)
        return reply

    def submit(self, specs: list[dict[str, Any]], idempotency_key: str | None = None) -> list[int]:
        """Submit specs; returns the new (or, for a repeated key, the original) job ids."""
        body: dict[str, Any] = {"specs": specs}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        return list(self.request("SUBMIT", **body)["ids"])

    def get(self, ids: list[int], events: bool = False) -> tuple[list[dict[str, Any]], list[int]]:
        """Jobs by id (with their event history if asked) and the ids not found."""
        reply = self.request("GET", ids=list(ids), events=events)
        return reply["jobs"], reply.get("missing", [])

    def list_jobs(
        self, states: list[str] | None = None, limit: int = 100, before_id: int | None = None,
        scenarios: list[str] | None = None, agent: str | None = None,
        since: float | None = None,
    ) -> list[dict[str, Any]]:
        """A page of jobs, newest first (list_page also says whether more match)."""
        return self.list_page(states, limit, before_id, scenarios, agent, since)[0]

    def list_page(
        self, states: list[str] | None = None, limit: int = 100, before_id: int | None = None,
        scenarios: list[str] | None = None, agent: str | None = None,
        since: float | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of jobs, newest first, and whether more jobs match past it."""
        reply = self.request("LIST", states=states, limit=limit, before_id=before_id,
                             scenarios=scenarios, agent=agent, since=since)
        return list(reply["jobs"]), bool(reply.get("more"))

    def events(self, after: int = 0, limit: int = 1000,
               ids: Iterable[int] | None = None) -> dict[str, Any]:
        """Committed events with seq > after: {events, last, head, more} (docs/protocol.md)."""
        return self.request("EVENTS", after=after, limit=limit,
                            ids=None if ids is None else list(ids))

    def info(self) -> dict[str, Any]:
        """What the master says about itself: version, instance, events endpoint, head, limits,
        role and epoch (the leader's, when a standby answers and names a listed leader)."""
        return dict(self._from_leader("INFO"))

    def events_endpoint(self) -> str:
        """Where this master publishes events: INFO's endpoint, a wildcard bind host (`*`,
        0.0.0.0, ::) replaced by the host this client reaches the master at."""
        return advertised(self.info()["events"], self.endpoint)

    def cancel(self, ids: list[int], grace_s: float = 30.0) -> list[dict[str, Any]]:
        """Cancel jobs; returns [{id, result}] (cancelled, cancelling, terminal, not_found)."""
        return list(self.request("CANCEL", ids=list(ids), grace_s=float(grace_s))["results"])

    def retry(self, job_id: int) -> int:
        """Submit a terminal job again as a new job; returns the new id."""
        return int(self.request("RETRY", id=job_id)["id"])

    def nodes(self, page: int = 200) -> list[dict[str, Any]]:
        """Every agent the master knows, by name, fetched `page` at a time (NODES is paged)."""
        nodes: list[dict[str, Any]] = []
        after = None
        while True:
            reply = self.request("NODES", limit=page, after=after)
            nodes += reply["nodes"]
            after = reply.get("next")
            if not after:
                return nodes

    def drain(self, name: str, on: bool = True) -> dict[str, Any]:
        """Stop (or resume) dispatching to an agent."""
        return self.request("DRAIN", name=name, on=on)

    def stats(self) -> dict[str, Any]:
        """The master's counters snapshot: the leader's, if a standby answers and names a
        leader this client has in its list (else the standby's {role, epoch, leader, …})."""
        return dict(self._from_leader("STATS", "stats")["stats"])


class Subscriber:
    """Events from masters' PUB sockets, filtered by topic prefixes: one socket connected to
    every endpoint given (a list, or a comma-separated str) and any added later (`connect`)."""

    def __init__(
        self, topics: list[str], endpoint: Endpoints = DEFAULT_EVENTS,
        ctx: zmq.Context | None = None, keys: PeerKeys | None = None,
    ) -> None:
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        first, *more = endpoint_list(endpoint)
        try:
            self._sock = connect_sub(self._ctx, first, topics, keys)
        except BaseException:
            if self._own_ctx:
                self._ctx.destroy(linger=0)
            raise
        self.endpoints = [parse_endpoint(first)]
        try:
            for ep in more:
                self.connect(ep)
        except BaseException:
            self.close()
            raise

    def connect(self, endpoint: str) -> bool:
        """Also receive from the PUB at `endpoint` (another master's); False if this socket
        is connected to it already. EndpointError for one that cannot be connected."""
        target = parse_endpoint(endpoint)
        if target in self.endpoints or endpoint in self.endpoints:
            return False
        try:
            self._sock.connect(target)
        except zmq.ZMQError as e:
            raise EndpointError(f"cannot connect to {endpoint!r}: {e.strerror}") from e
        self.endpoints.append(target)
        return True

    def recv(self, timeout: float) -> tuple[str, Message] | None:
        """The next (topic, message), or None if nothing came within timeout s."""
        if not self._sock.poll(int(timeout * 1000)):
            return None
        frames = self._sock.recv_multipart()
        try:
            return frames[0].decode(), decode(frames[1:], EVENTS)
        except (ProtocolError, UnicodeDecodeError):
            return None

    def subscribe(self, topic: str) -> None:
        """Add a topic prefix (the master filters: unsubscribed topics are never sent)."""
        self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())

    def unsubscribe(self, topic: str) -> None:
        """Drop a topic prefix added before."""
        self._sock.setsockopt(zmq.UNSUBSCRIBE, topic.encode())

    def __iter__(self) -> Iterator[tuple[str, Message]]:
        while True:
            item = self.recv(1.0)
            if item is not None:
                yield item

    def close(self) -> None:
        """Close the socket (and the context if this subscriber made it)."""
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.destroy(linger=0)  # never waits (see Client.close)


def advertised(events: str, clients: str) -> str:
    """The events endpoint a client connects to: `events` as the master bound it, with a
    wildcard host replaced by the host of the clients endpoint this client uses."""
    if not events.startswith("tcp://") or not clients.startswith("tcp://"):
        return events
    bound, used = urlsplit(events), urlsplit(clients)
    if (bound.hostname or "") not in _WILDCARDS or not used.hostname:
        return events
    host = used.hostname if ":" not in used.hostname else f"[{used.hostname}]"
    return f"tcp://{host}:{bound.port}"


class EventFollower:
    """Every job event after a sequence number, exactly once and in seq order.

    The `events` topic of the master's PUB socket carries each turn's events with consecutive
    seqs; a gap (a slow subscriber dropped some, a reconnect, a master restart) is filled from
    the store with EVENTS, and so is a quiet stream (the tail of a run may be lost with nothing
    after it to show the gap). Requests that fail (master down) are retried on the next poll:
    the follower itself never gives up. `on_progress` receives PROGRESS bodies of the jobs
    subscribed in `progress_ids` (topics `job.<id>.progress`).

    Across a failover (a client with several endpoints that moved to another master) the
    subscription is connected to the new leader's events endpoint too, from its INFO, after
    the next catch-up; seqs continue across leaders, so nothing is taken twice.
    """

    QUIET_S = 0.5  # ask the store when the stream was quiet this long

    def __init__(self, client: Client, events_ep: Endpoints, after: int | None = None,
                 progress_ids: Iterable[int] = (), ids: Iterable[int] | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None,
                 ctx: zmq.Context | None = None) -> None:
        """Subscribe first, then (unless `after` is given) read the head, so no event after
        the returned position can be missed. `ids` narrows catch-up reads to those jobs (the
        stream still carries every job's events; poll() returns only theirs). `events_ep`:
        one endpoint or several (all connected)."""
        self.client = client
        self.ids = None if ids is None else set(ids)
        self.on_progress = on_progress
        topics = ["events", *(f"job.{i}.progress" for i in progress_ids)]
        self.sub = Subscriber(topics, events_ep, ctx=ctx, keys=client.keys)
        # The client endpoint whose master's events endpoint the subscription has (None: not
        # known; it is asked after the first catch-up). Only a client with several endpoints
        # can move: with one, the events endpoint given is the only one.
        self._resolved: str | None = None
        if after is None:
            try:
                info = client.info()
                self._connect_announced(info)
            except BaseException:
                self.sub.close()
                raise
            self.last = int(info["head"])
        else:
            self.last = after
        self._quiet_since = time.monotonic()
        self.replayed = 0  # events read from the store rather than the stream (for tests)

    def _connect_announced(self, info: dict[str, Any]) -> None:
        """Connect the subscription to the events endpoint of the master that answered INFO
        (the client's endpoint now), if the client may move between masters."""
        if len(self.client.endpoints) < 2:
            return
        used = self.client.endpoint
        try:
            self.sub.connect(advertised(str(info["events"]), used))
        except (EndpointError, KeyError):
            return  # an INFO without a usable endpoint: catch-up reads go on all the same
        self._resolved = used

    def _follow_leader(self) -> None:
        """After a catch-up: if the client moved to another master since the subscription's
        events endpoint was resolved, connect to the one that master announces as well."""
        if len(self.client.endpoints) < 2 or self.client.endpoint == self._resolved:
            return
        try:
            info = self.client.info()
        except ClientError:
            return  # asked again after the next catch-up
        self._connect_announced(info)

    def close(self) -> None:
        """Close the subscription."""
        self.sub.close()

    def _wanted(self, events: Iterable[Event]) -> list[Event]:
        return [e for e in events if self.ids is None or e["id"] in self.ids]

    def _catch_up(self, upto: int | None) -> list[Event]:
        """Events from the store after self.last (up to `upto` if given, else to the head)."""
        out: list[Event] = []
        try:
            while upto is None or self.last < upto:
                ids = self.ids if self.ids is not None and len(self.ids) <= EVENT_IDS else None
                reply = self.client.events(self.last, 10_000, ids)
                got = [e for e in reply["events"] if upto is None or e["seq"] <= upto]
                self.replayed += len(got)
                out += self._wanted(got)
                if got:
                    self.last = got[-1]["seq"]
                if upto is not None and len(got) < len(reply["events"]):  # read past upto
                    self.last = max(self.last, upto)
                    break
                if not reply["more"]:  # everything up to the reply's `last` has been read
                    end = reply["last"] if upto is None else min(reply["last"], upto)
                    self.last = max(self.last, end)
                    break
        except ClientError:
            return out  # master down or busy: the next poll tries again from self.last
        self._follow_leader()
        return out

    def poll(self, timeout: float) -> list[Event]:
        """New events (possibly none) within about `timeout` s, in seq order."""
        deadline = time.monotonic() + timeout
        out: list[Event] = []
        while True:
            item = self.sub.recv(max(0.0, deadline - time.monotonic()))
            now = time.monotonic()
            if item is not None:
                topic, msg = item
                if msg.command == "EVENTS":
                    batch = [e for e in msg["events"] if isinstance(e, dict)]
                    if batch and batch[0].get("seq", 0) > self.last + 1:  # a gap: fill it
                        out += self._catch_up(batch[0]["seq"] - 1)
                    fresh = [e for e in batch if e.get("seq", 0) > self.last]
                    if fresh and fresh[0]["seq"] == self.last + 1:
                        out += self._wanted(fresh)
                        self.last = fresh[-1]["seq"]
                    self._quiet_since = now
                elif msg.command == "PROGRESS" and self.on_progress is not None:
                    self.on_progress(msg.body)
            elif now - self._quiet_since >= self.QUIET_S:
                out += self._catch_up(None)
                self._quiet_since = now
            if out or now >= deadline:
                return out
