"""Master failover, the agent's side (issue 13, docs/protocol.md "Masters").

The rules, on the sans-I/O core with a fake clock: the agent keeps the highest epoch of a WELCOME
it accepted; a deposed leader's WELCOME (an older epoch) is refused and left for the next master;
its JOB, DONE_ACK and CANCEL are ignored, unanswered and counted; epoch 0 (a master without
epochs) is always accepted; a standby's `not_leader` sends the agent to the leader it names, or
back to the same endpoint after a backoff of 0.1 s doubling to 1 s, reset by a WELCOME. Then the
loop's choice of endpoint and `--master A,B` parsing, and one real agent process between two
test-owned ROUTERs standing in for a standby, a leader and a deposed leader.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from prometheus_client import CollectorRegistry, generate_latest

from agent.admission import Admission
from agent.cli import check_masters
from agent.config import AgentConfig
from agent.core import AgentCore, Identity, Prepare, Reconnect, Start, Stop, Timing
from agent.kinds import Finished, Ready
from agent.loop import pick_master
from agent.metrics import AgentMetrics
from agent.runner import Result
from bus import vocab
from bus.codec import Message, decode, encode
from bus.schemas import AGENT_TO_MASTER, MASTER_TO_AGENT
from conftest import free_ports, wait_for
from harness import stop_group
from inproc import FakeRun

ROOT = Path(__file__).resolve().parents[1]
STALE = "ffrtmp_agent_stale_master_messages_total"
SPEC: dict[str, Any] = {"scenario": "sleep", "params": {"seconds": 60}}


# ---- the core -----------------------------------------------------------------------------------


class Agent1:
    """One AgentCore with the real metrics as its observer, connected at t=0."""

    def __init__(self, tmp_path: Path) -> None:
        self.registry = CollectorRegistry()
        cfg = AgentConfig(work_dir=tmp_path, name="a1", slots=2, metrics=None)
        me = Identity(name="a1", instance="i-a1", version="test", slots=2, cpus=8.0,
                      memory_mb=16384.0, workloads=tuple(vocab.WORKLOADS), cgroup="none",
                      limits="best-effort")
        self.core = AgentCore(me, Admission(800.0, 16384.0, disk_floor_mb=0.0), Timing(),
                              AgentMetrics(self.registry, cfg, "test"))
        self.core.observe_disk(100_000.0)
        self.core.connected(0.0)
        self.core.take()

    def stale(self, command: str) -> float | None:
        return self.registry.get_sample_value(STALE, {"command": command})

    def send(self, command: str, now: float, **body: Any) -> tuple[list[str], list[Any]]:
        """The master's message through the real codec; (commands sent, actions) in answer."""
        self.core.message(decode(encode(command, body), MASTER_TO_AGENT), now)
        out, actions = self.core.take()
        return [c for c, _ in out], actions

    def welcome(self, epoch: int, now: float) -> tuple[list[str], list[Any]]:
        return self.send("WELCOME", now, heartbeat_s=1.0, liveness=3, master="m", epoch=epoch)

    def reconnect(self, now: float) -> list[tuple[str, dict[str, Any]]]:
        """The loop opened a new connection: what the core sends on it (HELLO)."""
        self.core.connected(now)
        return self.core.take()[0]

    def next_reconnect(self, now: float, step: float = 0.01,
                       limit: float = 10.0) -> tuple[Reconnect, float]:
        """Tick from `now` (the loop ticks in the same turn) until the core asks to reconnect:
        (that action, when). Nothing but Reconnect may be asked meanwhile."""
        for k in range(int(limit / step) + 1):
            t = now + k * step
            self.core.tick(t)
            out, actions = self.core.take()
            assert not [c for c, _ in out if c != "HEARTBEAT"], out
            if actions:
                assert len(actions) == 1 and isinstance(actions[0], Reconnect), actions
                return actions[0], t
        raise AssertionError(f"no Reconnect within {limit}s")


def test_an_older_epoch_welcome_is_refused_and_the_agent_moves_on(tmp_path: Path) -> None:
    a = Agent1(tmp_path)
    assert a.welcome(5, 0.1)[0] == ["CREDIT"] and a.core.epoch_seen == 5
    a.reconnect(1.0)  # the leader went away; a deposed one answers the next HELLO
    assert a.welcome(4, 1.1) == ([], [])  # no CREDIT: not registered
    assert not a.core.registered and a.core.epoch_seen == 5 and a.stale("WELCOME") == 1
    # What the deposed master says next neither counts nor keeps the connection alive.
    assert a.send("HEARTBEAT", 1.15) == ([], [])
    assert a.send("DRAIN", 1.15, on=True) == ([], []) and not a.core.draining
    a.core.tick(1.2)  # the next master at once
    assert a.core.take() == ([], [Reconnect(rotate=True)])
    # A second deposed leader in a row: left too, but after the backoff (no hot loop).
    a.reconnect(1.3)
    assert a.welcome(3, 1.3) == ([], [])
    hop, when = a.next_reconnect(1.3)
    assert hop == Reconnect(rotate=True) and when >= 1.3 + 0.1 - 1e-6
    assert a.stale("WELCOME") == 2


def test_a_stale_job_gets_no_answer_and_is_counted(tmp_path: Path) -> None:
    a = Agent1(tmp_path)
    a.welcome(5, 0.1)
    granted = a.core.granted
    assert a.send("JOB", 0.2, id=1, attempt=1, spec=SPEC, epoch=4) == ([], [])
    assert not a.core.attempts and a.core.granted == granted  # its credit is not used up
    assert a.stale("JOB") == 1
    sent: list[str] = []
    for k in range(1, 41):  # 2 s: only heartbeats (no ACCEPT, REJECT or DONE for it, ever)
        a.core.tick(0.2 + k * 0.05)
        out, actions = a.core.take()
        assert not actions
        sent += [c for c, _ in out]
    assert set(sent) == {"HEARTBEAT"}
    # The leader's JOB runs.
    _, actions = a.send("JOB", 2.3, id=1, attempt=1, spec=SPEC, epoch=5)
    assert [type(x) for x in actions] == [Prepare]


def test_a_stale_done_ack_leaves_the_result_for_the_next_master(tmp_path: Path) -> None:
    a = Agent1(tmp_path)
    a.welcome(5, 0.1)
    a.send("JOB", 0.2, id=7, attempt=1, spec=SPEC, epoch=5)
    a.core.prepared(7, 1, Finished(Result(vocab.COMPLETED, None, 0, 0.5)), 0.3)
    assert [c for c, _ in a.core.take()[0]] == ["DONE"]
    assert a.send("DONE_ACK", 0.4, acks=[[7, 1]], epoch=4) == ([], [])
    assert (7, 1) in a.core.unacked and a.stale("DONE_ACK") == 1
    # The new leader hears of it in HELLO.results, and its ack counts.
    [(command, hello)] = a.reconnect(1.0)
    assert command == "HELLO"
    assert [(r["id"], r["attempt"], r["status"]) for r in hello["results"]] == \
        [(7, 1, vocab.COMPLETED)]
    a.welcome(6, 1.1)
    a.send("DONE_ACK", 1.2, acks=[[7, 1]], epoch=6)
    assert not a.core.unacked


def test_a_stale_cancel_is_ignored(tmp_path: Path) -> None:
    a = Agent1(tmp_path)
    a.welcome(5, 0.1)
    a.send("JOB", 0.2, id=3, attempt=1, spec=SPEC, epoch=5)
    a.core.prepared(3, 1, Ready(FakeRun(60.0)), 0.3)
    out, actions = a.core.take()
    assert [c for c, _ in out] == ["ACCEPT"] and [type(x) for x in actions] == [Start]
    assert a.send("CANCEL", 0.4, id=3, attempt=1, grace_s=0.0, reason="cancelled",
                  epoch=4) == ([], [])
    assert a.core.attempts[3].state == "running" and a.stale("CANCEL") == 1
    _, actions = a.send("CANCEL", 0.5, id=3, attempt=1, grace_s=0.0, reason="cancelled",
                        epoch=5)
    assert [type(x) for x in actions] == [Stop]


def test_epoch_0_an_old_master_is_always_accepted(tmp_path: Path) -> None:
    a = Agent1(tmp_path)
    a.welcome(5, 0.1)
    a.reconnect(1.0)
    assert a.welcome(0, 1.1)[0] == ["CREDIT"] and a.core.registered
    assert a.core.epoch_seen == 5
    _, actions = a.send("JOB", 1.2, id=4, attempt=1, spec=SPEC)  # no epoch key at all
    assert [type(x) for x in actions] == [Prepare]
    a.core.prepared(4, 1, Ready(run := FakeRun(60.0)), 1.3)
    a.core.take()
    _, actions = a.send("CANCEL", 1.4, id=4, attempt=1, grace_s=0.0, reason="cancelled",
                        epoch=0)
    assert [type(x) for x in actions] == [Stop]
    run.stop(1.4, 0.0)
    a.core.exited(4, 1, run.poll(1.5), 1.5)
    assert (4, 1) in a.core.unacked
    a.send("DONE_ACK", 1.6, acks=[[4, 1]], epoch=0)
    assert not a.core.unacked
    assert all(a.stale(c) == 0 for c in ("WELCOME", "JOB", "DONE_ACK", "CANCEL"))


def test_stale_counter_has_help_text(tmp_path: Path) -> None:
    text = generate_latest(Agent1(tmp_path).registry).decode()
    assert f"# HELP {STALE} Messages of a deposed master" in text
    assert f'{STALE}{{command="JOB"}} 0.0' in text  # every command shows before any counts


LEADER = {"agents": "tcp://127.0.0.1:7001", "clients": "tcp://127.0.0.1:7002",
          "events": "tcp://127.0.0.1:7003", "epoch": 9, "instance": "x"}


def test_not_leader_with_a_leader_sends_the_agent_there(tmp_path: Path) -> None:
    a = Agent1(tmp_path)
    a.welcome(5, 0.1)  # the leader stepped down: it answers our heartbeat not_leader
    assert a.send("ERROR", 1.0, code="not_leader", text="standby", leader=LEADER) == ([], [])
    assert not a.core.registered and a.core.granted == 0
    # A standby answers whatever else we sent the same way: nothing changes.
    a.send("ERROR", 1.0, code="not_leader", text="standby", leader=None)
    hop, when = a.next_reconnect(1.0)
    assert hop == Reconnect(to="tcp://127.0.0.1:7001") and when - 1.0 == pytest.approx(0.1)


def test_not_leader_without_a_leader_retries_the_same_master_backoff_capped_at_1s(
        tmp_path: Path) -> None:
    a = Agent1(tmp_path)
    now, delays = 0.0, []
    for _ in range(7):
        a.send("ERROR", now, code="not_leader", text="standby, no leader known", leader=None)
        hop, when = a.next_reconnect(now)
        assert hop == Reconnect()  # the same endpoint
        delays.append(when - now)
        now = when
        a.reconnect(now)
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0], abs=0.015)
    # Past two liveness windows (6 s) on standbys without a usable leader: the next master
    # too (one that cannot reach the database must not hold the agent for good).
    while True:
        a.send("ERROR", now, code="not_leader", text="standby, no leader known", leader=None)
        hop, when = a.next_reconnect(now)
        now = when
        a.reconnect(now)
        if hop != Reconnect():
            break
    assert hop == Reconnect(rotate=True) and 6.0 < now <= 7.6, (hop, now)
    a.send("ERROR", now, code="not_leader", text="standby, no leader known", leader=None)
    hop, when = a.next_reconnect(now)
    assert hop == Reconnect()  # the window starts again
    now = when
    a.reconnect(now)
    # A WELCOME resets it: the next not_leader is retried after 0.1 s again ...
    a.welcome(6, now)
    a.send("ERROR", now, code="not_leader", text="stepped down", leader=None)
    _, when = a.next_reconnect(now)
    assert when - now == pytest.approx(0.1, abs=0.015)
    # ... and a silent master is retried up to the usual 5 s again, not 1 s.
    now = when
    a.reconnect(now)
    a.welcome(6, now)
    delays = []
    for _ in range(5):
        hop, when = a.next_reconnect(now)
        assert hop == Reconnect(rotate=True)  # silence: the next master
        delays.append(when - now - 3.0)  # heartbeat 1 s x liveness 3, then the backoff
        now = when
        a.reconnect(now)
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6], abs=0.03)


# ---- the loop's choice of endpoint, the CLI, the config -----------------------------------------

A, B, C = "tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002", "tcp://127.0.0.1:7003"


def test_the_next_endpoint_follows_the_reconnect_action() -> None:
    ms = (A, B, C)
    assert pick_master(ms, 0, Reconnect()) == (0, True)
    assert pick_master(ms, 1, Reconnect(rotate=True)) == (2, True)
    assert pick_master(ms, 2, Reconnect(rotate=True)) == (0, True)  # round robin
    assert pick_master((A,), 0, Reconnect(rotate=True)) == (0, True)
    assert pick_master(ms, 0, Reconnect(to=C)) == (2, True)
    assert pick_master(ms, 0, Reconnect(to="127.0.0.1:7002")) == (1, True)  # HOST:PORT too
    # Never an endpoint the operator did not give: the same one, flagged for the log.
    assert pick_master(ms, 1, Reconnect(to="tcp://10.9.9.9:5555")) == (1, False)
    assert pick_master(ms, 1, Reconnect(to="not an endpoint")) == (1, False)
    # A standby naming the master just left for its silence (its lease is not out yet): the
    # standby is tried again, it is about to lead.
    assert pick_master(ms, 1, Reconnect(to=A), avoid=A) == (1, True)
    assert pick_master(ms, 1, Reconnect(to=C), avoid=A) == (2, True)
    # A standby stuck without a usable leader (rotate set by the core): the next master.
    assert pick_master(ms, 1, Reconnect(to="tcp://10.9.9.9:5555", rotate=True)) == (2, False)
    assert pick_master(ms, 1, Reconnect(to=None, rotate=True)) == (2, True)


def test_master_takes_a_comma_separated_list_each_checked() -> None:
    assert check_masters("127.0.0.1:7001,tcp://127.0.0.1:7002,127.0.0.1:7001", None, False) \
        == (A, B)
    with pytest.raises(SystemExit, match="refusing to connect to tcp://192.0.2.1:5555 without"):
        check_masters(f"{A},tcp://192.0.2.1:5555", None, False)  # the second one too
    assert check_masters(f"{A},192.0.2.1:5555", None, True) == (A, "tcp://192.0.2.1:5555")
    with pytest.raises(SystemExit, match="expected tcp://HOST:PORT"):
        check_masters(f"{A},", None, False)


def test_config_master_and_masters_agree(tmp_path: Path) -> None:
    one = AgentConfig(work_dir=tmp_path, master=A)
    assert (one.master, one.masters) == (A, (A,))
    two = AgentConfig(work_dir=tmp_path, masters=(B, C))
    assert (two.master, two.masters, two.endpoints) == (B, (B, C), (B, C))


# ---- a real agent process between test-owned masters -------------------------------------------


class Router:
    """A test-owned ROUTER standing in for one master process."""

    def __init__(self, ctx: zmq.Context, ep: str) -> None:
        self.ep = ep
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        wait_for(self._bind, 5, message=f"bound {ep} again")  # its port was just closed

    def _bind(self) -> bool:
        try:
            self.sock.bind(self.ep)
        except zmq.ZMQError:
            return False
        return True

    def recv(self, timeout: float) -> tuple[bytes, Message] | None:
        if not self.sock.poll(max(0, int(timeout * 1000))):
            return None
        ident, *frames = self.sock.recv_multipart()
        return ident, decode(frames, AGENT_TO_MASTER)

    def send(self, ident: bytes, command: str, **body: Any) -> None:
        self.sock.send_multipart([ident, *encode(command, body)])

    def close(self) -> None:
        self.sock.close(linger=0)


def _until(router: Router, command: str, timeout: float, log: Path) -> tuple[bytes, Message]:
    deadline, seen = time.monotonic() + timeout, []
    while (left := deadline - time.monotonic()) > 0:
        got = router.recv(left)
        if got is None:
            break
        seen.append(got[1].command)
        if got[1].command == command:
            return got
    raise AssertionError(f"no {command} at {router.ep} within {timeout}s (saw {seen})\n"
                         + log.read_text(errors="replace")[-3000:])


def test_a_real_agent_follows_the_leader_and_leaves_a_deposed_one(tmp_path: Path) -> None:
    p1, p2 = free_ports(2)
    ep1, ep2 = f"tcp://127.0.0.1:{p1}", f"tcp://127.0.0.1:{p2}"
    log = tmp_path / "agent.log"
    ctx = zmq.Context()
    routers: list[Router] = []

    def master(ep: str) -> Router:
        routers.append(Router(ctx, ep))
        return routers[-1]

    env = {**os.environ, "PYTHONPATH": str(ROOT), "FFRTMP_LOG": "info"}
    env.pop("FFRTMP_MASTER", None)
    standby, leader = master(ep1), master(ep2)
    with open(log, "ab") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "ffrtmp", "agent", "--master", f"{ep1},{ep2}", "--name",
             "a1", "--work-dir", str(tmp_path / "work"), "--metrics", "off", "--cgroup", "none",
             "--limits", "best-effort", "--stop-grace", "0"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        # The first endpoint is a standby: it names the leader, and the agent goes there.
        ident, hello = _until(standby, "HELLO", 30, log)
        standby.send(ident, "ERROR", code="not_leader", text="this master is a standby",
                     leader={"agents": ep2, "clients": "tcp://127.0.0.1:1",
                             "events": "tcp://127.0.0.1:2", "epoch": 5, "instance": "m2"})
        ident2, hello2 = _until(leader, "HELLO", 5, log)
        assert hello2["instance"] == hello["instance"]  # the same process
        leader.send(ident2, "WELCOME", heartbeat_s=0.2, liveness=3, master="m2", epoch=5)
        _until(leader, "CREDIT", 5, log)  # registered with the leader of epoch 5
        # The leader dies; a deposed leader of epoch 4 is back on the first endpoint.
        leader.close()
        standby.close()
        deposed = master(ep1)
        ident3, _ = _until(deposed, "HELLO", 10, log)  # silence: the next endpoint
        back = master(ep2)  # a new process on the second endpoint, before the old WELCOME
        deposed.send(ident3, "WELCOME", heartbeat_s=0.2, liveness=3, master="m1", epoch=4)
        # The agent must leave the deposed leader (it keeps talking, as a live one would) for
        # the next endpoint, and never register with it.
        poller = zmq.Poller()
        poller.register(deposed.sock, zmq.POLLIN)
        poller.register(back.sock, zmq.POLLIN)
        from_deposed: list[str] = []
        hello4: Message | None = None
        deadline, next_hb = time.monotonic() + 10, 0.0
        while hello4 is None and time.monotonic() < deadline:
            if time.monotonic() >= next_hb:
                deposed.send(ident3, "HEARTBEAT")
                next_hb = time.monotonic() + 0.1
            ready = dict(poller.poll(50))
            while deposed.sock in ready and (got := deposed.recv(0)) is not None:
                if got[0] == ident3:
                    from_deposed.append(got[1].command)
            if back.sock in ready and (got := back.recv(0)) is not None \
                    and got[1].command == "HELLO":
                hello4 = got[1]
        assert hello4 is not None, (from_deposed, log.read_text(errors="replace")[-3000:])
        while (got := deposed.recv(0.2)) is not None:  # anything still on its way
            if got[0] == ident3:
                from_deposed.append(got[1].command)
        assert "CREDIT" not in from_deposed and "HEARTBEAT" not in from_deposed, from_deposed
        assert hello4["instance"] == hello["instance"]
        wait_for(lambda: "is a deposed leader" in log.read_text(errors="replace"), 5,
                 message="the agent said why it left")
        text = log.read_text(errors="replace")
        assert f"master {ep1} not_leader: following the leader to {ep2}" in text, text
        assert f"master {ep2} silent" in text and f"trying {ep1}" in text, text
    finally:
        stop_group(agent)
        for r in routers:
            r.close()
        ctx.term()
