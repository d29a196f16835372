"""cgroup v2 (unified): one hierarchy, controllers enabled per subtree.

Limits: `cpu.max`, `memory.max` with `memory.swap.max` = 0 (no escape into swap) and
`memory.oom.group` = 1 (an OOM kills the whole job, not one helper), `pids.max`. Accounting:
`cpu.stat` (usage_usec, nr_throttled, throttled_usec), `memory.peak`, `memory.events` (oom_kill).
Kill: `cgroup.kill`, else freeze (`cgroup.freeze`) and SIGKILL every pid.

The parent must be a delegated subtree: v2 forbids processes in a cgroup whose controllers are
enabled for its children, so the agent cannot sit in the cgroup it hands controllers down from
(run it as a systemd service with `Delegate=yes` and point `--cgroup-parent` below it).
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

WANTED = ("cpu", "memory", "pids")
REQUIRED = ("cpu", "memory")
CPU_PERIOD_US = 100_000
FREEZE_WAIT_S = 0.2


def parse_mount(text: str) -> Path | None:
    """The cgroup2 mount point from /proc/self/mounts (the unified one on hybrid hosts)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return Path(parts[1])
    return None


def parse_own(text: str) -> str | None:
    """This process's v2 cgroup path (`0::/path` in /proc/self/cgroup)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


class V2Handle(CgroupHandle):
    """A job cgroup in the unified hierarchy."""

    def __init__(self, key: str, path: Path) -> None:
        super().__init__(key, (path,))
        self.path = path

    def stats(self) -> Stats:
        cpu = read_keyed(self.path / "cpu.stat")
        events = read_keyed(self.path / "memory.events")
        peak = read_int(self.path / "memory.peak")
        usage, throttled = cpu.get("usage_usec"), cpu.get("throttled_usec")
        oom = None
        if events:
            oom = max(events.get("oom_kill", 0), events.get("oom_group_kill", 0))
        return Stats(cpu_usage_s=usage / 1e6 if usage is not None else None,
                     cpu_periods=cpu.get("nr_periods"),
                     cpu_throttled_periods=cpu.get("nr_throttled"),
                     cpu_throttled_s=throttled / 1e6 if throttled is not None else None,
                     memory_peak_mb=peak / 2**20 if peak is not None else None,
                     memory_limit_hits=events.get("max"), oom_kills=oom)

    def kill_all(self) -> int:
        pids = self.pids()
        if not pids:
            return 0
        kill = self.path / "cgroup.kill"
        if kill.exists():  # Linux >= 5.14: the kernel kills the whole subtree atomically
            with contextlib.suppress(CgroupError):
                write(kill, "1")
                return len(pids)
        freeze = self.path / "cgroup.freeze"
        frozen = False
        if freeze.exists():
            with contextlib.suppress(CgroupError):
                write(freeze, "1")
                frozen = True
                deadline = time.monotonic() + FREEZE_WAIT_S
                while "frozen 1" not in (read_text(self.path / "cgroup.events") or "") \
                        and time.monotonic() < deadline:
                    time.sleep(0.002)
        killed = kill_pids(self.pids())
        if frozen:
            with contextlib.suppress(CgroupError):
                write(freeze, "0")
        return killed


class V2Backend(CgroupBackend):
    """Job cgroups under one parent directory of a cgroup2 mount."""

    name = "v2"

    def __init__(self, mount: Path, parent: str, required: tuple[str, ...] = REQUIRED) -> None:
        super().__init__()
        self.mount = mount
        self.parent = mount / parent.lstrip("/")
        self.controllers: frozenset[str] = frozenset()
        try:
            self._setup(required)
        except (OSError, CgroupError) as e:
            self.reason = str(e)
            return
        self.available = True
        self.supports = frozenset(self.controllers & set(WANTED))

    def _setup(self, required: tuple[str, ...]) -> None:
        root = (read_text(self.mount / "cgroup.controllers") or "").split()
        missing = [c for c in required if c not in root]
        if missing:
            raise CgroupError(f"cgroup2 at {self.mount} has no {', '.join(missing)} controller")
        wanted = [c for c in WANTED if c in root]
        # Hand the controllers down every level from the mount to the parent (inclusive), so
        # job cgroups created in the parent get cpu.max, memory.max, pids.max.
        levels = [self.mount]
        for part in self.parent.relative_to(self.mount).parts:
            levels.append(levels[-1] / part)
        for level in levels:
            level.mkdir(exist_ok=True)
            have = (read_text(level / "cgroup.subtree_control") or "").split()
            need = [c for c in wanted if c not in have]
            if need:
                write(level / "cgroup.subtree_control", " ".join(f"+{c}" for c in need))
        self.controllers = frozenset(
            (read_text(self.parent / "cgroup.subtree_control") or "").split())
        missing = [c for c in required if c not in self.controllers]
        if missing:
            raise CgroupError(f"{self.parent}: controller(s) {', '.join(missing)} not enabled")

    def parents(self) -> tuple[Path, ...]:
        return (self.parent,)

    def create(self, key: str, limits: Limits) -> V2Handle:
        if not self.available:
            raise CgroupError(self.reason or "cgroup v2 not available")
        handle = V2Handle(key, self.parent / key)
        try:
            for attempt in range(3):
                try:
                    handle.path.mkdir(exist_ok=True)
                    break
                except FileNotFoundError:  # a sibling agent removed the empty parent
                    if attempt == 2:
                        raise
                    self.parent.mkdir(exist_ok=True)
            self._apply(handle.path, limits)
        except (OSError, CgroupError) as e:
            with contextlib.suppress(OSError, CgroupError):
                rmdir(handle.path)
            if isinstance(e, CgroupError):
                raise
            raise CgroupError(f"cannot create job cgroup {key}: {e}") from e
        return handle

    def _apply(self, path: Path, limits: Limits) -> None:
        def need(ctrl: str) -> None:
            if ctrl not in self.controllers:
                raise CgroupError(f"{self.parent}: no {ctrl} controller for this limit")

        if limits.cpu_percent is not None:
            need("cpu")
            quota = max(1000, limits.cpu_percent * CPU_PERIOD_US // 100)
            write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        if "memory" in self.controllers:
            if limits.memory_mb is not None:
                write(path / "memory.max", str(limits.memory_mb * 2**20))
                if (path / "memory.swap.max").exists():
                    write(path / "memory.swap.max", "0")
            write(path / "memory.oom.group", "1")
        elif limits.memory_mb is not None:
            need("memory")
        if limits.pids_max is not None and "pids" in self.controllers:
            write(path / "pids.max", str(limits.pids_max))

    def leftovers(self) -> list[CgroupHandle]:
        out: list[CgroupHandle] = []
        with contextlib.suppress(OSError):
            for e in sorted(self.parent.iterdir()):
                if e.is_dir() and is_leftover(e.name):
                    out.append(V2Handle(e.name, e))
        return out
