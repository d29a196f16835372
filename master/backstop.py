"""The master's backstop for time limits (pure): a job past timeout_s + margin on a live agent.

The agent enforces `timeout_s` itself (SIGTERM, grace, SIGKILL, DONE timed_out). If that does not
happen (a wedged agent that still heartbeats, a lost DONE), the master steps in: past
`timeout_s + margin` it sends `CANCEL reason=timeout`; if the attempt is still not done one
margin later, it is ended as `timed_out` (reason `timeout`) and fenced.
"""

from __future__ import annotations

from dataclasses import dataclass

CANCEL, GIVE_UP = 1, 2  # the stages an expired entry reports


@dataclass(slots=True)
class _Entry:
    attempt: int
    timeout_s: float
    due: float
    stage: int = 0


class Backstop:
    """Deadlines of live attempts that have a timeout_s; `expired(now)` says what to do."""

    def __init__(self, margin_s: float) -> None:
        self.margin_s = margin_s
        self._entries: dict[int, _Entry] = {}

    def arm(self, job_id: int, attempt: int, timeout_s: float, now: float) -> None:
        """An attempt was sent to an agent (or started there): its clock starts now."""
        self._entries[job_id] = _Entry(attempt, timeout_s, now + timeout_s + self.margin_s)

    def started(self, job_id: int, attempt: int, now: float) -> None:
        """The agent started the process (ACCEPT): count from here, like the agent does."""
        e = self._entries.get(job_id)
        if e is not None and e.attempt == attempt and e.stage == 0:
            e.due = now + e.timeout_s + self.margin_s

    def cancelled(self, job_id: int, attempt: int) -> bool:
        """True if the master already sent this attempt a CANCEL reason=timeout."""
        e = self._entries.get(job_id)
        return e is not None and e.attempt == attempt and e.stage >= CANCEL

    def watching(self, job_id: int) -> bool:
        """True if some attempt of this job has a deadline here."""
        return job_id in self._entries

    def forget(self, job_id: int) -> None:
        """The attempt ended (or the job left its agent): nothing to watch."""
        self._entries.pop(job_id, None)

    def expired(self, now: float) -> list[tuple[int, int, int]]:
        """(job id, attempt, CANCEL | GIVE_UP) for each deadline passed; advances the stages."""
        out: list[tuple[int, int, int]] = []
        for job_id, e in list(self._entries.items()):
            if now < e.due:
                continue
            if e.stage == 0:
                e.stage, e.due = CANCEL, now + self.margin_s
                out.append((job_id, e.attempt, CANCEL))
            else:
                del self._entries[job_id]
                out.append((job_id, e.attempt, GIVE_UP))
        return out

    def __len__(self) -> int:
        return len(self._entries)
