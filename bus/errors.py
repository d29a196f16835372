"""The bus error hierarchy: one ProtocolError for bad frames, one ClientError for requests."""

from __future__ import annotations


class ProtocolError(Exception):
    """A frame or body that breaks docs/protocol.md; `code` is the wire ERROR code."""

    def __init__(self, code: str, text: str, rid: object = None) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text
        self.rid = rid


class ClientError(Exception):
    """A request that failed: an ERROR reply from the master, or no reply in time."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text
