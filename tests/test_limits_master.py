"""The master's side of resource enforcement, stepped with a fake clock (no sockets):
requirements with '+', placement by advertised size, the timeout backstop, cancel vs DONE."""

from __future__ import annotations

import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from bus.codec import Message, decode, encode
from bus.schemas import AGENT_TO_MASTER, MASTER_TO_AGENT
from master import state as sm
from master.agents import AgentConn
from master.backstop import CANCEL, GIVE_UP, Backstop
from master.config import MasterConfig
from master.core import MasterCore
from master.metrics import MasterMetrics
from master.scheduler import Job
from master.spec import limit_requirements, validate_spec

IDENT = b"a1/0001"


def msg(command: str, **body: Any) -> Message:
    return decode(encode(command, body), AGENT_TO_MASTER)


def core_with_agent(margin: float = 10.0, **hello: Any) -> MasterCore:
    core = MasterCore(MasterConfig(db_url="sqlite://", timeout_margin_s=margin), 1,
                      MasterMetrics(CollectorRegistry()), random.Random(1))
    body = {"name": "a1", "slots": 4, "workloads": ["sleep", "burn", "hog"],
            "resources": {"cpus": 2.0, "memory_mb": 8192, "disk_mb": 50_000},
            "cgroup": "v1", "limits": "required", **hello}
    core.on_agent(IDENT, msg("HELLO", **body), 0.0, 1000.0)
    core.on_agent(IDENT, msg("CREDIT", n=4), 0.0, 1000.0)
    core.take_output()
    return core


def submit(core: MasterCore, raw: dict[str, Any], now: float = 0.0) -> Job:
    v = validate_spec({"max_attempts": 3, **raw})
    job = core.jobs.get(core.jobs.create(v.spec, v.priority, v.requires, None, now, 1000.0))
    assert job is not None
    return job


def sent(core: MasterCore) -> list[Message]:
    _, outbox, _ = core.take_output()
    return [decode(frames, MASTER_TO_AGENT) for kind, _, frames in outbox if kind == "agent"]


# ----------------------------------------------------------------------- requirements, placement


def test_limit_requirements() -> None:
    assert limit_requirements({}) == ""
    assert limit_requirements({"max_disk_mb": 500}) == ""  # the agent itself watches disk
    assert limit_requirements({"max_cpu_percent": 150, "max_memory_mb": 512}) == \
        "+limits+cpu>=150+mem>=512"
    v = validate_spec({"scenario": "burn", "resource_limits": {"max_memory_mb": 256}})
    assert v.requires == "workload:burn+limits+mem>=256"


def conn(caps: set[str], cpus: float = 2.0, memory_mb: int = 8192) -> AgentConn:
    return AgentConn(ident=b"x", name="x", slots=1, caps=frozenset(caps),
                     info={"resources": {"cpus": cpus, "memory_mb": memory_mb}},
                     last_seen=0.0, last_sent=0.0)


@pytest.mark.parametrize(("requirement", "ok"), [
    ("workload:sleep", True),
    ("workload:sleep+limits", True),
    ("workload:sleep+limits+cpu>=200+mem>=8192", True),
    ("workload:sleep+limits+cpu>=201", False),
    ("workload:sleep+limits+mem>=16384", False),
    ("workload:burn", False),
    ("workload:sleep+encoder:libx264", False),
    ("workload:sleep+disk>=1", False),  # an unknown floor never matches
    ("workload:sleep+mem>=lots", False),
])
def test_can_run_needs_every_part(requirement: str, ok: bool) -> None:
    assert conn({"workload:sleep", "limits"}).can_run(requirement) is ok


def test_limits_capability_follows_cgroup_and_policy() -> None:
    for cgroup, policy, has in (("v1", "required", True), ("v2", "best-effort", True),
                                ("none", "best-effort", True), ("none", "required", False)):
        core = core_with_agent(cgroup=cgroup, limits=policy)
        assert ("limits" in core.agents.get(IDENT).caps) is has


def test_a_job_bigger_than_the_agent_is_not_sent_there() -> None:
    core = core_with_agent()
    big = submit(core, {"scenario": "sleep", "resource_limits": {"max_memory_mb": 16384}})
    small = submit(core, {"scenario": "sleep", "resource_limits": {"max_memory_mb": 4096}})
    assert core.dispatch(0.0, 1000.0) == 1
    assert (big.state, small.state) == (sm.QUEUED, sm.ASSIGNED)
    core_none = core_with_agent(cgroup="none", limits="required")
    limited = submit(core_none, {"scenario": "sleep", "resource_limits": {"max_cpu_percent": 50}})
    assert core_none.dispatch(0.0, 1000.0) == 0 and limited.state == sm.QUEUED


def test_reject_for_resources_requeues_at_the_head_without_charging() -> None:
    core = core_with_agent()
    job = submit(core, {"scenario": "sleep"})
    later = submit(core, {"scenario": "sleep"})
    core.dispatch(0.0, 1000.0)
    core.on_agent(IDENT, msg("REJECT", id=job.id, attempt=1, reason="resources"), 0.1, 1000.1)
    assert (job.state, job.attempt, job.rejects) == (sm.QUEUED, 1, 1)
    assert sm.attempts_left(sm.Core(job.state, job.attempt, job.max_attempts, job.rejects)) == 3
    assert core.jobs.sched.pick(lambda r: True, 0.2) is job and later.state == sm.ASSIGNED


# ----------------------------------------------------------------------- timeout backstop


def test_backstop_stages() -> None:
    b = Backstop(margin_s=10)
    b.arm(1, 1, timeout_s=5, now=0)
    b.started(1, 1, now=2)  # counts from the process start
    assert b.expired(16.9) == []
    assert b.expired(17) == [(1, 1, CANCEL)] and b.cancelled(1, 1)
    assert b.expired(26.9) == []
    assert b.expired(27) == [(1, 1, GIVE_UP)] and len(b) == 0
    b.arm(2, 1, 5, 0)
    b.forget(2)
    assert b.expired(100) == []


def running_job(core: MasterCore, timeout: float) -> Job:
    job = submit(core, {"scenario": "sleep", "params": {"seconds": 600}, "timeout_s": timeout})
    core.dispatch(0.0, 1000.0)
    core.on_agent(IDENT, msg("ACCEPT", id=job.id, attempt=1), 1.0, 1001.0)
    assert job.state == sm.RUNNING
    sent(core)
    return job


def heartbeat(core: MasterCore, now: float) -> None:
    core.on_agent(IDENT, msg("HEARTBEAT"), now, 1000.0 + now)


def test_backstop_cancels_then_times_out_a_job_its_live_agent_does_not_end() -> None:
    core = core_with_agent(margin=10.0)
    job = running_job(core, timeout=5)
    for now in (2.0, 4.0, 8.0, 12.0, 15.9):
        heartbeat(core, now)
        core.tick(now, 1000.0 + now)
    assert not [m for m in sent(core) if m.command == "CANCEL"]
    heartbeat(core, 16.0)
    core.tick(16.0, 1016.0)  # 1 s started + 5 s timeout + 10 s margin
    cancels = [m for m in sent(core) if m.command == "CANCEL"]
    assert [(m["id"], m["attempt"], m["reason"]) for m in cancels] == [(job.id, 1, "timeout")]
    assert job.state == sm.RUNNING
    for now in (18.0, 22.0, 25.9):
        heartbeat(core, now)
        core.tick(now, 1000.0 + now)
    assert job.state == sm.RUNNING
    heartbeat(core, 26.0)
    core.tick(26.0, 1026.0)
    assert job.id not in core.jobs  # terminal
    batch, outbox, _ = core.take_output()
    assert any(e["to_state"] == sm.TIMED_OUT and e["reason"] == "timeout" for e in batch.events)
    fenced = [decode(f, MASTER_TO_AGENT) for _, _, f in outbox]
    assert [(m["id"], m["reason"]) for m in fenced if m.command == "CANCEL"] == \
        [(job.id, "fenced")]
    # The agent's late DONE for that attempt changes nothing.
    core.on_agent(IDENT, msg("DONE", id=job.id, attempt=1, status="completed"), 27.0, 1027.0)
    assert job.id not in core.jobs


def test_backstop_cancel_answered_by_the_agent_ends_timed_out() -> None:
    core = core_with_agent(margin=10.0)
    job = running_job(core, timeout=5)
    heartbeat(core, 16.0)
    core.tick(16.0, 1016.0)
    assert [m["reason"] for m in sent(core) if m.command == "CANCEL"] == ["timeout"]
    # An agent that treats every CANCEL as a cancel still ends up timed_out, not cancelled.
    core.on_agent(IDENT, msg("DONE", id=job.id, attempt=1, status="cancelled",
                             reason="cancelled_forced"), 16.5, 1016.5)
    batch, _, _ = core.take_output()
    assert [(e["to_state"], e["reason"]) for e in batch.events] == [(sm.TIMED_OUT, "timeout")]


def test_jobs_without_timeout_or_done_in_time_are_left_alone() -> None:
    core = core_with_agent(margin=1.0)
    job = running_job(core, timeout=5)
    core.on_agent(IDENT, msg("DONE", id=job.id, attempt=1, status="completed"), 3.0, 1003.0)
    untimed = submit(core, {"scenario": "sleep", "params": {"seconds": 600}})
    core.dispatch(3.0, 1003.0)
    core.on_agent(IDENT, msg("ACCEPT", id=untimed.id, attempt=1), 3.0, 1003.0)
    sent(core)
    for now in (10.0, 20.0, 100.0):
        heartbeat(core, now)
        core.tick(now, 1000.0 + now)
    assert not [m for m in sent(core) if m.command == "CANCEL"]
    assert untimed.state == sm.RUNNING and len(core.jobs.backstop) == 0


def test_an_assignment_never_answered_is_requeued_uncharged_and_fenced() -> None:
    """A JOB lost in transit (the agent never saw it): found by the in-process property test,
    the job stayed `assigned` for ever while the agent went on heartbeating."""
    core = core_with_agent()
    job = submit(core, {"scenario": "sleep", "params": {"seconds": 1}})
    core.dispatch(1.0, 1001.0)
    sent(core)
    for now in (30.0, 61.5):
        heartbeat(core, now)
        core.tick(now, 1000.0 + now)
    assert job.state == sm.QUEUED and job.attempt - job.rejects == 0
    fences = [m for m in sent(core) if m.command == "CANCEL"]
    assert [(m["id"], m["attempt"], m["reason"]) for m in fences] == [(job.id, 1, "fenced")]


# ----------------------------------------------------------------------- cancel vs completion


@pytest.mark.parametrize(("status", "final"), [
    ("completed", sm.COMPLETED), ("cancelled", sm.CANCELLED), ("failed", sm.CANCELLED),
    ("timed_out", sm.CANCELLED)])
def test_cancel_racing_done_yields_exactly_one_terminal_state(status: str, final: str) -> None:
    core = core_with_agent()
    job = running_job(core, timeout=600)
    job.cancel_grace = 1.0
    core.jobs.transition(job, sm.CANCEL, 2.0, 1002.0)  # what a client CANCEL does
    core.on_agent(IDENT, msg("DONE", id=job.id, attempt=1, status=status), 2.1, 1002.1)
    # A second DONE (re-sent in a HELLO, or the cancelled one after a completed one) is ignored.
    core.on_agent(IDENT, msg("DONE", id=job.id, attempt=1, status="cancelled"), 2.2, 1002.2)
    batch, _, _ = core.take_output()
    terminal = [e for e in batch.events if e["to_state"] in sm.TERMINAL]
    assert [e["to_state"] for e in terminal] == [final]
