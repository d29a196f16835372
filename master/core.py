"""The master's core: a thin façade over live jobs, the agents registry and the turn's outbox.

No sockets: messages in, outbox out. Every turn of the loop feeds messages in with `now`
(monotonic) and `wall` (epoch); the server then commits the outbox's batch and only afterwards
sends its messages and events (persist, then act). Job state has one writer (`LiveJobs`), agent
records have one writer (`AgentRegistry`); this module routes messages between them.
"""

from __future__ import annotations

import json
import logging
import math
import random
import secrets
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from bus import vocab
from bus.codec import Message, encode_jobs, validate
from bus.errors import ProtocolError
from bus.schemas import AGENT_TO_MASTER
from bus.sockets import AGENT_MAX_MSG
from master import state as sm
from master.agents import AgentConn
from master.config import MasterConfig
from master.livejobs import LiveJobs
from master.metrics import MasterMetrics
from master.outbox import AGENT, Outbox, Outgoing
from master.registry import AgentRegistry
from master.scheduler import Job
from storage import WriteBatch

log = logging.getLogger("ffrtmp.master")

if TYPE_CHECKING:
    from bus.security import Peer

MAX_REASON = 200  # characters of an agent's DONE/REJECT reason


class MasterCore:
    """Routes agent messages, dispatches, keeps time; owns the jobs, agents and outbox."""

    def __init__(
        self, cfg: MasterConfig, next_id: int, metrics: MasterMetrics, rng: random.Random,
        next_seq: int = 1, instance: str | None = None, epoch: int = 0,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.epoch = epoch  # this leader's fencing token (master/leader.py)
        self.out = Outbox(epoch)
        self.instance = instance or secrets.token_hex(8)  # this master process (WELCOME, INFO)
        self.jobs = LiveJobs(cfg, next_id, self.out, metrics, rng, metrics.sla, next_seq)
        self.agents = AgentRegistry(cfg, self.out, metrics, self.instance)
        self.jobs.on_release = self.agents.release
        self.orphan_deadline = 0.0
        self.started = time.monotonic()

    def take_output(self) -> tuple[WriteBatch, list[Outgoing], list[list[bytes]]]:
        """Hand the turn's batch and messages to the server and start a new turn."""
        return self.out.take()

    # ---- recovery -------------------------------------------------------------------------

    def recover(self, rows: Iterable[dict[str, Any]], agents: Iterable[dict[str, Any]],
                now: float, wall: float) -> None:
        """Reload non-terminal jobs after a start; live ones wait `grace_s` for their agent."""
        self.agents.recover(agents)
        self.orphan_deadline = now + self.cfg.grace_s
        self.jobs.recover(rows, now, wall)

    # ---- agents -----------------------------------------------------------------------------

    def on_agent(self, ident: bytes, msg: Message, now: float, wall: float,
                 peer: Peer | None = None) -> None:
        """Handle one decoded agent message (`peer`: who its CURVE key says it is)."""
        cmd = msg.command
        if cmd == "HELLO":
            self._hello(ident, msg, peer, now, wall)
            return
        conn = self.agents.get(ident)
        if conn is None:
            if cmd not in ("BYE", "ERROR"):
                self.out.send(AGENT, ident, "ERROR",
                              {"code": "unknown_agent", "text": "say HELLO first"})
            return
        if peer is not None and peer.name != conn.name:  # a connection's key never changes
            self.out.send(AGENT, ident, "ERROR", {"code": "forbidden", "text":
                          f"agent key {peer.name!r} may not act as agent {conn.name!r}"})
            return
        self.agents.seen(conn, now)
        if cmd == "PROGRESS":  # the hot message of a busy fleet: first, and the cheap check
            if bad := _unstorable_progress(msg.body):
                self.out.send(AGENT, ident, "ERROR", {"code": "bad_body",
                                                      "text": f"PROGRESS.{bad}"})
            else:
                self._attempt_message(conn, msg, now, wall)
        elif cmd == "CREDIT":
            self.agents.credit(conn, msg["n"])
        elif cmd == "HEARTBEAT":
            if isinstance(msg.get("credit"), int):
                self.agents.sync_credit(conn, msg["credit"])
        elif cmd in ("DONE", "REJECT") and len(msg.get("reason") or "") > MAX_REASON:
            self.out.send(AGENT, ident, "ERROR", {"code": "bad_body", "text":
                          f"{cmd}.reason: at most {MAX_REASON} characters"})
            if cmd == "DONE":  # a result is never lost for its text: keep the rest of it
                self._done(conn, {**msg.body, "reason": msg["reason"][:MAX_REASON]}, now, wall)
        elif cmd == "DONE" and (field := _unstorable_text(msg.body)) is not None:
            # A result must never be lost for a text we cannot store: keep the rest of it.
            log.warning("agent %s: DONE.%s not storable; dropped that field", conn.name, field)
            self.out.send(AGENT, ident, "ERROR",
                          {"code": "bad_body", "text": f"DONE.{field} not storable: dropped"})
            self._done(conn, {**msg.body, field: None if field == "reason" else {}}, now, wall)
        elif cmd in ("DONE", "REJECT") and (bad := _unstorable(msg.body)):
            self.out.send(AGENT, ident, "ERROR", {"code": "bad_body", "text": f"{cmd}.{bad}"})
        elif cmd == "DONE":
            self._done(conn, msg.body, now, wall)
        elif cmd in ("ACCEPT", "REJECT"):
            self._attempt_message(conn, msg, now, wall)
        elif cmd == "BYE":
            self._drop(conn, now, wall, lost=False)
        elif cmd == "ERROR":
            log.warning("agent %s reports error %.40s: %.200s", conn.name, msg["code"],
                        msg["text"])

    def _attempt_message(self, conn: AgentConn, msg: Message, now: float, wall: float) -> None:
        cmd = msg.command
        job = self.jobs.current(msg["id"], msg["attempt"], conn.name)
        if job is None:
            if cmd != "REJECT":
                self._fence(conn, msg["id"], msg["attempt"])
        elif cmd == "ACCEPT":
            self.jobs.accept(job, now, wall)
        elif cmd == "REJECT" and msg["reason"] == vocab.AGENT_SHUTDOWN:
            # The agent is stopping cleanly and gives the attempt back, started or not: it is
            # requeued (cancelled if a cancel was under way) without charging an attempt.
            self.jobs.transition(job, sm.HAND_BACK, now, wall, reason=vocab.AGENT_SHUTDOWN)
        elif cmd == "REJECT":
            if self.jobs.can_reject(job):  # not after ACCEPT: too late to refuse
                self.jobs.transition(job, sm.REJECT, now, wall, reason=msg["reason"])
            else:
                self.out.send(AGENT, conn.ident, "ERROR", {"code": "conflict", "text":
                              f"REJECT of job {job.id} attempt {job.attempt}: already {job.state}"})
        else:
            self.jobs.progress(job, msg.body)

    def _fence(self, conn: AgentConn, job_id: int, attempt: int) -> None:
        self.metrics.fenced.inc()
        self.out.send(AGENT, conn.ident, "CANCEL", {"id": job_id, "attempt": attempt,
                                                     "grace_s": 0.0, "reason": vocab.FENCED})

    def _done(self, conn: AgentConn, body: dict[str, Any], now: float, wall: float) -> None:
        self.agents.ack(conn, body["id"], body["attempt"])
        if body["status"] not in vocab.STATUSES:
            log.warning("agent %s sent DONE with status %.40r", conn.name, body["status"])
            return
        job = self.jobs.current(body["id"], body["attempt"], conn.name)
        if job is not None:
            self.jobs.done(job, body, now, wall)

    def _hello(self, ident: bytes, msg: Message, peer: Peer | None, now: float,
               wall: float) -> None:
        # What HELLO brings is stored: a value the store refuses would wedge every commit.
        bad = next((k for k in ("name", "version", "resources", "workloads", "encoders",
                                "cgroup", "limits") if not _storable(msg[k])), None)
        if bad is not None:
            self.out.send(AGENT, ident, "ERROR",
                          {"code": "bad_body", "text": f"HELLO.{bad}: not storable"})
            return
        conn = self.agents.hello(ident, msg.body, peer, now, wall)
        if conn is None:
            return
        conn.batches = bool(msg["jobs_batch"])
        for result in msg["results"]:  # DONE bodies, so checked as DONE is (HELLO's schema can't)
            if not isinstance(result, dict):
                continue
            try:
                done = validate({"status": "failed", **result}, AGENT_TO_MASTER["DONE"], "DONE")
                if bad := _unstorable(done):
                    raise ProtocolError("bad_body", f"DONE.{bad}")
            except ProtocolError as e:
                self.out.send(AGENT, ident, "ERROR",
                              {"code": e.code, "text": f"HELLO.results: {e.text}"})
                continue
            if len(done["reason"] or "") > MAX_REASON:  # as for DONE: cut, never lost for it
                self.out.send(AGENT, ident, "ERROR", {"code": "bad_body", "text":
                              f"HELLO.results: DONE.reason: at most {MAX_REASON} characters"})
                done = {**done, "reason": done["reason"][:MAX_REASON]}
            self._done(conn, done, now, wall)
        still: set[tuple[int, int]] = {
            (r["id"], r["attempt"]) for r in msg["running"]
            if isinstance(r, dict) and isinstance(r.get("id"), int)
            and isinstance(r.get("attempt"), int)}
        for job in self.jobs.held_by(conn.name):
            if (job.id, job.attempt) in still:
                self.agents.hold(conn, job.id)
                self.jobs.reclaim(job, now)
                if job.state == vocab.CANCELLING:
                    self.out.send(AGENT, ident, "CANCEL", {"id": job.id, "attempt": job.attempt,
                                                           "grace_s": job.cancel_grace,
                                                           "reason": vocab.CANCELLED})
            else:
                self.jobs.lose(job, now, wall)
        for job_id, attempt in still:
            if self.jobs.current(job_id, attempt, conn.name) is None:
                self._fence(conn, job_id, attempt)

    def _drop(self, conn: AgentConn, now: float, wall: float, lost: bool) -> None:
        """Forget a connection (lost or left) and requeue every attempt it held."""
        for job_id in self.agents.drop(conn, wall, lost):
            job = self.jobs.get(job_id)
            if job is not None and job.state in vocab.LIVE and job.agent == conn.name:
                self.jobs.lose(job, now, wall)

    def agent_unreachable(self, ident: bytes, now: float, wall: float) -> None:
        """A send to this agent failed (ROUTER_MANDATORY): treat it as gone."""
        conn = self.agents.get(ident)
        if conn is not None:
            self._drop(conn, now, wall, lost=True)

    # ---- client-facing writes ---------------------------------------------------------------

    def cancel(self, job: Job, grace_s: float, now: float, wall: float) -> str:
        """A client CANCEL of a live job: 'cancelled' (it was queued) or 'cancelling'."""
        was_cancelling = job.state == vocab.CANCELLING
        if self.jobs.cancel(job, grace_s, now, wall):
            return "cancelled"
        conn = self.agents.named(job.agent or "")
        if conn is not None and not was_cancelling:
            self.out.send(AGENT, conn.ident, "CANCEL", {"id": job.id, "attempt": job.attempt,
                                                         "grace_s": grace_s,
                                                         "reason": vocab.CANCELLED})
        return "cancelling"

    # ---- timers and dispatch ----------------------------------------------------------------

    def _enforce_backstop(self, now: float, wall: float) -> None:
        """Jobs far past their timeout_s on a live agent: CANCEL them, then end them ourselves."""
        for job, gave_up in self.jobs.expire_backstop(now, wall):
            conn = self.agents.named(job.agent or "")
            log.warning("job %d attempt %d is past its timeout_s + %.0fs: %s", job.id,
                        job.attempt, self.jobs.backstop.margin_s,
                        "timed out" if gave_up else "cancelling")
            if conn is None:
                continue
            if gave_up:
                self._fence(conn, job.id, job.attempt)
            else:
                self.out.send(AGENT, conn.ident, "CANCEL", {
                    "id": job.id, "attempt": job.attempt, "grace_s": 0.0,
                    "reason": vocab.TIMEOUT})

    def tick(self, now: float, wall: float) -> None:
        """Liveness, heartbeats, retry promotion, orphan expiry, unanswered assignments."""
        self._enforce_backstop(now, wall)
        for job, agent in self.jobs.expire_assignments(now, wall):
            log.warning("job %d attempt %d: agent %s never answered its JOB in %.0fs; requeued",
                        job.id, job.attempt, agent, self.cfg.assign_timeout_s)
            conn = self.agents.named(agent)
            if conn is not None:
                self._fence(conn, job.id, job.attempt)
        for conn in self.agents.liveness(now):
            self._drop(conn, now, wall, lost=True)
        if self.orphan_deadline and now >= self.orphan_deadline:
            self.orphan_deadline = 0.0
            for job in self.jobs:
                if job.state in vocab.LIVE and self.agents.named(job.agent or "") is None:
                    self.jobs.lose(job, now, wall)
        self.jobs.sched.promote(now)

    def flush_progress(self, wall: float) -> None:
        """Write coalesced progress of running jobs."""
        self.jobs.flush_progress(wall)

    def dispatch(self, now: float, wall: float) -> int:
        """Hand queued jobs to agents with credit, round robin; returns how many went out."""
        if not self.jobs.sched.waiting():  # nothing to hand out: no walk over the agents
            return 0
        ready = self.agents.ready()
        sent = 0
        picked: dict[bytes, tuple[AgentConn, list[tuple[Job, dict[str, Any]]]]] = {}
        while ready:
            nxt = []
            for conn in ready:
                job = self.jobs.sched.pick(conn.can_run, now)
                if job is None:
                    continue
                spec = self.jobs.assign(job, conn.name, now, wall)
                self.agents.took(conn, job.id, now)
                picked.setdefault(conn.ident, (conn, []))[1].append((job, spec))
                sent += 1
                if conn.credit > 0:
                    nxt.append(conn)
            ready = nxt
        for conn, jobs in picked.values():  # JOBS per agent and turn where it takes them
            if conn.batches and len(jobs) > 1:
                for part in _jobs_parts(jobs):
                    self.out.send_frames(AGENT, conn.ident, encode_jobs(
                        [(job.id, job.attempt, job.spec) for job, _ in part], self.out.epoch))
                continue
            for job, spec in jobs:
                self.out.send(AGENT, conn.ident, "JOB", {"id": job.id, "attempt": job.attempt,
                                                         "spec": spec})
        if sent:
            self.metrics.dispatched.inc(sent)
        return sent

    def flush_acks(self) -> None:
        """One DONE_ACK per agent per turn."""
        self.agents.flush_acks()

    def snapshot(self) -> dict[str, Any]:
        """Counters from memory only (cheap: used by metrics and the stats event)."""
        slots, busy = self.agents.totals()
        return {
            "queued_by_priority": self.jobs.sched.depth(),
            "delayed": self.jobs.sched.delayed(),
            "live_by_state": self.jobs.by_state(),
            "agents": len(self.agents),
            "slots": slots,
            "slots_busy": busy,
            "dispatched_total": self.jobs.dispatched_total,
            "completed_total": self.jobs.finished_total,
            "sla": {**self.metrics.sla_counts, "target": self.metrics.sla.target,
                    "done_s": self.metrics.sla.done_s, "wait_s": self.metrics.sla.wait_s},
            "uptime_s": round(time.monotonic() - self.started, 3),
            "role": "leader",
            "epoch": self.epoch,
        }


# A JOBS body stays under this (the agents' socket drops a message over AGENT_MAX_MSG and the
# connection with it); a spec is at most MAX_SPEC_BYTES, so one always fits.
JOBS_BUDGET = AGENT_MAX_MSG // 2
_JOBS_ITEM = 48  # bytes of an item besides its spec: keys, id, attempt


def _jobs_parts(jobs: list[tuple[Job, Any]]) -> Iterator[list[tuple[Job, Any]]]:
    """A turn's jobs for one agent cut into JOBS bodies of at most JOBS_BUDGET bytes."""
    part: list[tuple[Job, Any]] = []
    size = 0
    for item in jobs:
        cost = len(item[0].spec) + _JOBS_ITEM
        if part and size + cost > JOBS_BUDGET:
            yield part
            part, size = [], 0
        part.append(item)
        size += cost
    if part:
        yield part


def _unstorable_text(body: dict[str, Any]) -> str | None:
    """'reason' or 'extra' if that field alone makes a DONE unstorable (numbers are fine)."""
    if _unstorable({k: v for k, v in body.items() if k not in ("reason", "extra")}):
        return None
    return next((k for k in ("reason", "extra") if not _storable(body.get(k))), None)


# A PROGRESS body as the schema makes it (bus/schemas.py): only these keys, nothing else.
_PROGRESS_KEYS = frozenset(AGENT_TO_MASTER["PROGRESS"])
_PROGRESS_FLOATS = ("progress", "fps", "speed", "out_time_s")
_INT63 = 2**63


def _unstorable_progress(body: dict[str, Any]) -> str | None:
    """`_unstorable(body)` for a PROGRESS, answered without it for the common body: the
    schema's keys only, byte counts in range, finite numbers (anything else: the full check,
    so every refusal and its text are the same)."""
    if body.keys() <= _PROGRESS_KEYS:
        b_in, b_out = body.get("bytes_in", 0), body.get("bytes_out", 0)
        if type(b_in) is int and type(b_out) is int and 0 <= b_in < _INT63 \
                and 0 <= b_out < _INT63:
            for key in _PROGRESS_FLOATS:
                value = body.get(key)
                if type(value) is float and value - value != 0.0:  # inf or nan
                    break
            else:
                return None
    return _unstorable(body)


def _unstorable(body: dict[str, Any]) -> str | None:
    """The first agent-reported value of a DONE/PROGRESS/REJECT the store cannot hold, with
    what it must be; None if all fit. One such value would fail (and wedge) every commit."""
    for key in ("bytes_in", "bytes_out"):
        value = body.get(key, 0)
        if not isinstance(value, int) or not 0 <= value < 2**63:
            return f"{key} must be 0 to 2^63-1"
    for key in ("progress", "fps", "speed", "out_time_s", "duration_s"):
        value = body.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} must be a finite number"
    code = body.get("exit_code")
    if code is not None and not -(2**31) <= code < 2**31:
        return "exit_code must be a 32-bit integer"
    bad = next((k for k in ("reason", "extra")  # nil (or absent) is always storable
                if body.get(k) is not None and not _storable(body[k])), None)
    return f"{bad} must be storable (JSON, no NUL)" if bad else None


def _storable(value: Any) -> bool:
    """True if the store can keep value: JSON-encodable, no NUL (PostgreSQL text refuses it)."""
    try:
        text = json.dumps(value, allow_nan=False)  # NaN is not JSON for other readers
    except (TypeError, ValueError):
        return False
    return "\\u0000" not in text.replace("\\\\", "")  # a NUL, not an escaped backslash + u0000
