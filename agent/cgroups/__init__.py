"""Resource enforcement for jobs: cgroup v2/v1/none backends, the join-before-exec hook, disk watch.

`detect()` picks a backend; `resource_hooks()` turns a job spec into runner hooks under the
agent's `--limits required|best-effort` policy. See docs/RESOURCE_LIMITS.md.
"""

from agent.cgroups.base import CgroupBackend, CgroupError, CgroupHandle, Limits, Stats, job_key
from agent.cgroups.detect import MODES, detect, parent_name
from agent.cgroups.disk import DiskWatch, tree_size
from agent.cgroups.hook import CgroupHook, Unenforced
from agent.cgroups.limits import POLICIES, limits_of, resource_hooks
from agent.cgroups.none import NoCgroups

__all__ = [
    "MODES", "POLICIES", "CgroupBackend", "CgroupError", "CgroupHandle", "CgroupHook",
    "DiskWatch", "Limits", "NoCgroups", "Stats", "Unenforced", "detect", "job_key", "limits_of",
    "parent_name", "resource_hooks", "tree_size",
]
