"""Helpers for the cgroup suites: find (and clean up) the ffrtmp cgroups a test left behind.

Agents and runners started by a test inherit the test process's cgroups, so their parents
(`ffrtmp-<agent name>`) sit under this process's own cgroup in each hierarchy.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer")


def own_cgroup_dirs() -> list[Path]:
    """This process's cgroup directory in every v1 controller we use and in the v2 mount."""
    mounts: dict[str, Path] = {}
    v2_mount: Path | None = None
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 4:
                continue
            if parts[2] == "cgroup":
                for opt in parts[3].split(","):
                    if opt in V1_CONTROLLERS:
                        mounts.setdefault(opt, Path(parts[1]))
            elif parts[2] == "cgroup2" and v2_mount is None:
                v2_mount = Path(parts[1])
    dirs: list[Path] = []
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if not ctrls and v2_mount is not None:
                dirs.append(v2_mount / path.lstrip("/"))
            for ctrl in ctrls.split(","):
                if ctrl in mounts:
                    dirs.append(mounts[ctrl] / path.lstrip("/"))
    return sorted(set(dirs))


def unique_prefix() -> str:
    """An agent-name prefix no other test (or concurrent test run) uses."""
    return f"cgt{secrets.token_hex(4)}"


def ffrtmp_cgroups(prefix: str) -> list[Path]:
    """Every `ffrtmp-<prefix>*` parent and the job cgroups in it, deepest first."""
    found: list[Path] = []
    for base in own_cgroup_dirs():
        with contextlib.suppress(OSError):
            for parent in base.glob(f"ffrtmp-{prefix}*"):
                if parent.is_dir():
                    found.extend(d for d in parent.iterdir() if d.is_dir())
                    found.append(parent)
    return found


def job_cgroups(prefix: str) -> list[Path]:
    """Only the job cgroups (`job-*`) of agents named `<prefix>*`."""
    return [d for d in ffrtmp_cgroups(prefix) if d.name.startswith("job-")]


def remove_all(paths: list[Path]) -> None:
    """Kill whatever is in these cgroups and remove them (test cleanup, best effort)."""
    for d in paths:
        with contextlib.suppress(OSError):
            for pid in (d / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
        freezer = d / "freezer.state"
        with contextlib.suppress(OSError):
            if freezer.exists():
                freezer.write_text("THAWED")
    for d in paths:
        for _ in range(200):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                with contextlib.suppress(OSError):
                    for pid in (d / "cgroup.procs").read_text().split():
                        os.kill(int(pid), signal.SIGKILL)
                os.sched_yield()


def checked_prefix() -> Iterator[str]:
    """A unique agent-name prefix that fails the test if any of its cgroups is left behind.

    Use as a fixture: `prefix = pytest.fixture(checked_prefix)`.
    """
    p = unique_prefix()
    yield p
    left = ffrtmp_cgroups(p)
    remove_all(left)
    assert not left, f"cgroups left behind: {left}"
