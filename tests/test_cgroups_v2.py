"""The cgroup v2 backend: its file writes against a fake cgroup2 tree, and a real cgroup2
hierarchy where the host has one (this host's v2 mount has no cpu/memory controllers: the full
test is not applicable here, the containment test runs on the bare hierarchy)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import agent.cgroups.base as base
import agent.cgroups.v2 as v2mod
from agent.cgroups import CgroupHook, Limits, detect, job_key
from agent.cgroups.base import CgroupError
from agent.cgroups.v2 import V2Backend, parse_mount, parse_own
from agent.runner import ProcessRun, Result
from cgroup_check import checked_prefix
from conftest import have_root_cgroups, skip_not_applicable, wait_for

PY = sys.executable
KEY = job_key(41, 2)


def ended(run: ProcessRun, timeout: float = 30.0, message: str = "") -> Result:
    """Poll a started run until it ends; its Result."""
    result = wait_for(lambda: run.poll(time.monotonic()), timeout, interval=0.02,
                      message=message or f"{run.argv} to end")
    assert result is not None
    return result


# ------------------------------------------------------------------------- a fake cgroup2 tree


class FakeTree:
    """A temp dir shaped like a cgroup2 mount; records what the backend writes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.writes: list[tuple[str, str]] = []
        self.node(root, controllers="cpuset cpu io memory pids", subtree="")

    def node(self, path: Path, controllers: str = "cpu memory pids", subtree: str = "") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        for name, text in (("cgroup.controllers", controllers), ("cgroup.subtree_control", subtree),
                           ("cgroup.procs", ""), ("cgroup.events", "populated 0\nfrozen 0\n")):
            (path / name).write_text(text + ("\n" if text else ""))
        return path

    def job(self, parent: Path, key: str = KEY) -> Path:
        """What mkdir gives on a real cgroup2 fs: the interface files of the enabled controllers."""
        d = self.node(parent / key)
        for name, text in (("cpu.max", "max 100000"), ("memory.max", "max"),
                           ("memory.swap.max", "max"), ("memory.oom.group", "0"),
                           ("pids.max", "max"), ("cgroup.kill", ""), ("cgroup.freeze", "0"),
                           ("memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"),
                           ("memory.peak", "0"),
                           ("cpu.stat", "usage_usec 0\nnr_periods 0\nnr_throttled 0\n"
                                        "throttled_usec 0\n")):
            (d / name).write_text(text + "\n")
        return d

    def rel(self, path: Path) -> str:
        return "/" + str(path.relative_to(self.root))

    def read(self, path: Path) -> str:
        return path.read_text().strip()


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTree]:
    tree = FakeTree(tmp_path / "cgroup")
    real_write, real_rmdir = v2mod.write, base.rmdir

    def write(path: Path, value: str) -> None:
        tree.writes.append((tree.rel(path), value))
        if path.name == "cgroup.subtree_control":  # the kernel's +ctrl/-ctrl semantics
            have = set(path.read_text().split())
            for tok in value.split():
                (have.add if tok[0] == "+" else have.discard)(tok[1:])
            value = " ".join(sorted(have))
        real_write(path, value)

    def rmdir(path: Path) -> bool:  # a cgroup dir goes away with its interface files
        if not path.is_relative_to(tree.root):
            return real_rmdir(path)
        if not path.exists():
            return True
        if any(c.is_dir() for c in path.iterdir()) or (path / "cgroup.procs").read_text().strip():
            return False  # EBUSY: child cgroups or processes
        shutil.rmtree(path)
        return True

    real_mkdir = Path.mkdir

    # Interface files appear with a new cgroup directory. Patched on Path (what the backend
    # calls), not os.mkdir: before Python 3.11 Path.mkdir held its own reference to os.mkdir.
    def mkdir(self: Path, mode: int = 0o777, parents: bool = False,
              exist_ok: bool = False) -> None:
        existed = self.exists()
        real_mkdir(self, mode, parents, exist_ok)
        if not existed and self.is_relative_to(tree.root) and self != tree.root:
            tree.job(self.parent, self.name)

    monkeypatch.setattr(v2mod, "write", write)
    monkeypatch.setattr(base, "rmdir", rmdir)
    monkeypatch.setattr(v2mod, "rmdir", rmdir)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    yield tree


def test_parse_mount_and_own() -> None:
    mounts = ("tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
              "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0\n")
    assert parse_mount(mounts) == Path("/sys/fs/cgroup/unified")
    assert parse_mount("cgroup /x cgroup rw,cpu 0 0\n") is None
    assert parse_own("4:memory:/a\n0::/system.slice/ffrtmp.service\n") == \
        "/system.slice/ffrtmp.service"
    assert parse_own("1:cpu:/\n") is None


def test_setup_enables_controllers_down_to_the_parent(fake: FakeTree) -> None:
    fake.node(fake.root / "svc.slice")
    b = V2Backend(fake.root, "/svc.slice/ffrtmp-a1")
    assert b.available, b.reason
    assert b.supports == {"cpu", "memory", "pids"}
    assert ("/cgroup.subtree_control", "+cpu +memory +pids") in fake.writes
    assert ("/svc.slice/cgroup.subtree_control", "+cpu +memory +pids") in fake.writes
    assert ("/svc.slice/ffrtmp-a1/cgroup.subtree_control", "+cpu +memory +pids") in fake.writes
    # Already enabled: nothing written again.
    fake.writes.clear()
    assert V2Backend(fake.root, "/svc.slice/ffrtmp-a1").available
    assert not [w for w in fake.writes if w[0].endswith("subtree_control")]


def test_setup_without_memory_controller_is_unavailable(fake: FakeTree) -> None:
    (fake.root / "cgroup.controllers").write_text("cpu io pids\n")
    b = V2Backend(fake.root, "/ffrtmp-a1")
    assert not b.available and "memory" in b.reason
    with pytest.raises(CgroupError):
        b.create(KEY, Limits())


def test_create_writes_every_limit(fake: FakeTree) -> None:
    b = V2Backend(fake.root, "/ffrtmp-a1")
    job = fake.job(b.parent)
    handle = b.create(KEY, Limits(cpu_percent=150, memory_mb=512, pids_max=4096))
    assert handle.procs_path == job / "cgroup.procs"
    assert fake.read(job / "cpu.max") == "150000 100000"
    assert fake.read(job / "memory.max") == str(512 * 2**20)
    assert fake.read(job / "memory.swap.max") == "0"
    assert fake.read(job / "memory.oom.group") == "1"
    assert fake.read(job / "pids.max") == "4096"
    # Unlimited: no cpu.max/memory.max write, but an OOM still takes the whole job.
    job2 = fake.job(b.parent, "job-1-2-3")
    b.create("job-1-2-3", Limits())
    assert fake.read(job2 / "cpu.max") == "max 100000"
    assert fake.read(job2 / "memory.max") == "max"
    assert fake.read(job2 / "memory.oom.group") == "1"


def test_stats_kill_and_remove(fake: FakeTree) -> None:
    b = V2Backend(fake.root, "/ffrtmp-a1")
    job = fake.job(b.parent)
    handle = b.create(KEY, Limits(cpu_percent=25))
    (job / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1\nsystem_usec 2\n"
                                  "nr_periods 40\nnr_throttled 31\nthrottled_usec 2750000\n")
    (job / "memory.peak").write_text(str(96 * 2**20) + "\n")
    (job / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n")
    stats = handle.stats()
    assert stats.extra() == {"cpu_usage_s": 1.5, "cpu_periods": 40, "cpu_throttled_periods": 31,
                             "cpu_throttled_s": 2.75, "memory_peak_mb": 96.0,
                             "memory_limit_hits": 7, "oom_kills": 1}
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (job / "cgroup.procs").write_text(f"{sleeper.pid}\n")
        assert handle.kill_all() == 1
        assert fake.read(job / "cgroup.kill") == "1"  # the kernel would kill them now
        assert sleeper.poll() is None
        # Without cgroup.kill (Linux < 5.14): freeze, SIGKILL each pid, thaw.
        (job / "cgroup.kill").unlink()
        (job / "cgroup.events").write_text("populated 1\nfrozen 1\n")
        fake.writes.clear()
        assert handle.kill_all() == 1
        assert sleeper.wait(timeout=5) == -9
        assert [w for w in fake.writes if "freeze" in w[0]] == [
            (fake.rel(job / "cgroup.freeze"), "1"), (fake.rel(job / "cgroup.freeze"), "0")]
    finally:
        sleeper.kill()
        sleeper.wait()
    (job / "cgroup.procs").write_text("")
    assert b.release(handle) and not job.exists()
    b.close()
    assert not b.parent.exists()


def test_hook_joins_before_exec_and_reads_oom(fake: FakeTree, tmp_path: Path) -> None:
    b = V2Backend(fake.root, "/ffrtmp-a1")
    job = fake.job(b.parent)
    (job / "memory.events").write_text("oom 1\noom_kill 1\n")
    hook = CgroupHook(b, KEY, Limits(memory_mb=64))
    run = ProcessRun(["sh", "-c", "kill -9 $$"], tmp_path / "w", 10, hooks=[hook])
    run.start(time.monotonic())
    result: Result = ended(run, 10)
    assert (result.status, result.reason) == ("failed", "oom_killed")
    assert result.extra["cgroup"] == "v2" and result.extra["oom_kills"] == 1
    # The child wrote "0" (itself) through the fd opened before the fork; the agent did not.
    assert fake.read(job / "cgroup.procs") == "0"
    assert not [w for w in fake.writes if w[0].endswith("cgroup.procs")]
    assert fake.read(job / "cgroup.kill") == "1"  # whatever was left of the tree
    (job / "cgroup.procs").write_text("")  # the kernel empties it as the processes exit
    assert b.sweep() == 0 and not job.exists()
    b.close()


def test_leftovers_on_v2(fake: FakeTree) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    b = V2Backend(fake.root, "/ffrtmp-a1")
    stale = fake.job(b.parent, job_key(1, 1, pid=dead.pid))
    mine = fake.job(b.parent, job_key(1, 2))
    assert b.cleanup_leftovers() == 1
    assert not stale.exists() and mine.exists()


# ------------------------------------------------------------------------- real cgroup2


def _v2_mount() -> Path | None:
    return parse_mount(Path("/proc/self/mounts").read_text())


prefix = pytest.fixture(checked_prefix)


@pytest.mark.cgroups
def test_real_v2_containment_join_kill_remove(prefix: str, tmp_path: Path) -> None:
    """On any writable cgroup2 hierarchy (even one without controllers): the child joins before
    exec, a daemonized grandchild is caught, cgroup.kill ends the whole tree, removal works."""
    mount = _v2_mount()
    if mount is None or not os.access(mount, os.W_OK):
        skip_not_applicable("no writable cgroup2 hierarchy")
    assert mount is not None
    own = parse_own(Path("/proc/self/cgroup").read_text()) or "/"
    b = V2Backend(mount, f"{own.rstrip('/')}/ffrtmp-{prefix}-v2", required=())
    if not b.available:
        skip_not_applicable(f"cgroup2 hierarchy not usable for a subtree: {b.reason}")
    pidfile = tmp_path / "daemon.pid"
    script = (f"setsid sh -c 'trap \"\" TERM; echo $$ > {pidfile}; exec sleep 300' "
              "</dev/null >/dev/null 2>&1 & exec sleep 300")
    hook = CgroupHook(b, job_key(50, 1), Limits())
    run = ProcessRun(["sh", "-c", script], tmp_path / "w", None, hooks=[hook])
    run.start(time.monotonic())
    try:
        daemon = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10))
        assert hook.handle is not None and daemon in hook.handle.pids()
        assert run.pid in hook.handle.pids()
    finally:
        run.stop(time.monotonic(), 0.0)
    result = ended(run, 10)
    assert (result.status, result.reason) == ("cancelled", "cancelled_forced")
    wait_for(lambda: not psutil.pid_exists(daemon)
             or psutil.Process(daemon).status() == psutil.STATUS_ZOMBIE, 5)
    wait_for(lambda: b.sweep() == 0, 5)
    b.close()
    assert not b.parent.exists()


@pytest.mark.cgroups
def test_real_v2_limits_hold(prefix: str, tmp_path: Path) -> None:
    """Full v2 enforcement (cpu.max throttles, memory.max OOM-kills) on a host whose cgroup2
    hierarchy has the cpu and memory controllers."""
    if not have_root_cgroups():
        pytest.skip("needs root")
    try:
        b = detect("v2", f"{prefix}-v2full")
    except CgroupError as e:
        skip_not_applicable(f"no cgroup2 hierarchy with cpu and memory controllers ({e})")
    try:
        hook = CgroupHook(b, job_key(51, 1), Limits(cpu_percent=25))
        run = ProcessRun([PY, "-m", "agent.synthetic", "burn", "--cpu-seconds", "0.5"],
                         tmp_path / "a", 30, hooks=[hook])
        t0 = time.monotonic()
        run.start(t0)
        result = ended(run, 30)
        assert result.status == "completed" and time.monotonic() - t0 >= 1.6
        assert result.extra["cpu_throttled_periods"] > 0
        hook = CgroupHook(b, job_key(51, 2), Limits(memory_mb=64))
        run = ProcessRun([PY, "-m", "agent.synthetic", "hog", "--mb", "256", "--seconds", "5"],
                         tmp_path / "b", 30, hooks=[hook])
        run.start(time.monotonic())
        result = ended(run, 30)
        assert (result.status, result.reason) == ("failed", "oom_killed")
    finally:
        wait_for(lambda: b.sweep() == 0, 5)
        b.close()
