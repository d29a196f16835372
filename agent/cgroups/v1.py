"""cgroup v1: one directory per controller hierarchy (cpu, cpuacct, memory, pids, freezer).

Limits: `cpu.cfs_quota_us`/`cpu.cfs_period_us`, `memory.limit_in_bytes` (and
`memory.memsw.limit_in_bytes` where swap accounting exists, so a limit is not dodged by swapping),
`pids.max`. Accounting: `cpuacct.usage`, `cpu.stat` (nr_throttled, throttled_time),
`memory.max_usage_in_bytes`, `memory.oom_control` (oom_kill). v1 has no `cgroup.kill`: the group is
frozen (freezer controller, if mounted) so nothing can fork while every pid is SIGKILLed.
"""

from __future__ import annotations

import contextlib
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

    def __init__(self, mounts: dict[str, Path], own: dict[str, str], parent_name: str,
                 parent: str | None = None) -> None:
        super().__init__()
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
                for attempt in range(3):  # a sibling agent may remove the empty parent meanwhile
                    try:
                        d.parent.mkdir(parents=True, exist_ok=True)
                        d.mkdir(exist_ok=True)
                        break
                    except FileNotFoundError:
                        if attempt == 2:
                            raise
            self._apply(handle, limits)
        except (OSError, CgroupError) as e:
            for d in handle.dirs:
                with contextlib.suppress(OSError, CgroupError):
                    rmdir(d)
            if isinstance(e, CgroupError):
                raise
            raise CgroupError(f"cannot create job cgroup {key}: {e}") from e
        return handle

    def _apply(self, handle: V1Handle, limits: Limits) -> None:
        cpu, mem = handle.by_ctrl["cpu"], handle.by_ctrl["memory"]
        if limits.cpu_percent is not None:
            quota = max(1000, limits.cpu_percent * CFS_PERIOD_US // 100)
            write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            write(cpu / "cpu.cfs_quota_us", str(quota))
        if limits.memory_mb is not None:
            limit = str(limits.memory_mb * 2**20)
            write(mem / "memory.limit_in_bytes", limit)
            if (mem / "memory.memsw.limit_in_bytes").exists():
                write(mem / "memory.memsw.limit_in_bytes", limit)  # no escape into swap
        if limits.pids_max is not None and "pids" in handle.by_ctrl:
            write(handle.by_ctrl["pids"] / "pids.max", str(limits.pids_max))

    def leftovers(self) -> list[CgroupHandle]:
        names: set[str] = set()
        for parent in self.parents():
            with contextlib.suppress(OSError):
                names.update(e.name for e in parent.iterdir() if e.is_dir() and is_leftover(e.name))
        return [self._handle(n) for n in sorted(names)]

