#!/usr/bin/env python3
"""Check what docs/protocol.md says, statement by statement, against a running master, using
nothing but pyzmq, msgpack and the standard library.

    python examples/contract_checks.py [--item N ...] [--page docs/protocol.md]
                                       [--clients EP] [--events EP] [--timeout 60]

One line per check: `ok item-N what` or `FAIL item-N what: why`. The items are the numbered
points of the "client contract" review (issue 11), each a place where a client written from the
page alone met a master that did otherwise:

  1 times are float epoch seconds         7 rid: required, a scalar, echoed in every ERROR
  2 the transition table is complete      8 every ERROR names its command
  3 a queued job cancelled: `cancelled`   9 a non-string key is named; readable range errors
  4 timeouts retried only if asked        10 LIST states=[] means all states
  5 too_large is sent, never a timeout   11 type coercion as documented
  6 one error code per kind of limit     12 which workloads send PROGRESS

The master needs at least one agent for the items that run jobs (1-4, 12); item 2's
invalid-input and item 12's ffmpeg half need an agent with ffmpeg and libx264, and are reported
as not checked without one. Exit status: 0 all ok, 1 some FAIL, 2 the master did not answer.
Imports nothing from ffrtmp.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

HEADER = b"FFR\x01\x03"  # "FFR", major 1, minor 3 (the page's version)
TERMINAL = {"completed", "failed", "timed_out", "cancelled"}
NOOP = {"scenario": "noop"}
UNPLACEABLE = {"scenario": "noop", "resource_limits": {"max_memory_mb": 1_048_576}}  # no agent
PAGE = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


class Failed(Exception):
    """A check that did not hold: its text says what was seen instead."""


def pack(command: str | bytes, body: Any, header: bytes = HEADER) -> list[bytes]:
    raw = command.encode("ascii") if isinstance(command, str) else command
    return [header, raw, msgpack.packb(body, use_bin_type=True)]


class Conn:
    """One DEALER to the master's client endpoint; replies are matched by rid."""

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout: float) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.timeout = timeout
        self.rid = 0

    def close(self) -> None:
        self.sock.close(linger=0)

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames, copy=False)

    def recv(self, timeout: float | None = None) -> tuple[str, dict[str, Any]]:
        """The next reply as (command, body); Failed on timeout."""
        if not self.sock.poll(int((timeout or self.timeout) * 1000) + 1):
            raise Failed(f"no reply within {timeout or self.timeout:g}s")
        frames = self.sock.recv_multipart()
        body = msgpack.unpackb(frames[2], raw=False, strict_map_key=False)
        return frames[1].decode("ascii"), body

    def reply_to(self, rid: Any, timeout: float | None = None) -> tuple[str, dict[str, Any]]:
        """The reply carrying this rid (earlier, late replies are skipped)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            command, body = self.recv(max(0.01, deadline - time.monotonic()))
            if body.get("rid") == rid and type(body.get("rid")) is type(rid):
                return command, body

    def ask(self, command: str, **body: Any) -> tuple[str, dict[str, Any]]:
        """Send a request with a fresh rid; its reply as (command, body)."""
        rid = self.next_rid()
        self.send(pack(command, {"rid": rid, **body}))
        return self.reply_to(rid)

    def ok(self, command: str, **body: Any) -> dict[str, Any]:
        """A request that must succeed: its reply body; Failed on ERROR."""
        got, reply = self.ask(command, **body)
        if got == "ERROR":
            raise Failed(f"{command}: ERROR {reply.get('code')}: {reply.get('text')}")
        return reply

    def error(self, command: str, **body: Any) -> dict[str, Any]:
        """A request that must fail: its ERROR body; Failed if it was answered otherwise."""
        got, reply = self.ask(command, **body)
        if got != "ERROR":
            raise Failed(f"{command} was answered {got}, not ERROR")
        return reply


class Run:
    """The checks' shared context: connections, output, jobs."""

    def __init__(self, args: argparse.Namespace, ctx: zmq.Context) -> None:
        self.args, self.ctx = args, ctx
        self.conn = Conn(ctx, args.clients, min(args.timeout, 10.0))
        self.failed = 0

    def fresh(self) -> Conn:
        return Conn(self.ctx, self.args.clients, min(self.args.timeout, 10.0))

    def check(self, item: int, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one check, fn(*args); print its line. Returns what fn returned (None on
        failure)."""
        try:
            result = fn(*args)
        except Failed as e:
            print(f"FAIL item-{item} {what}: {e}", flush=True)
            self.failed += 1
            return None
        except Exception as e:  # a check that crashed is a failed check, with its reason
            print(f"FAIL item-{item} {what}: {type(e).__name__}: {e}", flush=True)
            self.failed += 1
            return None
        print(f"ok item-{item} {what}", flush=True)
        return result

    def submit(self, specs: list[dict[str, Any]]) -> list[int]:
        return list(self.conn.ok("SUBMIT", specs=specs)["ids"])

    def job(self, job_id: int, events: bool = False) -> dict[str, Any]:
        jobs = self.conn.ok("GET", ids=[job_id], events=events)["jobs"]
        if not jobs:
            raise Failed(f"job {job_id} not found")
        return dict(jobs[0])

    def wait(self, job_id: int, until: Callable[[dict[str, Any]], bool] | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """Poll GET until the job is terminal (or `until` holds); Failed on timeout."""
        until = until or (lambda j: j["state"] in TERMINAL)
        deadline = time.monotonic() + (timeout or self.args.timeout)
        while True:
            job = self.job(job_id, events=True)
            if until(job):
                return job
            if time.monotonic() >= deadline:
                raise Failed(f"job {job_id} still {job['state']} after {timeout or 0:g}s")
            time.sleep(0.1)

    def nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.conn.ok("NODES")["nodes"] if n["state"] == "alive"]

    def need_agent(self) -> None:
        if not self.nodes():
            raise Failed("no agent is connected: this check runs jobs")

    def ffmpeg_agent(self) -> bool:
        return any("libx264" in (n.get("encoders") or []) for n in self.nodes())


def expect(cond: Any, why: str) -> None:
    if not cond:
        raise Failed(why)


def code_of(reply: dict[str, Any], code: str, text: str = "") -> dict[str, Any]:
    expect(reply.get("code") == code and text in reply.get("text", ""),
           f"expected ERROR {code} {text!r}, got {reply.get('code')}: {reply.get('text')}")
    return reply


def is_epoch(value: Any) -> bool:
    return isinstance(value, float) and abs(value - time.time()) < 86_400


# --------------------------------------------------------------------------- 1: times


def item_1(run: Run) -> None:
    run.need_agent()
    sub = run.ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"job.")
    sub.connect(run.args.events)
    time.sleep(0.3)  # the subscription must reach the master before the events it wants
    try:
        (job_id,) = run.submit([{"scenario": "sleep", "params": {"seconds": 0.2}}])
        job = run.check(1, "a job's created_at, started_at and finished_at are float epoch s",
                        lambda: _times_of(run.wait(job_id)))
        if job is not None:
            run.check(1, "GET events=true: each event's `at` is a float",
                      lambda: _event_times(job["events"]))
        run.check(1, "EVENTS: each event's `at` is a float", lambda: _event_times(
            run.conn.ok("EVENTS", after=0, ids=[job_id])["events"]))
        run.check(1, "PUB STATE: `at` is a float, as in GET", lambda: _pub_times(sub, job_id))
        run.check(1, "LIST: created_at is a float", lambda: expect(all(
            is_epoch(j["created_at"]) for j in run.conn.ok("LIST", limit=5)["jobs"]),
            "LIST created_at not a float"))
    finally:
        sub.close(linger=0)


def _times_of(job: dict[str, Any]) -> dict[str, Any]:
    for key in ("created_at", "started_at", "finished_at"):
        expect(is_epoch(job.get(key)), f"{key} is {job.get(key)!r}")
    expect(job["created_at"] <= job["started_at"] <= job["finished_at"], "times out of order")
    return job


def _event_times(events: list[dict[str, Any]]) -> None:
    expect(events, "no events")
    for event in events:
        expect(is_epoch(event.get("at")), f"event at {event.get('at')!r}")


def _pub_times(sub: zmq.Socket, job_id: int) -> None:
    seen = 0
    while sub.poll(1000):
        topic, _, command, body = sub.recv_multipart()
        event = msgpack.unpackb(body, raw=False)
        if topic == f"job.{job_id}.state".encode() and command == b"STATE":
            expect(is_epoch(event.get("at")), f"STATE at {event.get('at')!r}")
            expect(isinstance(event.get("seq"), int), f"STATE without seq: {event}")
            seen += 1
    expect(seen >= 2, f"{seen} STATE events for job {job_id}")


# --------------------------------------------------------------------------- 2: transitions


def page_section(page: Path, heading: str) -> str:
    """The text of one `## heading` section of the page, whitespace folded."""
    text = page.read_text(encoding="utf-8").split(f"\n## {heading}\n", 1)[-1]
    return " ".join(text.split("\n## ", 1)[0].split())


def page_transitions(page: Path) -> set[tuple[str | None, str, str | None]]:
    """(from, to, reason) of every row of the page's transition table (*States and reasons*)."""
    text = page.read_text(encoding="utf-8")
    section = text.split("## States and reasons", 1)[-1]
    allowed: set[tuple[str | None, str, str | None]] = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[0] in ("from", "---"):
            continue
        source = None if "new" in cells[0] else cells[0].strip("`")
        reasons = re.findall(r"`([a-z_]+)`", cells[3]) or [None]
        for reason in reasons:
            allowed.add((source, cells[2].strip("`"), reason))
    return allowed


def item_2(run: Run) -> None:
    run.need_agent()
    allowed = run.check(2, "the page has a transition table (from, to, reasons)",
                        lambda: page_transitions(run.args.page) or _raise("no table found"))
    if not allowed:
        return
    named = [(None, "queued", "submitted"), ("assigned", "completed", None),
             ("assigned", "failed", "invalid_input"), ("running", "queued", "timeout")]
    run.check(2, "the table has assigned -> completed, assigned -> failed (invalid_input) "
                 "and running -> queued", lambda: expect(
                     not [t for t in named if t not in allowed],
                     f"missing {[t for t in named if t not in allowed]}"))
    specs: list[dict[str, Any]] = [NOOP, {
        "scenario": "sleep", "params": {"seconds": 30}, "timeout_s": 0.5, "max_attempts": 2,
        "retry_timeouts": True}]
    if run.ffmpeg_agent():
        specs.append({"scenario": "720p-h264", "input": "no-such-input.mp4"})
    ids = run.submit(specs)
    jobs = [run.wait(i, timeout=run.args.timeout) for i in ids]
    for job in jobs:
        moves = [(e["from_state"], e["state"], e["reason"]) for e in job["events"]]
        run.check(2, f"{job['scenario']}: every transition it made is in the table",
                  lambda m: expect(all(t in allowed for t in m),
                                   f"not in the table: {[t for t in m if t not in allowed]}"),
                  moves)
    seen = {(e["from_state"], e["state"], e["reason"]) for j in jobs for e in j["events"]}
    run.check(2, "noop went assigned -> completed", lambda: expect(
        ("assigned", "completed", None) in seen, f"noop events {jobs[0]['events']}"))
    run.check(2, "a timed-out attempt with retry_timeouts went running -> queued", lambda: expect(
        ("running", "queued", "timeout") in seen, f"sleep events {jobs[1]['events']}"))
    if len(jobs) > 2:
        run.check(2, "a missing local input went assigned -> failed (invalid_input)",
                  lambda: expect(("assigned", "failed", "invalid_input") in seen,
                                 f"ffmpeg events {jobs[2]['events']}"))
    else:
        print("ok item-2 assigned -> failed (invalid_input): not checked, no ffmpeg agent")


def _raise(why: str) -> Any:
    raise Failed(why)


# --------------------------------------------------------------------------- 3: cancel queued


def item_3(run: Run) -> None:
    (job_id,) = run.submit([UNPLACEABLE])  # needs 1 TiB of memory: stays queued
    results = run.conn.ok("CANCEL", ids=[job_id])["results"]
    run.check(3, "CANCEL of a queued job answers `cancelled`", lambda: expect(
        results == [{"id": job_id, "result": "cancelled"}], f"results {results}"))
    job = run.job(job_id, events=True)
    run.check(3, "a job cancelled while queued has reason `cancelled`", lambda: expect(
        (job["state"], job["reason"]) == ("cancelled", "cancelled"),
        f"{job['state']} reason={job['reason']}"))
    run.check(3, "its last event is queued -> cancelled (cancelled)", lambda: expect(
        [(e["from_state"], e["state"], e["reason"]) for e in job["events"]][-1:]
        == [("queued", "cancelled", "cancelled")], f"events {job['events']}"))


# --------------------------------------------------------------------------- 4: timeouts


def item_4(run: Run) -> None:
    run.need_agent()
    base = {"scenario": "sleep", "params": {"seconds": 30}, "timeout_s": 0.5, "max_attempts": 2}
    plain, retried = run.submit([base, {**base, "retry_timeouts": True}])
    job = run.wait(plain)
    run.check(4, "a timeout is not retried by default", lambda: expect(
        (job["state"], job["reason"], job["attempt"]) == ("timed_out", "timeout", 1),
        f"{job['state']} {job['reason']} attempt {job['attempt']}"))
    job = run.wait(retried)
    run.check(4, "retry_timeouts: true retries it while attempts are left", lambda: expect(
        (job["state"], job["reason"], job["attempt"]) == ("timed_out", "timeout", 2),
        f"{job['state']} {job['reason']} attempt {job['attempt']}"))


# --------------------------------------------------------------------------- 5: too_large


def item_5(run: Run) -> None:
    big_spec = {"scenario": "noop", "params": {"pad": "x" * 70_000}}
    reply = run.conn.error("SUBMIT", specs=[big_spec])
    run.check(5, "a spec over 64 KiB packed: ERROR too_large naming specs[0]",
              lambda: code_of(reply, "too_large", "specs[0]"))
    conn = run.fresh()

    def nine_mib() -> None:  # rid first in the map: the master reads it from the first 64 KiB
        conn.send(pack("GET", {"rid": "nine-mib", "ids": [], "pad": b"x" * (9 * 2**20)}))
        command, reply = conn.reply_to("nine-mib", timeout=30)
        code_of(reply, "too_large", "8388608")
        expect(reply.get("command") == "GET", f"command {reply}")
    try:
        run.check(5, "a 9 MiB request: ERROR too_large with its rid and command, no timeout",
                  nine_mib)
        run.check(5, "the connection still works after it", lambda: conn.ok("STATS"))
    finally:
        conn.close()


# --------------------------------------------------------------------------- 6: limit codes


def item_6(run: Run) -> None:
    ids = list(range(1, 10_002))
    cases = [
        ("10 001 specs: bad_body specs", "SUBMIT", {"specs": [NOOP] * 10_001}, "bad_body",
         "specs"),
        ("10 001 ids in GET: bad_body ids", "GET", {"ids": ids}, "bad_body", "ids"),
        ("10 001 ids in CANCEL: bad_body ids", "CANCEL", {"ids": ids}, "bad_body", "ids"),
        ("grace_s 4000: bad_body grace_s", "CANCEL", {"ids": [1], "grace_s": 4000},
         "bad_body", "grace_s"),
        ("a 201-character idempotency key: bad_body idempotency_key", "SUBMIT",
         {"specs": [NOOP], "idempotency_key": "k" * 201}, "bad_body", "idempotency_key"),
        ("LIST limit 0: bad_body limit", "LIST", {"limit": 0}, "bad_body", "limit"),
        ("NODES limit 0: bad_body limit", "NODES", {"limit": 0}, "bad_body", "limit"),
        ("a field inside a spec: invalid_spec specs[1].priority", "SUBMIT",
         {"specs": [NOOP, {"scenario": "noop", "priority": "urgent"}]}, "invalid_spec",
         "specs[1].priority"),
    ]
    for what, command, body, code, text in cases:
        run.check(6, what, lambda c, b, k, t: code_of(run.conn.error(c, **b), k, t),
                  command, body, code, text)


# --------------------------------------------------------------------------- 7 and 8: rid, command


def _bad_messages() -> list[tuple[str, list[bytes], str, str]]:
    """(what, frames, expected code, expected command) of messages a master must refuse, each
    with rid "r" readable in its body."""
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    body = {"rid": "r", "ids": []}
    return [
        ("bad_frame (header XYZ)", pack("GET", body, header=b"XYZ\x01\x01"), "bad_frame", "GET"),
        ("bad_version (major 2)", pack("GET", body, header=b"FFR\x02\x00"), "bad_version", "GET"),
        ("bad_command (NOPE)", pack("NOPE", body), "bad_command", "NOPE"),
        ("nesting deeper than 32", pack("GET", {**body, "x": deep}), "bad_body", "GET"),
        ("a non-string key", pack("GET", {**body, "x": {1: 2}}), "bad_body", "GET"),
        ("a wrong type", pack("GET", {"rid": "r", "ids": "x"}), "bad_body", "GET"),
        ("a missing key", pack("RETRY", {"rid": "r"}), "bad_body", "RETRY"),
        ("four frames", [*pack("STATS", {"rid": "r"}), b"x"], "too_large", "STATS"),
        ("not_found", pack("RETRY", {"rid": "r", "id": 987_654_321}), "not_found", "RETRY"),
    ]


def answers(conn: Conn, frames: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    """Every reply to one message: it is sent, then a STATS whose reply comes after them."""
    sentinel = f"sentinel-{conn.next_rid()}"
    conn.send(frames)
    conn.send(pack("STATS", {"rid": sentinel}))
    got: list[tuple[str, dict[str, Any]]] = []
    while True:
        command, body = conn.recv()
        if body.get("rid") == sentinel:
            return got
        got.append((command, body))


def refused(conn: Conn, frames: list[bytes], code: str, text: str = "") -> dict[str, Any]:
    """The one ERROR a message gets; Failed unless it is `code` with `text` in it."""
    got = answers(conn, frames)
    expect(len(got) == 1 and got[0][0] == "ERROR", f"answered {got}")
    return code_of(got[0][1], code, text)


def item_7(run: Run) -> None:
    conn = run.conn
    rids: list[tuple[str, dict[str, Any], Any]] = [
        ("no rid", {}, None), ("a list rid", {"rid": [1]}, None),
        ("a map rid", {"rid": {"a": 1}}, None), ("a float rid", {"rid": 1.5}, 1.5),
        ("a bool rid", {"rid": True}, True), ("a nil rid", {"rid": None}, None),
        ("a negative rid", {"rid": -1}, -1), ("a 129-byte rid", {"rid": "r" * 129}, None),
    ]
    for what, body, echoed in rids:
        def verdict(body: dict[str, Any], echoed: Any) -> None:
            reply = refused(conn, pack("GET", {**body, "ids": []}), "bad_body")
            expect(reply["text"].startswith("rid: "), f"text {reply['text']!r}")
            expect(reply.get("rid") == echoed and type(reply.get("rid")) is type(echoed),
                   f"echoed rid {reply.get('rid')!r}, expected {echoed!r}")
        run.check(7, f"{what}: ERROR bad_body 'rid: …'" + (
            "" if echoed is None else f", its rid {echoed!r} echoed"), verdict, body, echoed)
    for rid in (0, 2**64 - 1, "x" * 128, "é" * 64):
        run.check(7, f"rid {str(rid)[:12]!r} is accepted", lambda r: expect(
            [(c, b.get("rid")) for c, b in answers(conn, pack("STATS", {"rid": r}))]
            == [("REPLY", r)], "not answered REPLY with that rid"), rid)
    for what, frames, code, _ in _bad_messages():
        run.check(7, f"{what}: ERROR {code} echoes the rid", lambda f, c: expect(
            refused(conn, f, c).get("rid") == "r", "rid not echoed"), frames, code)
    run.check(7, "busy: ERROR busy echoes each request's rid", lambda: _busy(run.fresh, 7))


def _busy(fresh: Callable[[], Conn], item: int) -> None:
    """Pipeline many cheap requests: a client past 64 in one master turn is answered busy.

    Whether 65 of them wait at the start of one turn depends on timing (a loaded machine may
    deliver them a few at a time), so up to 5 bursts, each on a new connection, packed first
    and sent back to back; every busy reply seen must carry its rid (and command)."""
    n, busy, answered = 1000, [], 0
    for _ in range(5):
        conn = fresh()
        try:
            frames = [pack("GET", {"rid": rid, "ids": []}) for rid in range(1, n + 1)]
            for f in frames:
                conn.send(f)
            answered = 0
            while answered < n:
                try:
                    command, reply = conn.recv(2.0)
                except Failed:
                    break  # replies past the client's queue of 64 may be dropped: documented
                answered += 1
                if command == "ERROR":
                    code_of(reply, "busy")
                    busy.append(reply)
        finally:
            conn.close()
        if busy:
            break
    expect(busy, f"no ERROR busy among {answered} replies to {n} pipelined requests, 5 times")
    for reply in busy:
        expect(isinstance(reply.get("rid"), int) and 1 <= reply["rid"] <= n,
               f"busy without its rid: {reply}")
        expect(item != 8 or reply.get("command") == "GET", f"busy without command: {reply}")


def item_8(run: Run) -> None:
    conn = run.conn
    for what, frames, code, command in _bad_messages():
        run.check(8, f"{what}: ERROR {code} names command {command}",
                  lambda f, c, m: expect(
                      refused(conn, f, c).get("command") == m, f"command not {m}"),
                  frames, code, command)
    run.check(8, "no rid: ERROR bad_body names command GET", lambda: expect(
        refused(conn, pack("GET", {"ids": []}), "bad_body").get("command") == "GET",
        "command missing"))
    run.check(8, "an invalid spec: ERROR invalid_spec names command SUBMIT", lambda: expect(
        run.conn.error("SUBMIT", specs=[{"scenario": "nope"}]).get("command") == "SUBMIT",
        "command missing"))
    run.check(8, "busy: ERROR busy names command GET", lambda: _busy(run.fresh, 8))


# --------------------------------------------------------------------------- 9: readable errors


def item_9(run: Run) -> None:
    conn = run.conn
    frames = pack("SUBMIT", {"rid": "k", "specs": [{"scenario": "sleep", "params": {1: 2}}]})
    run.check(9, "an int key: bad_body naming the key and its path, rid echoed", lambda: expect(
        refused(conn, frames, "bad_body", "map keys must be strings: int key 1 in "
                "specs[0].params").get("rid") == "k", "rid not echoed"))
    reply = conn.error("SUBMIT", specs=[{"scenario": "noop",
                                         "resource_limits": {"max_memory_mb": 2_000_000}}])

    def bound() -> None:
        code_of(reply, "invalid_spec", "max_memory_mb")
        digits = re.sub(r"[ ,_\u202f]", "", reply["text"])
        expect("e+" not in reply["text"] and "1048576" in digits, f"text {reply['text']!r}")
    run.check(9, "max_memory_mb out of range: the bound printed as an integer", bound)


# --------------------------------------------------------------------------- 10: LIST states=[]


def item_10(run: Run) -> None:
    (job_id,) = run.submit([UNPLACEABLE])
    try:
        every = run.conn.ok("LIST", limit=1000)["jobs"]
        empty = run.conn.ok("LIST", states=[], limit=1000)["jobs"]
        run.check(10, "LIST states=[] lists every state, like no states", lambda: expect(
            [j["id"] for j in empty] == [j["id"] for j in every] and job_id in
            {j["id"] for j in empty}, f"{len(empty)} jobs with [], {len(every)} without"))
        run.check(10, "LIST replies say whether more jobs match (`more`)", lambda: expect(
            isinstance(run.conn.ok("LIST", states=[], limit=1).get("more"), bool), "no more"))
    finally:
        run.conn.ok("CANCEL", ids=[job_id])


# --------------------------------------------------------------------------- 11: coercion


def item_11(run: Run) -> None:
    conn = run.conn
    frames = page_section(run.args.page, "Frames").lower()
    for rule in ("an int is accepted", "a float is refused", "a bool is not a number",
                 "nil is accepted"):
        run.check(11, f"the page's Frames section says: {rule}",
                  lambda r: expect(r in frames, "not stated"), rule)
    run.check(11, "an int is accepted where a float is expected (grace_s: 5)",
              lambda: conn.ok("CANCEL", ids=[], grace_s=5))
    cases = [
        ("a float is refused for an int (limit: 10.0)", "LIST", {"limit": 10.0}, "LIST.limit"),
        ("a bool is refused for an int (limit: true)", "LIST", {"limit": True}, "LIST.limit"),
        ("a bool is not a number (grace_s: true)", "CANCEL", {"ids": [], "grace_s": True},
         "CANCEL.grace_s"),
        ("a string is not parsed (id: \"7\")", "RETRY", {"id": "7"}, "RETRY.id"),
        ("nil is refused where a default is not nil (limit: nil)", "LIST", {"limit": None},
         "LIST.limit"),
        ("bin is not str (name: b'a1')", "DRAIN", {"name": b"a1"}, "DRAIN.name"),
    ]
    for what, command, body, text in cases:
        run.check(11, what, lambda c, b, t: code_of(conn.error(c, **b), "bad_body", t),
                  command, body, text)
    run.check(11, "nil is accepted where the default is nil (before_id: nil)",
              lambda: conn.ok("LIST", before_id=None, limit=1))


# --------------------------------------------------------------------------- 12: PROGRESS


def item_12(run: Run) -> None:
    rows = [line for line in run.args.page.read_text(encoding="utf-8").splitlines()
            if line.startswith("| `PROGRESS` | A→M")]
    run.check(12, "the page's PROGRESS row says which workloads send it", lambda: expect(
        rows and all(w in rows[0] for w in ("ffmpeg", "`noop`", "`sleep`", "`burn`", "`hog`")),
        f"row {rows[:1]}"))
    run.need_agent()
    sub = run.ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"job.")
    sub.connect(run.args.events)
    time.sleep(0.3)
    try:
        specs = [{"scenario": "sleep", "params": {"seconds": 2}}]
        if run.ffmpeg_agent():
            specs.append({"scenario": "720p-h264", "input": "testsrc:duration=4"})
        ids = run.submit(specs)
        progress: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
        deadline = time.monotonic() + run.args.timeout
        while time.monotonic() < deadline:
            if sub.poll(200):
                topic, _, command, body = sub.recv_multipart()
                event = msgpack.unpackb(body, raw=False)
                if topic.endswith(b".progress") and event.get("id") in progress:
                    progress[event["id"]].append(event)
            elif all(j["state"] in TERMINAL for j in run.conn.ok("GET", ids=ids)["jobs"]):
                break
        jobs = {j["id"]: j for j in run.conn.ok("GET", ids=ids)["jobs"]}
        run.check(12, "a synthetic workload (sleep) sends no PROGRESS; progress 1.0 at the end",
                  lambda: expect(not progress[ids[0]] and jobs[ids[0]]["progress"] == 1.0,
                                 f"{len(progress[ids[0]])} PROGRESS, {jobs[ids[0]]}"))
        if len(ids) == 1:
            print("ok item-12 ffmpeg jobs send PROGRESS: not checked, no ffmpeg agent")
            return
        got = progress[ids[1]]
        run.check(12, "an ffmpeg job sends PROGRESS (progress, bytes_in, bytes_out, fps, speed)",
                  lambda: expect(got and jobs[ids[1]]["state"] == "completed" and all(
                      isinstance(p.get("progress"), float) and isinstance(p.get("bytes_in"), int)
                      for p in got) and any("fps" in p and "speed" in p for p in got),
                      f"{jobs[ids[1]]['state']}, PROGRESS {got[:3]}"))
    finally:
        sub.close(linger=0)


ITEMS: dict[int, Callable[[Run], None]] = {
    1: item_1, 2: item_2, 3: item_3, 4: item_4, 5: item_5, 6: item_6, 7: item_7, 8: item_8,
    9: item_9, 10: item_10, 11: item_11, 12: item_12,
}


def main() -> int:
    ap = argparse.ArgumentParser(description="Check docs/protocol.md against a running master.")
    ap.add_argument("--item", type=int, action="append", choices=sorted(ITEMS),
                    help="check only this item (repeatable; default: all)")
    ap.add_argument("--page", type=Path, default=PAGE, help="the protocol page (item 2)")
    ap.add_argument("--clients", default="tcp://127.0.0.1:5556", help="master client endpoint")
    ap.add_argument("--events", default="tcp://127.0.0.1:5557", help="master events endpoint")
    ap.add_argument("--timeout", type=float, default=60.0, help="per item: waiting for jobs, s")
    args = ap.parse_args()
    ctx = zmq.Context()
    run = Run(args, ctx)
    try:
        try:
            run.conn.ask("STATS")
        except Failed as e:
            print(f"FAIL master at {args.clients}: {e}")
            return 2
        for item in args.item or sorted(ITEMS):
            try:
                ITEMS[item](run)
            except Failed as e:
                print(f"FAIL item-{item} {e}", flush=True)
                run.failed += 1
            except Exception as e:  # one broken item must not hide the others
                print(f"FAIL item-{item} crashed: {type(e).__name__}: {e}", flush=True)
                run.failed += 1
            run.conn.close()
            run.conn = run.fresh()  # what one item left unread does not reach the next
    finally:
        run.conn.close()
        ctx.destroy(linger=0)
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
