"""The master's core: live jobs, agents, dispatch and liveness. No sockets: messages in, outbox out.

Every turn of the loop feeds messages in with `now` (monotonic) and `wall` (epoch) and then the
server commits `batch` and only afterwards sends `outbox` and `published` (persist, then act).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from typing import Any

import msgpack

from bus.codec import Message, encode, validate
from bus.errors import ProtocolError
from bus.schemas import AGENT_TO_MASTER
from master import state as sm
from master.agents import AgentConn
from master.backstop import GIVE_UP, Backstop
from master.config import MasterConfig
from master.metrics import MasterMetrics
from master.scheduler import Job, Scheduler
from storage import WriteBatch

log = logging.getLogger("ffrtmp.master")

AGENT, CLIENT = "agent", "client"
MAX_SLOTS = 100_000
HELLO_STORED = ("name", "version", "resources", "workloads", "encoders", "cgroup", "limits")
DONE_EVENTS = {
    "completed": sm.COMPLETE,
    "failed": sm.FAIL,
    "timed_out": sm.TIME_OUT,
    "cancelled": sm.CANCEL_DONE,
}
Outgoing = tuple[str, bytes, list[bytes]]


def stored_extra(job: Job) -> dict[str, Any]:
    """The job's `extra` column: its live figures plus the placement requirement (which a
    restarted master reads back), so no write of figures loses it."""
    return {**job.extra, "requires": job.requires}


class MasterCore:
    """Live state of the master; all state changes go through `transition`."""

    def __init__(
        self, cfg: MasterConfig, next_id: int, metrics: MasterMetrics, rng: random.Random
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.rng = rng
        self.next_id = next_id
        self.jobs: dict[int, Job] = {}  # every non-terminal job
        self.sched = Scheduler(cfg.aging_s)
        self.agents: dict[bytes, AgentConn] = {}
        self.by_name: dict[str, AgentConn] = {}
        self.drained: set[str] = set()
        self.batch = WriteBatch()
        self.outbox: list[Outgoing] = []
        self.published: list[list[bytes]] = []
        self.dirty_progress: set[int] = set()
        self.orphan_deadline = 0.0
        self.dispatched_total = 0
        self.finished_total = 0
        self.backstop = Backstop(cfg.timeout_margin_s)

    # ---- output helpers -------------------------------------------------------------------

    def send(self, kind: str, ident: bytes, command: str, body: dict[str, Any]) -> None:
        """Queue a message for after the commit."""
        self.outbox.append((kind, ident, encode(command, body)))

    def publish(self, topic: str, command: str, body: dict[str, Any]) -> None:
        """Queue an event for after the commit."""
        self.published.append([topic.encode(), *encode(command, body)])

    def take_output(self) -> tuple[WriteBatch, list[Outgoing], list[list[bytes]]]:
        """Hand the turn's batch and messages to the server and start a new turn."""
        out = (self.batch, self.outbox, self.published)
        self.batch, self.outbox, self.published = WriteBatch(), [], []
        return out

    # ---- recovery -------------------------------------------------------------------------

    def recover(self, rows: Iterable[dict[str, Any]], agents: Iterable[dict[str, Any]],
                now: float, wall: float) -> None:
        """Reload non-terminal jobs after a start; live ones wait `grace_s` for their agent."""
        self.drained = {a["name"] for a in agents if a.get("state") == "draining"}
        self.orphan_deadline = now + self.cfg.grace_s
        for row in rows:
            job = Job(
                id=row["id"], scenario=row["scenario"], spec=msgpack.packb(row["spec"]),
                state=row["state"], priority=row["priority"], attempt=row["attempt"],
                max_attempts=row["max_attempts"], rejects=row.get("rejects") or 0,
                requires=(row.get("extra") or {}).get("requires", f"workload:{row['scenario']}"),
                extra={k: v for k, v in (row.get("extra") or {}).items() if k != "requires"},
                agent=row.get("agent"), progress=row.get("progress") or 0.0,
                bytes_in=row.get("bytes_in") or 0, bytes_out=row.get("bytes_out") or 0,
                created_at=row.get("created_at") or 0.0,
                first_wait_s=(row["started_at"] - row["created_at"]
                              if row.get("started_at") and row.get("created_at") else None),
            )
            self.jobs[job.id] = job
            if job.state == sm.QUEUED:
                nb = row.get("not_before")
                if nb and nb > wall:
                    self.sched.push_delayed(job, now + (nb - wall))
                else:
                    self.sched.push(job, now)

    # ---- the one place states change --------------------------------------------------------

    def transition(self, job: Job, event: str, now: float, wall: float,
                   reason: str | None = None, **fields: Any) -> sm.Outcome:
        """Apply a state-machine input to a live job and record it (update, event, publish)."""
        before, agent = job.state, job.agent
        out = sm.transition(sm.Core(job.state, job.attempt, job.max_attempts, job.rejects),
                            event, reason)
        job.state, job.attempt, job.rejects = out.core.state, out.core.attempt, out.core.rejects
        if job.state not in sm.LIVE:
            self.backstop.forget(job.id)
        upd: dict[str, Any] = {"state": job.state, "attempt": job.attempt, "updated_at": wall,
                               **fields}
        if event == sm.REJECT:
            upd["rejects"] = job.rejects
        elif event == sm.ASSIGN:
            self.metrics.job_assigned(job, now, wall)
        if reason is not None or event in (sm.ASSIGN, sm.ACCEPT):
            upd["reason"] = reason
        if before in sm.LIVE and job.state not in sm.LIVE and agent is not None:
            conn = self.by_name.get(agent)
            if conn is not None:
                conn.jobs.discard(job.id)
        if job.state == sm.QUEUED:
            job.agent = None
            upd["agent"] = None
            if out.retry:
                delay = sm.backoff_s(job.attempt - job.rejects, self.rng, self.cfg.retry_base_s,
                                     self.cfg.retry_cap_s)
                upd["not_before"] = wall + delay
                self.sched.push_delayed(job, now + delay)
                self.metrics.job_retried(reason)
            else:
                self.sched.push(job, now, front=True)
        elif job.state in sm.TERMINAL:
            upd["finished_at"] = wall
            upd["progress"] = job.progress
            upd["bytes_in"], upd["bytes_out"] = job.bytes_in, job.bytes_out
            self.sched.discard(job)
            self.jobs.pop(job.id, None)
            self.dirty_progress.discard(job.id)
            self.finished_total += 1
            verdict = self.metrics.job_finished(job, reason, wall)
            if verdict:  # the SLA verdict joins the job's per-job figures
                upd["extra"] = {**upd.get("extra", stored_extra(job)), **verdict}
        self.batch.update(job.id, **upd)
        self.batch.event(job_id=job.id, at=wall, from_state=before, to_state=job.state,
                         reason=reason, agent=job.agent or agent, attempt=job.attempt)
        self.publish(f"job.{job.id}.state", "STATE",
                     {"id": job.id, "state": job.state, "attempt": job.attempt,
                      "agent": job.agent or agent, "reason": reason, "at": wall})
        return out

    # ---- agents -----------------------------------------------------------------------------

    def on_agent(self, ident: bytes, msg: Message, now: float, wall: float) -> None:
        """Handle one decoded agent message."""
        conn = self.agents.get(ident)
        if msg.command == "HELLO":
            self._hello(ident, msg, now, wall)
            return
        if conn is None:
            if msg.command not in ("BYE", "ERROR"):
                self.send(AGENT, ident, "ERROR",
                          {"code": "unknown_agent", "text": "say HELLO first"})
            return
        conn.last_seen = now
        cmd = msg.command
        if cmd == "CREDIT":
            if msg["n"] <= 0 or conn.credit + msg["n"] > 100_000:
                self.send(AGENT, ident, "ERROR",
                          {"code": "bad_body", "text": "CREDIT.n out of range"})
                return
            conn.credit += msg["n"]
        elif cmd == "DONE" and (field := _unstorable_text(msg.body)) is not None:
            # A result must never be lost for a text we cannot store: keep the rest of it.
            log.warning("agent %s: DONE.%s not storable; dropped that field", conn.name, field)
            self.send(AGENT, ident, "ERROR",
                      {"code": "bad_body", "text": f"DONE.{field} not storable: dropped"})
            self._done(conn, {**msg.body, field: None if field == "reason" else {}}, now, wall)
        elif cmd in ("DONE", "PROGRESS", "REJECT") and (bad := _unstorable(msg.body)):
            self.send(AGENT, ident, "ERROR", {"code": "bad_body", "text": f"{cmd}.{bad}"})
        elif cmd == "DONE":
            self._done(conn, msg.body, now, wall)
        elif cmd in ("ACCEPT", "PROGRESS", "REJECT"):
            job = self._current(conn, msg["id"], msg["attempt"])
            if job is None:
                if cmd != "REJECT":
                    self._fence(conn, msg["id"], msg["attempt"])
            elif cmd == "ACCEPT":
                if job.state == sm.ASSIGNED:
                    self.transition(job, sm.ACCEPT, now, wall, started_at=wall)
                    self.backstop.started(job.id, job.attempt, now)
            elif cmd == "REJECT":
                if (job.state, sm.REJECT) in sm.TABLE:  # not after ACCEPT: too late to refuse
                    self.transition(job, sm.REJECT, now, wall, reason=msg["reason"])
                else:
                    self.send(AGENT, ident, "ERROR", {"code": "conflict", "text":
                              f"REJECT of job {job.id} attempt {job.attempt}: already {job.state}"})
            else:
                self._progress(job, msg.body)
        elif cmd == "BYE":
            self._drop(conn, now, wall, "left")
        elif cmd == "ERROR":
            log.warning("agent %s reports error %s: %s", conn.name, msg["code"], msg["text"])

    def _current(self, conn: AgentConn, job_id: int, attempt: int) -> Job | None:
        job = self.jobs.get(job_id)
        if job is None or job.state not in sm.LIVE or job.attempt != attempt:
            return None
        return job if job.agent == conn.name else None

    def _fence(self, conn: AgentConn, job_id: int, attempt: int) -> None:
        self.metrics.fenced.inc()
        self.send(AGENT, conn.ident, "CANCEL",
                  {"id": job_id, "attempt": attempt, "grace_s": 0.0, "reason": "fenced"})

    def _progress(self, job: Job, body: dict[str, Any]) -> None:
        job.progress = min(1.0, max(0.0, float(body["progress"])))
        job.bytes_in, job.bytes_out = body["bytes_in"], body["bytes_out"]
        for key in ("fps", "speed", "out_time_s"):
            if body.get(key) is not None:
                job.extra[key] = body[key]
        self.dirty_progress.add(job.id)
        self.publish(f"job.{job.id}.progress", "PROGRESS",
                     {"id": job.id, "attempt": job.attempt, "progress": job.progress,
                      "bytes_in": job.bytes_in, "bytes_out": job.bytes_out, **job.extra})

    def _done(self, conn: AgentConn, body: dict[str, Any], now: float, wall: float) -> None:
        conn.acks.append([body["id"], body["attempt"]])
        job = self._current(conn, body["id"], body["attempt"])
        event = DONE_EVENTS.get(body["status"])
        if job is None or event is None:
            if event is None:
                log.warning("agent %s sent DONE with status %r", conn.name, body["status"])
            return
        reason = body.get("reason")
        if event == sm.CANCEL_DONE and job.state != sm.CANCELLING \
                and self.backstop.cancelled(job.id, job.attempt):
            event, reason = sm.TIME_OUT, "timeout"  # our backstop stopped it, not a client
        if event == sm.COMPLETE:
            job.progress = 1.0
        job.bytes_in, job.bytes_out = body["bytes_in"], body["bytes_out"]
        extra = {**stored_extra(job), **(body.get("extra") or {}),
                 "duration_s": body["duration_s"]}
        self.metrics.job_done(job, body["status"], reason, body["duration_s"], job.bytes_in,
                              job.bytes_out, conn.name)
        self.transition(job, event, now, wall, reason=reason, exit_code=body.get("exit_code"),
                        bytes_in=job.bytes_in, bytes_out=job.bytes_out, extra=extra)

    def _hello(self, ident: bytes, msg: Message, now: float, wall: float) -> None:
        # What HELLO brings is stored: a value the store refuses would wedge every commit.
        bad = next((k for k in HELLO_STORED if not _storable(msg[k])), None)
        if bad is None and not all(
                isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 2**53
                for v in msg["resources"].values()):
            bad = "resources"  # placement compares these as numbers
        if bad is not None or not 0 <= msg["slots"] <= MAX_SLOTS:
            text = f"HELLO.{bad}: not storable or not numbers" if bad \
                else f"HELLO.slots: 0 to {MAX_SLOTS}"
            self.send(AGENT, ident, "ERROR", {"code": "bad_body", "text": text})
            return
        name = msg["name"]
        old = self.by_name.get(name)
        if old is not None and old.ident != ident:
            self.agents.pop(old.ident, None)
        workloads, encoders = msg["workloads"], msg["encoders"]
        caps = frozenset([f"workload:{w}" for w in workloads if isinstance(w, str)]
                         + [f"encoder:{e}" for e in encoders if isinstance(e, str)]
                         # it holds jobs to their limits (cgroups), or runs them and says not
                         + (["limits"] if msg["cgroup"] != "none"
                            or msg["limits"] == "best-effort" else []))
        info = {k: msg[k] for k in ("version", "resources", "workloads", "encoders",
                                    "cgroup", "limits")}
        conn = AgentConn(ident=ident, name=name, slots=max(0, msg["slots"]), caps=caps,
                         info=info, last_seen=now, last_sent=now,
                         draining=name in self.drained,
                         first_seen_wall=old.first_seen_wall if old else wall)
        if old is not None:
            conn.jobs = old.jobs
        self.agents[ident] = conn
        self.by_name[name] = conn
        self.send(AGENT, ident, "WELCOME", {"heartbeat_s": self.cfg.heartbeat_s,
                                             "liveness": self.cfg.liveness, "master": "ffrtmp"})
        # Either way: an agent that was away may have missed a DRAIN on or off.
        self.send(AGENT, ident, "DRAIN", {"on": conn.draining})
        for result in msg["results"]:  # DONE bodies, so checked as DONE is (HELLO's schema can't)
            if not isinstance(result, dict):
                continue
            try:
                done = validate({"status": "failed", **result}, AGENT_TO_MASTER["DONE"], "DONE")
                if bad := _unstorable(done):
                    raise ProtocolError("bad_body", f"DONE.{bad}")
            except ProtocolError as e:
                self.send(AGENT, ident, "ERROR",
                          {"code": e.code, "text": f"HELLO.results: {e.text}"})
                continue
            self._done(conn, done, now, wall)
        still = {(r.get("id"), r.get("attempt")) for r in msg["running"]
                 if isinstance(r, dict) and isinstance(r.get("id"), int)
                 and isinstance(r.get("attempt"), int)}
        for job in [j for j in self.jobs.values() if j.agent == name and j.state in sm.LIVE]:
            if (job.id, job.attempt) in still:
                conn.jobs.add(job.id)
                timeout = msgpack.unpackb(job.spec).get("timeout_s")
                if timeout and not self.backstop.watching(job.id):
                    # Reclaimed after a master restart: watch it again, from now (generous).
                    self.backstop.arm(job.id, job.attempt, float(timeout), now)
                if job.state == sm.CANCELLING:
                    self.send(AGENT, ident, "CANCEL", {"id": job.id, "attempt": job.attempt,
                                                       "grace_s": job.cancel_grace,
                                                       "reason": "cancelled"})
            else:
                self.transition(job, sm.LOST, now, wall, reason="agent_lost")
        for job_id, attempt in still:
            if isinstance(job_id, int) and isinstance(attempt, int) \
                    and self._current(conn, job_id, attempt) is None:
                self._fence(conn, job_id, attempt)
        self._save_agent(conn, wall, "draining" if conn.draining else "alive")
        self.publish(f"agent.{name}", "AGENT", {"name": name, "event": "joined"})
        self.metrics.agent_joins.inc()

    def _save_agent(self, conn: AgentConn, wall: float, state: str) -> None:
        self.batch.agents[conn.name] = {
            "name": conn.name, "state": state, "slots": conn.slots, "info": conn.info,
            "first_seen": conn.first_seen_wall, "last_seen": wall,
        }

    def _drop(self, conn: AgentConn, now: float, wall: float, event: str) -> None:
        """Forget a connection (lost or left) and requeue every attempt it held."""
        self.agents.pop(conn.ident, None)
        if self.by_name.get(conn.name) is conn:
            del self.by_name[conn.name]
        for job_id in sorted(conn.jobs):
            job = self.jobs.get(job_id)
            if job is not None and job.state in sm.LIVE and job.agent == conn.name:
                self.transition(job, sm.LOST, now, wall, reason="agent_lost")
        conn.jobs.clear()
        self._save_agent(conn, wall, "lost" if event == "lost" else "left")
        self.publish(f"agent.{conn.name}", "AGENT", {"name": conn.name, "event": event})
        if event == "lost":
            self.metrics.agents_lost.inc()

    def agent_unreachable(self, ident: bytes, now: float, wall: float) -> None:
        """A send to this agent failed (ROUTER_MANDATORY): treat it as gone."""
        conn = self.agents.get(ident)
        if conn is not None:
            self._drop(conn, now, wall, "lost")

    # ---- timers and dispatch ----------------------------------------------------------------

    def _enforce_backstop(self, now: float, wall: float) -> None:
        """Jobs far past their timeout_s on a live agent: CANCEL them, then end them ourselves."""
        for job_id, attempt, stage in self.backstop.expired(now):
            job = self.jobs.get(job_id)
            if job is None or job.attempt != attempt or job.state not in sm.LIVE:
                continue
            conn = self.by_name.get(job.agent or "")
            log.warning("job %d attempt %d is past its timeout_s + %.0fs: %s", job_id, attempt,
                        self.backstop.margin_s, "timed out" if stage == GIVE_UP else "cancelling")
            if stage != GIVE_UP:
                if conn is not None:
                    self.send(AGENT, conn.ident, "CANCEL", {
                        "id": job_id, "attempt": attempt, "grace_s": 0.0, "reason": "timeout"})
                continue
            if job.state == sm.CANCELLING:
                self.transition(job, sm.CANCEL_DONE, now, wall, reason="cancelled_forced")
            else:
                self.transition(job, sm.TIME_OUT, now, wall, reason="timeout")
            if conn is not None:
                self._fence(conn, job_id, attempt)

    def tick(self, now: float, wall: float) -> None:
        """Liveness, heartbeats, retry promotion, orphan expiry and progress flushing."""
        self._enforce_backstop(now, wall)
        for conn in list(self.agents.values()):
            if now - conn.last_seen > self.cfg.dead_after_s:
                log.warning("agent %s silent for %.1fs: lost", conn.name, now - conn.last_seen)
                self._drop(conn, now, wall, "lost")
            elif now - conn.last_sent >= self.cfg.heartbeat_s:
                conn.last_sent = now
                self.send(AGENT, conn.ident, "HEARTBEAT", {})
        if self.orphan_deadline and now >= self.orphan_deadline:
            self.orphan_deadline = 0.0
            for job in [j for j in self.jobs.values() if j.state in sm.LIVE]:
                if self.by_name.get(job.agent or "") is None:
                    self.transition(job, sm.LOST, now, wall, reason="agent_lost")
        self.sched.promote(now)

    def flush_progress(self, wall: float) -> None:
        """Write coalesced progress of running jobs (bounded rate, not one write per message)."""
        for job_id in self.dirty_progress:
            job = self.jobs.get(job_id)
            if job is not None:
                self.batch.update(job_id, progress=job.progress, bytes_in=job.bytes_in,
                                  bytes_out=job.bytes_out, extra=stored_extra(job),
                                  updated_at=wall)
        self.dirty_progress.clear()

    def dispatch(self, now: float, wall: float) -> int:
        """Hand queued jobs to agents with credit, round robin; returns how many went out."""
        ready = [c for c in self.agents.values() if c.credit > 0 and not c.draining]
        sent = 0
        while ready:
            nxt = []
            for conn in ready:
                job = self.sched.pick(conn.can_run, now)
                if job is None:
                    continue
                job.agent = conn.name
                self.transition(job, sm.ASSIGN, now, wall, agent=conn.name, not_before=None)
                conn.jobs.add(job.id)
                conn.credit -= 1
                conn.last_sent = now
                spec = msgpack.unpackb(job.spec)
                self.send(AGENT, conn.ident, "JOB", {"id": job.id, "attempt": job.attempt,
                                                     "spec": spec})
                if spec.get("timeout_s"):
                    self.backstop.arm(job.id, job.attempt, float(spec["timeout_s"]), now)
                sent += 1
                if conn.credit > 0:
                    nxt.append(conn)
            ready = nxt
        self.dispatched_total += sent
        if sent:
            self.metrics.dispatched.inc(sent)
        return sent

    def flush_acks(self) -> None:
        """One DONE_ACK per agent per turn."""
        for conn in self.agents.values():
            if conn.acks:
                self.send(AGENT, conn.ident, "DONE_ACK", {"acks": conn.acks})
                conn.acks = []


def _unstorable_text(body: dict[str, Any]) -> str | None:
    """'reason' or 'extra' if that field alone makes a DONE unstorable (numbers are fine)."""
    if _unstorable({k: v for k, v in body.items() if k not in ("reason", "extra")}):
        return None
    return next((k for k in ("reason", "extra") if not _storable(body.get(k))), None)


def _unstorable(body: dict[str, Any]) -> str | None:
    """The first agent-reported value of a DONE/PROGRESS/REJECT the store cannot hold, with
    what it must be; None if all fit. One such value would fail (and wedge) every commit."""
    for key in ("bytes_in", "bytes_out"):
        value = body.get(key, 0)
        if not isinstance(value, int) or not 0 <= value < 2**63:
            return f"{key} must be 0 to 2^63-1"
    code = body.get("exit_code")
    if code is not None and not -(2**31) <= code < 2**31:
        return "exit_code must be a 32-bit integer"
    bad = next((k for k in ("reason", "extra") if not _storable(body.get(k))), None)
    return f"{bad} must be storable (JSON, no NUL)" if bad else None


def _storable(value: Any) -> bool:
    """True if the store can keep value: JSON-encodable, no NUL (PostgreSQL text refuses it)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return False
    return "\\u0000" not in text.replace("\\\\", "")  # a NUL, not an escaped backslash + u0000
