"""WriteBatch: every row write of one master loop turn, applied later in one transaction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class WriteBatch:
    """Pure data, no I/O: Store.apply writes all of it in one transaction or none of it.

    inserts: full job rows with a master-allocated 'id' (their creation events are events).
    updates: job id -> changed columns (merged by update(); the later value wins).
    events:  job_event rows (id = sequence number, job_id, at, from_state, to_state, reason,
             agent, attempt).
    agents:  agent name -> full agent row to upsert.
    deletes: ids of terminal jobs to delete together with their events (retention).
    forgets: names of agents whose records to delete if they are (still) lost or left.
    """

    inserts: list[dict[str, Any]] = field(default_factory=list)
    updates: dict[int, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    deletes: list[int] = field(default_factory=list)
    forgets: list[str] = field(default_factory=list)

    def insert(self, **row: Any) -> None:
        """Queue a new job row (it must carry its 'id')."""
        self.inserts.append(row)

    def update(self, job_id: int, **fields: Any) -> None:
        """Queue column changes for a job, merging into earlier ones (the later value wins)."""
        self.updates.setdefault(job_id, {}).update(fields)

    def event(self, **row: Any) -> None:
        """Queue one job_event row."""
        self.events.append(row)

    def agent(self, name: str, **row: Any) -> None:
        """Queue an upsert of agent `name` (replaces an earlier row for it in this batch)."""
        self.agents[name] = row

    def delete(self, job_id: int) -> None:
        """Queue the deletion of a terminal job and its events."""
        self.deletes.append(job_id)

    def forget_agent(self, name: str) -> None:
        """Queue the deletion of agent `name`'s record; applied after this batch's agent
        upserts and only if the record is then lost or left (an agent that came back stays)."""
        self.forgets.append(name)

    def is_empty(self) -> bool:
        """True when the batch holds no row operation."""
        return len(self) == 0

    def __bool__(self) -> bool:
        """True when there is something to write."""
        return not self.is_empty()

    def __len__(self) -> int:
        """Number of row operations queued."""
        return (
            len(self.inserts) + len(self.updates) + len(self.events)
            + len(self.agents) + len(self.deletes) + len(self.forgets)
        )
