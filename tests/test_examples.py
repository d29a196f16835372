"""examples/ against a real cluster: the protocol page is enough to write a working client."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys

import pytest

from conftest import wait_for
from harness import ROOT, Cluster

pytestmark = pytest.mark.once  # plain pyzmq + msgpack clients: the full CI stage runs them

EXAMPLES = ROOT / "examples"
SCRIPTS = ("submit_and_follow.py", "list_and_cancel.py")
CONTRACT = "contract_checks.py"  # the page's statements, checked one by one (issue 11)



def run(cluster: Cluster, script: str, *args: str, timeout: float = 30.0
        ) -> subprocess.CompletedProcess[str]:
    """Run an example isolated from this checkout (-I: no PYTHONPATH, no script-dir imports)."""
    argv = [sys.executable, "-I", str(EXAMPLES / script), *args, "--clients", cluster.clients_ep,
            "--events", cluster.events_ep, "--timeout", str(timeout)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30,
                          cwd=cluster.tmp)
    assert not proc.stderr, f"{script} wrote to stderr:\n{proc.stderr}"
    return proc


def submitted_ids(out: str) -> list[int]:
    lines = [line for line in out.splitlines() if line.startswith("submitted ")]
    assert len(lines) == 1, out
    return [int(x) for x in lines[0].split()[1:]]


@pytest.mark.parametrize("script", [*SCRIPTS, CONTRACT])
def test_examples_import_nothing_but_zmq_msgpack_and_stdlib(script: str) -> None:
    tree = ast.parse((EXAMPLES / script).read_text(), script)
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    foreign = imported - set(sys.stdlib_module_names) - {"zmq", "msgpack"}
    assert not foreign, f"{script} imports {sorted(foreign)}"
    if script != CONTRACT:  # a check suite, not a small example
        assert len((EXAMPLES / script).read_text().splitlines()) <= 130


def test_follow_times_out_then_list_and_cancel_a_queued_job(cluster: Cluster) -> None:
    # No agent yet: the jobs stay queued and the follower gives up with a non-zero status.
    proc = run(cluster, "submit_and_follow.py", "-n", "2", timeout=1.5)
    assert proc.returncode == 2, proc.stdout
    first, second = ids = submitted_ids(proc.stdout)
    assert re.search(r"^timeout after 1\.5s; unfinished: \[\d+, \d+\]$", proc.stdout, re.M)
    assert {j["state"] for j in cluster.client.get(ids)[0]} == {"queued"}

    proc = run(cluster, "list_and_cancel.py", str(first))
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["listed 2 jobs in queued,running",
                         f"job {second} queued sleep priority=normal agent=-",
                         f"job {first} queued sleep priority=normal agent=-"], proc.stdout
    assert f"cancel {first} cancelled" in lines
    jobs = {j["id"]: j for j in cluster.client.get(ids)[0]}
    assert jobs[first]["state"] == "cancelled"
    assert jobs[first]["reason"] == "cancelled"  # queued: no process to stop gracefully
    assert jobs[second]["state"] == "queued"

    cluster.start_agent("a1", slots=2)  # the survivor now runs
    assert cluster.wait_terminal([second], timeout=30)[second]["state"] == "completed"


def test_submit_and_follow_until_all_completed(cluster: Cluster) -> None:
    cluster.start_agent("a1", slots=2)
    cluster.start_agent("a2", slots=1)
    proc = run(cluster, "submit_and_follow.py", "-n", "5", timeout=60)
    assert proc.returncode == 0, proc.stdout
    ids = submitted_ids(proc.stdout)
    assert len(set(ids)) == 5
    for job_id in ids:
        assert re.search(rf"^job {job_id} completed agent=a[12] via=(event|get)$",
                         proc.stdout, re.M), proc.stdout
    assert proc.stdout.splitlines()[-1] == "done: 5 of 5 completed"
    jobs, missing = cluster.client.get(ids)
    assert not missing
    assert all(j["state"] == "completed" and j["spec"]["params"] == {"seconds": 0.2}
               for j in jobs), jobs

    proc = run(cluster, "submit_and_follow.py", "noop", "-n", "50", timeout=60)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.splitlines()[-1] == "done: 50 of 50 completed"


def test_submit_and_follow_reports_error_replies(cluster: Cluster) -> None:
    proc = run(cluster, "submit_and_follow.py", "nosuchscenario")
    assert proc.returncode == 2
    assert proc.stdout.startswith("error invalid_spec: specs[0].scenario: unknown scenario"), \
        proc.stdout
    proc = run(cluster, "submit_and_follow.py", "sleep", "--param", "seconds=-1")
    assert proc.returncode == 2
    assert "error invalid_spec: specs[0].params.seconds" in proc.stdout
    assert cluster.client.list_jobs() == []


def test_follow_sees_a_cancelled_job_and_exits_1(cluster: Cluster) -> None:
    cluster.start_agent("a1", slots=1)
    argv = [sys.executable, "-I", str(EXAMPLES / "submit_and_follow.py"), "sleep",
            "--param", "seconds=60", "-n", "1", "--clients", cluster.clients_ep,
            "--events", cluster.events_ep, "--timeout", "60"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=cluster.tmp) as follower:
        try:
            running = wait_for(lambda: cluster.client.list_jobs(states=["running"]), 20)
            assert cluster.client.cancel([running[0]["id"]], grace_s=1) == [
                {"id": running[0]["id"], "result": "cancelling"}]
            out, err = follower.communicate(timeout=30)
        finally:
            follower.kill()
    assert follower.returncode == 1, (out, err)
    job_id = running[0]["id"]
    assert f"job {job_id} cancelled agent=a1" in out
    assert out.splitlines()[-1] == f"done: 0 of 1 completed; others: {{{job_id}: 'cancelled'}}"


def test_list_and_cancel_a_running_job_and_follow_it_to_the_end(cluster: Cluster) -> None:
    cluster.start_agent("a1", slots=1)
    running_id, queued_id = cluster.client.submit(
        [{"scenario": "sleep", "params": {"seconds": 60}}] * 2)
    wait_for(lambda: cluster.client.get([running_id])[0][0]["state"] == "running", 20)

    proc = run(cluster, "list_and_cancel.py", "--states", "running", "--all", "--grace", "2",
               "999999")
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.splitlines() == [
        "listed 1 jobs in running",
        f"job {running_id} running sleep priority=normal agent=a1",
        "cancel 999999 not_found",
        f"cancel {running_id} cancelling",
        f"job {running_id} cancelled reason=cancelled_graceful",
    ]
    jobs = {j["id"]: j for j in cluster.client.get([running_id, queued_id])[0]}
    assert jobs[running_id]["state"] == "cancelled"
    # The queued one was not listed (states=running), so it was left alone and now runs.
    wait_for(lambda: cluster.client.get([queued_id])[0][0]["state"] == "running", 20)

    proc = run(cluster, "list_and_cancel.py")  # list only
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        "listed 1 jobs in queued,running",
        f"job {queued_id} running sleep priority=normal agent=a1",
    ]
    proc = run(cluster, "list_and_cancel.py", "--states", "nosuchstate")
    assert proc.returncode == 2
    assert proc.stdout.startswith("LIST: error bad_body: states: unknown state 'nosuchstate'")


# ------------------------------------------------------------------ the contract, item by item
# examples/contract_checks.py --item N: the statements of docs/protocol.md that a client written
# from the page alone found the master to contradict (issue 11), checked as that client would.

CONTRACT_ITEMS = {
    1: "times are float epoch seconds",
    2: "the page's transition table has every transition made",
    3: "a job cancelled while queued has reason cancelled",
    4: "timeouts are retried only with retry_timeouts",
    5: "too_large is sent (spec over 64 KiB, message over 8 MiB)",
    6: "one error code per kind of limit",
    7: "rid required, a scalar, echoed in every ERROR",
    8: "every ERROR names its command",
    9: "a non-string key is named with its path",
    10: "LIST states=[] means all",
    11: "type coercion as documented",
    12: "which workloads send PROGRESS",
}
RUNS_JOBS = {1, 2, 4, 12}


@pytest.mark.parametrize("item", sorted(CONTRACT_ITEMS),
                         ids=[f"item-{i}" for i in sorted(CONTRACT_ITEMS)])
def test_contract_item(cluster: Cluster, item: int) -> None:
    """One numbered item of the client contract, checked by the pure pyzmq+msgpack suite."""
    if item in RUNS_JOBS:
        cluster.start_agent("a1", slots=4)
    proc = run(cluster, CONTRACT, "--item", str(item), "--page",
               str(ROOT / "docs" / "protocol.md"), timeout=60)
    lines = proc.stdout.splitlines()
    assert lines, f"item {item} ({CONTRACT_ITEMS[item]}) printed nothing"
    failed = [line for line in lines if not line.startswith(f"ok item-{item} ")]
    assert not failed and proc.returncode == 0, \
        f"item {item} ({CONTRACT_ITEMS[item]}):\n{proc.stdout}\n{cluster.dump_logs()}"
    if item in (2, 12) and shutil.which("ffmpeg"):  # the ffmpeg halves ran too
        assert "not checked" not in proc.stdout, proc.stdout
