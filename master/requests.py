"""Client requests: SUBMIT, GET, LIST, CANCEL, RETRY, NODES, DRAIN, STATS (docs/protocol.md)."""

from __future__ import annotations

import logging
from typing import Any

from bus import vocab
from bus.codec import Message, encode
from bus.errors import FfrtmpError
from bus.sockets import CLIENT_MAX_MSG
from master.agents import node_view
from master.core import MasterCore
from master.outbox import CLIENT
from master.spec import ScenarioCheck, SpecError, validate_spec
from master.views import event_view, job_view
from storage import StorageError, Store

log = logging.getLogger("ffrtmp.master")

MAX_SPECS = 10_000
MAX_IDS = 10_000
MAX_NODES = 1000
INT64 = range(-(2**63), 2**63)  # what the database can compare ids with (msgpack goes to 2^64-1)


class RequestError(FfrtmpError):
    """A request the master refuses; becomes an ERROR reply with this code."""


class Requests:
    """Serves client requests against the core (writes) and the store (reads)."""

    def __init__(self, core: MasterCore, store: Store,
                 scenarios: dict[str, ScenarioCheck] | None = None,
                 max_reply: int = CLIENT_MAX_MSG) -> None:
        self.core = core
        self.store = store
        self.scenarios = scenarios or {}
        self.max_reply = max_reply
        # idempotency key -> (ids, specs) of this uncommitted turn
        self.pending_keys: dict[str, tuple[list[int], list[Any]]] = {}

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
        """Forget this turn's idempotency keys: they are in the store now."""
        self.pending_keys.clear()

    # ---- writes -----------------------------------------------------------------------------

    def _submit(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        specs, key = msg["specs"], msg["idempotency_key"]
        if not 1 <= len(specs) <= MAX_SPECS:
            raise RequestError("invalid_spec", f"specs: 1 to {MAX_SPECS} specs per SUBMIT")
        if key is not None and (len(key) > 200 or "\x00" in key):
            raise RequestError("invalid_spec", "idempotency_key: at most 200 characters, no NUL")
        checked = []
        for i, raw in enumerate(specs):
            try:
                checked.append(validate_spec(raw, self.scenarios))
            except SpecError as e:
                raise RequestError("invalid_spec", f"specs[{i}].{e}") from e
        wanted = [v.spec for v in checked]
        if key is not None:
            known = self.pending_keys.get(key) or self._stored_key(key)
            if known is not None:
                ids, had = known
                if had != wanted:
                    raise RequestError("conflict", f"idempotency_key {key!r} was used for "
                                       f"other specs (jobs {_id_span(ids)}): use a new key")
                return "SUBMITTED", {"ids": ids}
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
        return ids, [specs.get(i) for i in ids]

    def _cancel(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        ids = _ids(msg["ids"])
        grace = float(msg["grace_s"])
        if not 0 <= grace <= 3600:
            raise RequestError("bad_body", "grace_s: must be between 0 and 3600")
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
        spec = {k: v for k, v in rows[0]["spec"].items() if k != "preset"}  # resolved anew
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
        if msg["events"]:
            for view in jobs:
                view["events"] = [event_view(e) for e in self.store.events_for(view["id"])]
        found = {r["id"] for r in rows}
        return "REPLY", {"jobs": jobs, "missing": [i for i in ids if i not in found]}

    def _list(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        states = msg["states"]
        if states is not None:
            bad = [s for s in states if s not in vocab.STATES]
            if bad:
                raise RequestError("bad_body", f"states: unknown state {bad[0]!r} "
                                               f"(known: {', '.join(vocab.STATES)})")
        limit = msg["limit"]
        if not 1 <= limit <= 1000:
            raise RequestError("bad_body", "limit: must be between 1 and 1000")
        before_id = msg["before_id"]
        if before_id is not None:
            _int64("before_id", before_id)
        rows = self.store.list_jobs(states=states, limit=limit, before_id=before_id)
        return "REPLY", {"jobs": self._views(rows)}

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
        stats["jobs_by_state"] = self.store.counts_by_state()
        return "REPLY", {"stats": stats}


def _error(code: str, text: str, rid: Any, command: str) -> list[bytes]:
    return encode("ERROR", {"code": code, "text": text, "rid": rid, "command": command})


def _id_span(ids: list[int]) -> str:
    return str(ids[0]) if len(ids) == 1 else f"{ids[0]}..{ids[-1]}"


def _ids(raw: list[Any]) -> list[int]:
    if len(raw) > MAX_IDS or not all(isinstance(i, int) and not isinstance(i, bool)
                                     and i in INT64 for i in raw):
        raise RequestError("bad_body", f"ids: a list of at most {MAX_IDS} 64-bit integers")
    return raw


def _int64(key: str, value: int) -> int:
    if value not in INT64:
        raise RequestError("bad_body", f"{key}: must be a 64-bit signed integer")
    return value
