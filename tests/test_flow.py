"""Behaviour of the whole system with real processes: credit flow, priorities, aging, cancellation,
retries, idempotent submits, draining and submit validation (docs/protocol.md)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

from bus.codec import decode, encode
from bus.errors import ClientError
from bus.schemas import MASTER_TO_CLIENT
from conftest import skip_not_applicable, wait_for
from harness import TERMINAL, Cluster, ignores_sigterm

pytestmark = pytest.mark.timeout(90)

SLEEP = "sleep"


def sleep_spec(seconds: float, **extra: Any) -> dict[str, Any]:
    params = {"seconds": seconds}
    params.update(extra.pop("params", {}))
    return {"scenario": SLEEP, "params": params, **extra}


def ts(value: float | None) -> float:
    """A wire timestamp: float UNIX epoch seconds (docs/protocol.md "Frames")."""
    assert isinstance(value, float), value
    return value


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(**kwargs: Any) -> Cluster:
        c = Cluster(tmp_path, f"sqlite:///{tmp_path}/ffrtmp.db", **kwargs)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.close()


def start(make_cluster: Any, agents: dict[str, int], **kwargs: Any) -> Cluster:
    """A master plus agents {name: slots}, all registered."""
    c = make_cluster(**kwargs)
    c.start_master()
    for name, slots in agents.items():
        c.start_agent(name, slots, wait=False)
    wait_for(lambda: {n["name"] for n in c.client.nodes() if n["state"] == "alive"}
             == set(agents), 20, message="agents did not register")
    # Every agent has granted its credit: a fair start for the tests that count dispatches.
    wait_for(lambda: all(n["credit"] == n["slots"] for n in c.client.nodes()), 10,
             message="agents did not grant credit")
    return c


def with_events(c: Cluster, ids: list[int]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for i in range(0, len(ids), 500):
        jobs, missing = c.client.get(ids[i:i + 500], events=True)
        assert not missing
        out.update({j["id"]: j for j in jobs})
    return out


def state_is(c: Cluster, job_id: int, *states: str) -> Any:
    """The job's view if it is in one of states, else None."""
    job = c.jobs([job_id])[job_id]
    return job if job["state"] in states else None


def assigned_events(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in job["events"] if e["state"] == "assigned"]


def child_of(c: Cluster, job_id: int, attempt: int = 1) -> psutil.Process:
    """The synthetic child process running this attempt (found by its work dir)."""

    def find() -> psutil.Process | None:
        for proc in c.synthetic_children():
            try:
                if Path(proc.cwd()).name == f"{job_id}-{attempt}":
                    return proc
            except psutil.Error:
                continue
        return None

    return wait_for(find, 10, message=f"child process of job {job_id}")


# ------------------------------------------------------------------------------ 1 credit


def test_credit_no_idle_agent_and_never_over_slots(make_cluster: Any) -> None:
    names = {f"a{i}": 1 for i in range(1, 5)}
    c = start(make_cluster, names)
    ids = c.client.submit([sleep_spec(3)] * 4 + [sleep_spec(0.1)] * 40)
    long_ids, short_ids = ids[:4], ids[4:]

    over: list[dict[str, Any]] = []
    samples = 0

    def all_done() -> bool:
        nonlocal samples
        for n in c.client.nodes():
            samples += 1
            if n["busy"] > n["slots"] or n["busy"] + n["credit"] > n["slots"]:
                over.append(n)
        return all(j["state"] in TERMINAL for j in c.jobs(ids).values())

    wait_for(all_done, 40, interval=0.05, message="all jobs terminal")
    assert samples > 20
    assert not over, f"an agent held more than its slots: {over[:5]}"

    jobs = with_events(c, ids)
    assert {j["state"] for j in jobs.values()} == {"completed"}, c.dump_logs()
    # The four long jobs went to four different agents (nobody got two while another idled).
    assert len({jobs[i]["agent"] for i in long_ids}) == 4

    # Per job: when it waited (queued -> assigned) and when it held an agent (assigned -> end).
    waits: list[tuple[float, float, int]] = []
    held: dict[str, list[tuple[float, float, int]]] = {n: [] for n in names}
    for job in jobs.values():
        ev = job["events"]
        queued = [ts(e["at"]) for e in ev if e["state"] == "queued"]
        assigned = assigned_events(job)
        assert len(assigned) == 1, ev
        start_at = ts(assigned[0]["at"])
        end_at = ts(ev[-1]["at"])
        assert ev[-1]["state"] == "completed"
        waits.append((queued[0], start_at, job["id"]))
        held[assigned[0]["agent"]].append((start_at, end_at, job["id"]))
    first_submit = min(w[0] for w in waits)
    last_end = max(h[1] for hs in held.values() for h in hs)

    for name, spans in held.items():
        spans.sort()
        # Never more than its one slot: the next job starts only after the previous ended.
        for (_s0, e0, j0), (s1, _e1, j1) in zip(spans, spans[1:], strict=False):
            assert s1 >= e0, f"{name} held jobs {j0} and {j1} at once"
        # Idle periods of this agent: before its first job, between jobs, after its last.
        idle = [(first_submit, spans[0][0])]
        idle += [(e0, s1) for (_s0, e0, _), (s1, _e1, _) in zip(spans, spans[1:], strict=False)]
        idle.append((spans[-1][1], last_end))
        for lo, hi in idle:
            for q_at, a_at, job_id in waits:
                overlap = min(hi, a_at) - max(lo, q_at)
                assert overlap <= 0.5, (
                    f"agent {name} idle from {lo:.3f} to {hi:.3f} while job {job_id} waited "
                    f"({q_at:.3f}..{a_at:.3f}): {overlap:.3f}s")
    # Every short job ran (none starved) and the work was spread over all agents.
    assert {jobs[i]["agent"] for i in short_ids} == set(names)


# ------------------------------------------------------------------------------ 2 priority


def test_priority_order_high_normal_low_fifo_within(make_cluster: Any) -> None:
    c = start(make_cluster, {"solo": 1})
    blocker = c.client.submit([sleep_spec(30)])[0]
    wait_for(lambda: state_is(c, blocker, "running"), 10, message="blocker running")
    order = ["low", "normal", "high"] * 4
    ids = []
    for prio in order:  # one SUBMIT each: distinct submission times, interleaved priorities
        ids += c.client.submit([sleep_spec(0, priority=prio)])
    assert c.client.stats()["queued_by_priority"] == {"high": 4, "normal": 4, "low": 4}
    assert c.client.cancel([blocker], grace_s=0)[0]["result"] == "cancelling"
    final = c.wait_terminal(ids, timeout=30)
    assert {j["state"] for j in final.values()} == {"completed"}
    by_finish = sorted(ids, key=lambda i: ts(final[i]["finished_at"]))
    expected = ([i for i, p in zip(ids, order, strict=True) if p == "high"]
                + [i for i, p in zip(ids, order, strict=True) if p == "normal"]
                + [i for i, p in zip(ids, order, strict=True) if p == "low"])
    assert by_finish == expected, [(i, final[i]["priority"]) for i in by_finish]


# ------------------------------------------------------------------------------ 3 aging


def test_aging_lifts_a_low_job_past_a_steady_high_supply(make_cluster: Any) -> None:
    c = start(make_cluster, {"solo": 1}, master_args=["--aging", "1"])
    high_ids = c.client.submit([sleep_spec(0.2, priority="high")] * 3)
    low = c.client.submit([sleep_spec(0, priority="low")])[0]
    budget = 40

    def low_done_or_short_of_high() -> str | None:
        if state_is(c, low, *TERMINAL):
            return "low"
        if c.client.stats()["queued_by_priority"]["high"] < 2:
            return "refill"
        return None

    while True:
        why = wait_for(low_done_or_short_of_high, 20, interval=0.02,
                       message="low job done or high queue short")
        if why == "low":
            break
        assert len(high_ids) < budget, "high supply exhausted before the low job ran"
        high_ids += c.client.submit([sleep_spec(0.2, priority="high")])

    jobs = with_events(c, [low, *high_ids])
    low_job = jobs[low]
    assert low_job["state"] == "completed"
    low_start = ts(assigned_events(low_job)[0]["at"])
    # High jobs were waiting when the low one was picked (the supply never ran dry) ...
    waiting = [i for i in high_ids if ts(jobs[i]["created_at"]) < low_start
               and (not assigned_events(jobs[i]) or ts(assigned_events(jobs[i])[0]["at"])
                    > low_start)]
    assert waiting, "no high job was waiting: the low job ran only because the queue was empty"
    # ... and the low job had been passed over by high jobs submitted after it (it aged).
    overtook = [i for i in high_ids if i > low and assigned_events(jobs[i])
                and ts(assigned_events(jobs[i])[0]["at"]) < low_start]
    assert overtook, "the low job never waited behind the high supply"
    waited = low_start - ts(low_job["created_at"])
    assert waited >= 1.5, f"low job ran after only {waited:.2f}s: aging 1 s x 2 levels"
    # Clean up what is left of the supply.
    c.client.cancel([i for i in high_ids if jobs[i]["state"] not in TERMINAL], grace_s=0)


# ------------------------------------------------------------------------------ 4 cancel


def test_cancel_queued_job_never_starts(make_cluster: Any) -> None:
    c = start(make_cluster, {"solo": 1})
    blocker = c.client.submit([sleep_spec(30)])[0]
    wait_for(lambda: state_is(c, blocker, "running"), 10, message="blocker running")
    queued = c.client.submit([{"scenario": "noop"}])[0]
    assert c.client.cancel([queued])[0] == {"id": queued, "result": "cancelled"}
    sentinel = c.client.submit([{"scenario": "noop"}])[0]
    c.client.cancel([blocker], grace_s=0)
    final = c.wait_terminal([blocker, sentinel], timeout=15)
    assert final[sentinel]["state"] == "completed"
    job = with_events(c, [queued])[queued]
    # No process ever existed, so the reason says cancelled, not cancelled_graceful.
    assert (job["state"], job["reason"]) == ("cancelled", "cancelled")
    assert job["agent"] is None and job["started_at"] is None
    assert [e["state"] for e in job["events"]] == ["queued", "cancelled"]
    assert job["events"][-1]["reason"] == "cancelled"
    assert not assigned_events(job)


def test_cancel_running_graceful_and_forced_leave_no_process(make_cluster: Any) -> None:
    c = start(make_cluster, {"solo": 2})
    graceful, stubborn = c.client.submit(
        [sleep_spec(30), sleep_spec(30, params={"ignore_term": 1})])
    g_proc, s_proc = child_of(c, graceful), child_of(c, stubborn)
    wait_for(lambda: ignores_sigterm(s_proc.pid), 10, message="child ignores SIGTERM")
    wait_for(lambda: state_is(c, graceful, "running") and state_is(c, stubborn, "running"), 10)

    assert c.client.cancel([graceful], grace_s=2)[0]["result"] == "cancelling"
    job = wait_for(lambda: state_is(c, graceful, *TERMINAL), 4, message="graceful cancel")
    assert (job["state"], job["reason"]) == ("cancelled", "cancelled_graceful")
    assert not g_proc.is_running()

    asked = time.time()
    assert c.client.cancel([stubborn], grace_s=1)[0]["result"] == "cancelling"
    assert state_is(c, stubborn, "cancelling")
    job = wait_for(lambda: state_is(c, stubborn, *TERMINAL), 5, message="forced cancel")
    assert (job["state"], job["reason"]) == ("cancelled", "cancelled_forced")
    assert ts(job["finished_at"]) - asked >= 0.9, "killed before its grace period ran out"
    assert not s_proc.is_running()
    assert c.synthetic_children() == []
    # Neither was retried: cancelled is final.
    jobs = with_events(c, [graceful, stubborn])
    for j in jobs.values():
        assert len(assigned_events(j)) == 1
        assert [e["state"] for e in j["events"]][-2:] == ["cancelling", "cancelled"]


def test_cancel_terminal_unknown_and_many_running_at_once(make_cluster: Any) -> None:
    c = start(make_cluster, {"wide": 8})
    done = c.client.submit([{"scenario": "noop"}])[0]
    c.wait_terminal([done], timeout=10)
    results = c.client.cancel([done, 987_654])
    assert results == [{"id": done, "result": "terminal"}, {"id": 987_654, "result": "not_found"}]
    assert c.jobs([done])[done]["state"] == "completed"

    ids = c.client.submit([sleep_spec(30)] * 8)
    wait_for(lambda: all(j["state"] == "running" for j in c.jobs(ids).values()), 15,
             message="8 jobs running")
    wait_for(lambda: len(c.synthetic_children()) == 8, 10, message="8 children")
    results = c.client.cancel(ids, grace_s=2)
    assert [r["result"] for r in results] == ["cancelling"] * 8
    final = c.wait_terminal(ids, timeout=8)
    assert {(j["state"], j["reason"]) for j in final.values()} == {
        ("cancelled", "cancelled_graceful")}
    assert c.synthetic_children() == []
    node = c.node("wide")
    assert node is not None and node["busy"] == 0

    # Cancelled right after submit: caught queued, assigned (JOB in flight) or running.
    wave = c.client.submit([sleep_spec(30)] * 12)
    results = c.client.cancel(wave, grace_s=0)
    assert {r["result"] for r in results} <= {"cancelled", "cancelling"}
    final = c.wait_terminal(wave, timeout=8)
    assert {j["state"] for j in final.values()} == {"cancelled"}
    wait_for(lambda: c.synthetic_children() == [], 5, message="no child left")
    wait_for(lambda: (n := c.node("wide")) and n["busy"] == 0 and n["credit"] == 8, 5,
             message="all 8 slots free and granted again")


# ------------------------------------------------------------------------------ 5 retries


def test_timed_out_is_terminal_not_retried(make_cluster: Any) -> None:
    c = start(make_cluster, {"solo": 1})
    job_id = c.client.submit([sleep_spec(5, timeout_s=0.5, max_attempts=3)])[0]
    final = c.wait_terminal([job_id], timeout=10)[job_id]
    assert (final["state"], final["reason"], final["attempt"]) == ("timed_out", "timeout", 1)
    assert len(assigned_events(with_events(c, [job_id])[job_id])) == 1
    assert c.synthetic_children() == []


def _huge_allocation_fails() -> bool:
    """`hog mb=1048576` (1 TiB) dies of MemoryError unless the kernel overcommits blindly."""
    try:
        with open("/proc/sys/vm/overcommit_memory", encoding="ascii") as f:
            mode = f.read().strip()
    except OSError:
        return False
    vm = psutil.virtual_memory().total + psutil.swap_memory().total
    return mode == "2" or (mode == "0" and vm < 2**40 // 2)


def test_failed_attempts_are_retried_with_backoff_then_fail(make_cluster: Any) -> None:
    if not _huge_allocation_fails():
        skip_not_applicable("the kernel would overcommit a 1 TiB allocation")
    c = start(make_cluster, {"solo": 1})
    spec = {"scenario": "hog", "params": {"mb": 1_048_576, "seconds": 0}, "max_attempts": 3}
    job_id = c.client.submit([spec])[0]
    final = c.wait_terminal([job_id], timeout=20)[job_id]
    assert (final["state"], final["reason"], final["exit_code"]) == ("failed", "exit_code", 1)
    assert final["attempt"] == 3
    events = with_events(c, [job_id])[job_id]["events"]
    assert [e["state"] for e in events] == [
        "queued", "assigned", "running", "queued",
        "assigned", "running", "queued",
        "assigned", "running", "failed"]
    assert [e["attempt"] for e in events if e["state"] == "assigned"] == [1, 2, 3]
    requeues = [i for i, e in enumerate(events) if e["state"] == "queued" and i > 0]
    for n, i in enumerate(requeues, start=1):
        assert events[i]["reason"] == "exit_code"
        delay = ts(events[i + 1]["at"]) - ts(events[i]["at"])
        nominal = 1.0 * 2 ** (n - 1)
        assert 0.75 * nominal - 0.05 <= delay <= 1.25 * nominal + 1.0, (n, delay)


def test_retry_request_resubmits_terminal_and_refuses_live(make_cluster: Any) -> None:
    c = start(make_cluster, {"solo": 1})
    spec = sleep_spec(0, priority="high", timeout_s=30, max_attempts=2,
                      resource_limits={"max_memory_mb": 256})
    done = c.client.submit([spec])[0]
    first = c.wait_terminal([done], timeout=10)[done]
    new_id = c.client.retry(done)
    assert new_id > done
    again = c.wait_terminal([new_id], timeout=10)[new_id]
    assert again["state"] == "completed" and again["attempt"] == 1
    assert again["spec"] == first["spec"]
    for key in ("scenario", "priority", "timeout_s", "max_attempts", "resource_limits"):
        assert again[key] == first[key], key
    assert c.jobs([done])[done]["state"] == "completed"  # the original is untouched
    assert [e["reason"] for e in with_events(c, [new_id])[new_id]["events"]
            if e["state"] == "queued"][-1] == "retry"

    live = c.client.submit([sleep_spec(30)])[0]
    queued = c.client.submit([sleep_spec(30)])[0]
    wait_for(lambda: state_is(c, live, "running"), 10)
    for job_id in (live, queued):
        with pytest.raises(ClientError) as err:
            c.client.retry(job_id)
        assert err.value.code == "conflict"
    with pytest.raises(ClientError) as err:
        c.client.retry(999_999)
    assert err.value.code == "not_found"
    c.client.cancel([live, queued], grace_s=0)


# ------------------------------------------------------------------------------ 6 idempotency


def test_idempotent_submit_returns_the_same_ids(make_cluster: Any) -> None:
    c = start(make_cluster, {"solo": 2})
    specs = [{"scenario": "noop"}, sleep_spec(0), {"scenario": "noop", "priority": "low"}]
    first = c.client.submit(specs, idempotency_key="batch-1")
    second = c.client.submit(specs, idempotency_key="batch-1")
    assert first == second and len(first) == 3
    c.wait_terminal(first, timeout=10)
    assert c.client.submit(specs, idempotency_key="batch-1") == first  # also once finished
    other = c.client.submit(specs, idempotency_key="batch-2")
    assert not set(other) & set(first)

    # Two SUBMITs with one key pipelined on one socket (likely in one master turn).
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(c.clients_ep)
        for rid in (1, 2):
            sock.send_multipart(encode("SUBMIT", {"rid": rid, "specs": specs,
                                                  "idempotency_key": "batch-3"}))
        replies = {}
        for _ in range(2):
            assert sock.poll(10_000), "no reply to a pipelined SUBMIT"
            msg = decode(sock.recv_multipart(), MASTER_TO_CLIENT)
            assert msg.command == "SUBMITTED", msg.body
            replies[msg["rid"]] = msg["ids"]
    finally:
        sock.close()
        ctx.term()
    assert replies[1] == replies[2] and len(replies[1]) == 3

    rows = c.client.list_jobs(limit=1000)
    assert sorted(r["id"] for r in rows) == sorted(first + other + replies[1])
    assert sum(c.client.stats()["jobs_by_state"].values()) == 9


# ------------------------------------------------------------------------------ 7 drain


def test_drain_stops_new_work_running_job_finishes_undrain_resumes(make_cluster: Any) -> None:
    c = start(make_cluster, {"a": 1})
    held = c.client.submit([sleep_spec(2)])[0]
    wait_for(lambda: state_is(c, held, "running"), 10)
    c.start_agent("b", 1)
    reply = c.client.drain("a")
    assert (reply["name"], reply["draining"]) == ("a", True)
    node = c.node("a")
    assert node is not None and node["state"] == "draining"
    others = c.client.submit([sleep_spec(0.1)] * 6)
    final = c.wait_terminal([held, *others], timeout=20)
    assert final[held]["state"] == "completed" and final[held]["agent"] == "a"
    assert {final[i]["agent"] for i in others} == {"b"}
    assert all(final[i]["state"] == "completed" for i in others)
    node = c.node("a")
    assert node is not None and (node["state"], node["busy"], node["credit"]) == (
        "draining", 0, 0)
    for job in with_events(c, others).values():  # never offered to a (no REJECT round trip)
        assert [e["agent"] for e in assigned_events(job)] == ["b"]

    reply = c.client.drain("a", on=False)
    assert (reply["name"], reply["draining"]) == ("a", False)
    wait_for(lambda: (n := c.node("a")) and n["state"] == "alive" and n["credit"] == 1, 10,
             message="a alive with credit again")
    more = c.client.submit([sleep_spec(1)] * 2)
    final = c.wait_terminal(more, timeout=15)
    assert sorted(j["agent"] for j in final.values()) == ["a", "b"]

    with pytest.raises(ClientError) as err:
        c.client.drain("nobody")
    assert err.value.code == "not_found"


# ------------------------------------------------------------------------------ 8 validation


INVALID: list[tuple[str, list[dict[str, Any]], str]] = [
    ("priority", [{"scenario": "noop"}, {"scenario": "noop", "priority": "urgent"}],
     "specs[1].priority"),
    ("scenario", [{"scenario": "no-such-thing"}], "specs[0].scenario"),
    ("unknown-key", [{"scenario": "noop", "priorty": "high"}], "specs[0].priorty"),
    ("params-low", [sleep_spec(-1)], "specs[0].params.seconds"),
    ("params-high", [sleep_spec(86_401)], "specs[0].params.seconds"),
    ("params-unknown", [sleep_spec(1, params={"secs": 2})], "specs[0].params.secs"),
    ("timeout", [sleep_spec(1, timeout_s=0)], "specs[0].timeout_s"),
    ("max-attempts", [sleep_spec(1, max_attempts=0)], "specs[0].max_attempts"),
    ("limits", [sleep_spec(1, resource_limits={"max_memory_mb": 1})],
     "specs[0].resource_limits.max_memory_mb"),
    ("too-many", [{"scenario": "noop"}] * 10_001, "specs"),
    ("none", [], "specs"),
]


def test_invalid_submit_names_the_field_and_reaches_no_agent(make_cluster: Any) -> None:
    c = start(make_cluster, {"solo": 1})
    for case, specs, field in INVALID:
        with pytest.raises(ClientError) as err:
            c.client.submit(specs)
        # A spec's own field: invalid_spec; the request's count of specs: bad_body.
        assert err.value.code == ("bad_body" if field == "specs" else "invalid_spec"), case
        assert err.value.text.startswith(field + ":"), (case, err.value.text)
    stats = c.client.stats()
    assert stats["dispatched_total"] == 0 and stats["jobs_by_state"] == {}
    assert c.client.list_jobs() == []
    node = c.node("solo")
    assert node is not None and node["busy"] == 0 and node["credit"] == 1
    # The master is still fine: a valid submit goes through and runs.
    ok = c.client.submit([{"scenario": "noop"}])
    assert c.wait_terminal(ok, timeout=10)[ok[0]]["state"] == "completed"
