"""The cgroup interface every backend implements (v2, v1, none) and what they share.

A backend owns one parent cgroup per agent (`ffrtmp-<agent name>` under the agent's own cgroup by
default) and creates one job cgroup per attempt in it, named `job-<agent pid>-<job>-<attempt>` so
that agents with the same name on one host never touch each other's jobs and a restarted agent
can tell the leftovers of a dead one (its pid no longer runs) from live work.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JOB_DIR = re.compile(r"^job-(\d+)-(\d+)-(\d+)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class CgroupError(Exception):
    """A cgroup operation that cannot be done; the message says which file and why."""


@dataclass(frozen=True)
class Limits:
    """What one job cgroup is held to; None means unlimited."""

    cpu_percent: int | None = None  # 100 = one core
    memory_mb: int | None = None
    pids_max: int | None = None

    @property
    def any(self) -> bool:
        """True if the job asked for a CPU or memory limit (pids is the agent's own guard)."""
        return self.cpu_percent is not None or self.memory_mb is not None


@dataclass(frozen=True)
class Stats:
    """A job cgroup's own accounting; None where the hierarchy has no such counter."""

    cpu_usage_s: float | None = None
    cpu_periods: int | None = None
    cpu_throttled_periods: int | None = None
    cpu_throttled_s: float | None = None
    memory_peak_mb: float | None = None
    memory_limit_hits: int | None = None  # times usage hit the limit (reclaim, maybe OOM)
    oom_kills: int | None = None

    def extra(self) -> dict[str, Any]:
        """The figures for a DONE message's `extra` (only those known)."""
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if value is not None:
                out[key] = round(value, 3) if isinstance(value, float) else value
        return out


def safe_name(name: str) -> str:
    """A cgroup directory name from an agent name (anything unusual becomes '_')."""
    return _UNSAFE.sub("_", name)[:100] or "agent"


def job_key(job_id: int, attempt: int, pid: int | None = None) -> str:
    """The job cgroup's directory name for an attempt of this agent process."""
    return f"job-{os.getpid() if pid is None else pid}-{job_id}-{attempt}"


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (another user's counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_leftover(name: str) -> bool:
    """True for a job cgroup whose agent process is gone (it crashed or was killed)."""
    m = JOB_DIR.match(name)
    if m is None:
        return False
    pid = int(m.group(1))
    return pid != os.getpid() and not pid_alive(pid)


def read_text(path: Path) -> str | None:
    """A cgroup file's content, or None if it does not exist (controller absent)."""
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return None


def read_int(path: Path) -> int | None:
    """A single-number cgroup file ('max' reads as None)."""
    text = read_text(path)
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() else None


def read_keyed(path: Path) -> dict[str, int]:
    """A flat-keyed cgroup file (`key value` per line), e.g. cpu.stat, memory.events."""
    out: dict[str, int] = {}
    for line in (read_text(path) or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def write(path: Path, value: str) -> None:
    """Write one value to a cgroup interface file; CgroupError names the file on failure."""
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(value)
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror or e}") from e


def read_pids(procs: Path) -> list[int]:
    """The pids listed in a cgroup.procs file (empty if the cgroup is gone)."""
    text = read_text(procs) or ""
    return [int(p) for p in text.split() if p.isdigit()]


def kill_pids(pids: list[int]) -> int:
    """SIGKILL each pid; returns how many were signalled."""
    n = 0
    me = os.getpid()
    for pid in pids:
        if pid <= 1 or pid == me:  # never signal a process group (0), init, or the agent
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            n += 1
    return n


def rmdir(path: Path) -> bool:
    """Remove one cgroup directory; True if it is gone (EBUSY: processes still in it)."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise CgroupError(f"cannot remove {path}: {e.strerror or e}") from e
    return True


class CgroupHandle(ABC):
    """One job cgroup (in every hierarchy the backend uses)."""

    def __init__(self, key: str, dirs: tuple[Path, ...]) -> None:
        self.key = key
        self.dirs = dirs

    @property
    def procs_paths(self) -> tuple[Path, ...]:
        """The cgroup.procs files a child writes itself into (one per hierarchy)."""
        return tuple(d / "cgroup.procs" for d in self.dirs)

    @property
    def procs_path(self) -> Path:
        """The first (on v2 the only) cgroup.procs file."""
        return self.procs_paths[0]

    def pids(self) -> list[int]:
        """Processes in the job cgroup now."""
        seen: set[int] = set()
        for procs in self.procs_paths:
            seen.update(read_pids(procs))
        return sorted(seen)

    @abstractmethod
    def stats(self) -> Stats:
        """CPU, throttling, peak memory and OOM-kill counters of the cgroup."""

    @abstractmethod
    def kill_all(self) -> int:
        """SIGKILL every process in the cgroup (daemonized grandchildren too); returns a count."""

    def remove(self) -> bool:
        """Remove the cgroup in every hierarchy; False while processes are still leaving it."""
        gone = True
        for d in self.dirs:
            gone = rmdir(d) and gone
        return gone


class CgroupBackend(ABC):
    """Creates, watches and removes job cgroups under one parent."""

    name = "none"

    def __init__(self) -> None:
        self.available = False
        self.reason = ""
        self.supports: frozenset[str] = frozenset()
        self._pending: list[CgroupHandle] = []

    @abstractmethod
    def create(self, key: str, limits: Limits) -> CgroupHandle:
        """Make the job cgroup and apply the limits; CgroupError if a limit cannot be applied."""

    @abstractmethod
    def leftovers(self) -> list[CgroupHandle]:
        """Handles for job cgroups in the parent whose agent process is dead."""

    @abstractmethod
    def parents(self) -> tuple[Path, ...]:
        """The parent cgroup directories (one per hierarchy)."""

    def release(self, handle: CgroupHandle) -> bool:
        """Kill what is left in a job cgroup and remove it (retried by `sweep` if busy)."""
        try:
            handle.kill_all()
            if handle.remove():
                return True
        except (OSError, CgroupError):
            pass
        self._pending.append(handle)
        return False

    def sweep(self) -> int:
        """Retry removing job cgroups whose last processes were exiting; returns how many remain."""
        pending, self._pending = self._pending, []
        for handle in pending:
            self.release(handle)
        return len(self._pending)

    def cleanup_leftovers(self) -> int:
        """Kill and remove the job cgroups of a crashed agent; returns how many were found."""
        found = self.leftovers()
        for handle in found:
            self.release(handle)
        return len(found)

    def close(self) -> None:
        """At agent exit: release pending cgroups and remove the parent if nothing is left in it."""
        self.sweep()
        for parent in self.parents():
            with contextlib.suppress(OSError, CgroupError):
                rmdir(parent)

    def describe(self) -> str:
        """One line for the log."""
        where = ", ".join(str(p) for p in self.parents()) or "-"
        return f"cgroup {self.name} under {where}" if self.available else \
            f"no cgroups ({self.reason})"
