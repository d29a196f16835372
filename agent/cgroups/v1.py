"""cgroup v1: one directory per controller hierarchy (cpu, cpuacct, memory, pids, freezer).

Limits: `cpu.cfs_quota_us`/`cpu.cfs_period_us`, `memory.limit_in_bytes` (and
`memory.memsw.limit_in_bytes` where swap accounting exists, so a limit is not dodged by swapping),
`pids.max`. Accounting: `cpuacct.usage`, `cpu.stat` (nr_throttled, throttled_time),
`memory.max_usage_in_bytes`, `memory.oom_control` (oom_kill). v1 has no `cgroup.kill`: the group is
frozen (freezer controller, if mounted) so nothing can fork while every pid is SIGKILLed.

v1 cgroups can be renamed within their parent (with their processes): that is what lets the
backend keep a pool of cgroups with a standby launcher already in each (see base.py).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from agent.cgroups.base import (
    CgroupBackend,
    CgroupError,
    CgroupHandle,
    Limits,
    Stats,
    is_leftover,
    kill_pids,
    read_int,
    read_keyed,
    read_text,
    rmdir,
    write,
)

CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer")
REQUIRED = ("cpu", "memory")
CFS_PERIOD_US = 100_000
FREEZE_WAIT_S = 0.2


def parse_mounts(text: str) -> dict[str, Path]:
    """v1 controller -> mount point, from /proc/self/mounts (co-mounted ones share a path)."""
    out: dict[str, Path] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[2] != "cgroup":
            continue
        for opt in parts[3].split(","):
            if opt in CONTROLLERS:
                out.setdefault(opt, Path(parts[1]))
    return out


def parse_own(text: str) -> dict[str, str]:
    """v1 controller -> this process's cgroup path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[1]:
            for ctrl in parts[1].split(","):
                out[ctrl] = parts[2]
    return out


class V1Handle(CgroupHandle):
    """A job cgroup in each v1 hierarchy."""

    def __init__(self, key: str, dirs: dict[str, Path]) -> None:
        unique: list[Path] = []
        for d in dirs.values():
            if d not in unique:
                unique.append(d)
        super().__init__(key, tuple(unique))
        self.by_ctrl = dirs

    @property
    def join_paths(self) -> tuple[Path, ...]:
        # `tasks`, not cgroup.procs: the kernel moves a single thread writing "0" (itself)
        # without the global threadgroup lock, whose write side waits out an RCU grace period
        # (measured: 0.1-0.25 ms against 6-11 ms). The joining child is single-threaded (the
        # launcher's shell, or the fork of the agent), so its thread is the whole process, and
        # the job's threads are born in the cgroup.
        return tuple(d / "tasks" for d in self.dirs)

    def _file(self, ctrl: str, name: str) -> Path | None:
        d = self.by_ctrl.get(ctrl)
        return d / name if d is not None else None

    def stats(self) -> Stats:
        usage = oom = peak = None
        cpu: dict[str, int] = {}
        if (p := self._file("cpuacct", "cpuacct.usage")) is not None:
            ns = read_int(p)
            usage = ns / 1e9 if ns is not None else None
        if (p := self._file("cpu", "cpu.stat")) is not None:
            cpu = read_keyed(p)
        if (p := self._file("memory", "memory.max_usage_in_bytes")) is not None:
            b = read_int(p)
            peak = b / 2**20 if b is not None else None
        if (p := self._file("memory", "memory.oom_control")) is not None:
            oom = read_keyed(p).get("oom_kill")
        hits = read_int(p) if (p := self._file("memory", "memory.failcnt")) is not None else None
        throttled = cpu.get("throttled_time")
        return Stats(cpu_usage_s=usage, cpu_periods=cpu.get("nr_periods"),
                     cpu_throttled_periods=cpu.get("nr_throttled"),
                     cpu_throttled_s=throttled / 1e9 if throttled is not None else None,
                     memory_peak_mb=peak, memory_limit_hits=hits, oom_kills=oom)

    def reset_counters(self) -> None:
        for ctrl, name in (("cpuacct", "cpuacct.usage"), ("memory", "memory.max_usage_in_bytes"),
                           ("memory", "memory.failcnt")):
            if (p := self._file(ctrl, name)) is not None:
                write(p, "0")

    def kill_all(self) -> int:
        state = self._file("freezer", "freezer.state")
        if state is None or read_text(state) is None:
            return self._kill_rounds()
        try:
            write(state, "FROZEN")
        except CgroupError:
            return self._kill_rounds()
        deadline = time.monotonic() + FREEZE_WAIT_S
        # The kernel freezes asynchronously (FREEZING first); a frozen group cannot fork.
        while (read_text(state) or "").strip() == "FREEZING" and time.monotonic() < deadline:
            time.sleep(0.002)
        killed = kill_pids(self.pids())
        with contextlib.suppress(CgroupError):
            write(state, "THAWED")  # SIGKILL is delivered once the tasks run again
        return killed + self._kill_rounds()

    def _kill_rounds(self, rounds: int = 5) -> int:
        killed = 0
        for _ in range(rounds):
            pids = self.pids()
            if not pids:
                break
            killed += kill_pids(pids)
        return killed


class V1Backend(CgroupBackend):
    """Job cgroups under `<parent>` in every mounted v1 controller we use."""

    name = "v1"
    POOL_SIZE = 4

    def __init__(self, mounts: dict[str, Path], own: dict[str, str], parent_name: str,
                 parent: str | None = None) -> None:
        super().__init__()
        self._memsw: bool | None = None  # memory.memsw.* exist (swap accounting), once known
        self.dirs: dict[str, Path] = {}
        for ctrl in CONTROLLERS:
            mount = mounts.get(ctrl)
            if mount is None:
                continue
            base = parent if parent is not None else \
                f"{own.get(ctrl, '/').rstrip('/')}/{parent_name}"
            self.dirs[ctrl] = mount / base.lstrip("/")
        missing = [c for c in REQUIRED if c not in self.dirs]
        if missing:
            self.reason = f"cgroup v1 controller(s) not mounted: {', '.join(missing)}"
            return
        try:
            for d in self.parents():
                d.mkdir(parents=True, exist_ok=True)
                if read_text(d / "cgroup.procs") is None:
                    raise CgroupError(f"{d} is not a cgroup directory")
        except (OSError, CgroupError) as e:
            self.reason = f"cannot create the parent cgroup: {e}"
            return
        self.available = True
        self.supports = frozenset({"cpu", "memory"} | ({"pids"} & set(self.dirs)))

    def parents(self) -> tuple[Path, ...]:
        out: list[Path] = []
        for d in self.dirs.values():
            if d not in out:
                out.append(d)
        return tuple(out)

    def _handle(self, key: str) -> V1Handle:
        return V1Handle(key, {c: d / key for c, d in self.dirs.items()})

    def create(self, key: str, limits: Limits) -> V1Handle:
        if not self.available:
            raise CgroupError(self.reason or "cgroup v1 not available")
        handle = self._handle(key)
        try:
            for d in handle.dirs:
                for attempt in range(3):
                    try:
                        d.mkdir(exist_ok=True)
                        break
                    except FileNotFoundError:  # a sibling agent removed the empty parent
                        if attempt == 2:
                            raise
                        d.parent.mkdir(parents=True, exist_ok=True)
            self._apply(handle, limits)
        except (OSError, CgroupError) as e:
            for d in handle.dirs:
                with contextlib.suppress(OSError, CgroupError):
                    rmdir(d)
            if isinstance(e, CgroupError):
                raise
            raise CgroupError(f"cannot create job cgroup {key}: {e}") from e
        return handle

    def _make_empty(self, key: str) -> V1Handle:
        handle = self._handle(key)
        try:
            for d in handle.dirs:
                try:
                    d.mkdir()
                except FileNotFoundError:  # a sibling agent removed the empty parent
                    d.parent.mkdir(parents=True, exist_ok=True)
                    d.mkdir()
        except OSError as e:
            for d in handle.dirs:
                with contextlib.suppress(OSError, CgroupError):
                    rmdir(d)
            raise CgroupError(f"cannot create cgroup {key}: {e}") from e
        return handle

    def _rename(self, handle: CgroupHandle, key: str) -> V1Handle:
        done: list[Path] = []
        try:
            for d in handle.dirs:
                os.rename(d, d.with_name(key))
                done.append(d)
        except OSError as e:
            for d in done:  # back to the old name: one cgroup, one name in every hierarchy
                with contextlib.suppress(OSError):
                    os.rename(d.with_name(key), d)
            raise CgroupError(f"cannot rename cgroup {handle.key} to {key}: {e}") from e
        return self._handle(key)

    def _apply(self, handle: V1Handle, limits: Limits) -> None:
        cpu, mem = handle.by_ctrl["cpu"], handle.by_ctrl["memory"]
        if limits.cpu_percent is not None:
            quota = max(1000, limits.cpu_percent * CFS_PERIOD_US // 100)
            write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            write(cpu / "cpu.cfs_quota_us", str(quota))
        if limits.memory_mb is not None:
            limit = str(limits.memory_mb * 2**20)
            write(mem / "memory.limit_in_bytes", limit)
            if self._memsw is None:  # swap accounting is the kernel's: the same for every job
                self._memsw = (mem / "memory.memsw.limit_in_bytes").exists()
            if self._memsw:
                write(mem / "memory.memsw.limit_in_bytes", limit)  # no escape into swap
        if limits.pids_max is not None and "pids" in handle.by_ctrl:
            write(handle.by_ctrl["pids"] / "pids.max", str(limits.pids_max))

    def leftovers(self) -> list[CgroupHandle]:
        names: set[str] = set()
        for parent in self.parents():
            with contextlib.suppress(OSError):
                names.update(e.name for e in parent.iterdir() if e.is_dir() and is_leftover(e.name))
        return [self._handle(n) for n in sorted(names)]

