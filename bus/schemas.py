"""Message schemas as data: command -> {key: (kind, default)}; see docs/protocol.md."""

from __future__ import annotations

from typing import Any

REQUIRED: Any = object()

# kinds: int, num (int or float), str, bool, list, map, any; a trailing "?" also admits nil;
# rid: a client request id (bus/codec.py RID_RULE: an int 0..2^64-1 or a str of <= 128 bytes).
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
        "jobs_batch": ("bool", False),  # 1.3: this agent takes JOBS
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
    # epoch: the leader's fencing token (docs/protocol.md "Masters"); 0 from a 1.1 master.
    "WELCOME": {
        "heartbeat_s": ("num", 1.0),
        "liveness": ("int", 3),
        "master": ("str", ""),
        "epoch": ("int", 0),
    },
    "JOB": {**_ID_ATTEMPT, "spec": ("map", REQUIRED), "epoch": ("int", 0)},
    # 1.3: the JOBs of one turn for one agent whose HELLO said jobs_batch; each item is a
    # JOB body (checked against JOB's schema one by one).
    "JOBS": {"jobs": ("list", REQUIRED), "epoch": ("int", 0)},
    "DONE_ACK": {"acks": ("list", REQUIRED), "epoch": ("int", 0)},
    "CANCEL": {**_ID_ATTEMPT, "grace_s": ("num", 30.0), "reason": ("str", "cancelled"),
               "epoch": ("int", 0)},
    "HEARTBEAT": {},
    "DRAIN": {"on": ("bool", True)},
    "BYE": {},
    "ERROR": {"code": ("str", "internal"), "text": ("str", ""), "rid": ("any", None)},
}

_RID: Schema = {"rid": ("rid", REQUIRED)}  # every client request carries one (checked first)
_ECHO: Schema = {"rid": ("any", None)}  # replies echo it; an ERROR may lack it (unreadable)

CLIENT_TO_MASTER: dict[str, Schema] = {
    "SUBMIT": {**_RID, "specs": ("list", REQUIRED), "idempotency_key": ("str?", None)},
    "GET": {**_RID, "ids": ("list", REQUIRED), "events": ("bool", False)},
    "LIST": {
        **_RID,
        "states": ("list?", None),
        "scenarios": ("list?", None),
        "agent": ("str?", None),
        "since": ("num?", None),
        "limit": ("int", 100),
        "before_id": ("int?", None),
    },
    "EVENTS": {**_RID, "after": ("int", 0), "limit": ("int", 1000), "ids": ("list?", None)},
    "INFO": dict(_RID),
    "CANCEL": {**_RID, "ids": ("list", REQUIRED), "grace_s": ("num", 30.0)},
    "RETRY": {**_RID, "id": ("int", REQUIRED)},
    "NODES": {**_RID, "limit": ("int", 1000), "after": ("str?", None)},
    "DRAIN": {**_RID, "name": ("str", REQUIRED), "on": ("bool", True)},
    "STATS": dict(_RID),
}

MASTER_TO_CLIENT: dict[str, Schema] = {
    "SUBMITTED": {**_ECHO, "ids": ("list", REQUIRED)},
    "REPLY": {**_ECHO},
    "ERROR": {**_ECHO, "code": ("str", "internal"), "text": ("str", ""),
              "command": ("str?", None)},
}

EVENTS: dict[str, Schema] = {
    "STATE": {"seq": ("int", REQUIRED), "id": ("int", REQUIRED), "state": ("str", REQUIRED)},
    "EVENTS": {"events": ("list", REQUIRED)},
    "PROGRESS": {"id": ("int", REQUIRED)},
    "AGENT": {"name": ("str", REQUIRED), "event": ("str", REQUIRED)},
    "STATS": {},
}
