"""Message schemas as data: command -> {key: (kind, default)}; see docs/protocol.md."""

from __future__ import annotations

from typing import Any

REQUIRED: Any = object()

# kinds: int, num (int or float), str, bool, list, map, any; a trailing "?" also admits nil.
Schema = dict[str, tuple[str, Any]]

_ID_ATTEMPT: Schema = {"id": ("int", REQUIRED), "attempt": ("int", REQUIRED)}

AGENT_TO_MASTER: dict[str, Schema] = {
    "HELLO": {
        "name": ("str", REQUIRED),
        "instance": ("str", ""),
        "version": ("str", ""),
        "slots": ("int", REQUIRED),
        "resources": ("map", {}),
        "workloads": ("list", []),
        "encoders": ("list", []),
        "cgroup": ("str", "none"),
        "limits": ("str", "best-effort"),
        "running": ("list", []),
        "results": ("list", []),
    },
    "CREDIT": {"n": ("int", REQUIRED)},
    "ACCEPT": dict(_ID_ATTEMPT),
    "REJECT": {**_ID_ATTEMPT, "reason": ("str", "rejected")},
    "PROGRESS": {
        **_ID_ATTEMPT,
        "progress": ("num", 0.0),
        "bytes_in": ("int", 0),
        "bytes_out": ("int", 0),
        "fps": ("num?", None),
        "speed": ("num?", None),
        "out_time_s": ("num?", None),
    },
    "DONE": {
        **_ID_ATTEMPT,
        "status": ("str", REQUIRED),
        "reason": ("str?", None),
        "exit_code": ("int?", None),
        "bytes_in": ("int", 0),
        "bytes_out": ("int", 0),
        "duration_s": ("num", 0.0),
        "extra": ("map", {}),
    },
    # credit: the agent's granted-and-unused credit, so a CREDIT lost in transit is made good.
    "HEARTBEAT": {"credit": ("int?", None)},
    "BYE": {},
    "ERROR": {"code": ("str", "internal"), "text": ("str", ""), "rid": ("any", None)},
}

MASTER_TO_AGENT: dict[str, Schema] = {
    "WELCOME": {
        "heartbeat_s": ("num", 1.0),
        "liveness": ("int", 3),
        "master": ("str", ""),
    },
    "JOB": {**_ID_ATTEMPT, "spec": ("map", REQUIRED)},
    "DONE_ACK": {"acks": ("list", REQUIRED)},
    "CANCEL": {**_ID_ATTEMPT, "grace_s": ("num", 30.0), "reason": ("str", "cancelled")},
    "HEARTBEAT": {},
    "DRAIN": {"on": ("bool", True)},
    "BYE": {},
    "ERROR": {"code": ("str", "internal"), "text": ("str", ""), "rid": ("any", None)},
}

_RID: Schema = {"rid": ("any", None)}

CLIENT_TO_MASTER: dict[str, Schema] = {
    "SUBMIT": {**_RID, "specs": ("list", REQUIRED), "idempotency_key": ("str?", None)},
    "GET": {**_RID, "ids": ("list", REQUIRED), "events": ("bool", False)},
    "LIST": {
        **_RID,
        "states": ("list?", None),
        "limit": ("int", 100),
        "before_id": ("int?", None),
    },
    "CANCEL": {**_RID, "ids": ("list", REQUIRED), "grace_s": ("num", 30.0)},
    "RETRY": {**_RID, "id": ("int", REQUIRED)},
    "NODES": {**_RID, "limit": ("int", 1000), "after": ("str?", None)},
    "DRAIN": {**_RID, "name": ("str", REQUIRED), "on": ("bool", True)},
    "STATS": dict(_RID),
}

MASTER_TO_CLIENT: dict[str, Schema] = {
    "SUBMITTED": {**_RID, "ids": ("list", REQUIRED)},
    "REPLY": {**_RID},
    "ERROR": {**_RID, "code": ("str", "internal"), "text": ("str", "")},
}

EVENTS: dict[str, Schema] = {
    "STATE": {"id": ("int", REQUIRED), "state": ("str", REQUIRED)},
    "PROGRESS": {"id": ("int", REQUIRED)},
    "AGENT": {"name": ("str", REQUIRED), "event": ("str", REQUIRED)},
    "STATS": {},
}
