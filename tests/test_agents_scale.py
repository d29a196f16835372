"""Many agents, stepped without sockets: a loop turn's work does not grow with idle agents.

Before, every turn walked every connection twice (liveness and DONE_ACKs) whatever happened
in it, so 5,000 idle agents cost the master O(agents) per message. Now liveness looks at a
connection only when its deadline comes (about once per heartbeat interval) and DONE_ACKs go to
the connections that got a DONE this turn. What must not change: a silent agent is declared
lost in time (the first turn past heartbeat x liveness), live ones get their heartbeats, and
progress is written once per flush, for the jobs whose figures changed only.
"""

from __future__ import annotations

import random
from typing import Any

from prometheus_client import CollectorRegistry

from bus.codec import Message, decode
from bus.schemas import MASTER_TO_AGENT
from master import state as sm
from master.config import MasterConfig
from master.core import MasterCore
from master.metrics import MasterMetrics
from master.scheduler import Job
from test_limits_master import msg, submit

HELLO = {"slots": 2, "workloads": ["sleep"], "resources": {"cpus": 1.0}}
TICK = 0.05  # the server's longest poll: a turn at least this often


def new_core() -> MasterCore:
    return MasterCore(MasterConfig(db_url="sqlite://"), 1, MasterMetrics(CollectorRegistry()),
                      random.Random(1))


def ident(i: int) -> bytes:
    return f"a{i}/0001".encode()


def register(core: MasterCore, n: int, now: float = 0.0) -> None:
    for i in range(n):
        core.on_agent(ident(i), msg("HELLO", name=f"a{i}", **HELLO), now, 1000.0 + now)
    core.take_output()


def one_job_on(core: MasterCore, i: int, seconds: float, now: float) -> Job:
    """Agent i grants one credit and is handed one sleep job (its JOB taken out)."""
    core.on_agent(ident(i), msg("CREDIT", n=1), now, 1000.0 + now)
    job = submit(core, {"scenario": "sleep", "params": {"seconds": seconds}})
    core.dispatch(now, 1000.0 + now)
    core.take_output()
    assert job.agent == f"a{i}"
    return job


def turn(core: MasterCore, now: float) -> tuple[list[tuple[bytes, Message]], Any]:
    """The core's part of a server turn with no message in: tick, flush_acks, output."""
    core.tick(now, 1000.0 + now)
    core.flush_acks()
    batch, out, _ = core.take_output()
    return [(who, decode(frames, MASTER_TO_AGENT)) for kind, who, frames in out
            if kind == "agent"], batch


def test_a_turn_looks_at_no_idle_agent_until_its_deadline() -> None:
    core = new_core()
    register(core, 5000)
    visited = core.agents.visited
    for k in range(1, 19):  # 18 turns within the first heartbeat interval: nothing is due
        sent, _ = turn(core, k * TICK)
        assert not sent
    assert core.agents.visited == visited  # not 18 x 5,000 connections: none

    # Over the next 4 s of turns (the heartbeat and dead windows pass) every agent talks once
    # a second: each connection is looked at about once per heartbeat interval, not per turn.
    turns, heartbeats, now = 0, 0, 0.95
    while now < 5.0:
        now += TICK
        if int(now * 1000) % 1000 < 50:  # every agent heartbeats once a second
            for i in range(5000):
                core.on_agent(ident(i), msg("HEARTBEAT", credit=0), now, 1000.0 + now)
        sent, _ = turn(core, now)
        heartbeats += sum(1 for _, m in sent if m.command == "HEARTBEAT")
        turns += 1
    looked = core.agents.visited - visited
    assert len(core.agents) == 5000  # nobody declared lost
    assert heartbeats == 4 * 5000  # our own heartbeat to each, once a second
    assert looked <= 5 * 5000  # about once per connection per second, not once per turn
    assert turns * 5000 > 10 * looked


def test_done_acks_visit_only_the_agents_that_sent_a_done() -> None:
    core = new_core()
    register(core, 5000)
    job = one_job_on(core, 7, 5, 0.1)
    visited = core.agents.visited
    core.on_agent(ident(7), msg("DONE", id=job.id, attempt=job.attempt, status="completed",
                                duration_s=1.0), 0.2, 1000.2)
    sent, _ = turn(core, 0.2)
    assert [(who, m.command, m["acks"]) for who, m in sent] == \
        [(ident(7), "DONE_ACK", [[job.id, job.attempt]])]
    assert core.agents.visited - visited == 1
    sent, _ = turn(core, 0.25)  # acked once: nothing again
    assert not sent


def test_an_agent_dropped_before_its_done_ack_gets_none() -> None:
    core = new_core()
    register(core, 2)
    job = one_job_on(core, 0, 5, 0.1)
    core.on_agent(ident(0), msg("DONE", id=job.id, attempt=job.attempt, status="completed",
                                duration_s=1.0), 0.2, 1000.2)
    core.on_agent(ident(0), msg("BYE"), 0.2, 1000.2)
    sent, _ = turn(core, 0.2)
    assert not [m for _, m in sent if m.command == "DONE_ACK"]


def test_a_silent_agent_is_lost_on_the_first_turn_past_its_window() -> None:
    core = new_core()
    register(core, 1000)
    job = one_job_on(core, 3, 60, 0.0)
    dead_after = core.cfg.dead_after_s
    now, lost_at = 0.0, None
    while now < dead_after + 1.0 and lost_at is None:
        now = round(now + TICK, 6)
        for i in range(1000):  # everyone else keeps talking
            if i != 3:
                core.on_agent(ident(i), msg("HEARTBEAT"), now, 1000.0 + now)
        turn(core, now)
        if core.agents.named("a3") is None:
            lost_at = now
    assert lost_at is not None and dead_after < lost_at <= dead_after + TICK + 1e-9
    assert len(core.agents) == 999
    assert job.state == sm.QUEUED and job.agent is None  # requeued (agent_lost)


def test_a_live_agent_gets_a_heartbeat_each_interval_and_a_job_postpones_it() -> None:
    core = new_core()
    register(core, 1)
    beats: list[float] = []
    now = 0.0
    while now < 3.5:
        now = round(now + TICK, 6)
        core.on_agent(ident(0), msg("HEARTBEAT"), now, 1000.0 + now)
        if now == 1.5:  # a JOB to the agent counts as our message to it
            core.on_agent(ident(0), msg("CREDIT", n=1), now, 1000.0 + now)
            submit(core, {"scenario": "sleep", "params": {"seconds": 60}})
            assert core.dispatch(now, 1000.0 + now) == 1
        sent, _ = turn(core, now)
        beats += [now for _, m in sent if m.command == "HEARTBEAT"]
    assert beats == [1.0, 2.5, 3.5]


def running_jobs(core: MasterCore, n: int) -> list[Job]:
    core.on_agent(ident(0), msg("CREDIT", n=2), 0.0, 1000.0)
    core.on_agent(ident(1), msg("CREDIT", n=2), 0.0, 1000.0)
    jobs = [submit(core, {"scenario": "sleep", "params": {"seconds": 60}}) for _ in range(n)]
    core.dispatch(0.0, 1000.0)
    for job in jobs:
        who = ident(int((job.agent or "a0")[1:]))
        core.on_agent(who, msg("ACCEPT", id=job.id, attempt=job.attempt), 0.0, 1000.0)
    core.take_output()
    assert all(j.state == sm.RUNNING for j in jobs)
    return jobs


def progress(core: MasterCore, job: Job, value: float, now: float, **more: Any) -> None:
    who = ident(int((job.agent or "a0")[1:]))
    core.on_agent(who, msg("PROGRESS", id=job.id, attempt=job.attempt, progress=value,
                           bytes_in=int(value * 1000), bytes_out=int(value * 500), **more),
                  now, 1000.0 + now)


def test_progress_is_written_once_per_flush_for_the_changed_jobs_only() -> None:
    core = new_core()
    register(core, 2)
    j1, j2, j3, _ = running_jobs(core, 4)
    for k, value in enumerate((0.1, 0.2, 0.3)):
        progress(core, j1, value, 0.1 * k, fps=25.0, out_time_s=value * 100)
    progress(core, j2, 0.5, 0.3)
    batch, _, events = core.take_output()  # a turn without the flush: nothing written yet
    assert not batch.updates
    assert len([e for e in events if e[0].endswith(b".progress")]) == 4  # events at once
    core.flush_progress(1001.0)
    batch, _, _ = core.take_output()
    assert set(batch.updates) == {j1.id, j2.id}  # j3 sent nothing: not written
    row = batch.updates[j1.id]
    assert (row["progress"], row["bytes_in"], row["bytes_out"]) == (0.3, 300, 150)
    assert row["extra"]["fps"] == 25.0 and row["extra"]["out_time_s"] == 30.0
    assert row["extra"]["requires"] == j1.requires and row["updated_at"] == 1001.0
    assert batch.updates[j2.id]["progress"] == 0.5
    core.flush_progress(1002.0)  # nothing changed since: nothing written
    batch, _, _ = core.take_output()
    assert not batch.updates
    progress(core, j3, 0.7, 2.0)
    core.flush_progress(1003.0)
    batch, _, _ = core.take_output()
    assert set(batch.updates) == {j3.id}


def test_bad_progress_figures_are_refused_by_the_fast_path_as_before() -> None:
    core = new_core()
    register(core, 2)
    job = running_jobs(core, 1)[0]
    cases = [
        ({"bytes_in": -1}, "PROGRESS.bytes_in must be 0 to 2^63-1"),
        ({"bytes_out": 2**63}, "PROGRESS.bytes_out must be 0 to 2^63-1"),
        ({"fps": float("inf")}, "PROGRESS.fps must be a finite number"),
        ({"speed": float("nan")}, "PROGRESS.speed must be a finite number"),
        ({"out_time_s": float("-inf")}, "PROGRESS.out_time_s must be a finite number"),
        ({"reason": "a\x00b"}, "PROGRESS.reason must be storable (JSON, no NUL)"),
        ({"extra": {"x": float("nan")}}, "PROGRESS.extra must be storable (JSON, no NUL)"),
        ({"exit_code": 2**40}, "PROGRESS.exit_code must be a 32-bit integer"),
    ]
    who = ident(int((job.agent or "a0")[1:]))
    for fields, text in cases:
        body = {"id": job.id, "attempt": job.attempt, "progress": 0.5, "bytes_in": 1,
                "bytes_out": 1, **fields}
        core.on_agent(who, msg("PROGRESS", **body), 1.0, 1001.0)
        _, out, events = core.take_output()
        replies = [decode(f, MASTER_TO_AGENT) for _, _, f in out]
        assert [(m.command, m["code"], m["text"]) for m in replies] == \
            [("ERROR", "bad_body", text)], fields
        assert not events  # never published, never stored
    core.flush_progress(1002.0)
    batch, _, _ = core.take_output()
    assert not batch.updates and job.progress == 0.0
    progress(core, job, 1, 1.5, fps=30, speed=None)  # ints are numbers; nil is no figure
    core.flush_progress(1003.0)
    batch, _, _ = core.take_output()
    assert batch.updates[job.id]["progress"] == 1.0
