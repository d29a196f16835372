"""The dashboard's state and its rendering to rows (pure: testable without a terminal)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.text import Text

from bus.vocab import ASSIGNED, CANCELLING, QUEUED, RUNNING, TERMINAL

STATE_ORDER = {RUNNING: 0, CANCELLING: 1, ASSIGNED: 2, QUEUED: 3}


def _bar(fraction: float, width: int = 12) -> str:
    full = int(min(1.0, max(0.0, fraction)) * width)
    return "█" * full + "░" * (width - full) + f" {100 * fraction:5.1f}%"


@dataclass
class DashModel:
    """What the dashboard shows: the latest stats, nodes and live jobs, plus event updates."""

    stats: dict[str, Any] = field(default_factory=dict)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    jobs: dict[int, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None

    def set_jobs(self, jobs: list[dict[str, Any]]) -> None:
        """Replace the live job list (from LIST)."""
        self.jobs = {j["id"]: j for j in jobs}

    def apply_event(self, command: str, body: dict[str, Any]) -> bool:
        """Fold one PROGRESS or STATE event in; True if a shown job changed."""
        job = self.jobs.get(body.get("id", -1))
        if job is None:
            return False
        if command == "PROGRESS":
            job["progress"] = float(body.get("progress") or 0.0)
            extra = job.setdefault("extra", {})
            for key in ("fps", "speed"):
                if body.get(key) is not None:
                    extra[key] = body[key]
            return True
        if command == "STATE":
            if body.get("state") in TERMINAL:
                del self.jobs[job["id"]]
            else:
                job["state"] = body.get("state", job["state"])
                job["agent"] = body.get("agent", job.get("agent"))
            return True
        return False

    def summary(self) -> Text:
        """The header lines: queue, agents, slots, totals (plain text: never parsed as markup,
        since error texts come from the network)."""
        if self.error:
            return Text.assemble(("master unreachable", "bold red"), f": {self.error}")
        s = self.stats
        by_state = s.get("jobs_by_state", {})
        queued = s.get("queued_by_priority", {})
        return Text(
            f"agents {s.get('agents', 0)}   slots {s.get('slots_busy', 0)}/{s.get('slots', 0)}"
            f" busy   queued high {queued.get('high', 0)} · normal {queued.get('normal', 0)}"
            f" · low {queued.get('low', 0)}   retry wait {s.get('delayed', 0)}\n"
            + "   ".join(f"{k} {v}" for k, v in sorted(by_state.items())))

    def node_rows(self) -> list[tuple[str, ...]]:
        """One row per agent."""
        return [(n["name"], n["state"], str(n["slots"]), str(n["busy"]), n["cgroup"],
                 n["limits"], f"{n['last_seen_s']:.1f}s") for n in self.nodes]

    def job_rows(self) -> list[tuple[str, ...]]:
        """Live jobs, running first, then by id."""
        rows = []
        for job in sorted(self.jobs.values(),
                          key=lambda j: (STATE_ORDER.get(j["state"], 9), j["id"])):
            extra = job.get("extra") or {}
            fps = f"{extra['fps']:.0f}" if extra.get("fps") is not None else ""
            speed = f"{extra['speed']:.2f}x" if extra.get("speed") is not None else ""
            rows.append((str(job["id"]), job["scenario"], job["state"], job["priority"],
                         job.get("agent") or "-", _bar(job.get("progress") or 0.0), fps, speed,
                         f"{job['attempt']}/{job['max_attempts']}"))
        return rows
