"""Frame codec: [header, command, msgpack map] <-> Message, with version and schema checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from bus.errors import ProtocolError
from bus.schemas import REQUIRED, Schema

PROTOCOL_VERSION = (1, 0)
SIGNATURE = b"FFR"
HEADER = SIGNATURE + bytes(PROTOCOL_VERSION)
MAX_COMMAND_LEN = 16
MAX_DEPTH = 32
MAX_ITEMS = 100_000  # entries of any one array or map in a body (SUBMIT holds <= 10 000 specs)
DEFAULT_MAX_BODY = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded message: its command and its body with defaults filled in."""

    command: str
    body: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.body[key]

    def get(self, key: str, default: Any = None) -> Any:
        """The body's value for key, or default."""
        return self.body.get(key, default)


def encode(command: str, body: dict[str, Any] | None = None) -> list[bytes]:
    """Encode a message as its three frames; raises ProtocolError if body cannot be packed."""
    try:
        packed = msgpack.packb(body or {}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError("bad_body", f"cannot encode {command}: {e}") from e
    return [HEADER, command.encode("ascii"), packed]


def decode(
    frames: list[bytes], schemas: dict[str, Schema], max_body: int = DEFAULT_MAX_BODY
) -> Message:
    """Decode and validate three frames against schemas; raises ProtocolError on any fault."""
    if len(frames) > 3:
        raise ProtocolError("too_large", f"a message is 3 frames, got {len(frames)}")
    if len(frames) != 3:
        raise ProtocolError("bad_body", f"expected 3 frames, got {len(frames)}")
    header, raw_command, raw_body = frames
    if len(header) != 5 or header[:3] != SIGNATURE:
        raise ProtocolError("bad_frame", "header is not FFR + major + minor")
    if header[3] != PROTOCOL_VERSION[0]:
        raise ProtocolError(
            "bad_version", f"major version {header[3]} not supported (speak {PROTOCOL_VERSION[0]})"
        )
    try:
        command = _command(raw_command, schemas)
    except ProtocolError as e:  # a 1.x body all the same: echo its rid where it can be read
        if len(raw_body) <= max_body:
            try:
                e.rid = _unpack(raw_body).get("rid")
            except ProtocolError:
                pass
        raise
    if len(raw_body) > max_body:
        raise ProtocolError("too_large", f"body of {len(raw_body)} bytes exceeds {max_body}")
    body = _unpack(raw_body)
    return Message(command, validate(body, schema=schemas[command], command=command))


def _command(raw: bytes, schemas: dict[str, Schema]) -> str:
    if not 0 < len(raw) <= MAX_COMMAND_LEN:
        raise ProtocolError("bad_command", "command must be 1-16 bytes")
    try:
        command = raw.decode("ascii")
    except UnicodeDecodeError as e:
        raise ProtocolError("bad_command", "command is not ASCII") from e
    if command not in schemas:
        raise ProtocolError("bad_command", f"unknown command {command!r}")
    return command


def _unpack(raw: bytes) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(  # element caps bound the CPU and memory of one decode
            raw, raw=False, strict_map_key=True, use_list=True,
            max_array_len=MAX_ITEMS, max_map_len=MAX_ITEMS,
        )
    except Exception as e:  # msgpack raises a zoo of types for garbage; all mean the same
        raise ProtocolError("bad_body", f"body is not valid msgpack: {type(e).__name__}") from e
    if not isinstance(body, dict):
        raise ProtocolError("bad_body", f"body must be a map, got {type(body).__name__}")
    fault = _tree_fault(body, 0)
    if fault == "depth":
        raise ProtocolError("bad_body", f"body nests deeper than {MAX_DEPTH}")
    if fault is not None:
        # A nested non-string key: the body itself is readable, so its rid is echoed.
        top_ok = all(isinstance(k, str) for k in body)
        raise ProtocolError("bad_body", f"map keys must be strings, got {fault}",
                            body.get("rid") if top_ok else None)
    return body


def _tree_fault(value: Any, level: int) -> str | None:
    """'depth' if value nests deeper than MAX_DEPTH, else a description of the first map key
    that is not a string (at any depth: a bin key next to str keys would reach code that
    compares or sorts keys), else None."""
    if level >= MAX_DEPTH:
        return "depth"
    if isinstance(value, dict):
        items: Any = value.values()
        for key in value:
            if not isinstance(key, str):
                return f"{type(key).__name__} {key!r:.40}"
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        if isinstance(item, dict | list) and (fault := _tree_fault(item, level + 1)):
            return fault
    return None


_KINDS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "num": (int, float),
    "str": (str,),
    "bool": (bool,),
    "list": (list,),
    "map": (dict,),
}


def validate(body: dict[str, Any], schema: Schema, command: str) -> dict[str, Any]:
    """Return body checked against schema with defaults filled; unknown keys are kept."""
    rid = body.get("rid")
    out = dict(body)
    for key, (kind, default) in schema.items():
        if key not in body:
            if default is REQUIRED:
                raise ProtocolError("bad_body", f"{command}.{key} is required", rid)
            out[key] = _fresh(default)
        elif not _kind_ok(body[key], kind):
            got = type(body[key]).__name__
            raise ProtocolError("bad_body", f"{command}.{key} must be {kind}, got {got}", rid)
    return out


def _fresh(default: Any) -> Any:
    if isinstance(default, dict | list):
        return type(default)()
    return default


def _kind_ok(value: Any, kind: str) -> bool:
    if kind == "any":
        return True
    if kind.endswith("?"):
        if value is None:
            return True
        kind = kind[:-1]
    if isinstance(value, bool) and kind in ("int", "num"):
        return False
    return isinstance(value, _KINDS[kind])
