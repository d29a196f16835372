"""What the master knows of one connected agent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bus import vocab


@dataclass(slots=True, eq=False)
class AgentConn:
    """One agent connection: identity, capabilities, credit and the jobs it holds."""

    ident: bytes
    name: str
    slots: int
    caps: frozenset[str]
    info: dict[str, Any]
    last_seen: float
    last_sent: float
    credit: int = 0
    draining: bool = False
    jobs: set[int] = field(default_factory=set)
    acks: list[list[int]] = field(default_factory=list)
    first_seen_wall: float = 0.0
    instance: str = ""  # HELLO.instance: tells the same process on a new connection apart
    batches: bool = False  # HELLO.jobs_batch: a turn's JOBs go in one JOBS (protocol 1.3)
    verdicts: dict[str, bool] = field(default_factory=dict)  # can_run cache (caps are fixed)
    wake: float = float("inf")  # when the registry's liveness next looks at it (its heap entry)

    def can_run(self, requirement: str) -> bool:
        """True if this agent has every '+'-joined capability of a requirement.

        `cpu>=PCT` and `mem>=MB` are floors on the advertised resources (cpus x 100, memory_mb);
        every other part must be advertised as is (`workload:sleep`, `encoder:libx264`, `limits`).
        """
        verdict = self.verdicts.get(requirement)
        if verdict is None:
            verdict = all(self._has(cap) for cap in requirement.split("+"))
            self.verdicts[requirement] = verdict
        return verdict

    def _has(self, cap: str) -> bool:
        if ">=" not in cap:
            return cap in self.caps
        key, _, value = cap.partition(">=")
        res = self.info.get("resources") or {}
        have = {"cpu": float(res.get("cpus") or 0) * 100, "mem": res.get("memory_mb") or 0}
        try:
            return key in have and float(have[key]) >= float(value)
        except (TypeError, ValueError):
            return False

    def node_view(self, now: float) -> dict[str, Any]:
        """The NODES shape of docs/protocol.md for this connected agent."""
        state = vocab.NODE_DRAINING if self.draining else vocab.NODE_ALIVE
        return node_view(self.name, state, self.slots,
                         len(self.jobs), self.credit, self.info, now - self.last_seen)


def node_view(name: str, state: str, slots: int, busy: int, credit: int,
              info: dict[str, Any], seen_ago_s: float) -> dict[str, Any]:
    """The NODES shape of docs/protocol.md, for connected and stored agents alike."""
    return {
        "name": name,
        "state": state,
        "slots": slots,
        "busy": busy,
        "credit": credit,
        "resources": info.get("resources", {}),
        "workloads": info.get("workloads", []),
        "encoders": info.get("encoders", []),
        "cgroup": info.get("cgroup", "none"),
        "limits": info.get("limits", "best-effort"),
        "last_seen_s": round(max(0.0, seen_ago_s), 3),
    }
