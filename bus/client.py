"""The client library: request/reply over a DEALER and event subscription over SUB."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
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
    connect_dealer,
    connect_sub,
)

Event = dict[str, Any]  # docs/protocol.md "Events": {seq, id, at, from_state, state, reason, …}
_WILDCARDS = ("*", "0.0.0.0", "::", "")
EVENT_IDS = 500  # jobs one EVENTS request may filter by (docs/protocol.md)


class Client:
    """A connection to the master's client endpoint; every call waits at most `timeout` s."""

    def __init__(
        self, endpoint: str = DEFAULT_CLIENTS, timeout: float = 10.0,
        ctx: zmq.Context | None = None, keys: PeerKeys | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.keys = keys
        self.timeout = timeout
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self._sock: zmq.Socket | None = None
        self._rids = itertools.count(1)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (and the context if this client made it)."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_ctx:
            # destroy, not term: term() waits forever for any socket of the context still
            # open (one left behind by a failed connect hung the CLI past its --timeout).
            self._ctx.destroy(linger=0)

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = connect_dealer(self._ctx, self.endpoint, keys=self.keys)
        return self._sock

    def request(self, command: str, **body: Any) -> dict[str, Any]:
        """Send one request and return the reply body; raises ClientError on ERROR or timeout."""
        rid = next(self._rids)
        frames = encode(command, {**body, "rid": rid})
        size = sum(len(f) for f in frames)
        if size > CLIENT_MAX_MSG:  # the master would refuse it: say so without sending it
            raise ClientError("too_large", f"{command} of {size} bytes is over the "
                                           f"{CLIENT_MAX_MSG}-byte message limit: send less")
        sock = self._socket()
        sock.send_multipart(frames)
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                # A late reply must not be taken for the next request's: start afresh.
                sock.close(linger=0)
                self._sock = None
                raise ClientError(
                    "timeout", f"no reply from master at {self.endpoint} within {self.timeout:g}s"
                )
            try:
                msg = decode(sock.recv_multipart(), MASTER_TO_CLIENT)
            except ProtocolError as e:
                raise ClientError(e.code, f"bad reply from master: {e.text}") from e
            if msg.get("rid") != rid:
                continue
            if msg.command == "ERROR":
                raise ClientError(msg["code"], msg["text"])
            return msg.body

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
        """What the master says about itself: version, instance, events endpoint, head, limits."""
        return dict(self.request("INFO"))

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
        """The master's counters snapshot."""
        return dict(self.request("STATS")["stats"])


class Subscriber:
    """Events from the master's PUB socket, filtered by topic prefixes."""

    def __init__(
        self, topics: list[str], endpoint: str = DEFAULT_EVENTS, ctx: zmq.Context | None = None,
        keys: PeerKeys | None = None,
    ) -> None:
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self._sock = connect_sub(self._ctx, endpoint, topics, keys)

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
    """

    QUIET_S = 0.5  # ask the store when the stream was quiet this long

    def __init__(self, client: Client, events_ep: str, after: int | None = None,
                 progress_ids: Iterable[int] = (), ids: Iterable[int] | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None,
                 ctx: zmq.Context | None = None) -> None:
        """Subscribe first, then (unless `after` is given) read the head, so no event after
        the returned position can be missed. `ids` narrows catch-up reads to those jobs (the
        stream still carries every job's events; poll() returns only theirs)."""
        self.client = client
        self.ids = None if ids is None else set(ids)
        self.on_progress = on_progress
        topics = ["events", *(f"job.{i}.progress" for i in progress_ids)]
        self.sub = Subscriber(topics, events_ep, ctx=ctx, keys=client.keys)
        self.last = client.info()["head"] if after is None else after
        self._quiet_since = time.monotonic()
        self.replayed = 0  # events read from the store rather than the stream (for tests)

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
            pass  # master down or busy: the next poll tries again from self.last
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
