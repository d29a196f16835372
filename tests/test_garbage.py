"""Hypothesis garbage against a LIVE master and a LIVE agent: bad frames never stop a receiver.

docs/protocol.md: every bad frame is counted and answered with ERROR where a reply is possible
(with the request's `rid` where it could be read); it never stops the receiver. Here real
`python -m ffrtmp` processes get random frames, random commands, random and wrongly typed
bodies, other major versions, huge maps, over-deep nesting and over-size messages, and after
every batch must still answer, still run a real job end to end, and still be alive.
(`bus.codec.decode` alone against such a corpus is tests/test_codec.py's business.)
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from bus.client import Client
from bus.codec import HEADER, Message, decode, validate
from bus.errors import ClientError, ProtocolError
from bus.schemas import AGENT_TO_MASTER, CLIENT_TO_MASTER, MASTER_TO_AGENT, REQUIRED, Schema
from conftest import wait_for
from harness import ROOT, Cluster

AGENT_NAME = "garbage-target-agent"  # a name hypothesis will not stumble on (DRAIN, HELLO)
SENTINEL = "ZZSENTINEL"  # an unknown command: always answered `ERROR bad_command`, in order
ALL_COMMANDS = sorted({*AGENT_TO_MASTER, *MASTER_TO_AGENT, *CLIENT_TO_MASTER, "STATE", "JOB"})
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])

# --------------------------------------------------------------------------- strategies

INT_EDGES = [0, -1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]
BEYOND_64 = [2**64, 2**100, -(2**63) - 1, -(2**90)]  # no msgpack encoding: such bodies are skipped
ints = st.integers(-(2**64), 2**65) | st.sampled_from(INT_EDGES + BEYOND_64)
scalars = (st.none() | st.booleans() | ints | st.floats() | st.text(max_size=12)
           | st.binary(max_size=12))
values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)
odd_keys = st.dictionaries(st.integers() | st.binary(max_size=4) | st.none() | st.floats(),
                           values, min_size=1, max_size=3)


def nest(levels: int, leaf: Any = 1) -> Any:
    for i in range(levels):
        leaf = {"k": leaf} if i % 2 else [leaf]
    return {"rid": "deep", "x": leaf}


def packed(value: Any) -> bytes | None:
    """msgpack bytes, or None when msgpack cannot encode it (ints beyond 64 bits)."""
    try:
        return msgpack.packb(value, use_bin_type=True)
    except OverflowError:
        return None


def fits(value: Any, kind: str) -> bool:
    """Whether value has the wire type `kind` of bus/schemas.py (docs/protocol.md types)."""
    if kind.endswith("?"):
        return value is None or fits(value, kind[:-1])
    if kind == "any":
        return True
    if kind == "rid":  # docs/protocol.md: an int 0..2^64-1 or a str of at most 128 bytes
        return (isinstance(value, int) and not isinstance(value, bool)
                and 0 <= value < 2**64) or (isinstance(value, str) and len(
                    value.encode("utf-8", "surrogatepass")) <= 128)
    if isinstance(value, bool):
        return kind == "bool"
    types = {"int": int, "num": (int, float), "str": str, "bool": bool, "list": list,
             "map": dict}
    return isinstance(value, types[kind])


def of_kind(kind: str) -> st.SearchStrategy[Any]:
    """Right-typed values with random content (64-bit edges, NaN, negative, empty)."""
    base = kind.rstrip("?")
    strat = {
        "int": st.integers(-(2**63), 2**64 - 1) | st.sampled_from(INT_EDGES),
        "num": st.integers(-(2**63), 2**64 - 1) | st.floats(),
        "str": st.text(max_size=20),
        "bool": st.booleans(),
        "list": st.lists(values, max_size=5),
        "map": st.dictionaries(st.text(max_size=6), values, max_size=5),
        "any": values,
        "rid": st.integers(0, 2**64 - 1) | st.text(max_size=40) | values,
    }[base]
    return st.none() | strat if kind.endswith("?") else strat


HUGE_MAP = {f"k{i}": i for i in range(10_000)}
HUGE_MAP_STATS = [HEADER, b"STATS", msgpack.packb({**HUGE_MAP, "rid": "huge"})]
HUGE_MAP_HELLO = [HEADER, b"HELLO", msgpack.packb(HUGE_MAP)]  # name and slots missing


def message(schemas: dict[str, Schema]) -> st.SearchStrategy[list[bytes] | None]:
    """One message for a receiver with these schemas, mostly broken; None if unencodable."""
    known = st.sampled_from(sorted(schemas))
    maps = st.dictionaries(st.sampled_from(["rid", "id", "ids", "name", "spec"]) | st.text(
        max_size=6), values, max_size=5)

    def frames(cmd: str | bytes, body: bytes | None, header: bytes = HEADER) -> list[bytes] | None:
        raw = cmd.encode() if isinstance(cmd, str) else cmd
        return None if body is None else [header, raw, body]

    @st.composite
    def wrong_type(draw: st.DrawFn) -> list[bytes] | None:
        cmd = draw(st.sampled_from([c for c in sorted(schemas)
                                    if any(k != "rid" for k in schemas[c])]))
        schema = schemas[cmd]
        body = {k: draw(of_kind(kind)) for k, (kind, _) in schema.items()}
        key = draw(st.sampled_from(sorted(k for k, (kind, _) in schema.items() if kind != "any")))
        body[key] = draw(values.filter(lambda v: not fits(v, schema[key][0])))
        body["rid"] = draw(values)
        return frames(cmd, packed(body))

    @st.composite
    def shaped(draw: st.DrawFn) -> list[bytes] | None:  # right types, random values, some missing
        cmd = draw(known)
        body = {k: draw(of_kind(kind)) for k, (kind, d) in schemas[cmd].items()
                if d is REQUIRED or draw(st.booleans())}
        if body and draw(st.integers(0, 3)) == 0:
            del body[draw(st.sampled_from(sorted(body)))]
        return frames(cmd, packed(body))

    return st.one_of(
        st.lists(st.binary(max_size=40), min_size=1, max_size=5),  # (0 frames cannot be sent)
        st.builds(frames, st.binary(max_size=20) | st.sampled_from(ALL_COMMANDS)
                  | st.sampled_from(ALL_COMMANDS).map(str.lower)
                  | st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=20),
                  maps.map(packed)),
        st.builds(frames, known, values.map(packed) | maps.map(packed) | odd_keys.map(packed)
                  | st.binary(max_size=40) | st.integers(25, 45).map(nest).map(packed)),
        st.builds(frames, known, maps.map(packed),
                  st.builds(lambda v, m: b"FFR" + bytes([v, m]), st.integers(0, 255).filter(
                      lambda v: v != 1), st.integers(0, 255))
                  | st.binary(max_size=8).filter(lambda h: h[:4] != HEADER[:4])),
        wrong_type(),
        shaped(),
        st.builds(lambda f, n: f and (f[:n] if n < 3 else [*f, *[b"x"] * (n - 3)]),
                  st.builds(frames, known, maps.map(packed)), st.sampled_from([1, 2, 4, 5])),
        st.sampled_from([HUGE_MAP_STATS, HUGE_MAP_HELLO]),
    )


CLIENT_MESSAGES = message(CLIENT_TO_MASTER)
AGENT_MESSAGES = message(AGENT_TO_MASTER)
TO_AGENT_MESSAGES = message(MASTER_TO_AGENT)

@pytest.mark.parametrize("value", BEYOND_64)
def test_ints_beyond_64_bits_have_no_msgpack_encoding(value: int) -> None:
    """Why the strategies skip such bodies: nobody can put them on the wire at all."""
    with pytest.raises(OverflowError):
        msgpack.packb({"n": value})
    assert packed({"n": value}) is None
    assert packed({"n": 2**64 - 1}) is not None and packed({"n": -(2**63)}) is not None


# --------------------------------------------------------------------------- the oracle

NO_RID = object()


def verdict(frames: list[bytes], schemas: dict[str, Schema]) -> tuple[str | None, Any]:
    """(the ERROR code a receiver must answer or None if valid, the rid it must echo)."""
    rid = readable_rid(frames)
    try:
        msg = decode(frames, schemas)
    except ProtocolError as e:
        return e.code, rid
    return None, msg.get("rid")


def readable_rid(frames: list[bytes]) -> Any:
    """The rid an ERROR must echo (docs/protocol.md "ERROR"): that of a body that is a msgpack
    map with string keys of its own, whatever else is wrong (header, version, command, frame
    count, nesting, keys deeper down), if it is a scalar: nil, bool, int, float, or a str or
    bin of at most 128 bytes. Else NO_RID (an array or map is never echoed)."""
    if len(frames) < 3:
        return NO_RID
    try:
        body = msgpack.unpackb(frames[2], raw=False, strict_map_key=False)
    except Exception:  # not msgpack at all
        return NO_RID
    if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
        return NO_RID
    rid = body.get("rid")  # nil when absent
    if rid is None or isinstance(rid, int | float):
        return rid
    size = len(rid.encode("utf-8", "surrogatepass")) if isinstance(rid, str) else \
        len(rid) if isinstance(rid, bytes) else None
    return rid if size is not None and size <= 128 else NO_RID


def readable_command(frames: list[bytes]) -> str | None:
    """The command an ERROR must name: the command frame if it has the form of one."""
    if len(frames) < 2 or not re.fullmatch(rb"[A-Z0-9_]{1,16}", frames[1]):
        return None
    return frames[1].decode()


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def same(a: Any, b: Any) -> bool:
    """Equal as sent on the wire (NaN equals NaN)."""
    return msgpack.packb(a, use_bin_type=True) == msgpack.packb(b, use_bin_type=True)


def unpack_reply(frames: list[bytes]) -> tuple[str, dict[str, Any]]:
    assert len(frames) == 3 and frames[0] == HEADER, frames
    body = msgpack.unpackb(frames[2], raw=False)
    assert isinstance(body, dict)
    return frames[1].decode(), body


def is_subsequence(needle: list[Any], hay: list[Any]) -> bool:
    it = iter(hay)
    return all(any(x == y for y in it) for x in needle)


# --------------------------------------------------------------------------- live master


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("garbage-master")
    c = Cluster(tmp, f"sqlite:///{tmp}/ffrtmp.db")
    try:
        c.start_master()
        c.start_agent(AGENT_NAME, slots=4)
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def collect_until(sock: zmq.Socket, last: Callable[[str, dict[str, Any]], bool],
                  timeout: float = 5.0) -> list[tuple[str, dict[str, Any]]]:
    """Every reply up to and including the first one `last` accepts."""
    replies = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and sock.poll(int(left * 1000) + 1), f"no final reply; got {replies}"
        replies.append(unpack_reply(sock.recv_multipart()))
        if last(*replies[-1]):
            return replies


def revive(cluster: Cluster) -> None:
    """Restart a master an earlier example killed or wedged, so that only that example fails."""
    assert cluster.master is not None
    if cluster.master.poll() is None:
        try:
            with Client(cluster.clients_ep, timeout=2) as client:
                client.stats()
            return
        except ClientError:
            cluster.kill9(cluster.master)
    cluster.start_master()


def assert_master_healthy(cluster: Cluster) -> None:
    """Alive, answers STATS, and a real job still goes queued -> completed."""
    assert cluster.master is not None
    assert cluster.master.poll() is None, f"master died\n{cluster.dump_logs()}"
    assert isinstance(cluster.client.stats()["agents"], int)
    (job_id,) = cluster.client.submit([{"scenario": "noop"}])
    try:
        wait_for(lambda: cluster.client.get([job_id])[0][0]["state"] == "completed", 30,
                 message=f"job {job_id} completed")
    except AssertionError:
        raise AssertionError(f"job {job_id} did not complete\n{cluster.dump_logs()}") from None


def sendable(batch: list[list[bytes] | None]) -> list[list[bytes]]:
    return [frames for frames in batch if frames is not None]


@pytest.mark.slow
@FUZZ
@given(batch=st.lists(CLIENT_MESSAGES, min_size=1, max_size=12))
def test_client_endpoint_answers_every_garbage_message(
        cluster: Cluster, ctx: zmq.Context, batch: list[list[bytes] | None]) -> None:
    revive(cluster)
    sock = dealer(ctx, cluster.clients_ep)
    try:
        msgs = sendable(batch)
        for frames in msgs:
            sock.send_multipart(frames)
        sock.send_multipart([HEADER, b"STATS", msgpack.packb({"rid": "sentinel"})])
        replies = collect_until(sock, lambda cmd, body: body.get("rid") == "sentinel")
    finally:
        sock.close(linger=0)
    # One reply per request, in order (the sentinel's last), each an ERROR where the protocol
    # says so, echoing the rid where it could be read.
    assert len(replies) == len(msgs) + 1, (msgs, replies)
    for frames, (command, body) in zip(msgs, replies, strict=False):
        code, rid = verdict(frames, CLIENT_TO_MASTER)
        event(f"{code or command}, rid {'unreadable' if rid is NO_RID else 'echoed'}")
        if code is not None:
            assert command == "ERROR" and body["code"] == code and body["text"], (frames, body)
        else:
            assert command in ("REPLY", "SUBMITTED", "ERROR"), (frames, command, body)
            assert command != "ERROR" or body["code"] != "internal", (frames, body)
        if rid is NO_RID:
            assert body.get("rid") is None, (frames, body)
        else:
            assert same(body.get("rid"), rid), (frames, body)
        if command == "ERROR":  # every ERROR names the command it answers, where readable
            assert body.get("command") == readable_command(frames), (frames, body)
    assert_master_healthy(cluster)


@pytest.mark.slow
@FUZZ
@given(batch=st.lists(AGENT_MESSAGES, min_size=1, max_size=12))
def test_agent_endpoint_answers_every_garbage_message(
        cluster: Cluster, ctx: zmq.Context, batch: list[list[bytes] | None]) -> None:
    revive(cluster)
    sock = dealer(ctx, cluster.agents_ep)
    try:
        msgs = sendable(batch)
        for frames in msgs:
            sock.send_multipart(frames)
        sock.send_multipart([HEADER, b"BYE", msgpack.packb({})])  # forget us if a HELLO got in
        sock.send_multipart([HEADER, SENTINEL.encode(), msgpack.packb({})])
        replies = collect_until(
            sock, lambda cmd, body: cmd == "ERROR" and SENTINEL in body.get("text", ""))
    finally:
        sock.close(linger=0)
    # Every bad frame gets its ERROR, in order. Until a valid HELLO registers us, every valid
    # message but BYE and ERROR gets `ERROR unknown_agent`; after it, replies vary.
    expected: list[str] = []
    registered = False
    for frames in msgs:
        code, _ = verdict(frames, AGENT_TO_MASTER)
        event(code or f"valid {frames[1].decode()}")
        if code is not None:
            expected.append(code)
        elif frames[1] == b"HELLO":
            registered = True
        elif not registered and frames[1] not in (b"BYE", b"ERROR"):
            expected.append("unknown_agent")
    errors = [body["code"] for cmd, body in replies if cmd == "ERROR"]
    assert is_subsequence([*expected, "bad_command"], errors), (msgs, replies)
    if not registered:
        assert errors == [*expected, "bad_command"], (msgs, replies)
    assert_master_healthy(cluster)


def test_client_message_over_the_cap_is_answered_too_large(
        cluster: Cluster, ctx: zmq.Context) -> None:
    """Over the clients' 8 MiB whole-message cap (and under the 64 MiB hard cap of libzmq):
    ERROR too_large with the rid and command it answers, never a silent disconnect."""
    revive(cluster)
    sock = dealer(ctx, cluster.clients_ep)
    try:
        for size in (8 * 2**20, 40 * 2**20):
            body = msgpack.packb({"rid": f"big-{size}", "ids": [], "pad": b"x" * size})
            sock.send_multipart([HEADER, b"GET", body])
            ((cmd, reply),) = collect_until(sock, lambda c, b: True, timeout=30)
            assert (cmd, reply["code"], reply.get("rid"), reply.get("command")) == (
                "ERROR", "too_large", f"big-{size}", "GET"), reply
            assert "8388608 bytes" in reply["text"], reply
        sock.send_multipart([HEADER, b"STATS", msgpack.packb({"rid": "after"})])
        ((cmd, reply),) = collect_until(sock, lambda c, b: True)
        assert (cmd, reply["rid"]) == ("REPLY", "after"), "the connection must still work"
    finally:
        sock.close(linger=0)
    assert_master_healthy(cluster)


@pytest.mark.parametrize(("endpoint", "limit"), [
    ("clients_ep", 64 * 2**20),  # the clients' hard cap (libzmq MAXMSGSIZE): over it, dropped
    ("agents_ep", 2**20),  # agents: libzmq's cap is the master's own
])
def test_message_over_maxmsgsize_drops_only_that_peer(
        cluster: Cluster, ctx: zmq.Context, endpoint: str, limit: int) -> None:
    ep = getattr(cluster, endpoint)
    big, other = dealer(ctx, ep), dealer(ctx, ep)
    try:
        body = msgpack.packb({"rid": "big", "ids": [], "pad": b"x" * limit})
        assert len(body) > limit
        big.send_multipart([HEADER, b"GET" if endpoint == "clients_ep" else b"HEARTBEAT", body])
        other.send_multipart([HEADER, SENTINEL.encode(), msgpack.packb({"rid": "other"})])
        ((cmd, reply),) = collect_until(other, lambda c, b: True)
        assert cmd == "ERROR" and reply["code"] == "bad_command"
        assert_master_healthy(cluster)
        assert not big.poll(200), "the over-size message must not have been served"
    finally:
        big.close(linger=0)
        other.close(linger=0)


def test_hello_results_and_running_of_any_shape(cluster: Cluster, ctx: zmq.Context) -> None:
    """HELLO's `results` are DONE bodies and `running` {id, attempt} pairs: HELLO's schema only
    says "list", so a bad entry must be an ERROR, not a crash (no registration needed for it)."""
    revive(cluster)
    sock = dealer(ctx, cluster.agents_ep)
    try:
        results = [{"id": 1, "attempt": 1, "status": []}, {"id": [], "attempt": 1},
                   {"id": 1, "attempt": 1, "status": "completed", "exit_code": 2**63},
                   {"id": 1, "attempt": 1, "extra": {"b": b"\x00"}}, "x", None]
        running = [{"id": [], "attempt": {}}, {"id": 1}, [1, 2], {"id": 2**64 - 1, "attempt": 1}]
        sock.send_multipart([HEADER, b"HELLO", msgpack.packb(
            {"name": "shapes", "slots": 1, "results": results, "running": running})])
        sock.send_multipart([HEADER, SENTINEL.encode(), msgpack.packb({})])
        replies = collect_until(
            sock, lambda cmd, body: cmd == "ERROR" and SENTINEL in body.get("text", ""))
        sock.send_multipart([HEADER, b"BYE", msgpack.packb({})])
    finally:
        sock.close(linger=0)
    assert replies[0][0] == "WELCOME", replies
    errors = [body for cmd, body in replies[:-1] if cmd == "ERROR"]
    assert [e["code"] for e in errors] == ["bad_body"] * 4, replies
    assert all(e["text"].startswith("HELLO.results: DONE.") for e in errors), errors
    assert_master_healthy(cluster)


ABSURD_REPORTS = [
    ("DONE", {"status": "completed", "exit_code": 2**63}, "exit_code"),
    ("DONE", {"status": "completed", "bytes_in": 2**64 - 1}, "bytes_in"),
    ("DONE", {"status": "failed", "extra": {"stderr": b"\xff"}}, "extra"),
    ("DONE", {"status": "failed", "reason": "exit\x00code"}, "reason"),
    ("PROGRESS", {"progress": 0.5, "bytes_out": 2**63}, "bytes_out"),
    ("REJECT", {"reason": "no\x00pe"}, "reason"),
]


def test_absurd_reports_for_a_current_job_do_not_wedge_the_master(
        cluster: Cluster, ctx: zmq.Context) -> None:
    """Values the store cannot hold (int64/int32 columns, JSON, NUL for PostgreSQL) in what a
    registered agent reports about its own job: one would fail every commit from then on."""
    revive(cluster)
    cluster.client.drain(AGENT_NAME, on=True)  # so that our fake agent gets the jobs
    sock = dealer(ctx, cluster.agents_ep)
    ids = []
    try:
        # One slot per report: a refused report leaves its job held, and credit <= free slots.
        sock.send_multipart([HEADER, b"HELLO", msgpack.packb(
            {"name": "reporter", "slots": len(ABSURD_REPORTS), "workloads": ["noop"]})])
        collect_until(sock, lambda cmd, body: cmd == "WELCOME")
        for command, report, key in ABSURD_REPORTS:
            sock.send_multipart([HEADER, b"CREDIT", msgpack.packb({"n": 1})])
            ids += cluster.client.submit([{"scenario": "noop"}])
            (_, job), = [r for r in collect_until(sock, lambda cmd, body: cmd == "JOB")
                         if r[0] == "JOB"]
            assert job["id"] == ids[-1]
            sock.send_multipart([HEADER, command.encode(), msgpack.packb(
                {"id": job["id"], "attempt": job["attempt"], **report})])
            (_, error), = collect_until(sock, lambda cmd, body: cmd == "ERROR")
            assert error["code"] == "bad_body" and error["text"].startswith(f"{command}.{key}")
            assert cluster.client.stats()["agents"] >= 1  # still committing, still answering
        sock.send_multipart([HEADER, b"BYE", msgpack.packb({})])  # its jobs go back to the queue
    finally:
        sock.close(linger=0)
        cluster.client.drain(AGENT_NAME, on=False)
    final = cluster.wait_terminal(ids, timeout=60)
    assert {j["state"] for j in final.values()} == {"completed"}, final
    assert {j["agent"] for j in final.values()} == {AGENT_NAME}
    assert_master_healthy(cluster)


# --------------------------------------------------------------------------- live agent


class FakeMaster:
    """A ROUTER playing master for one real agent: WELCOMEs every HELLO, records the rest."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.ident: bytes | None = None
        self.hellos = 0
        self.heartbeat_s = 0.25

    def send(self, frames: list[bytes]) -> None:
        assert self.ident is not None
        self.sock.send_multipart([self.ident, *frames])

    def send_msg(self, command: str, body: dict[str, Any]) -> None:
        self.send([HEADER, command.encode(), msgpack.packb(body, use_bin_type=True)])

    def recv(self, timeout: float) -> tuple[Message | None, list[bytes]] | None:
        """The next agent message (decoded, or None with its frames if it was not valid)."""
        if not self.sock.poll(int(timeout * 1000) + 1):
            return None
        ident, *frames = self.sock.recv_multipart()
        try:
            msg = decode(frames, AGENT_TO_MASTER)
        except ProtocolError:
            return None, frames
        if msg.command == "HELLO":
            self.ident, self.hellos = ident, self.hellos + 1
            self.send_msg("WELCOME", {"heartbeat_s": self.heartbeat_s, "liveness": 40,
                                      "master": "fake"})
        return msg, frames

    def until(self, done: Callable[[Message], bool], timeout: float = 15.0,
              what: str = "") -> list[Message]:
        """Every message up to and including the first that `done` accepts."""
        seen = self.poll_for(done, timeout)
        assert seen and done(seen[-1]), \
            f"agent sent no {what} in {timeout}s; got {[m.command for m in seen][-30:]}"
        return seen

    def poll_for(self, done: Callable[[Message], bool], timeout: float) -> list[Message]:
        """Messages until one that `done` accepts (last) or until timeout."""
        seen: list[Message] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = self.recv(left)
            if got is None:
                break
            msg, frames = got
            assert msg is not None, f"agent sent an invalid message: {frames}"
            seen.append(msg)
            if done(msg):
                break
        return seen


class LiveAgent:
    """A real `python -m ffrtmp agent` process connected to a FakeMaster."""

    def __init__(self, master: FakeMaster, tmp: Path) -> None:
        self.master, self.tmp = master, tmp
        self.ids = itertools.count(10**15)
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.tmp / f"agent.{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ffrtmp", "agent", "--master",
                 f"tcp://127.0.0.1:{self.master.port}", "--name", "x", "--slots", "2",
                 "--work-dir", str(self.tmp / "work"), "--metrics", "off"],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(ROOT), "FFRTMP_LOG": "info"})
        self.master.until(lambda m: m.command == "HELLO", 20, "HELLO")
        self.master.until(lambda m: m.command == "CREDIT", 10, "CREDIT")

    def revive(self) -> None:
        """Restart an agent an earlier example killed, so that only that example fails."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            self.stop()
            self.start()

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftover children of its group

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def assert_healthy(self) -> None:
        """Alive, and a valid noop JOB still ends in DONE completed."""
        assert self.proc is not None and self.proc.poll() is None, f"agent died\n{self.logs()}"
        self.master.send_msg("DRAIN", {"on": False})  # garbage may have drained it
        job_id = next(self.ids)
        self.master.send_msg("JOB", {"id": job_id, "attempt": 1, "spec": {"scenario": "noop"}})
        seen = self.master.until(lambda m: m.command == "DONE" and m["id"] == job_id,
                                 what=f"DONE for {job_id}")
        assert seen[-1]["status"] == "completed", seen[-1]
        self.master.send_msg("DONE_ACK", {"acks": [[job_id, 1]]})


@pytest.fixture(scope="module")
def agent(ctx: zmq.Context, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAgent]:
    master = FakeMaster(ctx)
    live = LiveAgent(master, tmp_path_factory.mktemp("garbage-agent"))
    try:
        live.start()
        yield live
    finally:
        live.stop()
        master.sock.close(linger=0)


NOT_A_NUMBER = (st.text(max_size=8) | st.none() | st.booleans() | st.binary(max_size=4)
                | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3),
                st.integers(), max_size=2) | st.sampled_from([math.nan, math.inf, -math.inf])
                | st.floats(max_value=-0.001) | st.integers(max_value=-1))
KNOBS = {"sleep": "seconds", "burn": "cpu_seconds", "hog": "mb"}
BAD_SPECS = st.one_of(
    # params that are not a map
    st.fixed_dictionaries({"scenario": st.sampled_from(["noop", *KNOBS]),
                           "params": values.filter(lambda v: v is not None
                                                   and not isinstance(v, dict))}),
    # a knob that is not a finite number >= 0
    st.sampled_from(sorted(KNOBS)).flatmap(lambda s: st.fixed_dictionaries(
        {"scenario": st.just(s), "params": st.fixed_dictionaries({KNOBS[s]: NOT_A_NUMBER})})),
    # timeout_s that is not a positive number
    st.fixed_dictionaries({"scenario": st.sampled_from(["noop", "sleep"]),
                           "params": st.just({"seconds": 0}),
                           "timeout_s": NOT_A_NUMBER.filter(lambda v: v is not None)
                           | st.sampled_from([0, 0.0])}),
    # unknown scenario, or none at all
    st.fixed_dictionaries({"scenario": values.filter(
        lambda v: v not in ("noop", "sleep", "burn", "hog"))}),
    st.dictionaries(st.sampled_from(["params", "input", "output", "timeout_s"]), values,
                    max_size=3),
)


@st.composite
def bad_job(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """("refuse", body) for a well-formed JOB with a bad spec, ("bad_body", body) otherwise."""
    body: dict[str, Any] = {"id": 0, "attempt": draw(st.integers(0, 100)), "spec": draw(BAD_SPECS)}
    if draw(st.integers(0, 4)) == 0:
        del body[draw(st.sampled_from(["id", "attempt", "spec"]))]  # a missing key
        return "bad_body", body
    return "refuse", body


def refusal(msg: Message) -> tuple[tuple[int, int], str] | None:
    """((id, attempt), why) if msg refuses an attempt: REJECT (a scenario this agent does not
    know: another may) or DONE failed invalid_input (a spec it cannot use: never run)."""
    if msg.command == "REJECT":
        return (msg["id"], msg["attempt"]), msg["reason"]
    if msg.command == "DONE" and (msg["status"], msg["reason"]) == ("failed", "invalid_input"):
        return (msg["id"], msg["attempt"]), str((msg["extra"] or {}).get("error"))
    return None


def agent_errors(frames: list[bytes]) -> list[str]:
    """The ERROR codes the agent answers one master message with, in order: the decode's
    verdict, or for a valid JOBS one bad_body per item that is not a JOB body (the items that
    are run or refuse as a JOB would)."""
    code, _ = verdict(frames, MASTER_TO_AGENT)
    if code:
        return [code]
    msg = decode(frames, MASTER_TO_AGENT)
    if msg.command != "JOBS":
        return []
    bad = []
    for item in msg["jobs"]:
        try:
            if not isinstance(item, dict):
                raise ProtocolError("bad_body", "not a map")
            validate(item, MASTER_TO_AGENT["JOB"], "JOB")
        except ProtocolError:
            bad.append("bad_body")
    return bad


def resets_connection(frames: list[bytes]) -> bool:
    """Valid messages with a defined effect that would end this connection (tested elsewhere)."""
    try:
        msg = decode(frames, MASTER_TO_AGENT)
    except ProtocolError:
        return False
    return msg.command in ("BYE", "WELCOME") or (
        msg.command == "ERROR" and msg["code"] == "unknown_agent")


@pytest.mark.slow
@FUZZ
@given(batch=st.lists(TO_AGENT_MESSAGES, max_size=10), jobs=st.lists(bad_job(), max_size=4))
def test_agent_survives_garbage_and_refuses_bad_jobs(
        agent: LiveAgent, batch: list[list[bytes] | None],
        jobs: list[tuple[str, dict[str, Any]]]) -> None:
    agent.revive()
    master = agent.master
    msgs = [f for f in sendable(batch) if not resets_connection(f)]
    expected = [code for f in msgs for code in agent_errors(f)]
    refuse: dict[tuple[int, int], dict[str, Any]] = {}
    for frames in msgs:
        master.send(frames)
    for want, body in jobs:
        if "id" in body:
            body["id"] = next(agent.ids)
        raw = packed(body)
        if raw is None:
            continue
        master.send([HEADER, b"JOB", raw])
        if want == "refuse":
            refuse[(body["id"], body["attempt"])] = body["spec"]
        else:
            expected.append("bad_body")
    master.send_msg(SENTINEL, {})
    seen = master.until(lambda m: m.command == "ERROR" and SENTINEL in m["text"],
                        what="ERROR for the sentinel")
    # Bad specs are refused after their (off-loop) preparation: wait for every answer.
    answered = {r[0] for m in seen if (r := refusal(m))}
    if not set(refuse) <= answered:
        seen += master.until(lambda m: (r := refusal(m)) is not None and
                             (answered.add(r[0]) or set(refuse) <= answered),
                             what="an answer to every bad JOB")
    assert [m["code"] for m in seen if m.command == "ERROR"] == [*expected, "bad_command"], seen
    refused = dict(r for m in seen if (r := refusal(m)))
    for key, spec in refuse.items():
        assert refused.get(key), f"JOB {key} with spec {spec!r} was not refused: {seen}"
    ran = [m for m in seen if m.command == "ACCEPT" and (m["id"], m["attempt"]) in refuse]
    assert not ran, ran
    agent.assert_healthy()


def test_agent_keeps_heartbeating_after_garbage(agent: LiveAgent) -> None:
    master = agent.master
    master.send([b"\xff"])
    master.send([HEADER, b"JOB", msgpack.packb({"id": 1, "attempt": 1, "spec": {
        "scenario": "sleep", "params": {"seconds": "forever"}, "timeout_s": "soon"}})])
    seen = master.until(lambda m: refusal(m) is not None, what="a refusal")
    assert refusal(seen[-1]) is not None and seen[-1]["id"] == 1, seen
    assert "timeout_s" in refusal(seen[-1])[1], seen  # type: ignore[index]
    master.until(lambda m: m.command == "HEARTBEAT", 5 * master.heartbeat_s, "HEARTBEAT")
    master.until(lambda m: m.command == "HEARTBEAT", 5 * master.heartbeat_s, "HEARTBEAT")
    agent.assert_healthy()


def test_agent_survives_a_message_over_maxmsgsize(agent: LiveAgent) -> None:
    master = agent.master
    # libzmq ends (does not re-make) a connection that brought an over-size message, so the
    # agent only notices the silence: short liveness, then expect a new socket and HELLO.
    master.send_msg("WELCOME", {"heartbeat_s": 0.25, "liveness": 4, "master": "fake"})
    master.until(lambda m: m.command == "CREDIT", 5, "CREDIT after WELCOME")
    hellos = master.hellos
    master.send([HEADER, b"HEARTBEAT", msgpack.packb({"pad": b"x" * 2**20})])
    master.until(lambda m: m.command == "HELLO", 15, "HELLO on a new connection")
    assert master.hellos == hellos + 1
    agent.assert_healthy()


def test_agent_survives_done_acks_of_any_shape(agent: LiveAgent) -> None:
    master = agent.master
    job_id = next(agent.ids)  # leave one result unacknowledged: pop() on {} would hash nothing
    master.send_msg("JOB", {"id": job_id, "attempt": 1, "spec": {"scenario": "noop"}})
    master.until(lambda m: m.command == "DONE" and m["id"] == job_id, 5, "DONE")
    master.send_msg("DONE_ACK", {"acks": [[[1], {"a": 1}], [1, 2, 3], "x", [None, 1.5], [[], []],
                                          {"id": 1}, [2**64 - 1, -(2**63)]]})
    master.send_msg(SENTINEL, {})
    seen = master.until(lambda m: m.command == "ERROR", 5, "ERROR for the sentinel")
    assert SENTINEL in seen[-1]["text"]
    agent.assert_healthy()
    master.send_msg("DONE_ACK", {"acks": [[job_id, 1]]})


@pytest.mark.parametrize("welcome", [
    {"heartbeat_s": math.nan}, {"heartbeat_s": math.inf}, {"heartbeat_s": -1.0},
    {"heartbeat_s": 0}, {"heartbeat_s": 1e300}, {"liveness": 0}, {"liveness": -5},
    {"liveness": 2**63},
], ids=repr)
def test_agent_survives_a_welcome_with_absurd_timing(agent: LiveAgent,
                                                     welcome: dict[str, Any]) -> None:
    master = agent.master
    master.send_msg("WELCOME", {"heartbeat_s": master.heartbeat_s, "liveness": 40, **welcome})
    seen = master.until(lambda m: m.command == "ERROR", 5, "ERROR bad_body")
    assert seen[-1]["code"] == "bad_body" and next(iter(welcome)) in seen[-1]["text"], seen
    # Still registered with sane timing: it heartbeats and does not drop the connection.
    hellos = master.hellos
    master.until(lambda m: m.command == "HEARTBEAT", 5 * master.heartbeat_s, "HEARTBEAT")
    master.until(lambda m: m.command == "HEARTBEAT", 5 * master.heartbeat_s, "HEARTBEAT")
    assert master.hellos == hellos
    agent.assert_healthy()
