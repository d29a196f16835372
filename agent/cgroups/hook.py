"""The runner hook that puts a child in its job cgroup before it execs and reads the verdict.

The job is confined before its first instruction: either it is the exec of a standby launcher
that the backend's pool had already put in the cgroup (`standby`), or the new child writes "0"
(itself) to the cgroup's join files (v1: `tasks`, v2: `cgroup.procs`) before it execs the job
(`join_paths`: the runner's launcher does the writes, or its fork fallback through fds opened
beforehand); if a join fails the job never runs. After exit the cgroup's own counters tell an
OOM kill apart from any other death (never exit code 137), its figures go into DONE `extra`,
and whatever is left in it (daemonized grandchildren too) is killed before the cgroup is removed
(an empty one by the backend's housekeeping thread, after the DONE).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from agent.cgroups.base import CgroupBackend, CgroupError, CgroupHandle, Limits, Stats
from agent.runner import Hook, ProcessRun, Result, Standby

log = logging.getLogger("ffrtmp.agent.cgroups")


class CgroupHook(Hook):
    """One attempt's job cgroup: create, join before exec, classify, account, kill, remove."""

    def __init__(self, backend: CgroupBackend, key: str, limits: Limits) -> None:
        self.backend = backend
        self.key = key
        self.limits = limits
        self.handle: CgroupHandle | None = None
        self.stats: Stats | None = None
        self._standby: Standby | None = None

    def before_spawn(self, run: ProcessRun) -> None:
        try:
            self.handle, self._standby = self.backend.take(self.key, self.limits)
        except (OSError, CgroupError) as e:
            raise OSError(f"job cgroup: {e}") from e

    def standby(self) -> Standby | None:
        standby, self._standby = self._standby, None
        return standby

    def join_paths(self) -> list[str]:  # for a new spawn (the standby, if any, is in already)
        return [str(p) for p in self.handle.join_paths] if self.handle is not None else []

    def classify(self, run: ProcessRun, code: int) -> tuple[str, str] | None:
        if self.handle is None or code == 0:
            return None
        self.stats = self._stats()
        if self.stats.oom_kills:
            return ("failed", "oom_killed")
        return None

    def after_exit(self, run: ProcessRun, result: Result) -> Result:
        if self._standby is not None:  # taken, never used (the start failed before it)
            self._standby.discard()
            self._standby = None
        if self.handle is None:
            return result
        stats = self.stats if self.stats is not None else self._stats()  # classify read them
        extra = {**result.extra, **stats.extra(), "cgroup": self.backend.name}
        if self.limits.any:
            extra["limits_enforced"] = True
        if run.proc is None:  # the spawn failed: nothing to wait for, remove it now
            if not self.backend.release(self.handle):  # never fatal: sweep() retries it
                log.info("job cgroup %s still busy; removal retried", self.key)
        else:
            self.backend.discard(self.handle)
        self.handle = None
        return replace(result, extra=extra)

    def _stats(self) -> Stats:
        assert self.handle is not None
        try:
            return self.handle.stats()
        except (OSError, ValueError) as e:  # a hook failure must not take the agent down
            log.warning("job cgroup %s: cannot read its counters: %s", self.key, e)
            return Stats()


class Unenforced(Hook):
    """Best-effort policy without cgroups: the job ran unlimited, and its DONE says so."""

    def after_exit(self, run: ProcessRun, result: Result) -> Result:
        return replace(result, extra={**result.extra, "cgroup": "none",
                                      "limits_enforced": False})
