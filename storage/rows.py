"""Turn WriteBatch contents into parameter tuples for the bulk writers (validation lives here)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from storage.batch import WriteBatch
from storage.errors import StorageError
from storage.models import (
    AGENT_REQUIRED,
    EVENT_COLUMNS,
    EVENT_DEFAULTS,
    EVENT_REQUIRED,
    JOB_COLUMNS,
    JOB_DEFAULTS,
    JOB_JSON,
    JOB_REQUIRED,
)

Params = tuple[Any, ...]
_JOB_SET = frozenset(JOB_COLUMNS)
_EVENT_SET = frozenset(EVENT_COLUMNS)
_AGENT_SET = frozenset({"name", "state", "slots", "info", "first_seen", "last_seen"})


def encode_json(value: Any) -> str | None:
    """JSON-encode a JSON column's value (None stays NULL); a str is encoded too, not passed raw."""
    if value is None:
        return None
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    except (TypeError, ValueError) as e:
        raise StorageError(f"value is not JSON-serialisable: {e}") from e


def decode_json(text: str | None) -> Any:
    """Decode a JSON column (NULL reads as None)."""
    return None if text is None else json.loads(text)


def _check_keys(kind: str, row: Mapping[str, Any], allowed: frozenset[str],
                required: frozenset[str]) -> None:
    unknown = row.keys() - allowed
    if unknown:
        raise StorageError(f"{kind} has unknown column(s): {', '.join(sorted(unknown))}")
    missing = required - row.keys()
    if missing:
        raise StorageError(f"{kind} lacks required column(s): {', '.join(sorted(missing))}")


def job_insert_params(rows: Iterable[Mapping[str, Any]]) -> list[Params]:
    """One tuple per job row, in JOB_COLUMNS order, defaults filled and JSON encoded."""
    out = []
    for row in rows:
        _check_keys("job insert", row, _JOB_SET, JOB_REQUIRED)
        if row["id"] is None:
            raise StorageError("job insert needs an explicit id (the master allocates ids)")
        out.append(tuple(
            encode_json(row.get(c)) if c in JOB_JSON else row.get(c, JOB_DEFAULTS.get(c))
            for c in JOB_COLUMNS
        ))
    return out


def job_update_groups(
    updates: Mapping[int, Mapping[str, Any]],
) -> dict[tuple[str, ...], list[Params]]:
    """Group updates by their (sorted) column set: columns -> [(id, value, …), …]."""
    groups: dict[tuple[str, ...], list[Params]] = {}
    for job_id, fields in updates.items():
        if not fields:
            continue
        cols = tuple(sorted(fields))
        if "id" in fields:
            raise StorageError(f"update of job {job_id} tries to change its id")
        _check_keys(f"update of job {job_id}", fields, _JOB_SET, frozenset())
        values = tuple(
            encode_json(fields[c]) if c in JOB_JSON else fields[c] for c in cols
        )
        groups.setdefault(cols, []).append((job_id, *values))
    return groups


def event_params(batch: WriteBatch) -> list[Params]:
    """The batch's events in EVENT_COLUMNS order (each names its sequence number `id`; a new
    job's creation event is one of them, written by whoever inserts the job)."""
    out: list[Params] = []
    for ev in batch.events:
        _check_keys("job event", ev, _EVENT_SET, EVENT_REQUIRED)
        out.append(tuple(ev.get(c, EVENT_DEFAULTS.get(c)) for c in EVENT_COLUMNS))
    return out


def agent_params(agents: Mapping[str, Mapping[str, Any]]) -> list[Params]:
    """(name, state, slots, info, first_seen, last_seen) per agent; first_seen defaults to last."""
    out = []
    for name, row in agents.items():
        _check_keys(f"agent {name!r}", row, _AGENT_SET, AGENT_REQUIRED)
        if row.get("name", name) != name:
            raise StorageError(f"agent row keyed {name!r} names {row['name']!r}")
        info = row.get("info")
        out.append((
            name, row["state"], row["slots"],
            encode_json({} if info is None else info),
            row.get("first_seen", row["last_seen"]), row["last_seen"],
        ))
    return out
