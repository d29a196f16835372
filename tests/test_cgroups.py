"""Job cgroups for real (this host: cgroup v1 as root): join before exec, limits, accounting,
OOM told apart from other deaths, whole-tree kill, removal, leftovers of a crashed agent.

These drive `ProcessRun` + `CgroupHook` directly (no master/agent): tests/test_limits.py covers
the same through the whole system. The `backend` fixture runs each test twice: with a new
spawn that joins the cgroup ("spawn") and with the job exec'd by a standby launcher from the
backend's pool, renamed to the job's key ("standby").
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent.cgroups import CgroupHook, DiskWatch, Limits, detect, job_key, parent_name
from agent.cgroups.base import CgroupBackend, CgroupError, is_leftover
from agent.cgroups.v1 import V1Backend, parse_mounts, parse_own
from agent.runner import ProcessRun, Result
from cgroup_check import checked_prefix, ffrtmp_cgroups, job_cgroups
from conftest import cgroup_mode, wait_for

pytestmark = [pytest.mark.cgroups, pytest.mark.timeout(60)]
PY = sys.executable


prefix = pytest.fixture(checked_prefix)


@pytest.fixture(params=["spawn", "standby"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend(prefix: str, mode: str) -> Iterator[CgroupBackend]:
    b = detect("auto", f"{prefix}-unit")
    if b.name != cgroup_mode():
        pytest.fail(f"detected {b.describe()} on a {cgroup_mode()} host")
    try:
        if mode == "spawn":
            b.POOL_SIZE = 0  # type: ignore[misc]  # this instance only: no pool
        else:
            if not b.POOL_SIZE:
                pytest.fail(f"cgroup {b.name} here should keep a pool of standbys")
            warm(b)
        yield b
    finally:
        wait_for(lambda: b.sweep() == 0, 10, message="job cgroups removed")
        b.close()


def warm(b: CgroupBackend) -> None:
    """Start the backend's pool (the first take does) and wait until it is full."""
    handle, standby = b.take(job_key(99, 0), Limits())
    assert standby is None  # nothing was ready yet
    assert b.release(handle)
    wait_for(lambda: b.pooled() == b.POOL_SIZE, 15, message="the pool filled")


def used_standby(run: ProcessRun) -> bool:
    return run.proc is not None and "ffrtmp-standby" in list(run.proc.args)  # type: ignore


def ended(run: ProcessRun, timeout: float = 30.0, message: str = "") -> Result:
    """Poll a started run until it ends; its Result."""
    result = wait_for(lambda: run.poll(time.monotonic()), timeout, interval=0.02,
                      message=message or f"{run.argv} to end")
    assert result is not None
    return result


def run_to_end(run: ProcessRun, timeout: float = 30.0) -> Result:
    run.start(time.monotonic())
    return ended(run, timeout)


def synthetic(tmp: Path, *args: str, hooks: list, timeout_s: float | None = None,
              kill_grace_s: float = 5.0) -> ProcessRun:
    return ProcessRun([PY, "-m", "agent.synthetic", *args], tmp / "w", timeout_s, hooks=hooks,
                      kill_grace_s=kill_grace_s)


def test_detect_parses_this_host_and_nests_under_own_cgroup(backend: CgroupBackend,
                                                            prefix: str) -> None:
    assert backend.available and {"cpu", "memory"} <= backend.supports
    own = parse_own(Path("/proc/self/cgroup").read_text())
    mounts = parse_mounts(Path("/proc/self/mounts").read_text())
    mem_parent = mounts["memory"] / own["memory"].lstrip("/") / parent_name(f"{prefix}-unit")
    assert mem_parent in backend.parents()  # nested under our own memory cgroup, not the root
    with pytest.raises(CgroupError, match="--cgroup v2 cannot be used"):
        detect("v2", f"{prefix}-x", mounts="cgroup2 /nowhere cgroup2 rw 0 0\n", own="0::/\n")
    assert detect("none", "x").name == "none"
    assert detect("auto", "x", mounts="", own="").name == "none"


def test_child_is_in_its_cgroup_before_exec(backend: CgroupBackend, tmp_path: Path,
                                            mode: str) -> None:
    # The program reads its own cgroup as its very first act: it must already be the job's
    # (a join after spawn, by the parent, would race with this read).
    out = tmp_path / "cg.txt"
    hook = CgroupHook(backend, job_key(1, 2), Limits())
    run = ProcessRun(["sh", "-c", f"exec cat /proc/self/cgroup > {out}"], tmp_path / "w2", 10,
                     hooks=[hook])
    assert run_to_end(run).status == "completed"
    assert used_standby(run) == (mode == "standby")
    lines = out.read_text().splitlines()
    assert any(line.endswith(f"/{job_key(1, 2)}") and ":memory:" in line for line in lines), lines
    assert any(line.endswith(f"/{job_key(1, 2)}") and ":cpu:" in line for line in lines), lines


def test_cpu_quota_throttles_burn_and_cgroup_accounts_it(backend: CgroupBackend,
                                                         tmp_path: Path) -> None:
    hook = CgroupHook(backend, job_key(2, 1), Limits(cpu_percent=25))
    t0 = time.monotonic()
    result = run_to_end(synthetic(tmp_path, "burn", "--cpu-seconds", "0.5", hooks=[hook]))
    took = time.monotonic() - t0
    assert result.status == "completed", result
    assert took >= 1.6, f"0.5 CPU-s at 25 % took only {took:.2f}s"
    extra = result.extra
    assert extra["cgroup"] == backend.name and extra["limits_enforced"] is True
    assert extra["cpu_usage_s"] >= 0.45
    # A busy host may not even grant the quota every period; throttling shows all the same.
    assert extra["cpu_throttled_periods"] > 0 and extra["cpu_throttled_s"] > 0, extra


def test_memory_limit_oom_is_classified_from_the_cgroup(backend: CgroupBackend,
                                                        tmp_path: Path) -> None:
    hook = CgroupHook(backend, job_key(3, 1), Limits(memory_mb=64))
    result = run_to_end(synthetic(tmp_path, "hog", "--mb", "256", "--seconds", "5",
                                  hooks=[hook]))
    # The OOM killer's SIGKILL: the cgroup's verdict wins over reason `signal`.
    assert (result.status, result.reason, result.exit_code) == ("failed", "oom_killed", -9)
    assert "signal" not in result.extra
    assert result.extra["oom_kills"] >= 1
    assert result.extra["memory_peak_mb"] <= 64.5


def test_sigkill_that_is_not_an_oom_is_not_called_one(backend: CgroupBackend,
                                                      tmp_path: Path) -> None:
    """Exit by SIGKILL (code -9, the '137' case) with no OOM kill: reason `signal`, not OOM."""
    hook = CgroupHook(backend, job_key(4, 1), Limits(memory_mb=256))
    run = ProcessRun(["sh", "-c", "kill -9 $$"], tmp_path / "w", 10, hooks=[hook])
    result = run_to_end(run)
    assert (result.status, result.reason, result.exit_code) == ("failed", "signal", -9)
    assert result.extra["signal"] == "SIGKILL"
    assert result.extra["oom_kills"] == 0


def test_timeout_and_cancel_are_not_oom(backend: CgroupBackend, tmp_path: Path) -> None:
    hook = CgroupHook(backend, job_key(5, 1), Limits(memory_mb=256))
    run = synthetic(tmp_path, "sleep", "--seconds", "30", "--ignore-term", hooks=[hook],
                    timeout_s=0.5, kill_grace_s=0.5)
    result = run_to_end(run)
    assert (result.status, result.reason) == ("timed_out", "timeout")
    hook = CgroupHook(backend, job_key(5, 2), Limits(memory_mb=256))
    run = synthetic(tmp_path, "sleep", "--seconds", "30", hooks=[hook])
    run.start(time.monotonic())
    try:
        # During execve /proc/<pid>/cmdline reads empty for a moment: compare a slice.
        wait_for(lambda: run.pid and psutil.Process(run.pid).cmdline()[-1:] == ["30"], 10)
    finally:
        run.stop(time.monotonic(), 2.0)
        result = ended(run, 10)
    assert (result.status, result.reason) == ("cancelled", "cancelled_graceful")


def test_daemonized_grandchild_dies_with_the_job(backend: CgroupBackend, tmp_path: Path,
                                                 prefix: str) -> None:
    pidfile = tmp_path / "daemon.pid"
    # The grandchild leaves the session and process group: only the cgroup still holds it.
    script = (f"setsid sh -c 'trap \"\" TERM; echo $$ > {pidfile}; exec sleep 300' "
              "</dev/null >/dev/null 2>&1 & exec sleep 300")
    hook = CgroupHook(backend, job_key(6, 1), Limits())
    run = ProcessRun(["sh", "-c", script], tmp_path / "w", None, hooks=[hook])
    run.start(time.monotonic())
    daemon = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10))
    assert psutil.Process(daemon).pid in {p for p in (hook.handle.pids() if hook.handle else [])}
    assert os.getpgid(daemon) != run.pid
    run.stop(time.monotonic(), 1.0)
    result = ended(run, 10)
    assert result.status == "cancelled"
    wait_for(lambda: not psutil.pid_exists(daemon)
             or psutil.Process(daemon).status() == psutil.STATUS_ZOMBIE, 5,
             message="daemonized grandchild killed")
    wait_for(lambda: backend.sweep() == 0 and not job_cgroups(prefix), 5,
             message="job cgroup removed")


def test_pids_limit_holds(backend: CgroupBackend, tmp_path: Path) -> None:
    if "pids" not in backend.supports:
        pytest.fail("this host has a pids controller; the backend did not pick it up")
    out = tmp_path / "forks.txt"
    script = f"for i in $(seq 1 40); do (sleep 5 &) 2>/dev/null || echo fail >> {out}; done"
    hook = CgroupHook(backend, job_key(7, 1), Limits(pids_max=10))
    run = ProcessRun(["sh", "-c", script], tmp_path / "w", 30, hooks=[hook])
    run_to_end(run)
    assert out.exists() and "fail" in out.read_text()


def test_spawn_failure_removes_the_cgroup(backend: CgroupBackend, tmp_path: Path,
                                          prefix: str) -> None:
    hook = CgroupHook(backend, job_key(8, 1), Limits(memory_mb=64))
    run = ProcessRun(["/nonexistent/binary"], tmp_path / "w", 10, hooks=[hook])
    with pytest.raises(OSError):
        run.start(time.monotonic())
    assert backend.sweep() == 0
    assert not job_cgroups(prefix)


def test_leftovers_of_a_dead_agent_are_killed_and_removed(prefix: str, tmp_path: Path) -> None:
    name = f"{prefix}-crash"
    # A "crashed agent": a process that created a job cgroup and died, leaving a daemon in it.
    dead = subprocess.Popen(["true"])
    dead.wait()
    first = detect("auto", name)
    assert isinstance(first, V1Backend) or first.name == "v2"
    handle = first.create(job_key(9, 1, pid=dead.pid), Limits(memory_mb=64))
    fd = [os.open(p, os.O_WRONLY) for p in handle.procs_paths]
    try:
        orphan = subprocess.Popen(["sleep", "300"], preexec_fn=lambda: [os.write(f, b"0")
                                                                        for f in fd])
    finally:
        for f in fd:
            os.close(f)
    live = first.create(job_key(9, 2), Limits())  # ours (this pid is alive): must stay
    assert is_leftover(handle.key) and not is_leftover(live.key)
    second = detect("auto", name)  # the restarted agent
    assert second.cleanup_leftovers() == 1
    assert orphan.wait(timeout=5) == -9
    wait_for(lambda: second.sweep() == 0 and not any(d.exists() for d in handle.dirs), 5)
    assert all(d.exists() for d in live.dirs)
    assert second.release(live)
    first.close()  # its pool (create() started one), not the crashed agent's jobs
    second.close()
    assert not ffrtmp_cgroups(prefix)


def test_a_standby_job_runs_at_its_priority_with_fresh_counters(backend: CgroupBackend,
                                                                 tmp_path: Path,
                                                                 mode: str) -> None:
    out = tmp_path / "nice.txt"
    hook = CgroupHook(backend, job_key(10, 1), Limits(memory_mb=128))
    run = ProcessRun(["sh", "-c", f"ps -o ni= -p $$ > {out}"], tmp_path / "w", 10,
                     hooks=[hook], nice=10)
    result = run_to_end(run)
    assert result.status == "completed" and used_standby(run) == (mode == "standby")
    assert int(out.read_text()) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    # the standby's own start-up is not the job's: its counters were reset at take
    assert result.extra["cpu_usage_s"] < 0.5 and result.extra["memory_peak_mb"] < 64


def test_pool_is_named_for_the_leftover_rule_and_goes_at_close(prefix: str) -> None:
    b = detect("auto", f"{prefix}-pool")
    warm(b)
    pooled = [d for d in ffrtmp_cgroups(prefix) if d.name.startswith("pool-")]
    assert len({d.name for d in pooled}) == b.POOL_SIZE
    assert all(d.name.startswith(f"pool-{os.getpid()}-") for d in pooled)
    assert not any(is_leftover(d.name) for d in pooled)  # ours: alive
    assert is_leftover("pool-999999999-3") and is_leftover(job_key(1, 1, pid=999999999))
    standbys = [int(p) for d in pooled for p in (d / "cgroup.procs").read_text().split()]
    assert len(set(standbys)) == b.POOL_SIZE
    b.close()
    assert not ffrtmp_cgroups(prefix)
    for pid in set(standbys):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == \
            psutil.STATUS_ZOMBIE


def test_a_killed_agents_pool_goes_with_it(prefix: str) -> None:
    """kill -9 of an agent with a full pool: its standbys die with it (PR_SET_PDEATHSIG) and
    the next agent of that name removes the pooled cgroups it left."""
    name = f"{prefix}-crashpool"
    script = (f"import time\nfrom agent.cgroups import detect, Limits, job_key\n"
              f"b = detect('auto', {name!r})\nh, _ = b.take(job_key(1, 1), Limits())\n"
              f"b.release(h)\nwhile b.pooled() < b.POOL_SIZE: time.sleep(0.01)\n"
              f"print('full', flush=True)\ntime.sleep(60)\n")
    agent = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE)
    try:
        assert agent.stdout is not None and agent.stdout.readline() == b"full\n"
        pooled = [d for d in ffrtmp_cgroups(prefix) if d.name.startswith("pool-")]
        standbys = [psutil.Process(int(p)) for d in pooled
                    for p in (d / "cgroup.procs").read_text().split()]
        assert standbys
        agent.kill()
        agent.wait()
        wait_for(lambda: all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
                             for p in standbys), 10, message="standbys died with the agent")
        second = detect("auto", name)
        assert second.cleanup_leftovers() == len({d.name for d in pooled})
        wait_for(lambda: second.sweep() == 0 and not any(d.exists() for d in pooled), 10)
        second.close()
        assert not ffrtmp_cgroups(prefix)
    finally:
        agent.kill()
        agent.wait()
        if agent.stdout is not None:
            agent.stdout.close()


def test_disk_watch_stops_a_job_that_writes_too_much(tmp_path: Path) -> None:
    script = "head -c 3000000 /dev/zero > scratch.bin; sleep 30"
    run = ProcessRun(["sh", "-c", script], tmp_path / "w", 30, hooks=[DiskWatch(1, every_s=0.1)],
                     kill_grace_s=1.0)
    t0 = time.monotonic()
    result = run_to_end(run)
    assert (result.status, result.reason) == ("failed", "disk_limit"), result
    assert result.extra["disk_peak_mb"] >= 2.5
    assert time.monotonic() - t0 < 5
