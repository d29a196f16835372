"""The agent's protocol with the master, in process (tests/inproc.py): real cores, real codec,
a fake clock and fake processes. Each test runs in milliseconds."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus import vocab
from inproc import Cluster


def completions(c: Cluster, job_id: int) -> list[dict[str, Any]]:
    """DONE completed bodies the master acted on for a job (any attempt)."""
    return [b for b in c.sent("a>m", "DONE") if b["id"] == job_id and b["status"] == "completed"]


def test_jobs_run_within_slots_and_complete() -> None:
    c = Cluster()
    node = c.add_agent("a1", slots=2)
    ids = [c.submit({"scenario": "sleep", "params": {"seconds": 1}}) for _ in range(6)]
    most = 0

    def done() -> bool:
        nonlocal most
        most = max(most, len(node.core.attempts))
        return len(c.master.jobs) == 0

    c.run_until(done)
    assert [c.state(i) for i in ids] == ["completed"] * 6
    assert most == 2  # never more attempts than slots
    assert 3.0 <= c.now < 4.0  # 3 waves of 1 s on 2 slots: no idle turn between waves


def test_done_is_kept_until_acknowledged_and_resent() -> None:
    """A DONE lost on the way (a transport reconnect inside the liveness window) is sent again
    until DONE_ACK comes: the job does not stay running at the master."""
    c = Cluster(liveness=10)
    node = c.add_agent("a1", slots=1)
    job = c.submit({"scenario": "sleep", "params": {"seconds": 1}})
    c.run_until(lambda: c.state(job) == "running")
    c.cut("a1")
    c.run_until(lambda: bool(node.core.unacked))  # finished while its DONE went nowhere
    c.advance(0.5)
    c.heal("a1")
    assert c.state(job) == "running"
    c.run_until(lambda: c.state(job) == "completed", max_s=10)
    assert not node.core.unacked
    assert len(completions(c, job)) >= 2  # the first one was lost, a repeat got through


def test_master_restart_reclaims_running_attempts() -> None:
    """The master goes away (its socket gone): the agent reconnects with HELLO.running, which
    reaches the master when it is back; its attempt goes on and is never run twice."""
    c = Cluster()
    node = c.add_agent("a1", slots=1)
    job = c.submit({"scenario": "sleep", "params": {"seconds": 8}})
    c.run_until(lambda: c.state(job) == "running")
    c.master_down = True
    c.advance(4.0)  # past the agent's liveness window: it reconnects
    assert node.conn >= 1
    c.master_up()
    c.run_until(lambda: c.state(job) == "completed", max_s=20)
    hellos = c.sent("a>m", "HELLO", "a1")
    assert any(h["running"] == [{"id": job, "attempt": 1}] for h in hellos)
    assert c.job(job) is None and len(c.sent("m>a", "JOB")) == 1  # never run twice


def test_partitioned_agent_is_fenced_and_the_job_completes_once() -> None:
    c = Cluster()
    a1 = c.add_agent("a1", slots=1)
    job = c.submit({"scenario": "sleep", "params": {"seconds": 12}})
    c.run_until(lambda: c.state(job) == "running")
    first_run = a1.runs[(job, 1)]
    c.cut("a1")
    c.add_agent("a2", slots=1)
    c.run_until(lambda: c.job(job) is not None and c.job(job).agent == "a2"
                and c.state(job) == "running", max_s=10)
    c.heal("a1")  # a1 comes back with its stale attempt 1
    c.run_until(lambda: c.state(job) == "completed", max_s=20)
    acted = [b for d, n, cmd, b in c.log if d == "m>a" and cmd == "CANCEL" and n == "a1"]
    assert any(b["reason"] == vocab.FENCED and b["attempt"] == 1 for b in acted)
    assert first_run.termed_at is not None  # the stale attempt was stopped on a1
    assert not a1.core.attempts
    finals = [b for d, n, cmd, b in c.log if d == "a>m" and cmd == "DONE" and n == "a2"]
    assert [b["attempt"] for b in finals if b["status"] == "completed"][:1] == [2]


def test_drain_stops_credit_and_refuses_jobs() -> None:
    c = Cluster()
    node = c.add_agent("a1", slots=2)
    c.master.agents.drain("a1", True, None, c.wall)
    c.pump()
    assert node.core.draining
    credits_before = len(c.sent("a>m", "CREDIT", "a1"))
    job = c.submit({"scenario": "sleep", "params": {"seconds": 1}})
    c.advance(2.0)
    assert c.state(job) == "queued"
    assert len(c.sent("a>m", "CREDIT", "a1")) == credits_before
    c.master.agents.drain("a1", False, None, c.wall)
    c.run_until_idle()
    assert c.state(job) == "completed"


def test_cancel_while_preparing_never_starts_a_process() -> None:
    c = Cluster()
    node = c.add_agent("a1", slots=1)
    node.prepare_later = True
    job = c.submit({"scenario": "sleep", "params": {"seconds": 5}})
    c.run_until(lambda: bool(node.pending_prepares))
    c.master.cancel(c.job(job), 5.0, c.now, c.wall)
    c.pump()
    c.release_prepares()
    c.run_until(lambda: c.state(job) == "cancelled", max_s=5)
    assert not node.runs and not c.sent("a>m", "ACCEPT")
    done = c.sent("a>m", "DONE")[-1]
    assert (done["status"], done["reason"]) == ("cancelled", vocab.CANCELLED_GRACEFUL)


def test_cancel_that_loses_the_race_keeps_the_result() -> None:
    c = Cluster()
    c.add_agent("a1", slots=1)
    job = c.submit({"scenario": "sleep", "params": {"seconds": 1}})
    c.run_until(lambda: c.state(job) == "running")
    c.advance(1.0, step=1.0)  # the child exited; its DONE is on the way
    c.run_until(lambda: c.state(job) != "running", max_s=2)
    assert c.state(job) == "completed"


def test_refused_job_is_requeued_uncharged() -> None:
    c = Cluster()
    c.add_agent("a1", slots=1)
    job = c.submit({"scenario": "burn", "params": {"cpu_seconds": 1}, "max_attempts": 1})
    c.advance(0.2)
    rejects = c.sent("a>m", "REJECT")
    assert rejects and rejects[0]["reason"] == "burn not supported here"
    j = c.job(job)
    assert j is not None and j.rejects >= 1 and j.attempt - j.rejects == 0


def test_shutdown_lets_jobs_finish_within_the_grace_then_hands_the_rest_back() -> None:
    c = Cluster()
    a1 = c.add_agent("a1", slots=2, stop_grace_s=3.0)
    short = c.submit({"scenario": "sleep", "params": {"seconds": 1}, "max_attempts": 1})
    long = c.submit({"scenario": "sleep", "params": {"seconds": 60}, "max_attempts": 1})
    c.run_until(lambda: c.state(short) == "running" and c.state(long) == "running")
    a1.core.shutdown(c.now)
    c.pump()
    c.run_until(lambda: a1.core.finished, max_s=10)
    assert c.state(short) == "completed"  # finished within the grace: its DONE counts
    j = c.job(long)
    assert j is not None and j.state == "queued"  # handed back, and not charged:
    assert j.attempt - j.rejects == 0  # max_attempts 1 and still runnable
    back = [b for b in c.sent("a>m", "REJECT", "a1") if b["id"] == long]
    assert back and back[0]["reason"] == vocab.AGENT_SHUTDOWN
    c.add_agent("a2", slots=1)
    c.run_until(lambda: c.state(long) == "completed", max_s=120)


def test_second_shutdown_stops_at_once() -> None:
    c = Cluster()
    a1 = c.add_agent("a1", slots=1, stop_grace_s=30.0)
    job = c.submit({"scenario": "sleep", "params": {"seconds": 60}})
    c.run_until(lambda: c.state(job) == "running")
    a1.core.shutdown(c.now)
    c.advance(1.0)
    assert a1.core.attempts  # still running inside the grace
    a1.core.shutdown(c.now)
    c.run_until(lambda: a1.core.finished, max_s=5)
    assert c.state(job) == "queued"


def test_new_jobs_during_shutdown_are_refused_uncharged() -> None:
    c = Cluster()
    a1 = c.add_agent("a1", slots=2, stop_grace_s=30.0)
    running = c.submit({"scenario": "sleep", "params": {"seconds": 60}})
    c.run_until(lambda: c.state(running) == "running")
    a1.core.shutdown(c.now)
    c.pump()
    credits = len(c.sent("a>m", "CREDIT", "a1"))
    late = c.submit({"scenario": "sleep", "params": {"seconds": 1}})
    c.advance(1.0)
    assert len(c.sent("a>m", "CREDIT", "a1")) == credits  # no credit while stopping
    # The credit granted before the stop may still bring a JOB: refused, not charged.
    j = c.job(late)
    assert j is not None and j.state == "queued" and j.attempt - j.rejects == 0


def test_unknown_job_shapes_end_that_job_only() -> None:
    """A JOB whose spec the agent cannot read ends that attempt with invalid_input; the agent
    keeps serving the next one."""
    c = Cluster()
    node = c.add_agent("a1", slots=1)
    # As a tampered master would send it (the master itself never stores this).
    node.core.message(_job_msg(99, 1, {"scenario": "sleep",
                                       "resource_limits": {"max_memory_mb": "lots"}}), c.now)
    out, _ = node.core.take()
    done = [b for cmd, b in out if cmd == "DONE"]
    assert done and done[0]["reason"] == vocab.INVALID_INPUT
    job = c.submit({"scenario": "sleep", "params": {"seconds": 1}})
    c.run_until(lambda: c.state(job) == "completed")


def _job_msg(job_id: int, attempt: int, spec: dict[str, Any]) -> Any:
    from bus.codec import decode, encode
    from bus.schemas import MASTER_TO_AGENT

    return decode(encode("JOB", {"id": job_id, "attempt": attempt, "spec": spec}),
                  MASTER_TO_AGENT)


# ---- property: any interleaving of faults -----------------------------------------------------

STEP = st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 3), st.floats(0.1, 3.0)),
    st.tuples(st.just("advance"), st.floats(0.05, 5.0)),
    st.tuples(st.just("cut"), st.sampled_from(["a1", "a2"])),
    st.tuples(st.just("heal"), st.sampled_from(["a1", "a2"])),
    st.tuples(st.just("kill"), st.sampled_from(["a1", "a2"])),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("drain"), st.sampled_from(["a1", "a2"]), st.booleans()),
    st.tuples(st.just("master_down"), st.booleans()),
    st.tuples(st.just("stop"), st.sampled_from(["a1", "a2"])),
)


@settings(max_examples=int(os.environ.get("FFRTMP_PROPERTY_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STEP, min_size=1, max_size=25))
def test_any_interleaving_ends_every_job_once(steps: list[tuple[Any, ...]]) -> None:
    """Whatever happens (partitions, kill -9 and restart, a silent master, cancels, drains,
    agent shutdowns), once the faults stop every job ends exactly once in the audit trail, and
    no agent ever holds more attempts than its slots."""
    c = Cluster()
    for name in ("a1", "a2"):
        c.add_agent(name, slots=2, stop_grace_s=1.0)
    ids: list[int] = []
    for step in steps:
        kind = step[0]
        if kind == "submit":
            for _ in range(step[1] + 1):
                ids.append(c.submit({"scenario": "sleep", "params": {"seconds": step[2]}}))
        elif kind == "advance":
            c.advance(step[1], step=0.1)
        elif kind == "cut":
            c.cut(step[1])
        elif kind == "heal":
            c.heal(step[1])
        elif kind == "kill":
            c.kill_agent(step[1])
            c.restart_agent(step[1], stop_grace_s=1.0)
        elif kind == "cancel" and ids:
            job = c.job(ids[step[1] % len(ids)])
            if job is not None:
                c.master.cancel(job, 0.5, c.now, c.wall)
        elif kind == "drain":
            c.master.agents.drain(step[1], step[2], None, c.wall)
        elif kind == "master_down":
            if step[1]:
                c.master_down = True
            else:
                c.master_up()
        elif kind == "stop":
            c.nodes[step[1]].core.shutdown(c.now)
        c.pump()
        for node in c.nodes.values():
            assert len(node.core.attempts) <= node.core.me.slots
    # Faults end: the network heals, the master is up, stopped agents come back.
    c.master_up()
    for name, node in list(c.nodes.items()):
        node.up = True
        if node.core.finished or node.core.stopping:
            c.kill_agent(name)
            c.restart_agent(name, stop_grace_s=1.0)
        c.master.agents.drain(name, False, None, c.wall)
    c.run_until_idle(max_s=300, step=0.1)
    for job_id in ids:
        assert c.state(job_id) in vocab.TERMINAL
        # Exactly one terminal transition in the audit trail (an attempt may have run on a
        # partitioned agent too: at-least-once execution, exactly-once completion).
        ends = [e for state in vocab.TERMINAL for e in c.transitions(job_id, state)]
        assert len(ends) == 1, ends
