"""Disk: the size of a job's scratch (its work directory), watched while it runs."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from agent.runner import Hook, ProcessRun, Result

WATCH_EVERY_S = 1.0


def tree_size(root: Path) -> int:
    """Bytes allocated by the files under root (not following symlinks; vanishing files skipped)."""
    total = 0
    stack = [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        else:
                            st = entry.stat(follow_symlinks=False)
                            total += max(st.st_size, getattr(st, "st_blocks", 0) * 512)
                    except OSError:
                        continue
        except OSError:
            continue
    return total


class DiskWatch(Hook):
    """Stops the job with reason `disk_limit` once its scratch grows past max_disk_mb."""

    def __init__(self, max_disk_mb: int, every_s: float = WATCH_EVERY_S) -> None:
        self.limit = max_disk_mb * 2**20
        self.every_s = every_s
        self.peak = 0
        self._next = 0.0

    def poll(self, run: ProcessRun, now: float) -> str | None:
        if now < self._next:
            return None
        self._next = now + self.every_s
        used = tree_size(run.workdir)
        self.peak = max(self.peak, used)
        return "disk_limit" if used > self.limit else None

    def after_exit(self, run: ProcessRun, result: Result) -> Result:
        self.peak = max(self.peak, tree_size(run.workdir))
        return replace(result, extra={**result.extra, "disk_peak_mb": round(self.peak / 2**20, 3)})
