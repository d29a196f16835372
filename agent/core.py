"""The agent's core, sans-I/O: messages and child events in (with `now`), messages and actions out.

The core owns the attempts this agent holds (preparing, running, stopping), the results the
master has not acknowledged, credit and admission. It never touches a socket, a process, the
filesystem or a clock: the loop (`agent/loop.py`) feeds it decoded master messages, the outcome
of each preparation, each child's exit, progress figures and the time; it executes the actions
the core asks for (`Prepare`, `Start`, `Stop`, `Discard`, `Reconnect`) and sends the messages
the core queued. The in-process harness (`tests/inproc.py`) drives the same core with a fake
clock and fake processes.

Containment: whatever the master sends, an attempt ends with a precise reason and the core
keeps serving; a JOB the core cannot even read is answered DONE failed `invalid_input`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.admission import REJECT_REASON, Admission, reservation_for
from agent.kinds import Finished, Prepared, Ready, Refused
from agent.runner import Result
from bus import vocab
from bus.codec import Message, validate, wire_type
from bus.errors import ProtocolError
from bus.schemas import MASTER_TO_AGENT

log = logging.getLogger("ffrtmp.agent")

PREPARING, RUNNING, STOPPING = "preparing", "running", "stopping"
NOT_LEADER_MAX_S = 1.0  # a standby's not_leader: retry backoff 0.1 s doubling up to this
EPOCHED = ("JOB", "JOBS", "DONE_ACK", "CANCEL")  # master messages a deposed leader's epoch voids


# ---- actions the loop executes ------------------------------------------------------------------

@dataclass(frozen=True)
class Prepare:
    """Build the attempt's process from its spec (off the loop); answer with `prepared()`."""

    id: int
    attempt: int
    spec: dict[str, Any]


@dataclass(frozen=True)
class Start:
    """Spawn the prepared process; on OSError answer with `start_failed()`."""

    id: int
    attempt: int
    run: Any


@dataclass(frozen=True)
class Stop:
    """SIGTERM the attempt's process group now, SIGKILL it after grace_s."""

    id: int
    attempt: int
    run: Any
    grace_s: float
    why: str  # cancel | timeout | shutdown


@dataclass(frozen=True)
class Discard:
    """A run that ended or will never start: remove its work directory."""

    run: Any


@dataclass(frozen=True)
class Reconnect:
    """Close the connection and open a fresh one; answer with `connected()`.

    Where to: `to`, the leader's endpoint a standby named (the loop follows it only if it is in
    the agent's list of masters, else it stays); else the next master in the list if `rotate`
    (silence, BYE, a deposed leader's WELCOME); else the same one again. `why` and `repeat`
    (the same reason as the last time: log it quietly) are for the loop's log line only.
    """

    to: str | None = None
    rotate: bool = False
    why: str = field(default="", compare=False)
    repeat: bool = field(default=False, compare=False)


Action = Prepare | Start | Stop | Discard | Reconnect


@dataclass(frozen=True)
class Identity:
    """What HELLO says about this agent besides what it runs."""

    name: str
    instance: str
    version: str
    slots: int
    cpus: float
    memory_mb: float
    workloads: tuple[str, ...]
    encoders: tuple[str, ...] = ()
    cgroup: str = "none"
    limits: str = "required"


@dataclass(frozen=True)
class Timing:
    """The core's timers, seconds."""

    heartbeat_s: float = 1.0  # until WELCOME says otherwise
    liveness: int = 3
    progress_interval_s: float = 0.5
    reconnect_max_s: float = 5.0
    stop_grace_s: float = 30.0
    kill_grace_s: float = 5.0
    ack_wait_s: float = 2.0
    resend_s: float = 5.0  # a DONE not acknowledged this long is sent again


@dataclass(eq=False)
class Attempt:
    """One attempt this agent holds."""

    id: int
    attempt: int
    state: str = PREPARING
    run: Any = None
    started: float = 0.0
    cancel: tuple[float, str] | None = None  # a CANCEL that came while preparing
    handback: bool = False  # stopped by the agent's shutdown: REJECT, not DONE
    last_progress: dict[str, Any] | None = None


@dataclass
class View:
    """A copy of what the metrics collector reads (taken on the loop's side of a lock-free copy)."""

    registered: bool
    draining: bool
    stopping: bool
    granted: int
    unacked: int
    running: list[tuple[dict[str, Any] | None, float]] = field(default_factory=list)


class AgentCore:
    """The agent's protocol, credit, admission and attempts; no I/O."""

    def __init__(self, me: Identity, admission: Admission, timing: Timing | None = None,
                 observer: Any = None) -> None:
        self.me = me
        self.admission = admission
        self.timing = timing or Timing()
        self.observer = observer  # metrics: connected(), finished(...); may be None
        self.attempts: dict[int, Attempt] = {}
        self.unacked: dict[tuple[int, int], dict[str, Any]] = {}
        self._resend_at: dict[tuple[int, int], float] = {}  # when an unacked DONE goes again
        self.granted = 0
        self.registered = False
        self.draining = False  # the master's DRAIN
        self.stopping = False  # our own shutdown (SIGTERM)
        self.stop_deadline = 0.0
        self.ack_deadline = 0.0
        self.finished = False  # shutdown complete: the loop says BYE and exits
        self.heartbeat_s = self.timing.heartbeat_s
        self.liveness = self.timing.liveness
        self.last_recv = self.last_sent = 0.0
        self.backoff = 0.1
        self.backoff_max = self.timing.reconnect_max_s  # NOT_LEADER_MAX_S after a not_leader
        self.reconnect_at = 0.0
        self.refused: str | None = None  # the master's last refusal of our HELLO (logged once)
        self.epoch_seen = 0  # the highest leader epoch of a WELCOME we registered with
        self.leaving = False  # this connection's master is being left: nothing it says counts
        self.deposed = False  # a deposed leader welcomed us since the last WELCOME we accepted
        self._hop = Reconnect()  # where the reconnect goes once we leave (see _leave)
        self._standby_since: float | None = None  # first not_leader since the last WELCOME
        self.disk_free_mb = float("inf")
        self.next_progress = 0.0
        self.completed = 0
        self._out: list[tuple[str, dict[str, Any]]] = []
        self._actions: list[Action] = []

    # ---- output ---------------------------------------------------------------------------------

    def take(self) -> tuple[list[tuple[str, dict[str, Any]]], list[Action]]:
        """The messages to send and the actions to execute, in order; starts afresh."""
        out, actions = self._out, self._actions
        self._out, self._actions = [], []
        return out, actions

    def _send(self, command: str, body: dict[str, Any], now: float) -> None:
        self._out.append((command, body))
        self.last_sent = now

    def view(self) -> View:
        """A snapshot for the metrics collector (cheap copies only)."""
        running = [(a.last_progress, a.started) for a in list(self.attempts.values())
                   if a.state != PREPARING]
        return View(self.registered, self.draining, self.stopping, self.granted,
                    len(self.unacked), running)

    # ---- connection -------------------------------------------------------------------------

    def connected(self, now: float) -> None:
        """A fresh connection is up: HELLO with what still runs and what is unacknowledged."""
        for key in self._resend_at:  # HELLO carries them; resend later only if still unacked
            self._resend_at[key] = now + self.timing.resend_s
        self.registered = False
        self.leaving = False
        self.reconnect_at = 0.0
        self.granted = 0
        self.last_recv = now
        self._send("HELLO", self._hello(), now)
        if self.observer is not None:
            self.observer.connected()

    def _hello(self) -> dict[str, Any]:
        me = self.me
        disk = self.disk_free_mb if self.disk_free_mb != float("inf") else 0.0
        return {
            "name": me.name, "instance": me.instance, "version": me.version, "slots": me.slots,
            "resources": {"cpus": me.cpus, "memory_mb": int(me.memory_mb),
                          "disk_mb": int(max(0.0, disk))},
            "workloads": list(me.workloads), "encoders": list(me.encoders),
            "cgroup": me.cgroup, "limits": me.limits,
            "running": [{"id": a.id, "attempt": a.attempt} for a in self.attempts.values()],
            "results": list(self.unacked.values()),
            "jobs_batch": True,
        }

    def observe_disk(self, free_mb: float) -> None:
        """The free space of the work dir's filesystem now (an unreadable disk is 0)."""
        self.disk_free_mb = free_mb
        self.admission.observe_disk(free_mb)

    # ---- master messages --------------------------------------------------------------------

    def bad_frame(self, code: str, text: str, now: float) -> None:
        """The master sent something we cannot decode: say so (counts as hearing from it)."""
        if self.leaving:
            return
        self.last_recv = now
        self._send("ERROR", {"code": code, "text": text}, now)

    def _stale(self, msg: Message) -> bool:
        """True for a message of a deposed leader: an epoch above 0 (1.1 masters have none)
        but below the highest one seen. It is ignored, unanswered, and counted."""
        epoch = msg.get("epoch", 0)
        if isinstance(epoch, int) and 0 < epoch < self.epoch_seen:
            if self.observer is not None:
                self.observer.stale_message(msg.command)
            return True
        return False

    def _leave(self, hop: Reconnect, now: float, at_once: bool = False) -> None:
        """Leave this master: reconnect as `hop` says on the next tick, after the backoff unless
        `at_once`; until then nothing it sends is acted on or keeps the connection alive."""
        self.registered = False
        self.granted = 0
        self.leaving = True
        self.last_recv = -1e9
        self._hop = hop
        if at_once:
            self.reconnect_at = max(now, 1e-9)  # due at once (0.0 would mean "not scheduled")

    def message(self, msg: Message, now: float) -> None:
        """One decoded message from the master."""
        cmd = msg.command
        if cmd in EPOCHED and self._stale(msg):
            return  # a deposed leader's: no answer, and it does not count as hearing from it
        if self.leaving:
            return
        self.last_recv = now
        if cmd == "WELCOME":
            self._welcome(msg, now)
        elif cmd == "JOB":
            self.granted = max(0, self.granted - 1)
            self._job(msg["id"], msg["attempt"], msg["spec"], now)
        elif cmd == "JOBS":
            self._jobs(msg["jobs"], now)
        elif cmd == "CANCEL":
            self._cancel(msg["id"], msg["attempt"], msg["reason"], float(msg["grace_s"]), now)
        elif cmd == "DONE_ACK":
            for pair in msg["acks"]:
                if isinstance(pair, list) and len(pair) == 2 \
                        and all(isinstance(x, int) for x in pair):  # lists would not hash
                    self.unacked.pop((pair[0], pair[1]), None)
                    self._resend_at.pop((pair[0], pair[1]), None)
        elif cmd == "DRAIN":
            self.draining = bool(msg["on"])
        elif cmd == "BYE":  # reconnect on the next tick, with backoff, to the next master
            self._leave(Reconnect(rotate=True, why="said BYE"), now)
        elif cmd == "ERROR":
            self._error(msg, now)
        if self.registered:
            self._top_up(now)

    def _welcome(self, msg: Message, now: float) -> None:
        # NaN or absurd timing would silence our heartbeat or liveness check for good.
        hb_ok = 0.01 <= msg["heartbeat_s"] <= 3600  # False for NaN too
        if not (hb_ok and 1 <= msg["liveness"] <= 1000):
            key = "liveness: 1 to 1000" if hb_ok else "heartbeat_s: 0.01 to 3600 s"
            self._send("ERROR", {"code": "bad_body", "text": f"WELCOME.{key}"}, now)
            return
        epoch = msg["epoch"]
        if self._stale(msg):  # a deposed leader: do not register, move on to the next master
            log.warning("master %s welcomes with epoch %d, older than epoch %d seen: a deposed "
                        "leader; leaving it", msg["master"][:64], epoch, self.epoch_seen)
            # The next master at once; if that one is deposed too, with the backoff (never a
            # hot loop over deposed leaders).
            self._leave(Reconnect(rotate=True,
                                  why=f"is a deposed leader (epoch {epoch} < {self.epoch_seen})"),
                        now, at_once=not self.deposed)
            self.deposed = True
            return
        self.epoch_seen = max(self.epoch_seen, epoch)
        self.deposed = False
        self.registered = True
        if self.refused is not None:
            log.info("master accepted this agent as %s", self.me.name)
        self.refused = None
        self.granted = 0
        self.backoff = 0.1
        self.backoff_max = self.timing.reconnect_max_s
        self._standby_since = None
        self.heartbeat_s = float(msg["heartbeat_s"])
        self.liveness = int(msg["liveness"])

    def _error(self, msg: Message, now: float) -> None:
        code = msg["code"]
        if code in ("name_taken", "forbidden") and not self.registered:
            # Our HELLO was refused: say so once, then retry with backoff (the name may be held
            # by our own previous process until the master declares it lost).
            repeat = self.refused == code
            if not repeat:
                log.error("master refused this agent (%s): %s; retrying with backoff", code,
                          msg["text"])
            self.refused = code
            self.backoff_max = self.timing.reconnect_max_s
            # The same master: it is the one that leads.
            self._leave(Reconnect(why=f"refused this agent ({code})", repeat=repeat), now)
            return
        if code == "not_leader":
            # A standby: nothing we sent was applied. Follow it to the leader it names (the
            # loop checks it is one of our masters), else try it again soon: it may lead.
            leader = msg.get("leader")
            hint = leader.get("agents") if isinstance(leader, dict) else None
            to = hint[:1000] if isinstance(hint, str) and hint else None
            repeat = self.refused == f"not_leader {to}"
            if not repeat:
                log.warning("master is a standby: %s", msg["text"][:200])
            self.refused = f"not_leader {to}"
            self.backoff_max = min(NOT_LEADER_MAX_S, self.timing.reconnect_max_s)
            self.backoff = min(self.backoff, self.backoff_max)
            # A standby that names no leader we can use for two liveness windows (it cannot
            # reach the database, or names one not in our list): try the next master too.
            if self._standby_since is None:
                self._standby_since = now
            stuck = now - self._standby_since > 2 * self.heartbeat_s * self.liveness
            if stuck:
                self._standby_since = now
            self._leave(Reconnect(to=to, rotate=stuck, why="not_leader", repeat=repeat), now)
            return
        log.warning("master error %s: %s", code, msg["text"])
        if code == "unknown_agent":
            self._actions.append(Reconnect(why="does not know this agent (unknown_agent)"))

    def _reject(self, job_id: int, attempt: int, reason: str, now: float) -> None:
        self._send("REJECT", {"id": job_id, "attempt": attempt, "reason": reason}, now)

    def _jobs(self, items: list[Any], now: float) -> None:
        """A JOBS: each item is a JOB body, checked as a JOB is; a bad one is reported to the
        master (ERROR bad_body) and skipped, the others run."""
        for i, item in enumerate(items):
            self.granted = max(0, self.granted - 1)  # the master spent a credit on each item
            try:
                if not isinstance(item, dict):
                    raise ProtocolError("bad_body", f"must be map, got {wire_type(item)}")
                job = validate(item, MASTER_TO_AGENT["JOB"], "JOB")
            except ProtocolError as e:
                log.warning("master sent a bad JOBS item: %s", e.text)
                self._send("ERROR", {"code": "bad_body", "text": f"JOBS.jobs[{i}]: {e.text}"},
                           now)
                continue
            self._job(job["id"], job["attempt"], job["spec"], now)

    def _job(self, job_id: int, attempt: int, spec: dict[str, Any], now: float) -> None:
        held = self.attempts.get(job_id)
        if held is not None and held.attempt != attempt:
            # A fenced older attempt is still being stopped: refuse (requeued, not charged).
            self._reject(job_id, attempt, "busy", now)
            return
        if held is not None or (job_id, attempt) in self.unacked:
            return  # a duplicate of what we already hold
        if self.stopping:
            self._reject(job_id, attempt, vocab.AGENT_SHUTDOWN, now)
            return
        if self.draining:
            self._reject(job_id, attempt, vocab.DRAINING, now)
            return
        try:
            res = reservation_for(spec, self.admission.default)
        except (TypeError, ValueError, AttributeError) as e:
            self._finish(job_id, attempt, Result(
                vocab.FAILED, vocab.INVALID_INPUT, None, 0.0,
                {"error": f"resource_limits: {e}"[:2000]}), now)
            return
        if not self.admission.admit(job_id, res, now):
            # Refused before start, and no credit until a job ends.
            self._reject(job_id, attempt, REJECT_REASON, now)
            return
        self.attempts[job_id] = Attempt(job_id, attempt)
        self._actions.append(Prepare(job_id, attempt, spec))

    def _cancel(self, job_id: int, attempt: int, reason: str, grace_s: float,
                now: float) -> None:
        att = self.attempts.get(job_id)
        if att is None or att.attempt != attempt:
            return
        why = "timeout" if reason == vocab.TIMEOUT else "cancel"  # the master's backstop
        if att.state == PREPARING:
            att.cancel = (grace_s, why)  # no process yet: it ends when preparation answers
            return
        att.state = STOPPING
        self._actions.append(Stop(job_id, attempt, att.run, grace_s, why))

    # ---- what the loop reports --------------------------------------------------------------

    def prepared(self, job_id: int, attempt: int, outcome: Prepared, now: float) -> None:
        """The preparation of an attempt finished (in a worker thread)."""
        att = self.attempts.get(job_id)
        if att is None or att.attempt != attempt or att.state != PREPARING:
            if isinstance(outcome, Ready):
                self._actions.append(Discard(outcome.run))
            return
        if att.cancel is not None or att.handback:
            if isinstance(outcome, Ready):
                self._actions.append(Discard(outcome.run))
            self._end(att, self._never_ran(att), now)
            return
        if isinstance(outcome, Refused):
            self._forget(att)
            self._reject(job_id, attempt, outcome.reason, now)
        elif isinstance(outcome, Finished):
            self._end(att, outcome.result, now)
        else:
            att.state, att.run, att.started = RUNNING, outcome.run, now
            self._actions.append(Start(job_id, attempt, outcome.run))
            self._send("ACCEPT", {"id": job_id, "attempt": attempt}, now)

    def _never_ran(self, att: Attempt) -> Result:
        if att.handback:
            return Result(vocab.FAILED, vocab.AGENT_SHUTDOWN, None, 0.0)
        assert att.cancel is not None
        if att.cancel[1] == "timeout":
            return Result(vocab.TIMED_OUT, vocab.TIMEOUT, None, 0.0)
        return Result(vocab.CANCELLED, vocab.CANCELLED_GRACEFUL, None, 0.0)

    def start_failed(self, job_id: int, attempt: int, error: str, now: float) -> None:
        """The process could not be spawned (its hooks have undone what they prepared)."""
        att = self.attempts.get(job_id)
        if att is not None and att.attempt == attempt:
            self._actions.append(Discard(att.run))
            self._end(att, Result(vocab.FAILED, vocab.AGENT_ERROR, None, 0.0,
                                  {"error": f"cannot start: {error}"[:2000]}), now)

    def exited(self, job_id: int, attempt: int, result: Result, now: float) -> None:
        """The attempt's process ended (reaped by the loop, hooks done)."""
        att = self.attempts.get(job_id)
        if att is not None and att.attempt == attempt:
            self._actions.append(Discard(att.run))
            self._end(att, result, now)

    def progress(self, job_id: int, attempt: int, fields: dict[str, Any], now: float) -> None:
        """Current figures of a running attempt; PROGRESS if they changed."""
        att = self.attempts.get(job_id)
        if att is None or att.attempt != attempt or not fields or fields == att.last_progress:
            return
        att.last_progress = fields
        if self.registered:
            self._send("PROGRESS", {"id": job_id, "attempt": attempt, **fields}, now)

    def progress_due(self, now: float) -> bool:
        """True once per progress interval while registered."""
        if not self.registered or now < self.next_progress:
            return False
        self.next_progress = now + self.timing.progress_interval_s
        return True

    def running(self) -> Iterator[tuple[int, int, Any]]:
        """(id, attempt, run) of every attempt with a process."""
        for att in list(self.attempts.values()):
            if att.state != PREPARING:
                yield att.id, att.attempt, att.run

    def _forget(self, att: Attempt) -> None:
        self.attempts.pop(att.id, None)
        self.admission.release(att.id)

    def _end(self, att: Attempt, result: Result, now: float) -> None:
        self._forget(att)
        if att.handback:
            # Our own shutdown stopped it: hand it back (the master requeues it, not charged).
            self._reject(att.id, att.attempt, vocab.AGENT_SHUTDOWN, now)
            return
        self._finish(att.id, att.attempt, result, now)

    def _finish(self, job_id: int, attempt: int, result: Result, now: float) -> None:
        body = {"id": job_id, "attempt": attempt, "status": result.status,
                "reason": result.reason, "exit_code": result.exit_code,
                "bytes_in": result.bytes_in, "bytes_out": result.bytes_out,
                "duration_s": result.duration_s, "extra": result.extra}
        self.unacked[(job_id, attempt)] = body
        self._resend_at[(job_id, attempt)] = now + self.timing.resend_s
        self.completed += 1
        if self.observer is not None:
            self.observer.finished(result.status, result.reason, result.duration_s,
                                   result.bytes_in, result.bytes_out)
        self._send("DONE", body, now)

    # ---- time -------------------------------------------------------------------------------

    def shutdown(self, now: float) -> None:
        """SIGTERM: take no more work; running attempts may finish within stop_grace_s, then
        they are stopped and handed back. A second call stops them at once."""
        if self.stopping:
            self.stop_deadline = min(self.stop_deadline, now)
        else:
            self.stopping = True
            self.stop_deadline = now + self.timing.stop_grace_s
            log.info("stopping: %d attempt(s) may finish within %.0fs", len(self.attempts),
                     self.timing.stop_grace_s)
        self.tick(now)

    def _hand_back(self, now: float) -> None:
        for att in list(self.attempts.values()):
            if att.handback:
                continue
            att.handback = True
            if att.state != PREPARING:
                att.state = STOPPING
                self._actions.append(Stop(att.id, att.attempt, att.run,
                                          self.timing.kill_grace_s, "shutdown"))

    def tick(self, now: float) -> None:
        """Shutdown progress, liveness of the master, heartbeat and credit."""
        if self.stopping:
            if now >= self.stop_deadline:
                self._hand_back(now)
            if not self.attempts:
                if not self.ack_deadline:
                    self.ack_deadline = now + self.timing.ack_wait_s
                if not self.unacked or now >= self.ack_deadline or not self.registered:
                    self.finished = True
        if now - self.last_recv > self.heartbeat_s * self.liveness:
            if not self.reconnect_at:
                self.reconnect_at = now + self.backoff
                self.backoff = min(self.backoff_max, self.backoff * 2)
            if now >= self.reconnect_at:
                self.reconnect_at = 0.0
                # Left on purpose (_leave) or silent: silence moves on to the next master.
                self._actions.append(self._hop if self.leaving else Reconnect(
                    rotate=True, why=f"silent {now - self.last_recv:.1f}s"))
            return
        if self.registered:
            self._resend(now)
            self._top_up(now)
            if now - self.last_sent >= self.heartbeat_s:
                self._send("HEARTBEAT", {"credit": self.granted}, now)

    def _resend(self, now: float) -> None:
        """DONEs still unacknowledged after resend_s go again (a message lost on a transport
        reconnect would otherwise leave the job running at the master); the master acks a
        repeat without applying it twice."""
        for key, due in list(self._resend_at.items()):
            if now >= due:
                self._resend_at[key] = now + self.timing.resend_s
                self._send("DONE", self.unacked[key], now)

    def _top_up(self, now: float) -> None:
        if self.draining or self.stopping:
            return
        free = self.me.slots - len(self.attempts) - self.granted
        if free > 0:
            free = self.admission.credits(free, self.granted, now)  # only work that fits
        if free > 0:
            self.granted += free
            self._send("CREDIT", {"n": free}, now)
