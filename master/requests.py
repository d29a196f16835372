"""Client requests: SUBMIT, GET, LIST, CANCEL, RETRY, NODES, DRAIN, STATS (docs/protocol.md)."""

from __future__ import annotations

import logging
import time
from typing import Any

import msgpack

from bus.codec import Message
from master import state as sm
from master.agents import node_view
from master.core import CLIENT, MasterCore
from master.scheduler import Job
from master.spec import ScenarioCheck, SpecError, validate_spec
from master.views import event_view, job_view
from storage import StorageError, Store

log = logging.getLogger("ffrtmp.master")

MAX_SPECS = 10_000
MAX_IDS = 10_000
INT64 = range(-(2**63), 2**63)  # what the database can compare ids with (msgpack goes to 2^64-1)


class RequestError(Exception):
    """A request the master refuses; becomes an ERROR reply with this code."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class Requests:
    """Serves client requests against the core (writes) and the store (reads)."""

    def __init__(self, core: MasterCore, store: Store,
                 scenarios: dict[str, ScenarioCheck] | None = None) -> None:
        self.core = core
        self.store = store
        self.scenarios = scenarios or {}
        self.started = time.monotonic()
        self.pending_keys: dict[str, list[int]] = {}  # idempotency keys of this uncommitted turn

    def handle(self, ident: bytes, msg: Message, now: float, wall: float) -> None:
        """Serve one request; every outcome, good or bad, is one reply carrying its rid."""
        rid = msg.get("rid")
        try:
            handler = getattr(self, "_" + msg.command.lower())
            command, body = handler(msg, now, wall)
        except RequestError as e:
            self.core.metrics.client_errors.labels(e.code).inc()
            command, body = "ERROR", {"code": e.code, "text": e.text}
        except StorageError as e:
            self.core.metrics.db_errors.labels("read").inc()
            command, body = "ERROR", {"code": "unavailable", "text": f"database: {e}"}
        except Exception as e:  # a bug must cost one request, never the master
            log.exception("request %s failed", msg.command)
            self.core.metrics.client_errors.labels("internal").inc()
            command, body = "ERROR", {"code": "internal", "text": f"{type(e).__name__}: {e}"}
        self.core.send(CLIENT, ident, command, {**body, "rid": rid})

    def turn_committed(self) -> None:
        """Forget this turn's idempotency keys: they are in the store now."""
        self.pending_keys.clear()

    # ---- writes -----------------------------------------------------------------------------

    def _submit(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        specs, key = msg["specs"], msg["idempotency_key"]
        if not 1 <= len(specs) <= MAX_SPECS:
            raise RequestError("invalid_spec", f"specs: 1 to {MAX_SPECS} specs per SUBMIT")
        if key is not None:
            if len(key) > 200 or "\x00" in key:
                raise RequestError("invalid_spec",
                                   "idempotency_key: at most 200 characters, no NUL")
            known = self.pending_keys.get(key) or self.store.find_idempotent(key)
            if known:
                return "SUBMITTED", {"ids": known}
        checked = []
        for i, raw in enumerate(specs):
            try:
                checked.append(validate_spec(raw, self.scenarios))
            except SpecError as e:
                raise RequestError("invalid_spec", f"specs[{i}].{e}") from e
        ids = [self._enqueue(v.spec, v.priority, v.requires, key, now, wall) for v in checked]
        if key is not None:
            self.pending_keys[key] = ids
        self.core.metrics.submitted.inc(len(ids))
        return "SUBMITTED", {"ids": ids}

    def _enqueue(self, spec: dict[str, Any], priority: int, requires: str, key: str | None,
                 now: float, wall: float, retry_of: int | None = None) -> int:
        core = self.core
        job_id = core.next_id
        core.next_id += 1
        job = Job(id=job_id, scenario=spec["scenario"], spec=msgpack.packb(spec),
                  state=sm.QUEUED, priority=priority, attempt=0,
                  max_attempts=spec["max_attempts"], requires=requires, created_at=wall,
                  extra={"retry_of": retry_of} if retry_of else {})
        core.jobs[job_id] = job
        core.sched.push(job, now)
        core.batch.inserts.append({
            "id": job_id, "scenario": spec["scenario"], "spec": spec, "state": sm.QUEUED,
            "priority": priority, "attempt": 0, "max_attempts": spec["max_attempts"],
            "created_at": wall, "updated_at": wall, "timeout_s": spec["timeout_s"],
            "output": spec["output"], "idem_key": key, "reason": "retry" if retry_of else None,
            "extra": {"requires": requires, **({"retry_of": retry_of} if retry_of else {})},
        })
        core.publish(f"job.{job_id}.state", "STATE",
                     {"id": job_id, "state": sm.QUEUED, "attempt": 0, "agent": None,
                      "reason": "submitted", "at": wall})
        return job_id

    def _cancel(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        ids = _ids(msg["ids"])
        grace = float(msg["grace_s"])
        if not 0 <= grace <= 3600:
            raise RequestError("bad_body", "grace_s: must be between 0 and 3600")
        core = self.core
        results = []
        missing = [i for i in ids if i not in core.jobs]
        known = {row["id"] for row in self.store.get_jobs(missing)} if missing else set()
        for job_id in ids:
            job = core.jobs.get(job_id)
            if job is None:
                results.append({"id": job_id,
                                "result": "terminal" if job_id in known else "not_found"})
                continue
            if job.state == sm.QUEUED:
                core.transition(job, sm.CANCEL, now, wall, reason="cancelled_graceful")
                results.append({"id": job_id, "result": "cancelled"})
                continue
            if job.state != sm.CANCELLING:
                job.cancel_grace = grace
                core.transition(job, sm.CANCEL, now, wall)
                conn = core.by_name.get(job.agent or "")
                if conn is not None:
                    core.send("agent", conn.ident, "CANCEL",
                              {"id": job.id, "attempt": job.attempt, "grace_s": grace,
                               "reason": "cancelled"})
            results.append({"id": job_id, "result": "cancelling"})
        return "REPLY", {"results": results}

    def _retry(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        job_id = _int64("id", msg["id"])
        if job_id in self.core.jobs:
            raise RequestError("conflict", f"job {job_id} is {self.core.jobs[job_id].state}, "
                                           "not terminal: nothing to retry")
        rows = self.store.get_jobs([job_id])
        if not rows:
            raise RequestError("not_found", f"job {job_id} not found")
        spec = {k: v for k, v in rows[0]["spec"].items() if k != "preset"}  # resolved anew
        try:
            checked = validate_spec(spec, self.scenarios)
        except SpecError as e:
            raise RequestError("invalid_spec", f"job {job_id} spec no longer valid: {e}") from e
        new_id = self._enqueue(checked.spec, checked.priority, checked.requires, None, now, wall,
                               retry_of=job_id)
        return "REPLY", {"id": new_id, "retry_of": job_id}

    def _drain(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        name, on = msg["name"], bool(msg["on"])
        core = self.core
        conn = core.by_name.get(name)
        stored = None if conn is not None else next(
            (a for a in self.store.list_agents() if a["name"] == name), None)
        if conn is None and stored is None:
            raise RequestError("not_found", f"agent {name!r} not known")
        if on:
            core.drained.add(name)
        else:
            core.drained.discard(name)
        if conn is not None:
            conn.draining = on
            core.send("agent", conn.ident, "DRAIN", {"on": on})
            core._save_agent(conn, wall, "draining" if on else "alive")
        else:
            core.batch.agents[name] = {**(stored or {}), "state": "draining" if on else "lost"}
        core.publish(f"agent.{name}", "AGENT",
                     {"name": name, "event": "draining" if on else "resumed"})
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
            bad = [s for s in states if s not in sm.STATES]
            if bad:
                raise RequestError("bad_body", f"states: unknown state {bad[0]!r} "
                                               f"(known: {', '.join(sm.STATES)})")
        limit = msg["limit"]
        if not 1 <= limit <= 1000:
            raise RequestError("bad_body", "limit: must be between 1 and 1000")
        before_id = msg["before_id"]
        if before_id is not None:
            _int64("before_id", before_id)
        rows = self.store.list_jobs(states=states, limit=limit, before_id=before_id)
        return "REPLY", {"jobs": self._views(rows)}

    def _nodes(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        nodes = [c.node_view(now) for c in self.core.agents.values()]
        seen = {n["name"] for n in nodes}
        for row in self.store.list_agents():
            if row["name"] not in seen:
                nodes.append(node_view(row["name"], row["state"], row["slots"], 0, 0,
                                       row.get("info") or {}, wall - row["last_seen"]))
        return "REPLY", {"nodes": sorted(nodes, key=lambda n: n["name"])}

    def _stats(self, msg: Message, now: float, wall: float) -> tuple[str, dict[str, Any]]:
        stats = self.snapshot()
        stats["jobs_by_state"] = self.store.counts_by_state()
        return "REPLY", {"stats": stats}

    def snapshot(self) -> dict[str, Any]:
        """Counters from memory only (cheap: used by metrics and the stats event)."""
        core = self.core
        live: dict[str, int] = {s: 0 for s in sm.STATES if s not in sm.TERMINAL}
        for job in core.jobs.values():
            live[job.state] = live.get(job.state, 0) + 1
        return {
            "queued_by_priority": core.sched.depth(),
            "delayed": core.sched.delayed(),
            "live_by_state": live,
            "agents": len(core.agents),
            "slots": sum(c.slots for c in core.agents.values()),
            "slots_busy": sum(len(c.jobs) for c in core.agents.values()),
            "dispatched_total": core.dispatched_total,
            "completed_total": core.finished_total,
            "uptime_s": round(time.monotonic() - self.started, 3),
        }


def _ids(raw: list[Any]) -> list[int]:
    if len(raw) > MAX_IDS or not all(isinstance(i, int) and not isinstance(i, bool)
                                     and i in INT64 for i in raw):
        raise RequestError("bad_body", f"ids: a list of at most {MAX_IDS} 64-bit integers")
    return raw


def _int64(key: str, value: int) -> int:
    if value not in INT64:
        raise RequestError("bad_body", f"{key}: must be a 64-bit signed integer")
    return value
