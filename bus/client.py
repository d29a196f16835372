"""The client library: request/reply over a DEALER and event subscription over SUB."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import zmq

from bus.codec import Message, decode, encode
from bus.errors import ClientError, ProtocolError
from bus.schemas import EVENTS, MASTER_TO_CLIENT
from bus.security import PeerKeys
from bus.sockets import DEFAULT_CLIENTS, DEFAULT_EVENTS, connect_dealer, connect_sub


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
            self._ctx.term()

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = connect_dealer(self._ctx, self.endpoint, keys=self.keys)
        return self._sock

    def request(self, command: str, **body: Any) -> dict[str, Any]:
        """Send one request and return the reply body; raises ClientError on ERROR or timeout."""
        rid = next(self._rids)
        sock = self._socket()
        sock.send_multipart(encode(command, {**body, "rid": rid}))
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
        self, states: list[str] | None = None, limit: int = 100, before_id: int | None = None
    ) -> list[dict[str, Any]]:
        """A page of jobs, newest first."""
        return list(self.request("LIST", states=states, limit=limit, before_id=before_id)["jobs"])

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

    def __iter__(self) -> Iterator[tuple[str, Message]]:
        while True:
            item = self.recv(1.0)
            if item is not None:
                yield item

    def close(self) -> None:
        """Close the socket (and the context if this subscriber made it)."""
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()
