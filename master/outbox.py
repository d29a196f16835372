"""One loop turn's output: database writes, replies and events, committed before anything is sent.

Persist, then act: the server commits `batch` first and only then sends `messages` and
`events`; if the commit cannot be made, nothing of the turn has left the master.
"""

from __future__ import annotations

from typing import Any

from bus.codec import encode
from bus.sockets import Subscriptions
from storage import WriteBatch

AGENT, CLIENT = "agent", "client"
Outgoing = tuple[str, bytes, list[bytes]]  # (socket kind, peer identity, frames)
# Events per coalesced `events` message: a slow subscriber's queue (events_hwm messages) then
# holds at most ~2 000 x 100 events of ~120 bytes at the master.
EVENTS_PER_MESSAGE = 100
EVENTS_TOPIC = b"events"
# Master -> agent messages that carry the epoch: an agent ignores them from an older leader.
STAMPED = frozenset({"WELCOME", "JOB", "DONE_ACK", "CANCEL"})


class Outbox:
    """The turn's writes, messages and events; `take()` hands them over and starts a new turn."""

    def __init__(self, epoch: int = 0, subscriptions: Subscriptions | None = None) -> None:
        self.epoch = epoch  # stamped on the messages agents fence by (STAMPED)
        # What subscribers take (the events XPUB's table); None: publish every topic.
        self.subscriptions = subscriptions
        self.batch = WriteBatch()
        self.messages: list[Outgoing] = []
        self.events: list[list[bytes]] = []
        self.log: list[dict[str, Any]] = []  # the turn's job events, in seq order

    def send(self, kind: str, ident: bytes, command: str, body: dict[str, Any]) -> None:
        """Queue a message to one peer (AGENT or CLIENT) for after the commit; the ones agents
        fence by carry this leader's epoch."""
        if command in STAMPED and kind == AGENT:
            body["epoch"] = self.epoch
        self.messages.append((kind, ident, encode(command, body)))

    def send_frames(self, kind: str, ident: bytes, frames: list[bytes]) -> None:
        """Queue an already encoded message for after the commit."""
        self.messages.append((kind, ident, frames))

    def wants(self, topic: bytes) -> bool:
        """Does anyone subscribe to this topic? (Nothing is encoded for a topic nobody takes.)"""
        subs = self.subscriptions
        return subs is None or subs.wants(topic)

    def publish(self, topic: str, command: str, body: dict[str, Any]) -> None:
        """Queue an event for after the commit, if anyone subscribes to its topic."""
        raw = topic.encode()
        if self.wants(raw):
            self.events.append([raw, *encode(command, body)])

    def job_event(self, event: dict[str, Any]) -> None:
        """Queue a job event (an event view, docs/protocol.md "Events") for after the commit:
        on its job's topic as STATE (if anyone subscribes to it), and in the turn's coalesced
        `events` messages."""
        subs = self.subscriptions
        if subs is None or subs.touches(b"job."):
            topic = b"job.%d.state" % event["id"]
            if self.wants(topic):
                self.events.append([topic, *encode("STATE", event)])
        self.log.append(event)

    def take(self) -> tuple[WriteBatch, list[Outgoing], list[list[bytes]]]:
        """Hand over the turn's batch, messages and events, and start a new turn.

        The turn's job events go last, as `EVENTS {events: [...]}` messages of consecutive
        sequence numbers, so a subscriber of `events` sees every event in order or a gap.
        """
        events = self.events
        log = self.log if self.wants(EVENTS_TOPIC) else []
        for start in range(0, len(log), EVENTS_PER_MESSAGE):
            chunk = log[start:start + EVENTS_PER_MESSAGE]
            events.append([EVENTS_TOPIC, *encode("EVENTS", {"events": chunk})])
        out = (self.batch, self.messages, events)
        self.batch, self.messages, self.events, self.log = WriteBatch(), [], [], []
        return out
