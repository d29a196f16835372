"""Enforcement policy: which hooks hold a job to its resource_limits on this agent."""

from __future__ import annotations

from typing import Any

from agent.cgroups.base import CgroupBackend, Limits, job_key
from agent.cgroups.disk import DiskWatch
from agent.cgroups.hook import CgroupHook, Unenforced
from agent.defaults import LIMIT_POLICIES
from agent.runner import Hook
from agent.workloads import UnsupportedJob

POLICIES = LIMIT_POLICIES


def limits_of(spec: dict[str, Any], pids_max: int | None = None) -> Limits:
    """The cgroup limits a spec asks for (pids_max is the agent's own guard for every job)."""
    rl = spec.get("resource_limits") or {}
    cpu, mem = rl.get("max_cpu_percent"), rl.get("max_memory_mb")
    return Limits(cpu_percent=int(cpu) if cpu is not None else None,
                  memory_mb=int(mem) if mem is not None else None,
                  pids_max=pids_max or None)


def resource_hooks(spec: dict[str, Any], job_id: int, attempt: int, backend: CgroupBackend,
                   policy: str, pids_max: int | None = None) -> list[Hook]:
    """Hooks for one attempt; UnsupportedJob (-> REJECT) if `required` limits cannot hold."""
    limits = limits_of(spec, pids_max)
    hooks: list[Hook] = []
    if backend.available:
        hooks.append(CgroupHook(backend, job_key(job_id, attempt), limits))
    elif limits.any:
        if policy == "required":
            raise UnsupportedJob(f"limits: cannot enforce resource_limits here "
                                 f"(cgroup none: {backend.reason})")
        hooks.append(Unenforced())
    disk = (spec.get("resource_limits") or {}).get("max_disk_mb")
    if disk is not None:
        hooks.append(DiskWatch(int(disk)))
    return hooks
