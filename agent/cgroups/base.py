"""The cgroup interface every backend implements (v2, v1, none) and what they share.

A backend owns one parent cgroup per agent (`ffrtmp-<agent name>` under the agent's own cgroup by
default) and creates one job cgroup per attempt in it, named `job-<agent pid>-<job>-<attempt>` so
that agents with the same name on one host never touch each other's jobs and a restarted agent
can tell the leftovers of a dead one (its pid no longer runs) from live work.

Off the job's path, in a housekeeping thread:

- removal: a finished job's cgroup, once empty (the usual case: its process was reaped), is
  removed there (`discard`), never delaying the DONE; one with processes left in it is killed
  and removed at once, and `sweep` retries a busy one;
- the pool (backends that can rename a cgroup: v1): a few cgroups `pool-<agent pid>-<n>`, each
  holding a `Standby` launcher that has already joined it (and its counters reset since).
  `take` renames a pooled cgroup to the job's key, standby inside, and applies the limits; the
  job's process is then that standby's exec: no mkdir, no join, no launcher start on the job's
  path. Pool entries follow the leftover rule like jobs (their agent's pid is gone), so a
  crashed agent's pool goes with its jobs; their standbys die with the agent
  (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.runner import Standby, launcher

log = logging.getLogger("ffrtmp.agent.cgroups")

JOB_DIR = re.compile(r"^job-(\d+)-(\d+)-(\d+)$")  # job-<agent pid>-<job>-<attempt>
POOL_DIR = re.compile(r"^pool-(\d+)-(\d+)$")  # pool-<agent pid>-<n>: a standby, no job yet
STANDBY_READY_S = 5.0  # a standby that is not set up by then is dropped
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


def pool_key(n: int, pid: int | None = None) -> str:
    """The directory name of this agent process's n-th pooled cgroup."""
    return f"pool-{os.getpid() if pid is None else pid}-{n}"


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
    """True for a job (or pooled) cgroup whose agent process is gone (crashed or was killed)."""
    m = JOB_DIR.match(name) or POOL_DIR.match(name)
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
    def join_paths(self) -> tuple[Path, ...]:
        """The files a single-threaded child writes "0" into to join the cgroup before it execs
        (cgroup.procs here; v1 uses its `tasks` files, see there)."""
        return self.procs_paths

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

    def reset_counters(self) -> None:  # noqa: B027  (optional: a backend without it keeps them)
        """Zero the resettable usage counters (a pooled cgroup's standby used a little)."""

    def kill_and_remove(self) -> bool:
        """Kill what is left (if anything: the kill is the costly part) and remove the cgroup."""
        if self.pids():
            self.kill_all()
        return self.remove()


class Housekeeper:
    """A daemon thread that runs `work` soon after each `wake()` (started on the first one).

    The backend's removals of finished jobs' (empty) cgroups and the pool's refills run here,
    not in the agent's loop between a job's exit and its DONE or a JOB and its start. It spawns
    the standbys, so it lives as long as the backend (PR_SET_PDEATHSIG: see agent/runner.py).
    """

    def __init__(self, work: Callable[[], None]) -> None:
        self._work = work
        self._event = threading.Event()
        self._stopping = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        """Run the work soon (once for any number of wake-ups before it starts)."""
        with self._lock:
            if self._stopping:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cgroup-housekeeper",
                                                daemon=True)
                self._thread.start()
        self._event.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (after the work in progress, if any)."""
        with self._lock:
            self._stopping = True
            thread = self._thread
        self._event.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._event.wait()
            self._event.clear()
            if self._stopping:
                return
            try:
                self._work()
            except Exception:  # never fatal: what it did not remove, sweep() retries
                log.exception("cgroup housekeeping failed")


class CgroupBackend(ABC):
    """Creates, watches and removes job cgroups under one parent."""

    name = "none"
    POOL_SIZE = 0  # pooled cgroups with a standby kept ready (backends that can rename: v1)

    def __init__(self) -> None:
        self.available = False
        self.reason = ""
        self.supports: frozenset[str] = frozenset()
        self._lock = threading.Lock()  # the lists below: the loop and the housekeeper share them
        self._pending: list[CgroupHandle] = []  # busy at removal: sweep() retries them
        self._doomed: list[CgroupHandle] = []  # empty, for the housekeeper to remove
        self._removing = 0  # taken by the housekeeper, not removed yet
        self._pool: list[tuple[CgroupHandle, Standby]] = []
        self._pool_next = 0
        self._pool_on = False  # filled from the first take() on
        self._pool_broken = False  # no launcher here: the pool stays empty
        self._closed = False
        self._housekeeper = Housekeeper(self._housekeep)

    @abstractmethod
    def create(self, key: str, limits: Limits) -> CgroupHandle:
        """Make the job cgroup and apply the limits; CgroupError if a limit cannot be applied."""

    @abstractmethod
    def leftovers(self) -> list[CgroupHandle]:
        """Handles for job cgroups in the parent whose agent process is dead."""

    @abstractmethod
    def parents(self) -> tuple[Path, ...]:
        """The parent cgroup directories (one per hierarchy)."""

    def take(self, key: str, limits: Limits) -> tuple[CgroupHandle, Standby | None]:
        """The job cgroup for an attempt (as `create`), with a standby launcher in it if the
        pool had one ready: the job is then that standby's exec, joining nothing."""
        self._pool_on = self.POOL_SIZE > 0 and not self._pool_broken
        while self._pool_on and not self._closed:
            with self._lock:
                entry = self._pool.pop() if self._pool else None
            self._housekeeper.wake()  # refill
            if entry is None:
                break
            pooled, standby = entry
            try:
                handle = self._rename(pooled, key)
            except (OSError, CgroupError) as e:
                log.warning("pooled cgroup %s: cannot rename it to %s: %s", pooled.key, key, e)
                standby.discard()
                self.release(pooled)
                continue
            if standby.proc.poll() is not None:  # it died: an empty job cgroup all the same
                standby.discard()
                return self._limited(handle, limits), None
            try:
                self._apply(handle, limits)
            except (OSError, CgroupError):
                standby.discard()
                self.release(handle)
                raise
            return handle, standby
        return self.create(key, limits), None

    def pooled(self) -> int:
        """Standbys ready in the pool now."""
        with self._lock:
            return len(self._pool)

    def _limited(self, handle: CgroupHandle, limits: Limits) -> CgroupHandle:
        try:
            self._apply(handle, limits)
        except (OSError, CgroupError):
            self.release(handle)
            raise
        return handle

    def _rename(self, handle: CgroupHandle, key: str) -> CgroupHandle:
        """The cgroup renamed to key in every hierarchy (backends with a pool)."""
        raise CgroupError(f"cgroup {self.name}: cannot rename a cgroup")

    def _apply(self, handle: Any, limits: Limits) -> None:
        """Write the limits into a job cgroup (backends with a pool)."""
        raise CgroupError(f"cgroup {self.name}: no limits")

    def _make_empty(self, key: str) -> CgroupHandle:
        """A new empty cgroup named key, without limits (backends with a pool)."""
        raise CgroupError(f"cgroup {self.name}: no pool")

    def release(self, handle: CgroupHandle) -> bool:
        """Kill what is left in a job cgroup and remove it now (retried by `sweep` if busy)."""
        try:
            if handle.kill_and_remove():
                return True
        except (OSError, CgroupError):
            pass
        with self._lock:
            self._pending.append(handle)
        return False

    def discard(self, handle: CgroupHandle) -> None:
        """Like `release`, but an empty cgroup (the usual case once a job's process has been
        reaped) is removed by the housekeeping thread, off the caller's path."""
        try:  # one hierarchy tells (a process left only in another one makes the removal
            stray = bool(read_pids(handle.procs_path))  # fail: sweep() then kills it)
        except (OSError, ValueError):
            stray = True
        if stray or self._closed:
            self.release(handle)
            return
        with self._lock:
            self._doomed.append(handle)
        self._housekeeper.wake()

    def sweep(self) -> int:
        """Retry removing job cgroups whose last processes were exiting; returns how many
        released cgroups are not removed yet (including those the housekeeper is removing)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for handle in pending:
            self.release(handle)
        with self._lock:
            return len(self._pending) + len(self._doomed) + self._removing

    def cleanup_leftovers(self) -> int:
        """Kill and remove the job cgroups of a crashed agent; returns how many were found."""
        found = self.leftovers()
        for handle in found:
            self.release(handle)
        return len(found)

    def close(self) -> None:
        """At agent exit: remove released and pooled cgroups (their standbys killed) and the
        parent if nothing is left in it."""
        self._closed = True
        self._housekeeper.stop()
        with self._lock:
            left = self._doomed + self._pending
            pool, self._pool = self._pool, []
            self._doomed, self._pending = [], []
        for handle, standby in pool:
            standby.discard()
            left.append(handle)
        for handle in left:
            self.release(handle)
        for _ in range(100):  # the last processes of a job may still be exiting
            if not self.sweep():
                break
            time.sleep(0.005)
        for parent in self.parents():
            with contextlib.suppress(OSError, CgroupError):
                rmdir(parent)

    def _housekeep(self) -> None:
        """The housekeeper's work: remove the discarded cgroups."""
        with self._lock:
            doomed, self._doomed = self._doomed, []
            self._removing = len(doomed)
        try:
            for handle in doomed:
                try:
                    gone = handle.remove()
                except (OSError, CgroupError):
                    gone = False
                with self._lock:
                    if not gone:
                        self._pending.append(handle)  # sweep() retries it (with a kill)
                    self._removing -= 1
        finally:
            with self._lock:
                self._removing = 0
        self._refill_pool()

    def _refill_pool(self) -> None:
        """Top the pool up: cgroups, standbys that join them (all at once: their waits for the
        kernel overlap), then wait until each is set up."""
        if not self._pool_on or self._closed:
            return
        with self._lock:
            missing = self.POOL_SIZE - len(self._pool)
            first, self._pool_next = self._pool_next, self._pool_next + max(0, missing)
        started: list[tuple[CgroupHandle, Standby]] = []
        for n in range(first, first + missing):
            try:
                handle = self._make_empty(pool_key(n))
            except (OSError, CgroupError) as e:
                log.warning("cannot make a pooled cgroup: %s", e)
                break
            try:
                standby = Standby.spawn([str(p) for p in handle.join_paths])
            except OSError as e:
                log.warning("cannot start a standby launcher: %s", e)
                standby = None
            if standby is None:
                if launcher() is None:  # no launcher tools here: take() makes its own cgroups
                    self._pool_broken, self._pool_on = True, False
                self.release(handle)
                break
            started.append((handle, standby))
        for handle, standby in started:
            if standby.wait_ready(STANDBY_READY_S) and not self._closed:
                try:  # what the standby used to get here is not the job's
                    handle.reset_counters()
                except (OSError, CgroupError):
                    pass
                with self._lock:
                    self._pool.append((handle, standby))
            else:  # it could not join (or took too long), or the backend is closing
                if not self._closed:
                    log.warning("a standby launcher for %s did not get ready", handle.key)
                standby.discard()
                self.release(handle)

    def describe(self) -> str:
        """One line for the log."""
        where = ", ".join(str(p) for p in self.parents()) or "-"
        return f"cgroup {self.name} under {where}" if self.available else \
            f"no cgroups ({self.reason})"
