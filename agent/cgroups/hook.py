"""The runner hook that puts a child in its job cgroup before it execs and reads the verdict.

The child joins in `in_child` (between fork and exec) by writing "0" ("the writing process") to
cgroup.procs fds opened beforehand: a raw write, no allocation, async-signal-safe, and the job is
confined before its first instruction. After exit the cgroup's own counters tell an OOM kill
apart from any other death (never exit code 137), its figures go into DONE `extra`, and whatever
is left in it (daemonized grandchildren too) is killed before the cgroup is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace

from agent.cgroups.base import CgroupBackend, CgroupError, CgroupHandle, Limits, Stats
from agent.runner import Hook, ProcessRun, Result

log = logging.getLogger("ffrtmp.agent.cgroups")
_SELF = b"0"


class CgroupHook(Hook):
    """One attempt's job cgroup: create, join before exec, classify, account, kill, remove."""

    def __init__(self, backend: CgroupBackend, key: str, limits: Limits) -> None:
        self.backend = backend
        self.key = key
        self.limits = limits
        self.handle: CgroupHandle | None = None
        self.stats: Stats | None = None
        self._fds: list[int] = []

    def before_spawn(self, run: ProcessRun) -> None:
        try:
            self.handle = self.backend.create(self.key, self.limits)
            for path in self.handle.procs_paths:
                self._fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        except (OSError, CgroupError) as e:
            self._close_fds()
            if self.handle is not None:
                self.backend.release(self.handle)
                self.handle = None
            raise OSError(f"job cgroup: {e}") from e

    def in_child(self) -> None:
        for fd in self._fds:  # an OSError here aborts the spawn: never exec unconfined
            os.write(fd, _SELF)

    def poll(self, run: ProcessRun, now: float) -> str | None:
        if self._fds and run.proc is not None:
            self._close_fds()  # the child is in (or past) exec: the parent needs them no more
        return None

    def classify(self, run: ProcessRun, code: int) -> tuple[str, str] | None:
        if self.handle is None or code == 0:
            return None
        self.stats = self._stats()
        if self.stats.oom_kills:
            return ("failed", "oom_killed")
        return None

    def after_exit(self, run: ProcessRun, result: Result) -> Result:
        self._close_fds()
        if self.handle is None:
            return result
        extra = {**result.extra, **self._stats().extra(), "cgroup": self.backend.name}
        if self.limits.any:
            extra["limits_enforced"] = True
        if not self.backend.release(self.handle):  # never fatal: sweep() retries the removal
            log.info("job cgroup %s still busy; removal retried", self.key)
        self.handle = None
        return replace(result, extra=extra)

    def _stats(self) -> Stats:
        assert self.handle is not None
        try:
            return self.handle.stats()
        except (OSError, ValueError) as e:  # a hook failure must not take the agent down
            log.warning("job cgroup %s: cannot read its counters: %s", self.key, e)
            return Stats()

    def _close_fds(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


class Unenforced(Hook):
    """Best-effort policy without cgroups: the job ran unlimited, and its DONE says so."""

    def after_exit(self, run: ProcessRun, result: Result) -> Result:
        return replace(result, extra={**result.extra, "cgroup": "none",
                                      "limits_enforced": False})
