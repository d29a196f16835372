"""Pick the cgroup backend for `--cgroup auto|v2|v1|none` on this host."""

from __future__ import annotations

from pathlib import Path

from agent.cgroups import v1, v2
from agent.cgroups.base import CgroupBackend, CgroupError, safe_name
from agent.cgroups.none import NoCgroups
from agent.defaults import CGROUP_MODES

MODES = CGROUP_MODES


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def parent_name(agent_name: str) -> str:
    """The default parent cgroup's directory name for an agent."""
    return f"ffrtmp-{safe_name(agent_name)}"


def detect(mode: str, agent_name: str, parent: str | None = None,
           mounts: str | None = None, own: str | None = None) -> CgroupBackend:
    """The backend for `mode`; CgroupError if an explicitly chosen one cannot be used.

    `parent` is a cgroup path relative to the hierarchy root (as /proc/self/cgroup shows them);
    the default is `ffrtmp-<agent name>` under the agent's own cgroup in each hierarchy.
    `mounts` and `own` stand in for /proc/self/mounts and /proc/self/cgroup (tests).
    The parent keeps the kernel's CPU weight, that of one nice-0 task such as the agent: all
    jobs together then weigh what the agent does (a lower weight was measured to starve jobs
    below their own quota on a busy host; see docs/PERFORMANCE.md).
    """
    if mode not in MODES:
        raise CgroupError(f"unknown cgroup mode {mode!r} (known: {', '.join(MODES)})")
    if mode == "none":
        return NoCgroups("disabled (--cgroup none)")
    mounts = _read("/proc/self/mounts") if mounts is None else mounts
    own = _read("/proc/self/cgroup") if own is None else own
    tried: list[str] = []
    if mode in ("auto", "v2"):
        mount = v2.parse_mount(mounts)
        own_v2 = v2.parse_own(own)
        if mount is None or own_v2 is None:
            tried.append("v2: no cgroup2 mount")
        else:
            where = parent if parent is not None else \
                f"{own_v2.rstrip('/')}/{parent_name(agent_name)}"
            b2 = v2.V2Backend(mount, where)
            if b2.available:
                return b2
            tried.append(f"v2: {b2.reason}")
    if mode in ("auto", "v1"):
        b1 = v1.V1Backend(v1.parse_mounts(mounts), v1.parse_own(own), parent_name(agent_name),
                          parent)
        if b1.available:
            return b1
        tried.append(f"v1: {b1.reason}")
    reason = "; ".join(tried)
    if mode != "auto":
        raise CgroupError(f"--cgroup {mode} cannot be used here: {reason}")
    return NoCgroups(reason)
