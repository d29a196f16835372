"""The "none" backend: no cgroups (not root, no hierarchy, or `--cgroup none`)."""

from __future__ import annotations

from pathlib import Path

from agent.cgroups.base import CgroupBackend, CgroupError, CgroupHandle, Limits


class NoCgroups(CgroupBackend):
    """Creates nothing; jobs that ask for limits are refused or run unlimited (policy)."""

    name = "none"

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason

    def create(self, key: str, limits: Limits) -> CgroupHandle:
        raise CgroupError(f"no cgroups on this agent: {self.reason}")

    def leftovers(self) -> list[CgroupHandle]:
        return []

    def parents(self) -> tuple[Path, ...]:
        return ()
