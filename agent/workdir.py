"""One agent per work dir: an exclusive lock held for the agent's lifetime.

The lock is a `flock` on WORK_DIR/agent.lock, so it goes away with the process however it ends
(kill -9 included) and a second agent on the same work dir is told at once instead of sharing
job directories, inputs and cgroup leftovers with the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


class WorkDirBusy(Exception):
    """Another running agent holds this work dir."""


class WorkDirLock:
    """An exclusive, process-lifetime lock on one work dir."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def claim(cls, work_dir: Path) -> WorkDirLock:
        """Create the work dir if needed and lock it; WorkDirBusy if another agent holds it."""
        work_dir.mkdir(parents=True, exist_ok=True)
        path = work_dir / "agent.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise WorkDirBusy(str(work_dir)) from e
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    def release(self) -> None:
        """Unlock (idempotent); the file stays, empty of meaning without the lock."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
