"""Admission and reservation (pure): what the running jobs hold against what this host has.

Every running attempt reserves its resource_limits (CPU %, memory MB, scratch disk MB); one
without limits reserves a small default. Credit is per slot and granted before the job is known,
so a credit goes out only while a "typical" reservation still fits. A JOB whose own reservation
does not fit is REJECTed (reason `resources`, the master requeues it at the head without
charging an attempt) and no further credit is granted until a running job ends: without that
block the same job would bounce between master and agent in a loop. No clock is read here:
`now` is an argument, disk free space an input.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

REJECT_REASON = "resources"


@dataclass(frozen=True)
class Reservation:
    """Resources one job holds: CPU in percent of a core, memory and disk in MB."""

    cpu_percent: float = 0.0
    memory_mb: float = 0.0
    disk_mb: float = 0.0

    def __add__(self, other: Reservation) -> Reservation:
        return Reservation(self.cpu_percent + other.cpu_percent,
                           self.memory_mb + other.memory_mb, self.disk_mb + other.disk_mb)

    @classmethod
    def parse(cls, text: str) -> Reservation:
        """`CPU_PERCENT:MEMORY_MB[:DISK_MB]`, e.g. `10:64` or `100:1024:500`."""
        parts = text.split(":")
        if not 2 <= len(parts) <= 3:
            raise ValueError(f"{text!r}: expected CPU_PERCENT:MEMORY_MB[:DISK_MB]")
        try:
            values = [float(p) for p in parts]
        except ValueError as e:
            raise ValueError(f"{text!r}: not a number") from e
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"{text!r}: values must be finite and >= 0")
        return cls(*values)


def reservation_for(spec: dict[str, Any], default: Reservation) -> Reservation:
    """What a job spec reserves: its resource_limits, the default for what it leaves out."""
    rl = spec.get("resource_limits") or {}
    return Reservation(float(rl.get("max_cpu_percent", default.cpu_percent)),
                       float(rl.get("max_memory_mb", default.memory_mb)),
                       float(rl.get("max_disk_mb", default.disk_mb)))


class Admission:
    """Reserved vs capacity for one agent; decides credit and whether a JOB may start."""

    def __init__(self, cpu_capacity_percent: float, memory_capacity_mb: float,
                 disk_floor_mb: float = 1024.0, default: Reservation | None = None,
                 typical: Reservation | None = None, idle_retry_s: float = 5.0) -> None:
        self.cpu_capacity = cpu_capacity_percent
        self.memory_capacity = memory_capacity_mb
        self.disk_floor = disk_floor_mb
        self.default = default if default is not None else Reservation(10.0, 64.0, 0.0)
        self.typical = typical if typical is not None else self.default
        self.idle_retry_s = idle_retry_s
        self.disk_free = math.inf  # MB free in the work dir's filesystem, from observe_disk
        self.held: dict[Hashable, Reservation] = {}
        self._blocked_on: Reservation | None = None
        self._retry_at: float | None = None

    # ---- inputs -------------------------------------------------------------------------------

    def observe_disk(self, free_mb: float) -> None:
        """The free space now in the filesystem of the work dir, MB."""
        self.disk_free = free_mb

    def admit(self, key: Hashable, res: Reservation, now: float) -> bool:
        """Reserve for a job about to start; False (and credit blocked) if it does not fit."""
        if self.fits(res):
            self.held[key] = res
            return True
        self._blocked_on = res
        # Nothing running means no release will ever unblock: retry later instead.
        self._retry_at = None if self.held else now + self.idle_retry_s
        return False

    def release(self, key: Hashable) -> None:
        """A job ended: free its reservation and lift a block on credit."""
        if self.held.pop(key, None) is not None:
            self._blocked_on = None
            self._retry_at = None

    # ---- decisions ----------------------------------------------------------------------------

    def reserved(self) -> Reservation:
        """The sum of what the running jobs hold."""
        total = Reservation()
        for res in self.held.values():
            total = total + res
        return total

    def free(self) -> Reservation:
        """What is left: capacity minus reservations (disk: free space minus the floor too)."""
        r = self.reserved()
        return Reservation(self.cpu_capacity - r.cpu_percent, self.memory_capacity - r.memory_mb,
                           self.disk_free - self.disk_floor - r.disk_mb)

    def fits(self, res: Reservation) -> bool:
        """True if a job reserving res can start now (never under the disk floor)."""
        f = self.free()
        return (self.disk_free > self.disk_floor and res.cpu_percent <= f.cpu_percent
                and res.memory_mb <= f.memory_mb and res.disk_mb <= f.disk_mb)

    def blocked(self, now: float) -> bool:
        """True while credit is held back after a REJECT for resources."""
        if self._blocked_on is None:
            return False
        if self.fits(self._blocked_on) or (self._retry_at is not None and now >= self._retry_at):
            self._blocked_on = None
            self._retry_at = None
            return False
        return True

    def credits(self, free_slots: int, outstanding: int, now: float) -> int:
        """How many more credits to grant: free slots that a typical job would still fit in.

        `outstanding` credits were granted and not yet used: each may bring a typical job.
        """
        if free_slots <= 0 or self.blocked(now) or self.disk_free <= self.disk_floor:
            return 0
        f, t = self.free(), self.typical
        fit = free_slots + outstanding
        for have, each in ((f.cpu_percent, t.cpu_percent), (f.memory_mb, t.memory_mb),
                           (f.disk_mb, t.disk_mb)):
            if each > 0:
                fit = min(fit, max(0, math.floor(have / each + 1e-9)))
            elif have < 0:
                fit = 0
        return max(0, min(free_slots, fit - outstanding))

    def snapshot(self) -> dict[str, float]:
        """Reserved vs capacity, for gauges (MB and percent of one core)."""
        r = self.reserved()
        return {
            "cpu_reserved_percent": r.cpu_percent,
            "cpu_capacity_percent": self.cpu_capacity,
            "memory_reserved_mb": r.memory_mb,
            "memory_capacity_mb": self.memory_capacity,
            "disk_reserved_mb": r.disk_mb,
            "disk_free_mb": self.disk_free if math.isfinite(self.disk_free) else -1.0,
        }
