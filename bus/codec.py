"""Frame codec: [header, command, msgpack map] <-> Message, with version and schema checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from bus.errors import ProtocolError
from bus.schemas import REQUIRED, Schema

PROTOCOL_VERSION = (1, 3)  # docs/protocol.md "Changes in 1.3"
SIGNATURE = b"FFR"
HEADER = SIGNATURE + bytes(PROTOCOL_VERSION)
MAX_COMMAND_LEN = 16
MAX_DEPTH = 32
MAX_ITEMS = 100_000  # entries of any one array or map in a body (SUBMIT holds <= 10 000 specs)
DEFAULT_MAX_BODY = 8 * 1024 * 1024
# A client request's rid (docs/protocol.md "Client ↔ master"): one rule for master and clients.
RID_MAX = 2**64 - 1
RID_MAX_BYTES = 128
RID_RULE = "an int 0..2^64-1 or a str of at most 128 bytes"
RID_PEEK = 64 * 1024  # of a body too large to unpack, this much is read for its rid
_COMMAND_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


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


_PACKER = msgpack.Packer(use_bin_type=True)
_JOBS_COMMAND = b"JOBS"
_JOB_KEYS = (_PACKER.pack("id"), _PACKER.pack("attempt"), _PACKER.pack("spec"))


def encode_jobs(jobs: list[tuple[int, int, bytes]], epoch: int) -> list[bytes]:
    """`JOBS {jobs: [{id, attempt, spec}, ...], epoch}` with each spec given already packed
    (a msgpack map, as the master keeps it): the body is assembled, never re-encoded."""
    pack = _PACKER.pack
    key_id, key_attempt, key_spec = _JOB_KEYS
    parts = [b"\x82", pack("jobs"), _PACKER.pack_array_header(len(jobs))]
    for job_id, attempt, spec in jobs:
        parts += (b"\x83", key_id, pack(job_id), key_attempt, pack(attempt), key_spec, spec)
    parts += (pack("epoch"), pack(epoch))
    return [HEADER, _JOBS_COMMAND, b"".join(parts)]


def decode(
    frames: list[bytes], schemas: dict[str, Schema], max_body: int = DEFAULT_MAX_BODY
) -> Message:
    """Decode and validate three frames against schemas; raises ProtocolError on any fault.

    The error carries the message's `command` and `rid` wherever they could be read, whatever
    the fault (header, version, command, body, size), for the ERROR that answers it.
    """
    try:
        return _decode(frames, schemas, max_body)
    except ProtocolError as e:
        if e.command is None and len(frames) >= 2:
            e.command = readable_command(frames[1])
        raise


def _decode(frames: list[bytes], schemas: dict[str, Schema], max_body: int) -> Message:
    if len(frames) > 3:
        raise ProtocolError("too_large", f"a message is 3 frames, got {len(frames)}",
                            peek_rid(frames[2]))
    if len(frames) != 3:
        raise ProtocolError("bad_body", f"expected 3 frames, got {len(frames)}")
    header, raw_command, raw_body = frames
    if len(header) != 5 or header[:3] != SIGNATURE:
        raise ProtocolError("bad_frame", "header is not FFR + major + minor",
                            _rid_of(raw_body, max_body))
    if header[3] != PROTOCOL_VERSION[0]:
        raise ProtocolError(
            "bad_version", f"major version {header[3]} not supported (speak {PROTOCOL_VERSION[0]})",
            _rid_of(raw_body, max_body))
    try:
        command = _command(raw_command, schemas)
    except ProtocolError as e:  # a 1.x body all the same: echo its rid where it can be read
        e.rid = _rid_of(raw_body, max_body)
        raise
    if len(raw_body) > max_body:
        raise ProtocolError("too_large", f"body of {len(raw_body)} bytes exceeds {max_body}",
                            peek_rid(raw_body))
    body = _unpack(raw_body)
    return Message(command, validate(body, schema=schemas[command], command=command))


def rid_problem(rid: Any) -> str | None:
    """Why `rid` is not a valid client request id (RID_RULE), or None if it is one."""
    if isinstance(rid, int) and not isinstance(rid, bool):
        return None if 0 <= rid <= RID_MAX else f"must be {RID_RULE}, got {rid}"
    if isinstance(rid, str):
        if len(rid) * 4 <= RID_MAX_BYTES:  # UTF-8: at most 4 bytes a character
            return None
        size = len(rid.encode("utf-8", "surrogatepass"))
        return None if size <= RID_MAX_BYTES else f"must be {RID_RULE}, got a str of {size} bytes"
    return f"must be {RID_RULE}, got {wire_type(rid)}"


def echo_rid(rid: Any) -> Any:
    """What an ERROR echoes of a readable rid: a scalar (nil, bool, int, float, or a str or
    bin of at most RID_MAX_BYTES bytes) as it was sent; None for anything else (an array or
    map is never echoed)."""
    if rid is None or isinstance(rid, int | float):
        return rid
    if isinstance(rid, str) and rid_problem(rid) is None:
        return rid
    if isinstance(rid, bytes) and len(rid) <= RID_MAX_BYTES:
        return rid
    return None


def readable_command(raw: bytes) -> str | None:
    """A command frame as text if it has the form of one (1-16 of A-Z 0-9 _), known or not."""
    if 0 < len(raw) <= MAX_COMMAND_LEN and _COMMAND_BYTES.issuperset(raw):
        return raw.decode("ascii")
    return None


def peek(frames: list[bytes]) -> tuple[str | None, Any]:
    """(command, rid) of a message that will not be decoded (over a size cap), as far as they
    can be read cheaply: the command frame, and a top-level `rid` within the body's first
    RID_PEEK bytes."""
    command = readable_command(frames[1]) if len(frames) >= 2 else None
    return command, peek_rid(frames[2]) if len(frames) >= 3 else None


def peek_rid(raw: bytes) -> Any:
    """The (echoable) top-level `rid` of a body, reading at most its first RID_PEEK bytes.

    A body shorter than that is unpacked whole (the rule of every other error); of a longer
    one (or its first RID_PEEK bytes, all a receiver kept) the top-level entries within the
    window are read, values skipped: the rid if it is among them and every key read is a
    string, else None.
    """
    if len(raw) < RID_PEEK:
        return _rid_of(raw, RID_PEEK)
    unpacker = msgpack.Unpacker(raw=False, max_array_len=MAX_ITEMS, max_map_len=MAX_ITEMS,
                                max_buffer_size=RID_PEEK)
    unpacker.feed(raw[:RID_PEEK])
    rid = None
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if not isinstance(key, str):
                return None
            if key == "rid":
                rid = echo_rid(unpacker.unpack())
            else:
                unpacker.skip()
    except Exception:  # not a map, garbage, or (mostly) the window ends: what was read
        pass
    return rid


def _rid_of(raw: bytes, max_body: int) -> Any:
    """The echoable rid of a body whatever else is wrong with the message."""
    if len(raw) > max_body:
        return peek_rid(raw)
    try:
        return echo_rid(_unpack(raw).get("rid"))
    except ProtocolError as e:
        return e.rid


def wire_type(value: Any) -> str:
    """The msgpack name of a decoded value's type (nil, bool, int, float, str, bin, array, map,
    ext)."""
    return _WIRE_TYPES.get(type(value), "ext")


_WIRE_TYPES: dict[type, str] = {type(None): "nil", bool: "bool", int: "int", float: "float",
                                str: "str", bytes: "bin", list: "array", dict: "map"}
# msgpack's own names in its "X is not allowed for map key" error
_PY_TYPES = {"NoneType": "nil", "bytes": "bin", "list": "array", "dict": "map",
             "tuple": "array", "Timestamp": "ext", "ExtType": "ext"}


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
    lenient = False
    try:
        body = msgpack.unpackb(  # element caps bound the CPU and memory of one decode
            raw, raw=False, strict_map_key=True, use_list=True,
            max_array_len=MAX_ITEMS, max_map_len=MAX_ITEMS,
        )
    except ValueError as e:
        if "not allowed for map key" not in str(e):  # msgpack's strict_map_key refusal
            raise ProtocolError("bad_body", f"body is not valid msgpack: {type(e).__name__}") \
                from e
        body, lenient = _unpack_lenient(raw, str(e)), True
    except Exception as e:  # msgpack raises a zoo of types for garbage; all mean the same
        raise ProtocolError("bad_body", f"body is not valid msgpack: {type(e).__name__}") from e
    if not isinstance(body, dict):
        raise ProtocolError("bad_body", f"body must be a map, got {wire_type(body)}")
    fault = _tree_fault(body, 0)
    if fault is not None:
        # The body itself is readable: its rid is echoed if its own keys are all strings.
        what, path = fault
        top_ok = all(isinstance(k, str) for k in body)
        rid = echo_rid(body.get("rid")) if top_ok else None
        if what == "depth":
            raise ProtocolError("bad_body", f"body nests deeper than {MAX_DEPTH}", rid)
        raise ProtocolError("bad_body", f"map keys must be strings: {what} in {_path(path)}", rid)
    if lenient:  # refused strictly for a key that the lenient unpack does not show: refuse
        raise ProtocolError("bad_body", "map keys must be strings")
    return body


def _unpack_lenient(raw: bytes, strict_error: str) -> Any:
    """A body the strict unpack refused for a map key that is not a string, unpacked again
    taking any hashable key, so that _tree_fault can say which key and where.

    Same element caps, so the cost stays that of a second decode. No object_pairs_hook (a
    Python call per map) and timestamps as floats: keys then are str, bin, int, float, bool,
    nil or ext, none of whose hashes a sender can make collide in bulk (Timestamp's can).
    """
    try:
        return msgpack.unpackb(
            raw, raw=False, strict_map_key=False, use_list=True, timestamp=1,
            max_array_len=MAX_ITEMS, max_map_len=MAX_ITEMS,
        )
    except Exception as e:  # an array or map as a key (unhashable): say what, not where
        name = strict_error.split(" ", 1)[0]
        kind = _PY_TYPES.get(name, name)
        raise ProtocolError("bad_body", f"map keys must be strings: {kind} key in the body") \
            from e


def _tree_fault(value: Any, level: int) -> tuple[str, list[str | int]] | None:
    """("depth", path) if value nests deeper than MAX_DEPTH, else (a description of the first
    map key that is not a string, path) (at any depth: a bin key next to str keys would reach
    code that compares or sorts keys), else None. `path` lists the keys and indexes leading
    to the fault, innermost first."""
    if level >= MAX_DEPTH:
        return "depth", []
    if isinstance(value, dict):
        items: Any = value.values()
        for key in value:
            if not isinstance(key, str):
                return f"{wire_type(key)} key {key!r:.40}", []
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        if isinstance(item, dict | list) and (fault := _tree_fault(item, level + 1)):
            # Only on the way out of a fault: the scan is bounded by this container's size.
            if isinstance(value, dict):
                fault[1].append(next(k for k, v in value.items() if v is item))
            else:
                fault[1].append(next(i for i, v in enumerate(value) if v is item))
            return fault
    return None


def _path(steps: list[str | int]) -> str:
    """specs[0].params for the innermost-first steps [params, 0, specs]; "the body" for []."""
    if not steps:
        return "the body"
    out = ""
    for step in reversed(steps):
        out += f"[{step}]" if isinstance(step, int) else f".{step}" if out else step
    return out if len(out) <= 200 else out[:197] + "..."


_KINDS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "num": (int, float),
    "str": (str,),
    "bool": (bool,),
    "list": (list,),
    "map": (dict,),
}


def validate(body: dict[str, Any], schema: Schema, command: str) -> dict[str, Any]:
    """Return body checked against schema with defaults filled; unknown keys are kept.

    Kinds (bus/schemas.py) coerce nothing: an int is accepted where a num (float) is
    expected; a float or bool is never an int, a bool never a num; nil only for `kind?` and
    `any`; `rid` is RID_RULE. A failure names the key: bad_body "COMMAND.key must be …".
    """
    out = dict(body)
    for key, (kind, default) in schema.items():
        if key not in body:
            if default is REQUIRED:
                if kind == "rid":
                    raise ProtocolError("bad_body", f"rid: {command}.rid is required ({RID_RULE})")
                raise ProtocolError("bad_body", f"{command}.{key} is required",
                                    echo_rid(body.get("rid")))
            out[key] = _fresh(default)
        elif not _kind_ok(body[key], kind):
            rid = echo_rid(body.get("rid"))
            if kind == "rid":
                raise ProtocolError("bad_body", f"rid: {command}.rid {rid_problem(body[key])}",
                                    rid)
            got = wire_type(body[key])
            raise ProtocolError("bad_body", f"{command}.{key} must be {kind}, got {got}", rid)
    return out


def _fresh(default: Any) -> Any:
    if isinstance(default, dict | list):
        return type(default)()
    return default


def _kind_ok(value: Any, kind: str) -> bool:
    if kind == "any":
        return True
    if kind == "rid":
        return (type(value) is int and 0 <= value <= RID_MAX) or rid_problem(value) is None
    if kind.endswith("?"):
        if value is None:
            return True
        kind = kind[:-1]
    if isinstance(value, bool) and kind in ("int", "num"):
        return False
    return isinstance(value, _KINDS[kind])
