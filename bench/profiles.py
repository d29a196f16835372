"""Profiles (how much load, on what topology) and workloads (what each job is)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# Jobs of the bus ceiling (bench/ceiling.py) measured beside every `ffrtmp bench` run.
CEILING_JOBS = 20_000

WORKLOADS = ("noop", "sleep", "ffmpeg")


class BenchError(Exception):
    """A bench invocation that cannot run as asked; the CLI prints it as one line."""


@dataclass(frozen=True)
class Profile:
    """How much load a run applies and on what local topology."""

    name: str
    jobs: int
    agents: int
    slots: int
    simulated: bool = False  # agents simulated in one process (noop only)
    batch: int = 1000  # specs per SUBMIT
    latency_samples: int = 50  # unloaded single-job round trips before the load
    idle_s: float = 0.0  # master CPU measured this long with agents connected and no jobs
    queued: int = 0  # jobs queued (low priority, agents drained) before the measured ones


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("quick", jobs=10, agents=2, slots=2, batch=10, latency_samples=10),
    Profile("standard", jobs=100, agents=3, slots=4, batch=100, latency_samples=50),
    Profile("stress", jobs=1_000, agents=3, slots=8, batch=500, latency_samples=100),
    Profile("scale", jobs=10_000, agents=200, slots=4, simulated=True, batch=1000,
            latency_samples=100, idle_s=10.0),
)}


@dataclass(frozen=True)
class Workload:
    """What each job does; `spec()` is the job spec submitted."""

    name: str
    sleep_s: float = 0.2
    scenario: str = "720p-h264"
    input: str = "testsrc:duration=2"

    def spec(self) -> dict[str, Any]:
        """The job spec for one job of this workload."""
        if self.name == "noop":
            return {"scenario": "noop"}
        if self.name == "sleep":
            return {"scenario": "sleep", "params": {"seconds": self.sleep_s}}
        return {"scenario": self.scenario, "input": self.input}

    def describe(self) -> str:
        """A short label for tables."""
        if self.name == "sleep":
            return f"sleep {self.sleep_s:g}s"
        if self.name == "ffmpeg":
            return f"ffmpeg {self.scenario} {self.input}"
        return self.name

    def est_job_s(self) -> float:
        """A rough single-job duration, for default timeouts only."""
        if self.name == "noop":
            return 0.001
        if self.name == "sleep":
            return self.sleep_s + 0.1
        return 2.0


def profile(name: str) -> Profile:
    """The named profile, or BenchError listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise BenchError(f"unknown profile {name!r} (choose from "
                         f"{', '.join(PROFILES)})") from None


def workload(name: str, **knobs: Any) -> Workload:
    """The named workload with its knobs, or BenchError listing the known ones."""
    if name not in WORKLOADS:
        raise BenchError(f"unknown workload {name!r} (choose from {', '.join(WORKLOADS)})")
    return Workload(name, **{k: v for k, v in knobs.items() if v is not None})


def customize(p: Profile, **overrides: Any) -> Profile:
    """The profile with the given (non-None) fields replaced."""
    return replace(p, **{k: v for k, v in overrides.items() if v is not None})
