"""One loop turn's output: database writes, replies and events, committed before anything is sent.

Persist, then act: the server commits `batch` first and only then sends `messages` and
`events`; if the commit cannot be made, nothing of the turn has left the master.
"""

from __future__ import annotations

from typing import Any

from bus.codec import encode
from storage import WriteBatch

AGENT, CLIENT = "agent", "client"
Outgoing = tuple[str, bytes, list[bytes]]  # (socket kind, peer identity, frames)


class Outbox:
    """The turn's writes, messages and events; `take()` hands them over and starts a new turn."""

    def __init__(self) -> None:
        self.batch = WriteBatch()
        self.messages: list[Outgoing] = []
        self.events: list[list[bytes]] = []

    def send(self, kind: str, ident: bytes, command: str, body: dict[str, Any]) -> None:
        """Queue a message to one peer (AGENT or CLIENT) for after the commit."""
        self.messages.append((kind, ident, encode(command, body)))

    def send_frames(self, kind: str, ident: bytes, frames: list[bytes]) -> None:
        """Queue an already encoded message for after the commit."""
        self.messages.append((kind, ident, frames))

    def publish(self, topic: str, command: str, body: dict[str, Any]) -> None:
        """Queue an event for after the commit."""
        self.events.append([topic.encode(), *encode(command, body)])

    def take(self) -> tuple[WriteBatch, list[Outgoing], list[list[bytes]]]:
        """Hand over the turn's batch, messages and events, and start a new turn."""
        out = (self.batch, self.messages, self.events)
        self.batch, self.messages, self.events = WriteBatch(), [], []
        return out
