"""Client requests: SUBMIT, GET, LIST, CANCEL, RETRY, NODES, DRAIN, STATS (docs/protocol.md)."""

from __future__ import annotations

import logging
from typing import Any

import msgpack

from bus import vocab
from bus.codec import Message, echo_rid, encode
from bus.errors import FfrtmpError
from bus.sockets import CLIENT_MAX_MSG
from master.agents import node_view
from master.core import MasterCore
from master.outbox import CLIENT
from master.spec import (
    ScenarioCheck,
    SpecError,
    Validated,
    as_submitted,
    expand_outputs,
    resubmittable,
    validate_spec,
)
from master.views import event_view, job_view
from storage import StorageError, Store

log = logging.getLogger("ffrtmp.master")

MAX_SPECS = 10_000
MAX_IDS = 10_000
MAX_NODES = 1000
MAX_LIST = 1000
MAX_EVENTS = 10_000  # events per EVENTS reply
MAX_EVENT_IDS = 500  # jobs an EVENTS may filter by: one indexed query (more: read the stream)
PROTOCOL = "1.3"
INT64 = range(-(2**63), 2**63)  # what the database can compare ids with (msgpack goes to 2^64-1)


class RequestError(FfrtmpError):
    """A request the master refuses; becomes an ERROR reply with this code."""


class Requests:
    """Serves client requests against the core (writes) and the store (reads)."""

    def __init__(self, core: MasterCore, store: Store,
                 scenarios: dict[str, ScenarioCheck] | None = None,
                 max_reply: int = CLIENT_MAX_MSG, leader: dict[str, Any] | None = None) -> None:
        self.core = core
        # This master as standbys name it ({agents, clients, events, epoch, instance}).
        self.leader = leader
        self.store = store
        self.scenarios = scenarios or {}
        self.max_reply = max_reply
        # idempotency key -> (ids, specs) of this uncommitted turn
        self.pending_keys: dict[str, tuple[list[int], list[Any]]] = {}
        self.head = core.jobs.next_seq - 1  # the highest committed event sequence number

    def handle(self, ident: bytes, msg: Message, now: float, wall: float,
               role: str | None = None) -> None:
        """Serve one request; every outcome, good or bad, is one reply carrying its rid.

        `role` is the client key's role under CURVE (None without keys: loopback, all allowed).
        """
        rid = msg.get("rid")
        try:
            if role is not None and msg.command not in vocab.ROLE_COMMANDS.get(role, ()):
                raise RequestError("forbidden", f"{msg.command} needs the operate role; this "
                                                f"client key has the {role} role")
            handler = getattr(self, "_" + msg.command.lower())
            command, body = handler(msg, now, wall)
            frames = encode(command, {**body, "rid": rid})
            if len(frames[2]) > self.max_reply:
                raise RequestError("too_large", f"the {msg.command} reply would be "
                                   f"{len(frames[2])} bytes, over the {self.max_reply}-byte "
                                   "message limit: ask for less (a lower limit, fewer ids)")
        except RequestError as e:
            self.core.metrics.client_errors.labels(e.code).inc()
            frames = _error(e.code, e.text, rid, msg.command)
        except StorageError as e:
            self.core.metrics.db_errors.labels("read").inc()
            frames = _error("unavailable", f"database: {e}", rid, msg.command)
        except Exception as e:  # a bug must cost one request, never the master
            log.exception("request %s failed", msg.command)
            self.core.metrics.client_errors.labels("internal").inc()
            frames = _error("internal", f"{type(e).__name__}: {e}", rid, msg.command)
        self.core.out.send_frames(CLIENT, ident, frames)

    def turn_committed(self) -> None:
        """Forget this turn's idempotency keys and advance the committed event head: the
        turn's writes are in the store now."""
        self.pending_keys.clear()
        self.head = self.core.jobs.next_seq - 1

    # ---- writes -----------------------------------------------------------------------------

    def _submit(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        specs, key = msg["specs"], msg["idempotency_key"]
        # The request's own fields and counts are bad_body; invalid_spec is for specs[i].field.
        if not 1 <= len(specs) <= MAX_SPECS:
            raise RequestError("bad_body", f"specs: 1 to {MAX_SPECS} specs per SUBMIT, "
                                           f"got {len(specs)}")
        if key is not None and (len(key) > 200 or "\x00" in key):
            raise RequestError("bad_body", "idempotency_key: at most 200 characters, no NUL "
                                           f"(got {len(key)} characters)")
        checked = []
        # Each distinct spec is validated once: the copies share one validated spec (never
        # modified afterwards), so it is also packed and JSON-encoded once per turn.
        distinct: dict[bytes, Validated] = {}
        for i, raw in enumerate(specs):
            seen = msgpack.packb(raw)  # it was decoded from msgpack: it packs
            v = distinct.get(seen)
            if v is None:
                try:
                    v = distinct[seen] = validate_spec(raw, self.scenarios, packed=seen)
                except SpecError as e:
                    raise RequestError(e.code, f"specs[{i}].{e}") from e
            checked.append(v)
        wanted = [v.spec for v in checked]
        if key is not None:
            known = self.pending_keys.get(key) or self._stored_key(key)
            if known is not None:
                ids, had = known
                if had != wanted:
                    raise RequestError("conflict", f"idempotency_key {key!r} was used for "
                                       f"other specs (jobs {_id_span(ids)}): use a new key")
                return "SUBMITTED", {"ids": ids}
        try:  # templates ({id}, {n}) filled in, collisions refused
            checked = expand_outputs(checked, self.core.jobs.next_id)
        except SpecError as e:
            raise RequestError(e.code, str(e)) from e
        ids = [self.core.jobs.create(v.spec, v.priority, v.requires, key, now, wall)
               for v in checked]
        if key is not None:
            self.pending_keys[key] = (ids, wanted)
        self.core.metrics.submitted.inc(len(ids))
        return "SUBMITTED", {"ids": ids}

    def _stored_key(self, key: str) -> tuple[list[int], list[Any]] | None:
        ids = self.store.find_idempotent(key)
        if not ids:
            return None
        specs = {r["id"]: r["spec"] for r in self.store.get_jobs(ids)}
        return ids, [as_submitted(specs.get(i)) for i in ids]  # templates as submitted

    def _cancel(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        ids = _ids(msg["ids"])
        grace = float(msg["grace_s"])
        if not 0 <= grace <= 3600:
            raise RequestError("bad_body", f"grace_s: must be between 0 and 3600, got {grace:g}")
        core = self.core
        missing = [i for i in ids if i not in core.jobs]
        known = {row["id"] for row in self.store.get_jobs(missing)} if missing else set()
        results = []
        for job_id in ids:
            job = core.jobs.get(job_id)
            if job is None:
                results.append({"id": job_id,
                                "result": "terminal" if job_id in known else "not_found"})
            else:
                results.append({"id": job_id, "result": core.cancel(job, grace, now, wall)})
        return "REPLY", {"results": results}

    def _retry(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        job_id = _int64("id", msg["id"])
        live = self.core.jobs.get(job_id)
        if live is not None:
            raise RequestError("conflict", f"job {job_id} is {live.state}, "
                                           "not terminal: nothing to retry")
        rows = self.store.get_jobs([job_id])
        if not rows:
            raise RequestError("not_found", f"job {job_id} not found")
        spec = resubmittable(rows[0]["spec"])  # preset resolved anew, output as filled in
        try:
            checked = validate_spec(spec, self.scenarios)
        except SpecError as e:
            raise RequestError("invalid_spec", f"job {job_id} spec no longer valid: {e}") from e
        new_id = self.core.jobs.create(checked.spec, checked.priority, checked.requires, None,
                                       now, wall, retry_of=job_id)
        return "REPLY", {"id": new_id, "retry_of": job_id}

    def _drain(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        name, on = msg["name"], bool(msg["on"])
        stored = None if self.core.agents.named(name) is not None else next(
            (a for a in self.store.list_agents() if a["name"] == name), None)
        if not self.core.agents.drain(name, on, stored, wall):
            raise RequestError("not_found", f"agent {name!r} not known")
        return "REPLY", {"name": name, "draining": on}

    # ---- reads ------------------------------------------------------------------------------

    def _views(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [job_view(r, self.core.jobs.get(r["id"])) for r in rows]

    def _get(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        ids = _ids(msg["ids"])
        rows = self.store.get_jobs(ids)
        jobs = self._views(rows)
        if msg["events"] and jobs:  # one read for all of them, not one per job
            trail: dict[int, list[dict[str, Any]]] = {}
            for row in self.store.events(job_ids=[v["id"] for v in jobs]):
                trail.setdefault(row["job_id"], []).append(event_view(row))
            for view in jobs:
                view["events"] = trail.get(view["id"], [])
        found = {r["id"] for r in rows}
        return "REPLY", {"jobs": jobs, "missing": [i for i in ids if i not in found]}

    def _events(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        after, limit, ids = msg["after"], msg["limit"], msg["ids"]
        if not 0 <= after < 2**63:
            raise RequestError("bad_body", "after: must be a sequence number, 0 to 2^63-1")
        if not 1 <= limit <= MAX_EVENTS:
            raise RequestError("bad_body", f"limit: must be between 1 and {MAX_EVENTS}")
        if ids is not None:
            ids = _ids(ids)
            if len(ids) > MAX_EVENT_IDS:
                raise RequestError("bad_body", f"ids: at most {MAX_EVENT_IDS} jobs (to follow "
                                               "more, read every event and keep yours)")
        head = self.head
        # Only committed events: those of this turn (seq > head) are not in the store yet.
        rows = [r for r in self.store.events(after, limit + 1, ids) if r["id"] <= head]
        more = len(rows) > limit
        events = [event_view(r) for r in rows[:limit]]
        # Not more: every event up to head was read, so the next call may start from head.
        last = events[-1]["seq"] if more else max(after, head)
        return "REPLY", {"events": events, "last": last, "head": head, "more": more}

    def _info(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        cfg = self.core.cfg
        return "REPLY", {
            "version": PROTOCOL, "master": self.core.instance, "events": cfg.events,
            "head": self.head, "role": "leader", "epoch": self.core.epoch, "leader": self.leader,
            "limits": {"specs": MAX_SPECS, "ids": MAX_IDS, "events": MAX_EVENTS,
                       "event_ids": MAX_EVENT_IDS,
                       "list": MAX_LIST, "nodes": MAX_NODES, "message_bytes": self.max_reply,
                       "requests_per_turn": cfg.client_messages_per_turn,
                       "replies_queued": cfg.client_reply_hwm,
                       "events_queued": cfg.events_hwm}}

    def _list(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        states = msg["states"] or None  # [] (like nil) means every state
        if states is not None:
            bad = [s for s in states if s not in vocab.STATES]
            if bad:
                raise RequestError("bad_body", f"states: unknown state {_shown(bad[0])} "
                                               f"(known: {', '.join(vocab.STATES)})")
        scenarios = msg["scenarios"] or None
        if scenarios is not None and not all(isinstance(s, str) for s in scenarios):
            raise RequestError("bad_body", "scenarios: a list of scenario names")
        limit = msg["limit"]
        if not 1 <= limit <= MAX_LIST:
            raise RequestError("bad_body", f"limit: must be between 1 and {MAX_LIST}")
        before_id = msg["before_id"]
        if before_id is not None:
            _int64("before_id", before_id)
        since = msg["since"]
        rows = self.store.list_jobs(states=states, limit=limit + 1, before_id=before_id,
                                    scenarios=scenarios, agent=msg["agent"],
                                    since=None if since is None else float(since))
        return "REPLY", {"jobs": self._views(rows[:limit]), "more": len(rows) > limit}

    def _nodes(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        limit, after = msg["limit"], msg["after"]
        if not 1 <= limit <= MAX_NODES:
            raise RequestError("bad_body", f"limit: must be between 1 and {MAX_NODES}")
        nodes = {n["name"]: n for n in self.core.agents.views(now)}
        for row in self.store.list_agents():
            if row["name"] not in nodes:
                nodes[row["name"]] = node_view(row["name"], row["state"], row["slots"], 0, 0,
                                               row.get("info") or {}, wall - row["last_seen"])
        names = sorted(n for n in nodes if after is None or n > after)
        page = names[:limit]
        more = len(names) > limit
        return "REPLY", {"nodes": [nodes[n] for n in page], "next": page[-1] if more else None}

    def _stats(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        stats = self.core.snapshot()
        stats["leader"] = self.leader
        stats["jobs_by_state"] = self.store.counts_by_state()
        return "REPLY", {"stats": stats}


def _error(code: str, text: str, rid: Any, command: str) -> list[bytes]:
    """An ERROR answering a request: always its command, its rid (valid: it was decoded)."""
    return encode("ERROR", {"code": code, "text": text, "rid": echo_rid(rid),
                            "command": command})


def _shown(value: Any) -> str:
    """A client's value in an error text, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _id_span(ids: list[int]) -> str:
    return str(ids[0]) if len(ids) == 1 else f"{ids[0]}..{ids[-1]}"


def _ids(raw: list[Any]) -> list[int]:
    if len(raw) > MAX_IDS:
        raise RequestError("bad_body", f"ids: at most {MAX_IDS} ids, got {len(raw)}")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i in INT64 for i in raw):
        i, bad = next((i, v) for i, v in enumerate(raw) if isinstance(v, bool)
                      or not isinstance(v, int) or v not in INT64)
        raise RequestError("bad_body", f"ids[{i}]: must be a 64-bit signed integer, "
                                       f"got {_shown(bad)}")
    return raw


def _int64(key: str, value: int) -> int:
    if value not in INT64:
        raise RequestError("bad_body", f"{key}: must be a 64-bit signed integer, got {value}")
    return value
