"""The client side of master failover (issue 13): endpoint lists, not_leader, resends.

Real masters cannot stand by in these tests, so small real pyzmq ROUTER (and PUB) sockets act
as masters: each answers as a leader, as a standby (ERROR not_leader naming a leader), or not at
all, per docs/protocol.md ("Masters: leader and standbys"). Every socket, context and process
is closed or killed in `finally`; waits are deadline-bound (conftest.wait_for).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from bus.client import Client, EventFollower, NotLeader, Subscriber
from bus.codec import decode, encode
from bus.errors import ClientError
from bus.schemas import CLIENT_TO_MASTER
from conftest import free_port, free_ports, wait_for
from ffrtmp import cli as ffrtmp_cli
from harness import ROOT

Reply = tuple[str, dict[str, Any]] | None  # (command, body) to answer, None: stay silent
Handler = Callable[["FakeMaster", str, dict[str, Any]], Reply]


class FakeMaster:
    """A ROUTER on a clients endpoint answered by `handler` in a thread of its own, plus a
    PUB on an events endpoint the test publishes on; `received` holds every request."""

    def __init__(self, ctx: zmq.Context, handler: Handler, epoch: int = 1,
                 log: list[dict[str, Any]] | None = None) -> None:
        port_c, port_e = free_ports(2)
        self.clients = f"tcp://127.0.0.1:{port_c}"
        self.events = f"tcp://127.0.0.1:{port_e}"
        self.ctx = ctx
        self.handler = handler
        self.epoch = epoch
        self.log = log if log is not None else []  # the "store": events by seq
        self.leader: dict[str, Any] | None = None  # the leader a standby names
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(self.events)
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._bound.wait(5), "fake master did not bind"

    def me(self) -> dict[str, Any]:
        return {"agents": "tcp://127.0.0.1:1", "clients": self.clients, "events": self.events,
                "epoch": self.epoch, "instance": f"fake{self.epoch}"}

    def _serve(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.clients)
        self._bound.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(20):
                    continue
                ident, *frames = sock.recv_multipart()
                msg = decode(frames, CLIENT_TO_MASTER)
                self.received.append((msg.command, dict(msg.body)))
                answer = self.handler(self, msg.command, msg.body)
                if answer is not None:
                    sock.send_multipart([ident, *encode(*answer)])
        finally:
            sock.close(linger=0)

    def got(self, command: str) -> list[dict[str, Any]]:
        return [body for cmd, body in list(self.received) if cmd == command]

    def publish(self, events: list[dict[str, Any]]) -> None:
        self.pub.send_multipart([b"events", *encode("EVENTS", {"events": events})])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.pub.close(linger=0)


# ---- what a fake master answers ----------------------------------------------------------------


def silent(fake: FakeMaster, command: str, body: dict[str, Any]) -> Reply:
    return None


def leader(fake: FakeMaster, command: str, body: dict[str, Any]) -> Reply:
    rid = body["rid"]
    log = list(fake.log)
    head = log[-1]["seq"] if log else 0
    if command == "INFO":
        return "REPLY", {"rid": rid, "version": "1.2", "master": f"fake{fake.epoch}",
                         "events": fake.events, "head": head, "role": "leader",
                         "epoch": fake.epoch, "leader": fake.me(), "limits": {}}
    if command == "STATS":
        return "REPLY", {"rid": rid, "stats": {"role": "leader", "epoch": fake.epoch,
                                               "leader": fake.me(), "agents": 1}}
    if command == "SUBMIT":
        return "SUBMITTED", {"rid": rid, "ids": list(range(1, len(body["specs"]) + 1))}
    if command == "RETRY":
        return "REPLY", {"rid": rid, "id": 99, "retry_of": body["id"]}
    if command == "NODES":
        return "REPLY", {"rid": rid, "next": None, "nodes": [
            {"name": "n1", "state": "alive", "slots": 2, "busy": 0, "cgroup": "none",
             "limits": "best-effort", "last_seen_s": 0.1}]}
    if command == "EVENTS":
        after, limit = body["after"], body["limit"]
        newer = [e for e in log if e["seq"] > after]
        page = newer[:limit]
        more = len(newer) > limit
        return "REPLY", {"rid": rid, "events": page, "head": head, "more": more,
                         "last": page[-1]["seq"] if more else head}
    return "ERROR", {"rid": rid, "code": "bad_command", "text": command, "command": command}


def standby(fake: FakeMaster, command: str, body: dict[str, Any]) -> Reply:
    """As master/server.py's standby: STATS answered, everything else not_leader (whose text
    does not name the leader: the client's error must)."""
    rid = body["rid"]
    known = fake.leader
    if command == "STATS":
        return "REPLY", {"rid": rid, "stats": {
            "role": "standby", "epoch": known["epoch"] if known else 0, "leader": known,
            "instance": "standby", "uptime_s": 1.0}}
    return "ERROR", {"rid": rid, "code": "not_leader", "leader": known, "command": command,
                     "text": "this master is a standby: request not applied"}


def standby_info(fake: FakeMaster, command: str, body: dict[str, Any]) -> Reply:
    """A standby that answers INFO (the design's variant) with its role and the leader."""
    if command == "INFO":
        known = fake.leader
        return "REPLY", {"rid": body["rid"], "version": "1.2", "master": "standby",
                         "events": fake.events, "head": 0, "role": "standby",
                         "epoch": known["epoch"] if known else 0, "leader": known, "limits": {}}
    return standby(fake, command, body)


@pytest.fixture
def fakes(ctx: zmq.Context) -> Iterator[Callable[..., FakeMaster]]:
    made: list[FakeMaster] = []

    def make(handler: Handler, **kw: Any) -> FakeMaster:
        fake = FakeMaster(ctx, handler, **kw)
        made.append(fake)
        return fake

    try:
        yield make
    finally:
        for fake in made:
            fake.close()


def ffrtmp(*args: str, env: dict[str, str] | None = None, timeout: float = 30
           ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FFRTMP_")}
    proc = subprocess.Popen([sys.executable, "-m", "ffrtmp", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**base, "PYTHONPATH": str(ROOT), **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ---- endpoint lists ----------------------------------------------------------------------------


def test_a_client_takes_one_endpoint_a_list_or_a_comma_separated_str() -> None:
    a, b = (f"tcp://127.0.0.1:{p}" for p in free_ports(2))
    for given in (f"{a}, {b}", [a, b], f"{a},{b},{a}"):
        with Client(given, timeout=1) as c:
            assert c.endpoints == [a, b] and c.endpoint == a
    with Client(a, timeout=1) as c:
        assert c.endpoints == [a] and c.endpoint == a


def test_a_subscriber_connects_to_every_endpoint_and_to_more_later(ctx: zmq.Context) -> None:
    a, b, c = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    sub = Subscriber(["events"], f"{a},{b}", ctx=ctx)
    try:
        assert sub.endpoints == [a, b]
        assert sub.connect(c) is True and sub.connect(a) is False
        assert sub.endpoints == [a, b, c]
    finally:
        sub.close()


def test_cli_endpoint_lists_are_checked_item_by_item(capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    good = f"tcp://127.0.0.1:{free_port()}"
    cases = [
        (["--master", f"{good},nonsense", "jobs", "list"], {}, "--master 'nonsense': expected"),
        (["--events-ep", f"{good},x", "jobs", "list"], {}, "--events-ep 'x': expected"),
        (["jobs", "list"], {"FFRTMP_MASTER": f"{good},nohost"}, "FFRTMP_MASTER 'nohost'"),
        (["jobs", "list"], {"FFRTMP_EVENTS": f"{good},bad"}, "FFRTMP_EVENTS 'bad'"),
    ]
    saved = {k: os.environ.get(k) for k in ("FFRTMP_MASTER", "FFRTMP_EVENTS")}
    try:
        for args, env, needle in cases:
            for k in saved:
                os.environ.pop(k, None)
            os.environ.update(env)
            assert ffrtmp_cli.main(args) == 2, args
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("ffrtmp: ") and needle in err[0], err
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


# ---- request(): not_leader, resends, the deadline ----------------------------------------------


def test_not_leader_is_followed_to_the_leader_within_one_call(
        fakes: Callable[..., FakeMaster]) -> None:
    lead = fakes(leader, epoch=4)
    stand = fakes(standby)
    stand.leader = lead.me()
    with Client([stand.clients, lead.clients], timeout=5) as c:
        started = time.monotonic()
        info = c.info()
        assert time.monotonic() - started < 1.0  # at once, not after a try's timeout
        assert info["role"] == "leader" and info["epoch"] == 4
        assert c.endpoint == lead.clients
        assert stand.got("INFO")[0]["rid"] == lead.got("INFO")[0]["rid"]  # the same request
        # An unsafe request too: a not_leader was not applied, so it is sent to the leader.
        with Client([stand.clients, lead.clients], timeout=5) as c2:
            assert c2.retry(7) == 99
        assert len(stand.got("RETRY")) == 1 and len(lead.got("RETRY")) == 1


def cut_off(fake: FakeMaster, command: str, body: dict[str, Any]) -> Reply:
    """A standby that cannot reach its database: STATS, else unavailable."""
    if command == "STATS":
        return standby(fake, command, body)
    return "ERROR", {"rid": body["rid"], "code": "unavailable", "command": command,
                     "text": "database unavailable: request not applied"}


def test_unavailable_from_one_master_asks_the_next_and_all_unavailable_is_the_answer(
        fakes: Callable[..., FakeMaster]) -> None:
    off = fakes(cut_off)
    lead = fakes(leader, epoch=4)
    with Client([off.clients, lead.clients], timeout=5) as c:
        # Refused (not applied) by the cut-off standby, then sent to the leader.
        assert c.submit([{"scenario": "noop"}], idempotency_key="u") == [1]
        assert len(off.got("SUBMIT")) == 1 and len(lead.got("SUBMIT")) == 1
    other = fakes(cut_off)
    with Client([off.clients, other.clients], timeout=5) as c:
        started = time.monotonic()
        with pytest.raises(ClientError) as both:
            c.list_jobs()
        assert time.monotonic() - started < 1.0  # each asked once, then the answer
    assert both.value.code == "unavailable", both.value
    with Client(off.clients, timeout=5) as c, pytest.raises(ClientError) as alone:
        c.list_jobs()  # one endpoint: at once, as always
    assert alone.value.code == "unavailable"


def test_not_leader_naming_an_endpoint_not_in_the_list_names_it(
        fakes: Callable[..., FakeMaster]) -> None:
    stand = fakes(standby)
    elsewhere = f"tcp://127.0.0.1:{free_port()}"
    stand.leader = {"agents": "tcp://127.0.0.1:1", "clients": elsewhere, "events": "x",
                    "epoch": 3, "instance": "other"}
    with Client(stand.clients, timeout=5) as c, pytest.raises(ClientError) as alone:
        c.submit([{"scenario": "noop"}], idempotency_key="k")
    assert alone.value.code == "not_leader"
    assert isinstance(alone.value, NotLeader) and alone.value.leader == stand.leader
    assert elsewhere in alone.value.text and stand.clients in alone.value.text
    assert "--master" in alone.value.text

    # Several endpoints, none of them the leader: tried in turn until the deadline.
    other = fakes(standby)
    other.leader = stand.leader
    with Client([stand.clients, other.clients], timeout=1.5) as c:
        started = time.monotonic()
        with pytest.raises(ClientError) as several:
            c.info()
        took = time.monotonic() - started
    assert several.value.code == "not_leader" and elsewhere in several.value.text
    assert 1.3 <= took < 3.0, took
    assert other.got("INFO"), "the second endpoint was never tried"

    # No leader known at all: said so, nothing sent elsewhere.
    stand.leader = None
    with Client(stand.clients, timeout=5) as c, pytest.raises(ClientError) as unknown:
        c.info()
    assert unknown.value.code == "not_leader" and "knows no leader" in unknown.value.text


def test_a_silent_endpoint_and_a_safe_request_is_answered_by_the_next(
        fakes: Callable[..., FakeMaster]) -> None:
    dead, lead = fakes(silent), fakes(leader)
    with Client([dead.clients, lead.clients], timeout=4) as c:
        started = time.monotonic()
        ids = c.submit([{"scenario": "noop"}] * 2, idempotency_key="key-1")
        took = time.monotonic() - started
        assert ids == [1, 2] and c.endpoint == lead.clients
        assert 1.8 <= took < 3.9, took  # one try of max(1, 4/2) s at the silent one
        assert [b["idempotency_key"] for b in dead.got("SUBMIT")] == ["key-1"]
        assert [b["idempotency_key"] for b in lead.got("SUBMIT")] == ["key-1"]
        # Now at the leader: the next call goes there first.
        started = time.monotonic()
        assert c.nodes()[0]["name"] == "n1"
        assert time.monotonic() - started < 1.0
    # Every endpoint silent: one timeout naming them all, within the one deadline.
    other = fakes(silent)
    with Client([dead.clients, other.clients], timeout=2) as c:
        started = time.monotonic()
        with pytest.raises(ClientError) as err:
            c.list_jobs()
        took = time.monotonic() - started
    assert err.value.code == "timeout" and 1.9 <= took < 3.0, took
    assert err.value.text == (f"no reply from master at {dead.clients}, {other.clients} "
                              "within 2s")


@pytest.mark.parametrize("unsafe", ["RETRY", "SUBMIT without a key"])
def test_a_silent_endpoint_and_an_unsafe_request_times_out_and_is_never_resent(
        fakes: Callable[..., FakeMaster], unsafe: str) -> None:
    dead, lead = fakes(silent), fakes(leader)
    c = Client([dead.clients, lead.clients], timeout=1.5)
    try:
        started = time.monotonic()
        with pytest.raises(ClientError) as err:
            if unsafe == "RETRY":
                c.retry(5)
            else:
                c.submit([{"scenario": "noop"}])
        took = time.monotonic() - started
    finally:
        c.close()
    assert err.value.code == "timeout" and 1.4 <= took < 3.0, took
    assert dead.clients in err.value.text and lead.clients not in err.value.text
    command = unsafe.split()[0]
    assert len(dead.got(command)) == 1
    assert lead.received == [], "an unsafe request was sent to a second master"


def test_one_endpoint_times_out_as_it_always_did(fakes: Callable[..., FakeMaster]) -> None:
    dead = fakes(silent)
    with Client(dead.clients, timeout=1) as c, pytest.raises(ClientError) as err:
        c.info()
    assert err.value.text == f"no reply from master at {dead.clients} within 1s"


def test_stats_of_a_standby_is_asked_of_its_leader_when_listed(
        fakes: Callable[..., FakeMaster]) -> None:
    lead, stand = fakes(leader, epoch=9), fakes(standby)
    stand.leader = lead.me()
    with Client([stand.clients, lead.clients], timeout=3) as c:
        stats = c.stats()
        assert stats["role"] == "leader" and stats["epoch"] == 9 and c.endpoint == lead.clients
    with Client(stand.clients, timeout=3) as c:  # the leader is not listed: the standby's view
        stats = c.stats()
        assert stats["role"] == "standby" and stats["leader"]["clients"] == lead.clients


# ---- the CLI -------------------------------------------------------------------------------


def test_cli_submit_always_sends_an_idempotency_key(fakes: Callable[..., FakeMaster]) -> None:
    lead = fakes(leader)
    for _ in range(2):
        proc = ffrtmp("--master", lead.clients, "--timeout", "5", "submit", "noop")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("submitted 1 job(s)"), proc.stdout
    keys = [b["idempotency_key"] for b in lead.got("SUBMIT")]
    assert len(keys) == 2 and keys[0] != keys[1], keys
    assert all(re.fullmatch(r"[0-9a-f]{32}:0", k) for k in keys), keys
    proc = ffrtmp("--master", lead.clients, "submit", "noop", "--idempotency-key", "mine")
    assert proc.returncode == 0, proc.stderr
    assert lead.got("SUBMIT")[-1]["idempotency_key"] == "mine:0"
    # Given a silent master first, the keyed SUBMIT is resent to the next: one set of jobs.
    dead = fakes(silent)
    proc = ffrtmp("--master", f"{dead.clients},{lead.clients}", "--timeout", "4",
                  "submit", "noop", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"ids": [1]}
    assert dead.got("SUBMIT")[0]["idempotency_key"] == lead.got("SUBMIT")[-1]["idempotency_key"]


def test_nodes_list_says_what_each_master_is(fakes: Callable[..., FakeMaster]) -> None:
    lead, stand, stand2, dead = (fakes(leader, epoch=7), fakes(standby), fakes(standby_info),
                                 fakes(silent))
    stand.leader = stand2.leader = lead.me()
    masters = f"{stand.clients},{lead.clients},{stand2.clients},{dead.clients}"
    started = time.monotonic()
    proc = ffrtmp("--master", masters, "--timeout", "5", "nodes", "list")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 15
    lines = proc.stdout.splitlines()
    assert lines[:4] == [
        f"master {stand.clients}  standby (leader {lead.clients})",
        f"master {lead.clients}  leader  epoch 7",
        f"master {stand2.clients}  standby (leader {lead.clients})",
        f"master {dead.clients}  unreachable",
    ], lines
    assert lines[4].split()[:2] == ["NAME", "STATE"] and lines[5].split()[0] == "n1"

    proc = ffrtmp("--master", masters, "--timeout", "5", "nodes", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [n["name"] for n in out["nodes"]] == ["n1"]
    assert [(m["endpoint"], m["role"], m["epoch"]) for m in out["masters"]] == [
        (stand.clients, "standby", 7), (lead.clients, "leader", 7),
        (stand2.clients, "standby", 7), (dead.clients, "unreachable", None)]
    assert out["masters"][0]["leader"]["clients"] == lead.clients


# ---- EventFollower across a failover -----------------------------------------------------------


def _event(seq: int) -> dict[str, Any]:
    return {"seq": seq, "id": 1 + seq % 4, "at": 1.0 + seq, "from_state": "queued",
            "state": "running", "reason": None, "attempt": 1, "agent": "n1"}


def test_event_follower_moves_to_the_new_leaders_events_endpoint(
        fakes: Callable[..., FakeMaster]) -> None:
    log: list[dict[str, Any]] = []  # the shared store: seqs continue across leaders
    a = fakes(leader, epoch=1, log=log)
    b = fakes(standby, epoch=2, log=log)
    b.leader = a.me()
    client = Client([a.clients, b.clients], timeout=2)
    follower = EventFollower(client, a.events)  # after: INFO's head (0)
    got: list[dict[str, Any]] = []
    try:
        def drive(fake: FakeMaster, upto: int, streamed: Callable[[], bool]) -> None:
            """Commit and publish one event at a time on `fake` until `upto` is delivered."""

            def step() -> bool:
                if not log or log[-1]["seq"] < upto:
                    log.append(_event(len(log) + 1))
                    fake.publish([log[-1]])
                got.extend(follower.poll(0.05))
                return bool(got) and got[-1]["seq"] >= upto and streamed()

            wait_for(step, 20, interval=0.01, message=f"events up to {upto} via {fake.events}")

        drive(a, 20, lambda: len(got) > follower.replayed)  # some over a's stream
        assert b.events not in follower.sub.endpoints

        # Failover: a goes silent (its PUB too), b leads; a's stale PUB repeats old events.
        a.handler, b.handler = silent, leader
        a.publish(log[:5])
        replayed, delivered = follower.replayed, len(got)
        drive(b, 60, lambda: len(got) - delivered > follower.replayed - replayed)
        assert client.endpoint == b.clients
        assert b.events in follower.sub.endpoints and b.got("INFO"), "not resolved again"
        assert follower.replayed > replayed, "the gap after the failover was not read back"
        a.publish(log[:30])  # still nothing twice
        got.extend(follower.poll(0.3))
        seqs = [e["seq"] for e in got]
        assert seqs == list(range(1, len(log) + 1)), seqs  # each once, in seq order
    finally:
        follower.close()
        client.close()
