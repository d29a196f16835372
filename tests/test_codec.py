"""The frame codec (bus/codec.py) against the schemas (bus/schemas.py) and docs/protocol.md."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.codec import (
    DEFAULT_MAX_BODY,
    HEADER,
    MAX_COMMAND_LEN,
    MAX_DEPTH,
    PROTOCOL_VERSION,
    RID_PEEK,
    Message,
    decode,
    echo_rid,
    encode,
    peek,
    peek_rid,
    readable_command,
    rid_problem,
    validate,
)
from bus.errors import ProtocolError
from bus.schemas import (
    AGENT_TO_MASTER,
    CLIENT_TO_MASTER,
    EVENTS,
    MASTER_TO_AGENT,
    MASTER_TO_CLIENT,
    REQUIRED,
    Schema,
)

SCHEMAS: dict[str, dict[str, Schema]] = {
    "agent_to_master": AGENT_TO_MASTER,
    "master_to_agent": MASTER_TO_AGENT,
    "client_to_master": CLIENT_TO_MASTER,
    "master_to_client": MASTER_TO_CLIENT,
    "events": EVENTS,
}
COMMANDS = [(name, cmd) for name, table in SCHEMAS.items() for cmd in table]
COMMAND_IDS = [f"{name}-{cmd}" for name, cmd in COMMANDS]
ALL_COMMAND_NAMES = sorted({cmd for _, cmd in COMMANDS})
KINDS = {"int", "num", "str", "bool", "list", "map", "any", "rid"}
CODES = {"bad_frame", "bad_version", "bad_command", "bad_body", "too_large"}

# One valid value per kind, chosen to differ from every default in the schemas.
SAMPLE: dict[str, Any] = {
    "int": 7,
    "num": 2.5,
    "str": "x-value",
    "list": [1, "a", None],
    "map": {"k": 1, "nested": {"z": [1.5]}},
    "any": "rid-1",
    "rid": 7,
}
# Values of the wrong type for each kind (bool is an int in Python but not on our wire).
WRONG: dict[str, list[Any]] = {
    "int": ["1", 1.5, True, False, [], {}, b"1"],
    "num": ["1.0", True, [], {}, b"1"],
    "str": [1, 1.5, True, [], {}, b"x"],
    "bool": [1, 0, "true", None, [], 1.0],
    "list": [{}, "x", 1, True],
    "map": [[], "x", 1, True],
    "rid": [-1, 1.5, True, [], {}, "r" * 129, b"r"],
}


def kind_of(spec: str) -> tuple[str, bool]:
    """("int?", ...) -> ("int", True)."""
    return (spec[:-1], True) if spec.endswith("?") else (spec, False)


def sample(key_kind: str, default: Any) -> Any:
    kind, _ = kind_of(key_kind)
    if kind == "bool":
        return not default if isinstance(default, bool) else True
    return SAMPLE[kind]


def minimal_body(schema: Schema) -> dict[str, Any]:
    return {k: sample(kind, d) for k, (kind, d) in schema.items() if d is REQUIRED}


def full_body(schema: Schema) -> dict[str, Any]:
    return {k: sample(kind, d) for k, (kind, d) in schema.items()}


def with_defaults(body: dict[str, Any], schema: Schema) -> dict[str, Any]:
    out = dict(body)
    for k, (_, d) in schema.items():
        out.setdefault(k, d)
    return out


def frames_for(command: str, body: Any) -> list[bytes]:
    return [HEADER, command.encode(), msgpack.packb(body, use_bin_type=True)]


def code_of(frames: list[bytes], schemas: dict[str, Schema], **kw: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frames, schemas, **kw)
    return info.value.code


# --------------------------------------------------------------------------- schema sanity


def test_header_and_constants() -> None:
    assert HEADER == b"FFR\x01\x03"
    assert PROTOCOL_VERSION == (1, 3)
    assert MAX_COMMAND_LEN == 16
    assert MAX_DEPTH == 32
    assert DEFAULT_MAX_BODY == 8 * 1024 * 1024


@pytest.mark.parametrize(("table", "command"), COMMANDS, ids=COMMAND_IDS)
def test_schema_is_well_formed(table: str, command: str) -> None:
    assert command.isascii() and command.isupper() and 1 <= len(command) <= MAX_COMMAND_LEN
    for key, (kind, default) in SCHEMAS[table][command].items():
        base, nullable = kind_of(kind)
        assert base in KINDS, (key, kind)
        if default is REQUIRED:
            continue
        if default is None:
            assert nullable or base == "any", (key, kind)
        else:
            assert validate({key: default}, {key: (kind, REQUIRED)}, command)  # default is valid


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(("table", "command"), COMMANDS, ids=COMMAND_IDS)
def test_minimal_body_round_trips_with_defaults_filled(table: str, command: str) -> None:
    schema = SCHEMAS[table][command]
    body = minimal_body(schema)
    frames = encode(command, body)
    assert len(frames) == 3 and frames[0] == HEADER and frames[1] == command.encode()
    msg = decode(frames, SCHEMAS[table])
    assert isinstance(msg, Message)
    assert msg.command == command
    assert msg.body == with_defaults(body, schema)
    assert set(msg.body) == set(schema)


@pytest.mark.parametrize(("table", "command"), COMMANDS, ids=COMMAND_IDS)
def test_full_body_round_trips(table: str, command: str) -> None:
    schema = SCHEMAS[table][command]
    body = full_body(schema)
    msg = decode(encode(command, body), SCHEMAS[table])
    assert msg == Message(command, body)
    for key in body:
        assert msg[key] == body[key]
        assert msg.get(key) == body[key]
    assert msg.get("no-such-key", "fallback") == "fallback"


@pytest.mark.parametrize(("table", "command"), COMMANDS, ids=COMMAND_IDS)
def test_unknown_keys_are_kept(table: str, command: str) -> None:
    schema = SCHEMAS[table][command]
    body = {**minimal_body(schema), "x_future_key": {"a": [1, 2]}, "zz": None}
    msg = decode(encode(command, body), SCHEMAS[table])
    assert msg["x_future_key"] == {"a": [1, 2]}
    assert msg["zz"] is None


@pytest.mark.parametrize(("table", "command"), COMMANDS, ids=COMMAND_IDS)
def test_nullable_keys_accept_nil(table: str, command: str) -> None:
    schema = SCHEMAS[table][command]
    nullable = [k for k, (kind, _) in schema.items() if kind.endswith("?") or kind == "any"]
    body = {**minimal_body(schema), **dict.fromkeys(nullable)}
    assert decode(encode(command, body), SCHEMAS[table]).body == with_defaults(body, schema)


def test_defaults_are_fresh_per_message() -> None:
    first = decode(encode("HELLO", {"name": "a", "slots": 1}), AGENT_TO_MASTER)
    first["workloads"].append("mutated")
    first["resources"]["cpus"] = 99
    second = decode(encode("HELLO", {"name": "b", "slots": 1}), AGENT_TO_MASTER)
    assert second["workloads"] == [] and second["resources"] == {}
    assert AGENT_TO_MASTER["HELLO"]["workloads"][1] == []


def test_documented_defaults() -> None:
    welcome = decode(encode("WELCOME"), MASTER_TO_AGENT)
    assert welcome.body == {"heartbeat_s": 1.0, "liveness": 3, "master": "", "epoch": 0}
    listing = decode(encode("LIST", {"rid": 1}), CLIENT_TO_MASTER)
    assert listing.body == {"rid": 1, "states": None, "scenarios": None, "agent": None,
                            "since": None, "limit": 100, "before_id": None}
    cancel = decode(encode("CANCEL", {"id": 1, "attempt": 2}), MASTER_TO_AGENT)
    assert cancel["grace_s"] == 30.0 and cancel["reason"] == "cancelled"
    done = decode(encode("DONE", {"id": 1, "attempt": 1, "status": "completed"}), AGENT_TO_MASTER)
    assert done["reason"] is None and done["exit_code"] is None and done["extra"] == {}


def test_int_is_accepted_where_num_is_expected() -> None:
    msg = decode(encode("WELCOME", {"heartbeat_s": 2}), MASTER_TO_AGENT)
    assert msg["heartbeat_s"] == 2


def test_minor_version_is_accepted() -> None:
    frames = encode("HEARTBEAT")
    for minor in (0, 1, 9, 255):
        frames[0] = b"FFR\x01" + bytes([minor])
        assert decode(frames, MASTER_TO_AGENT) == Message("HEARTBEAT", {})


def test_encode_none_body_is_an_empty_map() -> None:
    assert encode("BYE")[2] == msgpack.packb({})
    assert encode("BYE", None) == encode("BYE", {})


# --------------------------------------------------------------------------- bad bodies


REQUIRED_KEYS = [
    (table, cmd, key)
    for table, cmd in COMMANDS
    for key, (_, d) in SCHEMAS[table][cmd].items()
    if d is REQUIRED
]


@pytest.mark.parametrize(
    ("table", "command", "key"), REQUIRED_KEYS, ids=[f"{t}-{c}-{k}" for t, c, k in REQUIRED_KEYS]
)
def test_missing_required_key_names_the_key(table: str, command: str, key: str) -> None:
    body = minimal_body(SCHEMAS[table][command])
    del body[key]
    with pytest.raises(ProtocolError) as info:
        decode(encode(command, body), SCHEMAS[table])
    assert info.value.code == "bad_body"
    assert f"{command}.{key}" in info.value.text


TYPED_KEYS = [
    (table, cmd, key, bad)
    for table, cmd in COMMANDS
    for key, (kind, _) in SCHEMAS[table][cmd].items()
    if kind != "any"
    for bad in WRONG[kind_of(kind)[0]] + ([] if kind.endswith("?") else [None])
    if not (bad is None and kind.endswith("?"))
]


@pytest.mark.parametrize(
    ("table", "command", "key", "bad"),
    TYPED_KEYS,
    ids=[f"{t}-{c}-{k}-{type(b).__name__}{i}" for i, (t, c, k, b) in enumerate(TYPED_KEYS)],
)
def test_wrong_type_is_bad_body(table: str, command: str, key: str, bad: Any) -> None:
    schema = SCHEMAS[table][command]
    body = {**minimal_body(schema), key: bad}
    with pytest.raises(ProtocolError) as info:
        decode(encode(command, body), SCHEMAS[table])
    assert info.value.code == "bad_body"
    assert f"{command}.{key}" in info.value.text


@pytest.mark.parametrize("flag", [True, False])
def test_bool_is_not_an_int(flag: bool) -> None:
    assert code_of(frames_for("CREDIT", {"n": flag}), AGENT_TO_MASTER) == "bad_body"
    body = {"id": 1, "attempt": flag}
    assert code_of(frames_for("ACCEPT", body), AGENT_TO_MASTER) == "bad_body"


def test_bad_body_echoes_the_request_id() -> None:
    with pytest.raises(ProtocolError) as info:
        decode(encode("SUBMIT", {"rid": 42}), CLIENT_TO_MASTER)
    assert info.value.rid == 42
    with pytest.raises(ProtocolError) as info:
        decode(encode("RETRY", {"rid": "r-9", "id": "7"}), CLIENT_TO_MASTER)
    assert info.value.rid == "r-9"


@pytest.mark.parametrize(
    "body", [[1, 2], [], 1, -1, 1.5, "map", b"map", None, True], ids=lambda b: type(b).__name__
)
def test_body_that_is_not_a_map(body: Any) -> None:
    assert code_of(frames_for("HEARTBEAT", body), AGENT_TO_MASTER) == "bad_body"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x81\xa1a",  # map of one entry, value missing
        b"\x82\xa1a\x01",  # map of two entries, one present
        msgpack.packb({}) + msgpack.packb({}),  # trailing data
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4G entries
        b"\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
    ],
    ids=["empty", "c1", "truncated", "short-map", "extra-data", "huge-map", "huge-bin"],
)
def test_invalid_msgpack_is_bad_body(raw: bytes) -> None:
    assert code_of([HEADER, b"HEARTBEAT", raw], AGENT_TO_MASTER) == "bad_body"


@pytest.mark.parametrize(
    "body",
    [{1: "int key"}, {b"rid": 1}, {(1, 2): 3}, {None: 1}, {"ok": {5: "nested int key"}}],
    ids=["int", "bytes", "array", "nil", "nested-int"],
)
def test_non_string_keys_are_bad_body(body: dict[Any, Any]) -> None:
    raw = msgpack.packb(body, use_bin_type=True)
    assert code_of([HEADER, b"HEARTBEAT", raw], AGENT_TO_MASTER) == "bad_body"


def nested_body(levels: int, container: str = "map") -> dict[str, Any]:
    """A body whose containers nest `levels` deep, the body itself being level 1."""
    inner: Any = 1
    for _ in range(levels - 1):
        inner = {"n": inner} if container == "map" else [inner]
    return {"deep": inner}


@pytest.mark.parametrize("container", ["map", "list"])
def test_nesting_up_to_the_limit_is_accepted(container: str) -> None:
    body = nested_body(MAX_DEPTH, container)
    assert decode(frames_for("HEARTBEAT", body), MASTER_TO_AGENT).body == body


@pytest.mark.parametrize("container", ["map", "list"])
@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, MAX_DEPTH + 2, 200])
def test_nesting_deeper_than_the_limit_is_bad_body(container: str, levels: int) -> None:
    frames = frames_for("HEARTBEAT", nested_body(levels, container))
    with pytest.raises(ProtocolError) as info:
        decode(frames, AGENT_TO_MASTER)
    assert info.value.code == "bad_body"
    assert str(MAX_DEPTH) in info.value.text


def test_absurd_nesting_is_bad_body_not_a_crash() -> None:
    # 100 000 nested one-entry maps: more than msgpack (or Python's stack) would ever nest.
    raw = b"\x81\xa1n" * 100_000 + b"\xc0"
    assert code_of([HEADER, b"HEARTBEAT", raw], AGENT_TO_MASTER) == "bad_body"
    raw = b"\x91" * 100_000 + b"\xc0"
    assert code_of([HEADER, b"HEARTBEAT", b"\x81\xa1n" + raw], AGENT_TO_MASTER) == "bad_body"


def test_nesting_under_a_schema_key_is_checked_too() -> None:
    body = {"id": 1, "attempt": 1, "status": "failed", "extra": nested_body(MAX_DEPTH)}
    assert code_of(frames_for("DONE", body), AGENT_TO_MASTER) == "bad_body"


# --------------------------------------------------------------------------- size


def test_body_larger_than_max_body_is_too_large() -> None:
    frames = encode("HELLO", {"name": "a", "slots": 1, "pad": "x" * 1000})
    size = len(frames[2])
    assert decode(frames, AGENT_TO_MASTER, max_body=size)["pad"] == "x" * 1000
    with pytest.raises(ProtocolError) as info:
        decode(frames, AGENT_TO_MASTER, max_body=size - 1)
    assert info.value.code == "too_large"
    assert str(size) in info.value.text


def test_too_large_is_checked_before_unpacking() -> None:
    garbage = b"\xc1" * 100
    assert code_of([HEADER, b"HEARTBEAT", garbage], AGENT_TO_MASTER, max_body=99) == "too_large"


def test_default_max_body() -> None:
    frames = [HEADER, b"HEARTBEAT", msgpack.packb({"pad": b"\0" * DEFAULT_MAX_BODY})]
    assert code_of(frames, AGENT_TO_MASTER) == "too_large"


# --------------------------------------------------------------------------- frames, header


@pytest.mark.parametrize(("count", "code"), [
    (0, "bad_body"), (1, "bad_body"), (2, "bad_body"), (4, "too_large"), (5, "too_large")])
def test_wrong_frame_count(count: int, code: str) -> None:
    """Too few frames is a malformed body; more than three is over the whole-message cap."""
    good = encode("HEARTBEAT")
    frames = (good + [b"{}", b"{}"])[:count]
    assert code_of(frames, AGENT_TO_MASTER) == code


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"F",
        b"FFR",
        b"FFR\x01",
        b"FFR\x01\x00\x00",
        b"XYZ\x01\x00",
        b"ffr\x01\x00",
        b"\x00\x00\x00\x01\x00",
        b"FFR\x01\x00FFR\x01\x00",
        b"\xff" * 5,
    ],
)
def test_header_garbage_is_bad_frame(header: bytes) -> None:
    frames = encode("HEARTBEAT")
    frames[0] = header
    assert code_of(frames, AGENT_TO_MASTER) == "bad_frame"


@pytest.mark.parametrize("major", [0, 2, 3, 255])
def test_other_major_version_is_bad_version(major: int) -> None:
    frames = encode("HEARTBEAT")
    frames[0] = b"FFR" + bytes([major, 0])
    with pytest.raises(ProtocolError) as info:
        decode(frames, AGENT_TO_MASTER)
    assert info.value.code == "bad_version"


def test_major_version_is_checked_before_the_command() -> None:
    frames = [b"FFR\x02\x09", b"NO SUCH COMMAND!", b"\xc1"]
    assert code_of(frames, AGENT_TO_MASTER) == "bad_version"


@pytest.mark.parametrize(
    "command",
    [
        b"",
        b"NOPE",
        b"hello",
        b"HELLO ",
        b"HELLO\x00",
        b"A" * 17,
        b"\xff\xfe",
        "HÉLLO".encode(),
        b"JOB",
    ],  # JOB is master->agent only
)
def test_unknown_or_malformed_command_is_bad_command(command: bytes) -> None:
    frames = [HEADER, command, msgpack.packb({})]
    assert code_of(frames, AGENT_TO_MASTER) == "bad_command"


def test_commands_are_per_direction() -> None:
    body = {"id": 1, "attempt": 1, "spec": {}}
    assert decode(encode("JOB", body), MASTER_TO_AGENT).command == "JOB"
    assert code_of(encode("JOB", body), CLIENT_TO_MASTER) == "bad_command"
    # CANCEL exists in both directions with different schemas.
    assert code_of(encode("CANCEL", {"id": 1, "attempt": 1}), CLIENT_TO_MASTER) == "bad_body"
    assert decode(encode("CANCEL", {"rid": 1, "ids": [1]}), CLIENT_TO_MASTER)["ids"] == [1]


# --------------------------------------------------------------------------- encode


@pytest.mark.parametrize(
    "body",
    [{"x": {1, 2}}, {"x": object()}, {"x": 2**64}, {"x": -(2**63) - 1}],
    ids=["set", "object", "too-big-int", "too-small-int"],
)
def test_encode_rejects_unpackable_bodies(body: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        encode("HEARTBEAT", body)
    assert info.value.code == "bad_body"
    assert "HEARTBEAT" in info.value.text


def test_encode_packs_strings_as_str_and_bytes_as_bin() -> None:
    msg = decode(encode("HEARTBEAT", {"s": "é", "b": b"\x00\xff"}), AGENT_TO_MASTER)
    assert msg["s"] == "é" and msg["b"] == b"\x00\xff"


# --------------------------------------------------------------------------- properties

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)
# Keys msgpack may carry but our wire forbids, for the fuzzer.
any_keys = st.text(max_size=8) | st.integers(-5, 5) | st.binary(max_size=4)

KIND_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "int": st.integers(-(2**63), 2**64 - 1),
    "num": st.integers(-(2**63), 2**63) | st.floats(allow_nan=False),
    "str": st.text(max_size=20),
    "bool": st.booleans(),
    "list": st.lists(values, max_size=3),
    "map": st.dictionaries(st.text(max_size=8), values, max_size=3),
    "any": values,
    "rid": st.integers(0, 2**64 - 1) | st.text(max_size=32),
}


@st.composite
def valid_messages(draw: st.DrawFn) -> tuple[dict[str, Schema], str, dict[str, Any]]:
    table, command = draw(st.sampled_from(COMMANDS))
    schema = SCHEMAS[table][command]
    body: dict[str, Any] = {}
    for key, (kind, default) in schema.items():
        if default is not REQUIRED and draw(st.booleans()):
            continue
        base, nullable = kind_of(kind)
        strategy = KIND_VALUES[base]
        body[key] = draw(st.none() | strategy if nullable else strategy)
    return SCHEMAS[table], command, body


@settings(max_examples=300, deadline=None)
@given(message=valid_messages())
def test_valid_messages_round_trip(message: tuple[dict[str, Schema], str, dict[str, Any]]) -> None:
    schemas, command, body = message
    msg = decode(encode(command, body), schemas)
    assert msg == Message(command, with_defaults(body, schemas[command]))


headers = st.sampled_from(
    [HEADER, b"FFR\x01\x09", b"FFR\x02\x00", b"FFR\x00\x00", b"FFR\x01", b"FFX\x01\x00"]
) | st.binary(max_size=6)
commands = st.sampled_from(ALL_COMMAND_NAMES).map(str.encode) | st.binary(max_size=18)


@st.composite
def structured_frames(draw: st.DrawFn) -> list[bytes]:
    header = draw(headers)
    command = draw(commands)
    body = draw(
        st.dictionaries(
            st.sampled_from(
                [
                    "id",
                    "attempt",
                    "rid",
                    "name",
                    "slots",
                    "status",
                    "n",
                    "ids",
                    "spec",
                    "acks",
                    "on",
                    "extra",
                ]
            )
            | st.text(max_size=6),
            values,
            max_size=6,
        )
        | st.dictionaries(any_keys, values, max_size=3)
        | values
    )
    raw = msgpack.packb(body, use_bin_type=True)
    mangle = draw(st.sampled_from(["keep", "truncate", "append", "flip"]))
    if raw and mangle == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif mangle == "append":
        raw += draw(st.binary(min_size=1, max_size=8))
    elif raw and mangle == "flip":
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    frames = [header, command, raw]
    extra = draw(st.sampled_from(["exact", "fewer", "more"]))
    if extra == "fewer":
        frames = frames[: draw(st.integers(0, 2))]
    elif extra == "more":
        frames += draw(st.lists(st.binary(max_size=8), min_size=1, max_size=2))
    return frames


@settings(max_examples=600, deadline=None)
@given(
    frames=st.lists(st.binary(max_size=40), max_size=5) | structured_frames(),
    table=st.sampled_from(sorted(SCHEMAS)),
    max_body=st.sampled_from([DEFAULT_MAX_BODY, 64, 1]),
)
def test_decode_returns_a_message_or_raises_protocol_error(
    frames: list[bytes], table: str, max_body: int
) -> None:
    schemas = SCHEMAS[table]
    try:
        msg = decode(frames, schemas, max_body=max_body)
    except ProtocolError as e:
        assert e.code in CODES
        assert e.text
        return
    assert isinstance(msg, Message)
    assert msg.command in schemas
    assert isinstance(msg.body, dict)
    assert all(isinstance(k, str) for k in msg.body)
    assert set(schemas[msg.command]) <= set(msg.body)
    assert len(frames) == 3 and frames[0][:4] == b"FFR\x01" and len(frames[0]) == 5


# --------------------------------------------------------------------------- the client contract
# docs/protocol.md "Frames", "ERROR" and "Client ↔ master": rid, command, key faults, coercion.


def fault(frames: list[bytes], schemas: dict[str, Schema] = CLIENT_TO_MASTER,
          **kw: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(frames, schemas, **kw)
    return info.value


@pytest.mark.parametrize("rid", [0, 1, 2**64 - 1, "", "r-1", "é" * 64, "x" * 128])
def test_valid_rids(rid: Any) -> None:
    assert rid_problem(rid) is None
    assert decode(frames_for("STATS", {"rid": rid}), CLIENT_TO_MASTER)["rid"] == rid


@pytest.mark.parametrize(("rid", "echoed"), [
    (None, None), (True, True), (False, False), (1.5, 1.5), (-1, -1), ([1], None),
    ({"a": 1}, None), ([], None), ("x" * 129, None), ("é" * 65, None), (b"bin", b"bin"),
], ids=repr)
def test_invalid_rids_are_bad_body_and_only_scalars_are_echoed(rid: Any, echoed: Any) -> None:
    assert rid_problem(rid) is not None
    e = fault(frames_for("GET", {"rid": rid, "ids": [1]}))
    assert e.code == "bad_body" and e.text.startswith("rid: GET.rid must be"), e.text
    assert e.command == "GET"
    assert e.rid == echoed and type(e.rid) is type(echoed)
    assert echo_rid(rid) == echoed


def test_a_request_without_rid_is_bad_body() -> None:
    for command in CLIENT_TO_MASTER:
        e = fault(frames_for(command, {}))
        assert e.code == "bad_body" and e.text.startswith(f"rid: {command}.rid is required")
        assert e.command == command and e.rid is None
    # The rid is checked first: a request missing everything is told about its rid.
    assert "rid" in fault(frames_for("SUBMIT", {"specs": "x"})).text


@pytest.mark.parametrize(("frames", "code"), [
    ([b"XYZ\x01\x00", b"GET", msgpack.packb({"rid": "r", "ids": []})], "bad_frame"),
    ([b"FFR", b"GET", msgpack.packb({"rid": "r"})], "bad_frame"),
    ([b"FFR\x02\x00", b"GET", msgpack.packb({"rid": "r", "ids": []})], "bad_version"),
    ([HEADER, b"NOPE", msgpack.packb({"rid": "r"})], "bad_command"),
    ([HEADER, b"GET", msgpack.packb({"rid": "r", "ids": "x"})], "bad_body"),
    ([HEADER, b"GET", msgpack.packb({"rid": "r", "ids": [], "x": {1: 1}})], "bad_body"),
    ([HEADER, b"GET", msgpack.packb({"rid": "r", "x": nested_body(40)})], "bad_body"),
    ([HEADER, b"GET", msgpack.packb({"rid": "r", "ids": []}), b"extra"], "too_large"),
], ids=["header", "short-header", "major", "command", "type", "int-key", "depth", "frames"])
def test_rid_and_command_are_echoed_whatever_the_fault(frames: list[bytes], code: str) -> None:
    e = fault(frames)
    assert (e.code, e.rid) == (code, "r"), e
    assert e.command == frames[1].decode()


def test_command_is_echoed_only_when_it_reads_as_one() -> None:
    assert readable_command(b"STATS") == "STATS"
    assert readable_command(b"NO_SUCH_9") == "NO_SUCH_9"
    for raw in (b"", b"A" * 17, b"stats", b"ST\x00TS", b"\xff", "HÉLLO".encode()):
        assert readable_command(raw) is None
        assert fault([HEADER, raw, msgpack.packb({"rid": 1})]).command is None


def test_a_body_over_the_cap_echoes_a_rid_found_in_its_first_bytes() -> None:
    early = msgpack.packb({"rid": "big", "ids": [], "pad": b"x" * (2 * RID_PEEK)})
    e = fault([HEADER, b"GET", early], max_body=1000)
    assert (e.code, e.rid, e.command) == ("too_large", "big", "GET")
    late = msgpack.packb({"pad": b"x" * (2 * RID_PEEK), "rid": "late"})
    e = fault([HEADER, b"GET", late], max_body=1000)
    assert (e.code, e.rid) == ("too_large", None)
    assert peek_rid(late) is None and peek_rid(early) == "big"
    assert peek_rid(b"\xc1garbage") is None and peek_rid(msgpack.packb([1])) is None
    assert peek_rid(msgpack.packb({"rid": [1, 2]})) is None  # never a non-scalar
    assert peek(encode("STATS", {"rid": 5})) == ("STATS", 5)


@pytest.mark.parametrize(("body", "text"), [
    ({"rid": 1, "specs": [{"scenario": "noop", "params": {1: "x"}}]},
     "map keys must be strings: int key 1 in specs[0].params"),
    ({"rid": 1, "specs": [{}, {"params": {"a": [0, {None: 2}]}}]},
     "map keys must be strings: nil key None in specs[1].params.a[1]"),
    ({"rid": 1, "x": {1.5: 0}}, "map keys must be strings: float key 1.5 in x"),
    ({"rid": 1, "x": {True: 0}}, "map keys must be strings: bool key True in x"),
    ({"rid": 1, "x": {b"k": 0}}, "map keys must be strings: bin key b'k' in x"),
    ({"rid": 1, 7: 0}, "map keys must be strings: int key 7 in the body"),
], ids=["int", "nil-deep", "float", "bool", "bin", "top"])
def test_a_non_string_key_is_named_with_its_path(body: dict[Any, Any], text: str) -> None:
    e = fault([HEADER, b"SUBMIT", msgpack.packb(body, use_bin_type=True)])
    assert (e.code, e.text) == ("bad_body", text)
    assert e.rid == (None if 7 in body else 1)  # the rid of a body whose own keys are strings


def test_array_and_map_keys_are_bad_body_without_a_path() -> None:
    for raw in (b"\x82\xa3rid\x01\x91\x01\x02", b"\x82\xa3rid\x01\xa1x\x81\x81\x01\x02\x03"):
        e = fault([HEADER, b"STATS", raw])
        assert e.code == "bad_body" and e.text.startswith("map keys must be strings: ")
        assert "valid msgpack" not in e.text


def colliding_timestamps(n: int) -> list[msgpack.Timestamp]:
    """n msgpack Timestamps with one hash: Timestamp hashes as the tuple (seconds, nanos),
    and CPython's tuple hash (xxHash-like, not keyed) can be solved for the seconds."""
    m, p1, p2, p5 = 2**64, 11400714785074694791, 14029467366897019727, 2870177450012600261

    def rotr(x: int, r: int) -> int:
        return ((x >> r) | (x << (64 - r))) % m

    target = (0x1234567890ABCDEF - (2 ^ (p5 ^ 3527539))) % m
    before = rotr(target * pow(p1, -1, m) % m, 31)
    out: list[msgpack.Timestamp] = []
    nanos = 0
    while len(out) < n:
        acc = (before - nanos * p2) % m
        seconds = ((rotr(acc * pow(p1, -1, m) % m, 31) - p5) * pow(p2, -1, m)) % m
        if seconds < 2**61 - 1:  # an int that hashes to itself
            out.append(msgpack.Timestamp(seconds, nanos))
        nanos += 1
    return out


def test_colliding_key_hashes_cost_no_more_than_a_decode() -> None:
    """A body refused for a non-string key is unpacked again leniently to say which and where:
    taking Timestamp keys as Timestamps would build a dict of 20 000 colliding hashes
    (quadratic: minutes). They are unpacked as floats (and arrays or maps as keys not at
    all), whose hashes cannot be made to collide in bulk."""
    keys = colliding_timestamps(20_000)
    assert len({hash(k) for k in keys[:50]}) == 1
    pack = msgpack.Packer()  # packed entry by entry: a dict of them would be quadratic here
    raw = b"".join([pack.pack_map_header(2), pack.pack("rid"), pack.pack(1), pack.pack("x"),
                    pack.pack_map_header(len(keys)), *(pack.pack(k) + b"\x00" for k in keys)])
    started = time.perf_counter()
    e = fault([HEADER, b"STATS", raw])
    assert e.code == "bad_body" and "float key" in e.text and e.rid == 1, e.text
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(("kind", "value", "ok"), [
    ("num", 2, True),          # an int is accepted where a float is expected
    ("num", 2.5, True),
    ("num", 2**64 - 1, True),
    ("int", 2.0, False),       # a float is never an int, not even 2.0
    ("int", True, False),      # nor a bool
    ("num", False, False),     # a bool is not a number
    ("bool", 1, False),        # nor is a number a bool
    ("str", b"x", False),      # bin is not str
    ("str", 1, False),
    ("int", "1", False),       # no parsing of strings
    ("int", None, False),      # nil only for `kind?` and `any`
    ("int?", None, True),
    ("num?", None, True),
    ("str?", None, True),
    ("list?", None, True),
    ("any", None, True),
    ("list", {}, False),
    ("map", [], False),
], ids=repr)
def test_type_coercion_is_exactly_as_documented(kind: str, value: Any, ok: bool) -> None:
    schema: Schema = {"v": (kind, REQUIRED)}
    if ok:
        assert validate({"v": value}, schema, "X")["v"] == value
    else:
        with pytest.raises(ProtocolError) as info:
            validate({"v": value}, schema, "X")
        assert info.value.code == "bad_body" and info.value.text.startswith("X.v must be")
