"""The `ffrtmp` command line against a real cluster: JSON shapes, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port, wait_for
from harness import ROOT, Cluster

pytestmark = pytest.mark.timeout(90)

JOB_KEYS = {"id", "scenario", "state", "priority", "attempt", "max_attempts", "agent", "progress",
            "bytes_in", "bytes_out", "exit_code", "reason", "created_at", "started_at",
            "finished_at", "resource_limits", "timeout_s", "output"}
EVENT_KEYS = {"seq", "id", "at", "from_state", "state", "reason", "agent", "attempt"}
NODE_KEYS = {"name", "state", "slots", "busy", "credit", "resources", "workloads", "encoders",
             "cgroup", "limits", "last_seen_s"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path}/ffrtmp.db")
    try:
        c.start_master()
        c.start_agent("cli-a", 2)
        yield c
    finally:
        c.close()


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def ok_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(proc).stdout)


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str,
                   prefix: str = "ffrtmp: ") -> str:
    """A failed command: non-zero exit and exactly one `ffrtmp: ...` line on stderr."""
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(prefix), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_epoch(value: float | None, nullable: bool = True) -> None:
    """A wire time (protocol 1.1): float UNIX epoch seconds, here within 10 minutes of now."""
    if value is None:
        assert nullable
        return
    assert isinstance(value, float), value
    assert abs(value - time.time()) < 600, value


def assert_job_shape(job: dict[str, Any]) -> None:
    assert set(job) >= JOB_KEYS, JOB_KEYS - set(job)
    assert isinstance(job["id"], int)
    assert job["priority"] in ("high", "normal", "low")
    assert 0.0 <= job["progress"] <= 1.0
    assert isinstance(job["resource_limits"], dict)
    assert_epoch(job["created_at"], nullable=False)
    assert_epoch(job["started_at"])
    assert_epoch(job["finished_at"])


def test_submit_json_prints_ids_and_jobs_list_has_stable_fields(cluster: Cluster) -> None:
    out = ok_json(cluster.cli("submit", "sleep", "--set", "seconds=0.1", "--count", "5",
                              "--json"))
    assert set(out) == {"ids"}
    ids = out["ids"]
    assert len(ids) == 5 and len(set(ids)) == 5 and all(isinstance(i, int) for i in ids)
    final = cluster.wait_terminal(ids, timeout=20)
    assert {j["state"] for j in final.values()} == {"completed"}

    ok_json(cluster.cli("submit", "noop", "--priority", "high", "--cpu", "150", "--memory",
                        "512", "--disk", "100", "--timeout", "60", "--max-attempts", "2",
                        "--wait", "--json"))
    jobs = ok_json(cluster.cli("jobs", "list", "--json"))
    assert isinstance(jobs, list) and len(jobs) == 6
    assert [j["id"] for j in jobs] == sorted((j["id"] for j in jobs), reverse=True)
    for job in jobs:
        assert_job_shape(job)
    newest = jobs[0]
    assert (newest["scenario"], newest["priority"], newest["max_attempts"],
            newest["timeout_s"]) == ("noop", "high", 2, 60)
    assert newest["resource_limits"] == {"max_cpu_percent": 150, "max_memory_mb": 512,
                                         "max_disk_mb": 100}
    done = [j for j in jobs if j["id"] in ids]
    for job in done:
        assert job["state"] == "completed" and job["agent"] == "cli-a"
        assert job["exit_code"] == 0 and job["progress"] == 1.0
        assert job["started_at"] and job["finished_at"]
        assert job["created_at"] <= job["started_at"] <= job["finished_at"]

    page = ok_json(cluster.cli("jobs", "list", "--json", "--limit", "2", "--state", "completed"))
    assert [j["id"] for j in page] == [newest["id"], max(ids)]
    text = ok(cluster.cli("jobs", "list")).stdout.splitlines()
    assert text[0].split()[:3] == ["ID", "SCENARIO", "STATE"] and len(text) == 7


def test_submit_idempotency_key(cluster: Cluster) -> None:
    args = ("submit", "noop", "--count", "3", "--idempotency-key", "nightly-42", "--json")
    first = ok_json(cluster.cli(*args))["ids"]
    assert ok_json(cluster.cli(*args))["ids"] == first
    assert len(cluster.client.list_jobs()) == 3


def test_submit_wait_exit_status(cluster: Cluster) -> None:
    out = ok_json(cluster.cli("submit", "sleep", "--set", "seconds=0.1", "--count", "3",
                              "--wait", "--json"))
    assert len(out["ids"]) == 3
    assert [j["id"] for j in out["jobs"]] == out["ids"]
    assert {j["state"] for j in out["jobs"]} == {"completed"}
    ok(cluster.cli("submit", "noop", "--wait"))

    # One of them times out: --wait exits non-zero and names the job on stderr.
    timed = cluster.cli("submit", "sleep", "--set", "seconds=5", "--timeout", "0.3", "--wait",
                        "--json")
    assert timed.returncode == 1, (timed.stdout, timed.stderr)
    job = json.loads(timed.stdout)["jobs"][0]
    assert (job["state"], job["reason"]) == ("timed_out", "timeout")
    assert f"job {job['id']}: timed_out (timeout)" in timed.stderr

    # A cancelled one: the waiting CLI sees it end and fails.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ffrtmp", "--master", cluster.clients_ep, "--events-ep",
         cluster.events_ep, "submit", "sleep", "--set", "seconds=30", "--wait", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        running = wait_for(lambda: cluster.client.list_jobs(states=["running"]), 15,
                           message="the waited-for job running")
        assert cluster.client.cancel([running[0]["id"]], grace_s=1)[0]["result"] == "cancelling"
        stdout, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, (stdout, stderr)
    assert json.loads(stdout)["jobs"][0]["state"] == "cancelled"
    assert f"job {running[0]['id']}: cancelled (cancelled_graceful)" in stderr


def test_jobs_show_cancel_retry(cluster: Cluster) -> None:
    job_id = ok_json(cluster.cli("submit", "sleep", "--set", "seconds=0", "--json"))["ids"][0]
    cluster.wait_terminal([job_id], timeout=10)
    shown = ok_json(cluster.cli("jobs", "show", str(job_id), "--json"))
    assert_job_shape(shown)
    assert shown["id"] == job_id and shown["state"] == "completed"
    assert [e["state"] for e in shown["events"]] == ["queued", "assigned", "running",
                                                     "completed"]
    seqs = [e["seq"] for e in shown["events"]]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    for ev in shown["events"]:
        assert set(ev) >= EVENT_KEYS and ev["id"] == job_id
        assert_epoch(ev["at"], nullable=False)
    assert shown["events"][1]["agent"] == "cli-a" and shown["events"][1]["attempt"] == 1
    text = ok(cluster.cli("jobs", "show", str(job_id))).stdout
    assert "events:" in text and "completed" in text

    retried = ok_json(cluster.cli("jobs", "retry", str(job_id), "--json"))
    assert retried["retry_of"] == job_id and retried["id"] > job_id
    again = cluster.wait_terminal([retried["id"]], timeout=10)[retried["id"]]
    assert again["state"] == "completed" and again["spec"] == shown["spec"]
    line = ok(cluster.cli("jobs", "retry", str(job_id))).stdout.strip()
    assert line.startswith(f"job {job_id} resubmitted as job ")

    long_ids = ok_json(cluster.cli("submit", "sleep", "--set", "seconds=30", "--count", "2",
                                   "--json"))["ids"]
    wait_for(lambda: all(j["state"] == "running" for j in cluster.jobs(long_ids).values()), 15)
    one_line_error(cluster.cli("jobs", "retry", str(long_ids[0])), "conflict")
    res = ok_json(cluster.cli("jobs", "cancel", str(long_ids[0]), "--grace", "1", "--json"))
    assert res == [{"id": long_ids[0], "result": "cancelling"}]
    line = ok(cluster.cli("jobs", "cancel", str(long_ids[1]), "--grace", "0")).stdout.strip()
    assert line == f"job {long_ids[1]}: cancelling"
    final = cluster.wait_terminal(long_ids, timeout=10)
    assert {j["state"] for j in final.values()} == {"cancelled"}
    line = ok(cluster.cli("jobs", "cancel", str(long_ids[1]))).stdout.strip()
    assert line == f"job {long_ids[1]}: terminal"

    # watch follows a job to its end: 0 if it completed, 1 otherwise.
    assert cluster.cli("jobs", "watch", str(job_id)).returncode == 0
    assert cluster.cli("jobs", "watch", str(long_ids[0])).returncode == 1


def test_nodes_list_and_drain(cluster: Cluster) -> None:
    nodes = ok_json(cluster.cli("nodes", "list", "--json"))
    assert [n["name"] for n in nodes] == ["cli-a"]
    node = nodes[0]
    assert set(node) >= NODE_KEYS, NODE_KEYS - set(node)
    assert (node["state"], node["slots"], node["busy"]) == ("alive", 2, 0)
    assert "sleep" in node["workloads"]
    text = ok(cluster.cli("nodes", "list")).stdout.splitlines()
    assert text[0].split()[:2] == ["NAME", "STATE"] and text[1].split()[:2] == ["cli-a", "alive"]

    out = ok(cluster.cli("nodes", "drain", "cli-a")).stdout.strip()
    assert out == "agent cli-a: draining"
    assert ok_json(cluster.cli("nodes", "list", "--json"))[0]["state"] == "draining"
    job_id = cluster.client.submit([{"scenario": "noop"}])[0]
    out = ok(cluster.cli("nodes", "drain", "cli-a", "--undo")).stdout.strip()
    assert out == "agent cli-a: accepting work"
    assert cluster.wait_terminal([job_id], timeout=10)[job_id]["state"] == "completed"
    assert ok_json(cluster.cli("nodes", "list", "--json"))[0]["state"] == "alive"


def test_errors_are_one_line_and_non_zero(cluster: Cluster) -> None:
    one_line_error(cluster.cli("jobs", "show", "424242"), "not_found", "424242")
    one_line_error(cluster.cli("jobs", "retry", "424242"), "not_found", "424242")
    one_line_error(cluster.cli("jobs", "cancel", "424242"), "not_found", "424242")
    one_line_error(cluster.cli("nodes", "drain", "nobody"), "not_found", "nobody")
    one_line_error(cluster.cli("submit", "sleep", "--set", "seconds=-1"),
                   "invalid_spec", "params.seconds")
    one_line_error(cluster.cli("submit", "no-such-scenario"), "invalid_spec", "scenario")
    one_line_error(cluster.cli("submit", "sleep", "--set", "seconds"), "KEY=VALUE",
                   prefix="ffrtmp submit: ")
    one_line_error(cluster.cli("jobs", "list", "--state", "finished"), "bad_body", "finished")
    assert cluster.client.list_jobs() == []


def test_master_down_times_out_with_one_line(tmp_path: Path) -> None:
    dead = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["jobs", "list"], ["submit", "noop", "--json"], ["nodes", "list"]):
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "ffrtmp", "--master", dead, "--timeout", "1", *args],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=20, check=False)
        took = time.monotonic() - started
        line = one_line_error(proc, "timeout", dead)
        assert "within 1s" in line, line
        assert proc.stdout == ""
        assert took < 10, f"{args}: took {took:.1f}s with --timeout 1"


def test_ffrtmp_master_env_names_the_endpoint(cluster: Cluster) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FFRTMP_MASTER": cluster.clients_ep}
    proc = subprocess.run([sys.executable, "-m", "ffrtmp", "nodes", "list", "--json"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=30,
                          check=False)
    assert [n["name"] for n in ok_json(proc)] == ["cli-a"]
