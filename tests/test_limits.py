"""Resource enforcement through the whole system (real master, agents, cgroups, processes):
CPU and memory limits, timeouts, cancellation of many jobs, reservation and placement.

Figures the issue asks for are printed (`-s` shows them): throttled burn duration, OOM, cancel
times.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.cgroups import Limits, detect, job_key
from cgroup_check import checked_prefix, job_cgroups
from conftest import wait_for
from harness import TERMINAL, Cluster, ignores_sigterm

pytestmark = [pytest.mark.cgroups, pytest.mark.once, pytest.mark.timeout(120)]


def ts(value: float | None) -> float:
    """A wire timestamp: float UNIX epoch seconds (docs/protocol.md "Frames")."""
    assert isinstance(value, float), value
    return value


def ran_for(job: dict[str, Any]) -> float:
    """Start (ACCEPT) to finish (DONE), s, as the master recorded it."""
    return ts(job["finished_at"]) - ts(job["started_at"])


def spec(scenario: str, cpu: int | None = None, memory: int | None = None,
         timeout: float | None = None, **params: Any) -> dict[str, Any]:
    limits = {k: v for k, v in (("max_cpu_percent", cpu), ("max_memory_mb", memory))
              if v is not None}
    out: dict[str, Any] = {"scenario": scenario, "params": params, "resource_limits": limits,
                           "max_attempts": 1}
    if timeout is not None:
        out["timeout_s"] = timeout
    return out


def events(c: Cluster, job_id: int) -> list[dict[str, Any]]:
    return c.job(job_id, events=True)["events"]


def state_is(c: Cluster, job_id: int, *states: str) -> dict[str, Any] | None:
    job = c.jobs([job_id])[job_id]
    return job if job["state"] in states else None


prefix = pytest.fixture(checked_prefix)


@pytest.fixture
def cluster(tmp_path: Path, prefix: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path}/ffrtmp.db")
    try:
        c.start_master()
        yield c
    finally:
        c.close()


def agent(c: Cluster, prefix: str, name: str, slots: int = 4, *extra: str) -> str:
    full = f"{prefix}{name}"
    c.start_agent(full, slots, *extra)
    wait_for(lambda: (n := c.node(full)) and n["credit"] > 0, 10, message=f"{full} credit")
    return full


def no_job_left(c: Cluster, prefix: str, name: str) -> bool:
    """No process, job cgroup or scratch of this cluster's jobs is left."""
    jobs_dir = c.tmp / f"work-{name}" / "jobs"
    return (not c.synthetic_children() and not job_cgroups(prefix)
            and (not jobs_dir.exists() or not any(jobs_dir.iterdir())))


# ----------------------------------------------------------------------------------- CPU, memory


def test_cpu_limit_throttles_burn_and_the_cgroup_accounts_it(cluster: Cluster,
                                                             prefix: str) -> None:
    a = agent(cluster, prefix, "cpu", 2)
    node = cluster.node(a)
    assert node is not None and (node["cgroup"], node["limits"]) == ("v1", "required")
    limited, free = cluster.client.submit([spec("burn", cpu=25, cpu_seconds=1),
                                           spec("burn", cpu_seconds=1)])
    final = cluster.wait_terminal([limited, free], timeout=30)
    lim, unl = final[limited], final[free]
    assert lim["state"] == unl["state"] == "completed", (lim, unl)
    print(f"\nburn 1 CPU-s: at --cpu 25 {ran_for(lim):.2f}s, unlimited {ran_for(unl):.2f}s; "
          f"throttled {lim['extra']['cpu_throttled_periods']} periods, "
          f"{lim['extra']['cpu_throttled_s']:.2f}s")
    assert ran_for(lim) >= 3.5  # (unlimited: about 1 s on an idle host, more on a busy one)
    extra = lim["extra"]
    assert extra["limits_enforced"] is True and extra["cgroup"] == "v1"
    assert extra["cpu_usage_s"] >= 0.95
    assert extra["cpu_throttled_periods"] > 0 and extra["cpu_throttled_s"] > 0.2, extra
    assert unl["extra"]["cpu_throttled_periods"] == 0
    wait_for(lambda: no_job_left(cluster, prefix, a), 5, message="jobs cleaned up")


def test_memory_limit_ends_oom_killed_and_the_agent_survives(cluster: Cluster,
                                                             prefix: str) -> None:
    a = agent(cluster, prefix, "mem", 2)
    hog = cluster.client.submit([spec("hog", memory=128, mb=400, seconds=10)])[0]
    job = cluster.wait_terminal([hog], timeout=30)[hog]
    print(f"\nhog 400 MB at --memory 128: {job['state']}/{job['reason']} after "
          f"{ran_for(job):.2f}s, peak {job['extra'].get('memory_peak_mb')} MB, "
          f"oom_kills {job['extra'].get('oom_kills')}")
    assert (job["state"], job["reason"], job["attempt"]) == ("failed", "oom_killed", 1)
    assert job["extra"]["oom_kills"] >= 1 and job["extra"]["memory_peak_mb"] <= 128.5
    assert cluster.agents[a].poll() is None, "the agent died with its job"
    after = cluster.client.submit([spec("sleep", seconds=0.1)])[0]
    assert cluster.wait_terminal([after], timeout=15)[after]["state"] == "completed"
    assert cluster.job(after)["agent"] == a
    wait_for(lambda: no_job_left(cluster, prefix, a), 5, message="jobs cleaned up")


# ----------------------------------------------------------------------------------- timeouts


def test_timeout_ends_timed_out_within_timeout_plus_grace(cluster: Cluster, prefix: str) -> None:
    a = agent(cluster, prefix, "time", 2, "--kill-grace", "1.5")
    polite, stubborn = cluster.client.submit([
        spec("sleep", timeout=2, seconds=30),
        spec("sleep", timeout=2, seconds=30, ignore_term=1)])
    final = cluster.wait_terminal([polite, stubborn], timeout=20)
    for job_id in (polite, stubborn):
        job = final[job_id]
        assert (job["state"], job["reason"], job["attempt"]) == ("timed_out", "timeout", 1), job
    print(f"\n--timeout 2 on sleep 30: {ran_for(final[polite]):.2f}s (exits on SIGTERM), "
          f"{ran_for(final[stubborn]):.2f}s (ignores it; grace 1.5 s)")
    # started_at/finished_at are the master's clock at ACCEPT and DONE: 0.1 s of slack below.
    assert 2.0 - 0.1 <= ran_for(final[polite]) <= 2 + 1.5 + 1
    assert 2.0 + 1.5 - 0.1 <= ran_for(final[stubborn]) <= 2 + 1.5 + 1
    wait_for(lambda: no_job_left(cluster, prefix, a), 5, message="jobs cleaned up")


# ----------------------------------------------------------------------------------- cancel


def test_eight_running_jobs_cancelled_at_once(cluster: Cluster, prefix: str) -> None:
    a = agent(cluster, prefix, "wide", 8)
    polite = cluster.client.submit([spec("sleep", memory=256, seconds=60)] * 6)
    stubborn = cluster.client.submit([spec("sleep", memory=256, seconds=60, ignore_term=1)] * 2)
    ids = polite + stubborn
    wait_for(lambda: all(j["state"] == "running" for j in cluster.jobs(ids).values()), 20,
             message="8 jobs running")
    wait_for(lambda: len(cluster.synthetic_children()) == 8, 10, message="8 children")
    wait_for(lambda: len(job_cgroups(prefix)) >= 8, 5, message="8 job cgroups")
    wait_for(lambda: sum(ignores_sigterm(p.pid) for p in cluster.synthetic_children()) == 2, 10,
             message="2 children ignore SIGTERM")
    grace = 2.0
    asked = datetime.now().timestamp()
    assert {r["result"] for r in cluster.client.cancel(ids, grace_s=grace)} == {"cancelling"}
    final = cluster.wait_terminal(ids, timeout=grace + 5)
    took = max(ts(j["finished_at"]) for j in final.values()) - asked
    reasons = Counter((j["state"], j["reason"]) for j in final.values())
    print(f"\n8 cancels (grace {grace}s): all terminal {took:.2f}s after the request: "
          f"{dict(reasons)}")
    assert took <= grace + 5
    assert {final[i]["reason"] for i in polite} == {"cancelled_graceful"}
    assert {final[i]["reason"] for i in stubborn} == {"cancelled_forced"}
    assert reasons == {("cancelled", "cancelled_graceful"): 6, ("cancelled", "cancelled_forced"): 2}
    wait_for(lambda: no_job_left(cluster, prefix, a), 5,
             message="no process, job cgroup or temp dir left")
    node = cluster.node(a)
    assert node is not None and node["busy"] == 0


def test_cancel_racing_completion_has_exactly_one_terminal_state(cluster: Cluster,
                                                                 prefix: str) -> None:
    agent(cluster, prefix, "race", 8)
    seconds = [0.02 * (i % 10) for i in range(48)]
    ids = cluster.client.submit([spec("sleep", seconds=s) for s in seconds])
    # Cancel each job about when it ends (its sleep plus ~50 ms of interpreter start, give or
    # take): some DONEs overtake the CANCEL, some CANCELs overtake the DONE.
    due = {job_id: s + 0.025 * (i % 5)
           for i, (job_id, s) in enumerate(zip(ids, seconds, strict=True))}
    seen: set[str] = set()
    pending = list(ids)
    while pending:
        jobs = cluster.jobs(pending)
        now = time.time()
        ripe = [i for i, j in jobs.items() if j["state"] == "running" and j["started_at"]
                and now - ts(j["started_at"]) >= due[i]]
        if ripe:
            seen.update(r["result"] for r in cluster.client.cancel(ripe, grace_s=0.5))
        pending = [i for i, j in jobs.items() if j["state"] not in TERMINAL and i not in ripe
                   and j["state"] != "cancelling"]
    final = cluster.wait_terminal(ids, timeout=30)
    states = Counter(j["state"] for j in final.values())
    print(f"\ncancel racing completion: {dict(states)}; cancel replies {sorted(seen)}")
    assert set(states) <= {"completed", "cancelled"}
    for job_id in ids:
        evs = events(cluster, job_id)
        terminal = [e for e in evs if e["state"] in TERMINAL]
        assert len(terminal) == 1, evs
        assert evs[-1] is terminal[0] and terminal[0]["state"] == final[job_id]["state"]
    wait_for(lambda: not cluster.synthetic_children() and not job_cgroups(prefix), 5)


# ----------------------------------------------------------------------------------- admission


def test_a_job_that_does_not_fit_waits_and_is_never_started_and_killed(cluster: Cluster,
                                                                       prefix: str) -> None:
    a = agent(cluster, prefix, "fit", 4)
    cpus = len(os.sched_getaffinity(0))
    big = min(100 * cpus, max(51 * cpus, 150))  # more than half the host: two never fit
    first = cluster.client.submit([spec("sleep", cpu=big, seconds=3)])[0]
    wait_for(lambda: state_is(cluster, first, "running"), 10, message="first running")
    second = cluster.client.submit([spec("sleep", cpu=big, seconds=0.5)])[0]
    # It is offered, refused before anything starts, and waits at the head of its queue.
    wait_for(lambda: any(e["reason"] == "resources" for e in events(cluster, second)), 10,
             message="REJECT resources")
    assert state_is(cluster, second, "queued", "assigned")
    assert not (cluster.tmp / f"work-{a}" / "jobs" / f"{second}-1").exists()
    node = cluster.node(a)
    assert node is not None and node["busy"] == 1
    final = cluster.wait_terminal([first, second], timeout=30)
    assert final[first]["state"] == final[second]["state"] == "completed"
    assert ts(final[second]["started_at"]) >= ts(final[first]["finished_at"]) - 0.05
    evs = events(cluster, second)
    assert [e["state"] for e in evs].count("running") == 1
    assert final[second]["attempt"] - 1 == sum(1 for e in evs if e["reason"] == "resources")
    print(f"\nnon-fitting job: {sum(1 for e in evs if e['reason'] == 'resources')} REJECT(s), "
          f"started {ts(final[second]['started_at']) - ts(final[first]['finished_at']):.2f}s "
          f"after the first finished")


def test_a_job_that_does_not_fit_goes_to_another_agent(cluster: Cluster, prefix: str) -> None:
    agent(cluster, prefix, "one", 2)
    agent(cluster, prefix, "two", 2)
    cpus = len(os.sched_getaffinity(0))
    big = min(100 * cpus, max(51 * cpus, 150))
    first = cluster.client.submit([spec("sleep", cpu=big, seconds=6)])[0]
    wait_for(lambda: state_is(cluster, first, "running"), 10, message="first running")
    second = cluster.client.submit([spec("sleep", cpu=big, seconds=0.2)])[0]
    job = cluster.wait_terminal([second], timeout=10)[second]
    assert job["state"] == "completed"
    assert job["agent"] != cluster.job(first)["agent"]
    assert state_is(cluster, first, "running"), "it had to wait for the first after all"
    cluster.client.cancel([first], grace_s=0)
    cluster.wait_terminal([first], timeout=10)


def test_placement_by_policy_and_advertised_size(cluster: Cluster, prefix: str) -> None:
    req = agent(cluster, prefix, "req", 2, "--cgroup", "none", "--limits", "required")
    eff = agent(cluster, prefix, "eff", 2, "--cgroup", "none", "--limits", "best-effort")
    cg = agent(cluster, prefix, "cg", 2)
    nodes = {n["name"]: n for n in cluster.client.nodes()}
    assert (nodes[req]["cgroup"], nodes[req]["limits"]) == ("none", "required")
    assert (nodes[eff]["cgroup"], nodes[eff]["limits"]) == ("none", "best-effort")
    assert (nodes[cg]["cgroup"], nodes[cg]["limits"]) == ("v1", "required")
    out = cluster.cli("nodes", "list")
    assert out.returncode == 0 and "best-effort" in out.stdout and "v1" in out.stdout
    huge = nodes[cg]["resources"]["memory_mb"] * 4
    too_big = cluster.client.submit([spec("sleep", memory=huge, seconds=0.1)])[0]
    limited = cluster.client.submit([spec("sleep", memory=256, seconds=0.3)] * 8)
    free = cluster.client.submit([spec("sleep", seconds=0.3)] * 6)
    final = cluster.wait_terminal(limited + free, timeout=30)
    assert {j["state"] for j in final.values()} == {"completed"}
    on = Counter(final[i]["agent"] for i in limited)
    assert req not in on and set(on) <= {eff, cg}, on
    for i in limited:
        enforced = final[i]["extra"]["limits_enforced"]
        assert enforced is (final[i]["agent"] == cg), final[i]
    # The job bigger than any agent waits instead of being sent somewhere it cannot fit.
    assert state_is(cluster, too_big, "queued")
    assert [e["state"] for e in events(cluster, too_big)] == ["queued"]
    cluster.client.cancel([too_big])


def test_agent_under_the_disk_floor_takes_no_work(cluster: Cluster, prefix: str) -> None:
    full = f"{prefix}full"
    cluster.start_agent(full, 2, "--disk-floor-mb", str(10**12))  # "disk full"
    node = cluster.node(full)
    assert node is not None and node["credit"] == 0
    job = cluster.client.submit([spec("sleep", seconds=0.1)])[0]
    other = agent(cluster, prefix, "roomy", 1)
    final = cluster.wait_terminal([job], timeout=15)[job]
    assert (final["state"], final["agent"]) == ("completed", other)
    node = cluster.node(full)
    assert node is not None and node["credit"] == 0


# ----------------------------------------------------------------------------------- crashes


def test_leftover_cgroups_of_a_crashed_agent_are_removed_at_start(cluster: Cluster,
                                                                  prefix: str) -> None:
    name = f"{prefix}crash"
    # What a crashed agent leaves: a job cgroup holding a daemon that outlived the job.
    dead = subprocess.Popen(["true"])
    dead.wait()
    ours = detect("auto", name)
    handle = ours.create(job_key(77, 1, pid=dead.pid), Limits(memory_mb=64))
    fds = [os.open(p, os.O_WRONLY) for p in handle.procs_paths]
    try:
        daemon = subprocess.Popen(["sleep", "300"], start_new_session=True,
                                  preexec_fn=lambda: [os.write(f, b"0") for f in fds])
    finally:
        for f in fds:
            os.close(f)
    proc = cluster.start_agent(name, 1)
    assert daemon.wait(timeout=10) == -9
    wait_for(lambda: not any(d.exists() for d in handle.dirs), 5, message="leftover removed")
    # And a real crash: kill -9 with a job running, restart, nothing of it remains.
    job = cluster.client.submit([spec("sleep", memory=128, seconds=60)])[0]
    wait_for(lambda: state_is(cluster, job, "running"), 10)
    wait_for(lambda: job_cgroups(prefix), 5, message="its job cgroup")
    cluster.kill9(proc)
    wait_for(lambda: not cluster.synthetic_children(), 10, message="child died with the agent")
    cluster.start_agent(name, 1)
    wait_for(lambda: not job_cgroups(prefix), 10, message="crashed agent's job cgroup removed")
    cluster.client.cancel([job], grace_s=0)
    cluster.wait_terminal([job], timeout=30)
    assert psutil.pid_exists(os.getpid())
