"""Job, event and node views with the stable field names of docs/protocol.md.

Times on the wire are float UNIX epoch seconds, everywhere (docs/protocol.md "Frames").
"""

from __future__ import annotations

from typing import Any

from master.scheduler import PRIORITY_NAMES, Job


def job_view(row: dict[str, Any], live: Job | None = None) -> dict[str, Any]:
    """The wire/--json shape of a stored job row, overlaid with the live in-memory job."""
    spec = row.get("spec") or {}
    view = {
        "id": row["id"],
        "scenario": row["scenario"],
        "state": row["state"],
        "priority": PRIORITY_NAMES.get(row["priority"], "normal"),
        "attempt": row["attempt"],
        "max_attempts": row["max_attempts"],
        "agent": row.get("agent"),
        "progress": row.get("progress") or 0.0,
        "bytes_in": row.get("bytes_in") or 0,
        "bytes_out": row.get("bytes_out") or 0,
        "exit_code": row.get("exit_code"),
        "reason": row.get("reason"),
        "created_at": row.get("created_at"),
        "started_at": row.get("started_at"),
        "finished_at": row.get("finished_at"),
        "resource_limits": spec.get("resource_limits") or {},
        "timeout_s": row.get("timeout_s"),
        "output": row.get("output"),
        "spec": spec,
        "extra": row.get("extra") or {},
    }
    if live is not None:
        view.update(
            state=live.state,
            attempt=live.attempt,
            agent=live.agent,
            progress=live.progress,
            bytes_in=live.bytes_in,
            bytes_out=live.bytes_out,
            extra={**view["extra"], **live.extra},
        )
    return view


def event_view(row: dict[str, Any]) -> dict[str, Any]:
    """One event, as PUB STATE, GET events and EVENTS carry it, from a job_events row."""
    return {
        "seq": row["id"],
        "id": row["job_id"],
        "at": row["at"],
        "from_state": row.get("from_state"),
        "state": row["to_state"],
        "reason": row.get("reason"),
        "agent": row.get("agent"),
        "attempt": row.get("attempt") or 0,
    }
