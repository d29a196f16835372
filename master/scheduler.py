"""The scheduler (pure): priority queues with aging, retry delays, placement by capability."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bus.vocab import PRIORITIES, PRIORITY_NAMES  # noqa: F401  (re-exported)


@dataclass(slots=True, eq=False)
class Job:
    """A live (non-terminal) job as the master holds it in memory."""

    id: int
    scenario: str
    spec: bytes  # the validated spec, msgpack-packed (kept small: 100k queued jobs fit easily)
    state: str
    priority: int
    attempt: int
    max_attempts: int
    rejects: int = 0
    requires: str = ""  # the capability an agent must advertise (workload or encoder)
    agent: str | None = None
    progress: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    qseq: int = 0  # which queue entry is current (older entries are stale)
    where: int = 0  # 0 not queued, 1 in a ready queue, 2 waiting out a retry delay
    enqueued: float = 0.0  # monotonic time the job entered its queue
    cancel_grace: float = 30.0
    created_at: float = 0.0  # epoch s of the submission (SLA)
    first_wait_s: float | None = None  # submission to first assignment, s (SLA)
    answered: bool = False  # the agent answered the current attempt (ACCEPT, or HELLO.running)
    retry_timeouts: bool = False  # the spec's retry_timeouts (master/state.py)


class Scheduler:
    """Queued jobs by (priority, requirement); picks the best job an agent can run."""

    def __init__(self, aging_s: float = 60.0) -> None:
        self.aging_s = aging_s
        self._queues: dict[tuple[int, str], deque[tuple[int, Job]]] = {}
        self._delayed: list[tuple[float, int, Job]] = []
        self._seq = itertools.count(1)
        self._counts = [0, 0, 0]

    def push(self, job: Job, now: float, front: bool = False) -> None:
        """Queue a job now; front=True puts it back at the head (a rejected job keeps its place)."""
        job.qseq = next(self._seq)
        job.where = 1
        if not front or not job.enqueued:
            job.enqueued = now
        queue = self._queues.setdefault((job.priority, job.requires), deque())
        if front:
            queue.appendleft((job.qseq, job))
        else:
            queue.append((job.qseq, job))
        self._counts[job.priority] += 1

    def push_delayed(self, job: Job, due: float) -> None:
        """Queue a job once monotonic time reaches due (retry backoff)."""
        job.qseq = next(self._seq)
        job.where = 2
        heapq.heappush(self._delayed, (due, job.qseq, job))

    def promote(self, now: float) -> int:
        """Move due delayed jobs into their queues; returns how many moved."""
        moved = 0
        while self._delayed and self._delayed[0][0] <= now:
            _, qseq, job = heapq.heappop(self._delayed)
            if job.qseq == qseq and job.where == 2:
                self.push(job, now)
                moved += 1
        return moved

    def next_due(self) -> float | None:
        """The monotonic time of the earliest delayed job, if any."""
        return self._delayed[0][0] if self._delayed else None

    def discard(self, job: Job) -> None:
        """Forget a queued job (cancelled); its queue entry becomes stale."""
        if job.where == 1:
            self._counts[job.priority] -= 1
        job.where = 0
        job.qseq = -1

    def _head(self, key: tuple[int, str]) -> Job | None:
        queue = self._queues[key]
        while queue:
            qseq, job = queue[0]
            if job.qseq == qseq and job.where == 1:
                return job
            queue.popleft()
        return None

    def pick(self, can_run: Callable[[str], bool], now: float) -> Job | None:
        """Remove and return the best queued job whose requirement can_run admits, or None."""
        best: tuple[float, int] | None = None
        best_key: tuple[int, str] | None = None
        for key in list(self._queues):
            if not can_run(key[1]):
                continue
            job = self._head(key)
            if job is None:
                del self._queues[key]
                continue
            score = (job.priority * self.aging_s - (now - job.enqueued), job.qseq)
            if best is None or score < best:
                best, best_key = score, key
        if best_key is None:
            return None
        _, job = self._queues[best_key].popleft()
        job.qseq = 0
        job.where = 0
        self._counts[job.priority] -= 1
        return job

    def waiting(self) -> bool:
        """Is any job queued (not delayed)? O(priorities)."""
        return any(n > 0 for n in self._counts)

    def depth(self) -> dict[str, int]:
        """Jobs waiting in the queues (not delayed) by priority name."""
        return {PRIORITY_NAMES[p]: max(0, n) for p, n in enumerate(self._counts)}

    def delayed(self) -> int:
        """Jobs waiting out a retry backoff."""
        return sum(1 for _, q, j in self._delayed if j.qseq == q and j.where == 2)

    def requirements(self) -> set[str]:
        """The requirements of the non-empty queues."""
        return {k[1] for k, q in self._queues.items() if q}

