"""Service-level targets and the per-job verdict (pure: no I/O, no clock)."""

from __future__ import annotations

from dataclasses import dataclass

# States whose jobs get a verdict. A cancelled job is the client's decision, not a service
# failure, so it is neither met nor missed.
JUDGED = frozenset({"completed", "failed", "timed_out"})


@dataclass(frozen=True)
class SlaPolicy:
    """A job meets the SLA when it completed within done_s of its submission and its first
    queue wait (submission to first assignment) was at most wait_s. target is the fraction of
    judged jobs that should meet it (what the compliance alert compares against)."""

    done_s: float = 600.0
    wait_s: float = 30.0
    target: float = 0.95

    def __post_init__(self) -> None:
        if self.done_s <= 0 or self.wait_s < 0 or not 0 < self.target <= 1:
            raise ValueError("SLA: done_s > 0, wait_s >= 0 and 0 < target <= 1 required")

    def verdict(self, state: str, created_at: float, first_wait_s: float | None,
                finished_at: float) -> bool | None:
        """True (met), False (missed) or None (not judged: cancelled or unknown submit time).

        Times are epoch seconds. A completed job was assigned, so first_wait_s None means the
        wait is unknown (assigned before a master restart): only the done target is judged.
        """
        if state not in JUDGED or created_at <= 0:
            return None
        if state != "completed":
            return False
        waited_ok = first_wait_s is None or first_wait_s <= self.wait_s
        return waited_ok and finished_at - created_at <= self.done_s
