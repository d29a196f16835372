"""The one error root: every refusal the system reports carries a wire `code` and a `text`.

ProtocolError (a bad frame or body), ClientError (a request that failed, seen by a client) and
the master's RequestError (a request it refuses) share FfrtmpError's (code, text).
"""

from __future__ import annotations


class FfrtmpError(Exception):
    """Base of every coded error: `code` is the wire ERROR code, `text` says what to fix."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


class ProtocolError(FfrtmpError):
    """A frame or body that breaks docs/protocol.md; `rid` and `command` are echoed in the
    ERROR where they were readable (bus/codec.py decode fills them in)."""

    def __init__(self, code: str, text: str, rid: object = None,
                 command: str | None = None) -> None:
        super().__init__(code, text)
        self.rid = rid
        self.command = command


class ClientError(FfrtmpError):
    """A request that failed: an ERROR reply from the master, or no reply in time."""
