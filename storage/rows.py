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


_FLAT = (str, int, float, bool, type(None))


class _Texts:
    """JSON texts of one batch's values, each distinct value encoded once: the same object
    (the copies of one SUBMIT share a spec), or a flat map of equal items (`extra`)."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Any, str | None]] = {}
        self._flat: dict[tuple[Any, ...], str | None] = {}

    def __call__(self, value: Any) -> str | None:
        known = self._by_id.get(id(value))
        if known is not None and known[0] is value:
            return known[1]
        if isinstance(value, dict) and len(value) <= 8 \
                and all(type(v) in _FLAT for v in value.values()):
            key = tuple((k, type(v), v) for k, v in value.items())  # True is not 1 here
            text = self._flat.get(key)
            if text is None:
                text = self._flat[key] = encode_json(value)
            return text
        text = encode_json(value)
        self._by_id[id(value)] = (value, text)
        return text


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
    texts = _Texts()
    shapes: set[tuple[str, ...]] = set()  # key sets already checked (rows of one shape)
    for row in rows:
        shape = tuple(row)
        if shape not in shapes:
            _check_keys("job insert", row, _JOB_SET, JOB_REQUIRED)
            shapes.add(shape)
        if row["id"] is None:
            raise StorageError("job insert needs an explicit id (the master allocates ids)")
        params = []
        for c in JOB_COLUMNS:
            if c in JOB_JSON:
                params.append(texts(row.get(c)))
            else:
                params.append(row.get(c, JOB_DEFAULTS.get(c)))
        out.append(tuple(params))
    return out


def job_update_groups(
    updates: Mapping[int, Mapping[str, Any]],
) -> dict[tuple[str, ...], list[Params]]:
    """Group updates by their (sorted) column set: columns -> [(id, value, …), …]."""
    groups: dict[tuple[str, ...], list[Params]] = {}
    texts = _Texts()
    for job_id, fields in updates.items():
        if not fields:
            continue
        cols = tuple(sorted(fields))
        if cols not in groups:  # each column set is checked once
            if "id" in fields:
                raise StorageError(f"update of job {job_id} tries to change its id")
            _check_keys(f"update of job {job_id}", fields, _JOB_SET, frozenset())
        values = tuple(
            texts(fields[c]) if c in JOB_JSON else fields[c] for c in cols
        )
        groups.setdefault(cols, []).append((job_id, *values))
    return groups


def event_params(batch: WriteBatch) -> list[Params]:
    """The batch's events in EVENT_COLUMNS order (each names its sequence number `id`; a new
    job's creation event is one of them, written by whoever inserts the job)."""
    out: list[Params] = []
    for ev in batch.events:
        if tuple(ev) == EVENT_COLUMNS:  # every column, in order: the master's own rows
            out.append(tuple(ev.values()))
            continue
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
