"""JOBS (protocol 1.3): one master turn's JOBs for one agent in one message (issue 14).

The master sends JOBS only to an agent whose HELLO said `jobs_batch`; each item means exactly
what its own JOB would; a bad item ends that item only. End to end the real agent takes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import zmq

from agent.core import Prepare
from bus.codec import decode, encode, encode_jobs
from bus.schemas import MASTER_TO_AGENT
from bus.sockets import connect_dealer
from harness import Cluster
from master.spec import validate_spec
from test_agent_failover import Agent1
from test_limits_master import IDENT, core_with_agent, msg, sent, submit

NOOP: dict[str, Any] = {"scenario": "noop"}
SLEEP: dict[str, Any] = {"scenario": "sleep", "params": {"seconds": 60}}


def test_encode_jobs_is_the_body_a_list_of_job_bodies_would_be() -> None:
    spec = {"scenario": "noop", "params": {"k": "v"}, "input": None}
    frames = encode_jobs([(1, 1, msgpack.packb(spec)), (2**40, 3, msgpack.packb(spec))], 7)
    assert frames[:2] == encode("JOBS", {})[:2]
    assert msgpack.unpackb(frames[2]) == {"jobs": [{"id": 1, "attempt": 1, "spec": spec},
                                                   {"id": 2**40, "attempt": 3, "spec": spec}],
                                          "epoch": 7}
    assert decode(frames, MASTER_TO_AGENT).command == "JOBS"


def test_a_turn_sends_one_jobs_to_an_agent_that_takes_them() -> None:
    core = core_with_agent(jobs_batch=True)
    jobs = [submit(core, {"scenario": "sleep", "params": {"seconds": 1}}) for _ in range(3)]
    core.out.epoch = 9
    core.dispatch(1.0, 1001.0)
    [m] = [m for m in sent(core) if m.command in ("JOB", "JOBS")]
    assert m.command == "JOBS" and m["epoch"] == 9
    assert [(j["id"], j["attempt"]) for j in m["jobs"]] == [(j.id, 1) for j in jobs]
    assert all(j["spec"]["params"] == {"seconds": 1} for j in m["jobs"])
    # One job in a turn goes as JOB.
    submit(core, {"scenario": "sleep", "params": {"seconds": 1}})
    core.on_agent(IDENT, msg("CREDIT", n=1), 2.0, 1002.0)
    core.dispatch(2.0, 1002.0)
    assert [m.command for m in sent(core) if m.command in ("JOB", "JOBS")] == ["JOB"]


def test_an_agent_that_did_not_say_jobs_batch_gets_single_jobs() -> None:
    core = core_with_agent()  # a 1.2 agent: no jobs_batch in its HELLO
    for _ in range(3):
        submit(core, {"scenario": "sleep", "params": {"seconds": 1}})
    core.dispatch(1.0, 1001.0)
    assert [m.command for m in sent(core) if m.command in ("JOB", "JOBS")] == ["JOB"] * 3


def test_the_agent_runs_each_item_and_answers_a_bad_one_only(tmp_path: Path) -> None:
    a = Agent1(tmp_path)
    hello = a.reconnect(0.05)
    assert hello[0][0] == "HELLO" and hello[0][1]["jobs_batch"] is True
    a.welcome(5, 0.1)
    frames = encode("JOBS", {"epoch": 5, "jobs": [
        {"id": 1, "attempt": 1, "spec": SLEEP},
        {"id": 2, "attempt": "one", "spec": SLEEP},  # not a JOB body
        "junk",
        {"id": 3, "attempt": 1, "spec": SLEEP}]})
    a.core.message(decode(frames, MASTER_TO_AGENT), 0.2)
    out, actions = a.core.take()
    assert sorted(x.id for x in actions if isinstance(x, Prepare)) == [1, 3]
    errors = [body["text"] for command, body in out if command == "ERROR"]
    assert errors == ["JOBS.jobs[1]: JOB.attempt must be int, got str",
                      "JOBS.jobs[2]: must be map, got str"]


def test_an_older_epochs_jobs_is_ignored(tmp_path: Path) -> None:
    a = Agent1(tmp_path)
    a.welcome(5, 0.1)
    assert a.send("JOBS", 0.2, epoch=4, jobs=[{"id": 1, "attempt": 1, "spec": SLEEP}]) \
        == ([], [])
    assert a.stale("JOBS") == 1


def test_the_master_sends_jobs_over_the_wire_and_real_agents_run_them(
        tmp_path: Path, ctx: zmq.Context) -> None:
    cluster = Cluster(tmp_path, f"sqlite:///{tmp_path}/ffrtmp.db")
    try:
        cluster.start_master()
        ids = cluster.client.submit([NOOP] * 6)
        # A hand-made agent speaking the page's protocol: HELLO with jobs_batch, then 4 credits.
        sock = connect_dealer(ctx, cluster.agents_ep, identity=b"raw-1")
        hello = {"name": "raw", "slots": 4, "workloads": ["noop"], "jobs_batch": True}
        sock.send_multipart(encode("HELLO", hello))
        assert sock.poll(10_000), "no WELCOME"
        assert decode(sock.recv_multipart(), MASTER_TO_AGENT).command == "WELCOME"
        sock.send_multipart(encode("CREDIT", {"n": 4}))
        got = None
        while got is None:
            assert sock.poll(10_000), "no JOBS"
            m = decode(sock.recv_multipart(), MASTER_TO_AGENT)
            got = m if m.command in ("JOB", "JOBS") else None
        assert got.command == "JOBS" and [j["id"] for j in got["jobs"]] == ids[:4]
        assert got["epoch"] >= 1
        sock.send_multipart(encode("BYE", {}))  # its jobs go back to the queue
        sock.close(linger=100)
        cluster.start_agent("a1", slots=8)
        more = cluster.client.submit([NOOP] * 400)
        final = cluster.wait_terminal(ids + more, 60)
        assert {j["state"] for j in final.values()} == {"completed"}
    finally:
        cluster.close()


def test_only_in_agent_work_is_prepared_on_the_loop_thread() -> None:
    from agent.kinds import in_agent

    assert in_agent({"scenario": "noop"})
    for spec in ({"scenario": "sleep"}, {"scenario": "720p-h264", "preset": {}}, "noop", None,
                 {"scenario": ["noop"]}):
        assert not in_agent(spec)  # a process or I/O to prepare: a worker thread does it


def test_a_turn_of_large_specs_is_cut_into_jobs_under_the_agents_message_cap() -> None:
    from bus.sockets import AGENT_MAX_MSG
    from master.core import JOBS_BUDGET

    core = core_with_agent(jobs_batch=True, slots=64)
    core.on_agent(IDENT, msg("CREDIT", n=60), 0.5, 1000.5)
    # Specs near the master's 64 KiB cap (here a padded one made directly: the core keeps
    # whatever spec it was given), 40 of them: ~2.4 MB for one agent in one turn.
    base = validate_spec({"scenario": "sleep", "params": {"seconds": 1}}).spec
    big = {**base, "pad": "x" * 60_000}
    jobs = [core.jobs.get(core.jobs.create(big, 1, "workload:sleep", None, 0.0, 1000.0))
            for _ in range(40)]
    core.dispatch(1.0, 1001.0)
    _, outbox, _ = core.take_output()
    sizes = [len(frames[2]) for kind, _, frames in outbox if frames[1] == b"JOBS"]
    assert len(sizes) > 1 and max(sizes) <= JOBS_BUDGET < AGENT_MAX_MSG
    ids = [j["id"] for kind, _, frames in outbox if frames[1] == b"JOBS"
           for j in decode(frames, MASTER_TO_AGENT)["jobs"]]
    assert ids == [j.id for j in jobs if j is not None]  # every job once, in order
