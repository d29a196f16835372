"""Regressions from a review of the master core: one message must never stop the master,
lose a result, or strand a job; drain state survives reconnects."""

from __future__ import annotations

import pytest

from master import state as sm
from master.spec import SpecError, validate_spec
from test_limits_master import IDENT, core_with_agent, msg, sent, submit


def test_reject_after_accept_is_refused_not_fatal() -> None:
    core = core_with_agent()
    job = submit(core, {"scenario": "sleep", "params": {"seconds": 1}})
    core.dispatch(1.0, 1001.0)
    core.on_agent(IDENT, msg("ACCEPT", id=job.id, attempt=1), 1.0, 1001.0)
    sent(core)
    core.on_agent(IDENT, msg("REJECT", id=job.id, attempt=1, reason="x"), 1.0, 1001.0)
    assert job.state == sm.RUNNING
    assert [m["code"] for m in sent(core) if m.command == "ERROR"] == ["conflict"]


def test_hello_with_non_numeric_resources_is_refused() -> None:
    core = core_with_agent()
    core.on_agent(b"b/1", msg("HELLO", name="b", slots=1, resources={"cpus": "two"}), 0, 1000)
    assert core.agents.named("b") is None
    assert [m["code"] for m in sent(core) if m.command == "ERROR"] == ["bad_body"]


def test_done_with_an_unstorable_extra_is_applied_not_lost() -> None:
    core = core_with_agent()
    job = submit(core, {"scenario": "sleep", "params": {"seconds": 1}})
    core.dispatch(1.0, 1001.0)
    sent(core)
    core.on_agent(IDENT, msg("DONE", id=job.id, attempt=1, status="failed", reason="exit_code",
                             exit_code=1, extra={"stderr": "bad\x00byte"}), 2.0, 1002.0)
    assert job.state == sm.QUEUED  # the failure was applied: a retry is scheduled
    core.flush_acks()
    batch, outbox, _ = core.take_output()
    assert "\x00" not in str(batch.updates[job.id].get("extra"))
    assert any(b"DONE_ACK" in frames[1] for _, _, frames in outbox)


def test_drain_state_is_told_on_every_hello() -> None:
    core = core_with_agent()
    drains = [m["on"] for m in sent(core) if m.command == "DRAIN"]
    core.on_agent(b"a1/2", msg("HELLO", name="a1", slots=4), 0.0, 1000.0)
    assert drains == [] and [m["on"] for m in sent(core) if m.command == "DRAIN"] == [False]


@pytest.mark.parametrize("raw", [
    {"scenario": "sleep", "params": {"seconds": 1}, "output": None, "input": "a\x00"},
    {"scenario": "noop", "params": {"k\x00": 1}},
])
def test_nul_in_a_spec_is_refused(raw: dict[str, object]) -> None:
    with pytest.raises(SpecError, match="NUL"):
        validate_spec(raw)


def test_a_job_reclaimed_after_restart_is_watched_by_the_backstop_again() -> None:
    core = core_with_agent()
    spec = validate_spec({"scenario": "sleep", "params": {"seconds": 60}, "timeout_s": 5}).spec
    row = {"id": 40, "scenario": "sleep", "spec": spec, "state": sm.RUNNING, "priority": 1,
           "attempt": 1, "max_attempts": 3, "rejects": 0, "agent": "b",
           "extra": {"requires": "workload:sleep"}, "created_at": 990.0, "started_at": 995.0}
    core.recover([row], [], 0.0, 1000.0)
    assert not core.jobs.backstop.watching(40)
    core.on_agent(b"b/1", msg("HELLO", name="b", slots=1, workloads=["sleep"],
                              running=[{"id": 40, "attempt": 1}]), 1.0, 1001.0)
    job = core.jobs.get(40)
    assert job is not None and job.state == sm.RUNNING and core.jobs.backstop.watching(40)


def test_a_long_reason_in_hello_results_is_cut_as_in_done() -> None:
    # An agent's reason becomes event text that every follower reads: DONE cuts it at 200
    # characters, and so must the results a HELLO carries (they were taken whole).
    core = core_with_agent()
    job = submit(core, {"scenario": "sleep", "params": {"seconds": 1}})
    core.dispatch(1.0, 1001.0)
    sent(core)
    result = {"id": job.id, "attempt": 1, "status": "failed", "reason": "x" * 5000,
              "exit_code": 1}
    core.on_agent(b"a1/2", msg("HELLO", name="a1", slots=4, workloads=["sleep"],
                               results=[result]), 2.0, 1002.0)
    assert job.state == sm.QUEUED  # the result was applied, not lost for its text
    batch, outbox, _ = core.take_output()
    assert all(len(e["reason"] or "") <= 200 for e in batch.events)
    assert [e["reason"] for e in batch.events if e["job_id"] == job.id] == ["x" * 200]
