"""Live jobs: the only writer of job state (creation, every transition, progress, the SLA verdict).

Every change goes through `transition` (the one pure state machine of master/state.py) and
lands in the turn's outbox as a row update, an audit event and a STATE event. Observers
(metrics) are told through `JobHooks`; they read, they never write a job.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import msgpack

from bus import vocab
from master import state as sm
from master.backstop import GIVE_UP, Backstop
from master.config import MasterConfig
from master.outbox import Outbox
from master.scheduler import Job, Scheduler
from master.sla import SlaPolicy

# Keys of a job's `extra` that the master writes; an agent's DONE.extra cannot replace them.
RESERVED = frozenset({"requires", "retry_of", "sla_met"})

# PROGRESS figures kept in a job's `extra` (and written with it at the next flush).
_FIGURES = ("fps", "speed", "out_time_s")

# DONE.status -> the state machine's input.
DONE_EVENTS = {
    vocab.COMPLETED: sm.COMPLETE,
    vocab.FAILED: sm.FAIL,
    vocab.TIMED_OUT: sm.TIME_OUT,
    vocab.CANCELLED: sm.CANCEL_DONE,
}


class JobHooks(Protocol):
    """Lifecycle observers (master/metrics.py); called by LiveJobs, never writing a job."""

    def job_assigned(self, job: Job, now: float) -> None: ...
    def job_done(self, job: Job, status: str, reason: str | None, duration_s: float,
                 agent: str) -> None: ...
    def job_retried(self, reason: str | None) -> None: ...
    def job_finished(self, job: Job, reason: str | None, verdict: bool | None) -> None: ...


def stored_extra(job: Job) -> dict[str, Any]:
    """The job's `extra` column: its live figures plus the placement requirement (which a
    restarted master reads back), so no write of figures loses it."""
    return {**job.extra, "requires": job.requires}


class LiveJobs:
    """Every non-terminal job, its queue and its timeout backstop."""

    def __init__(self, cfg: MasterConfig, next_id: int, outbox: Outbox, hooks: JobHooks,
                 rng: random.Random, sla: SlaPolicy | None = None, next_seq: int = 1) -> None:
        self.cfg = cfg
        self.out = outbox
        self.hooks = hooks
        self.rng = rng
        self.sla = sla or SlaPolicy(cfg.sla_done_s, cfg.sla_wait_s, cfg.sla_target)
        self.next_id = next_id
        self.next_seq = next_seq  # the next event's sequence number (job_events.id)
        self._jobs: dict[int, Job] = {}
        self.sched = Scheduler(cfg.aging_s)
        self.backstop = Backstop(cfg.timeout_margin_s)
        self._dirty: set[int] = set()  # jobs whose progress is not written yet
        # The last spec packed and its bytes: the copies of one SUBMIT share one spec object.
        self._packed: tuple[dict[str, Any], bytes] | None = None
        # (deadline, id, attempt) of assignments in the order made: one deadline for all, so a
        # deque is a heap here. An attempt still `assigned` at its deadline was never answered.
        self._assigned: deque[tuple[float, int, int]] = deque()
        self.finished_total = 0
        self.dispatched_total = 0
        # Told when a job's assignment ends (job id, agent name): the agents registry frees it.
        self.on_release: Callable[[int, str], None] = lambda job_id, agent: None

    # ---- reads ------------------------------------------------------------------------------

    def get(self, job_id: int) -> Job | None:
        """The live job with this id, or None (unknown or terminal)."""
        return self._jobs.get(job_id)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def current(self, job_id: int, attempt: int, agent: str) -> Job | None:
        """The job if (job_id, attempt) is its live assignment on `agent`, else None."""
        job = self._jobs.get(job_id)
        if job is None or job.state not in sm.LIVE or job.attempt != attempt:
            return None
        return job if job.agent == agent else None

    def held_by(self, agent: str) -> list[Job]:
        """Live attempts assigned to an agent name."""
        return [j for j in self._jobs.values() if j.agent == agent and j.state in sm.LIVE]

    def by_state(self) -> dict[str, int]:
        """How many live jobs are in each non-terminal state."""
        live = {s: 0 for s in vocab.OPEN}
        for job in self._jobs.values():
            live[job.state] = live.get(job.state, 0) + 1
        return live

    # ---- creation and recovery --------------------------------------------------------------

    def create(self, spec: dict[str, Any], priority: int, requires: str, key: str | None,
               now: float, wall: float, retry_of: int | None = None) -> int:
        """A new queued job from a validated spec; returns its id."""
        job_id = self.next_id
        self.next_id += 1
        extra = {"retry_of": retry_of} if retry_of else {}
        if self._packed is None or self._packed[0] is not spec:
            self._packed = (spec, msgpack.packb(spec))
        job = Job(id=job_id, scenario=spec["scenario"], spec=self._packed[1],
                  state=sm.QUEUED, priority=priority, attempt=0,
                  max_attempts=spec["max_attempts"], requires=requires, created_at=wall,
                  extra=extra, retry_timeouts=bool(spec.get("retry_timeouts")))
        self._jobs[job_id] = job
        self.sched.push(job, now)
        reason = vocab.RETRY if retry_of else None
        self.out.batch.insert(
            id=job_id, scenario=spec["scenario"], spec=spec, state=sm.QUEUED,
            priority=priority, attempt=0, max_attempts=spec["max_attempts"], created_at=wall,
            updated_at=wall, timeout_s=spec["timeout_s"], output=spec["output"], idem_key=key,
            reason=reason, extra={"requires": requires, **extra})
        self._event(job_id, wall, None, sm.QUEUED, reason or vocab.SUBMITTED, None, 0)
        return job_id

    def _event(self, job_id: int, at: float, from_state: str | None, state: str,
               reason: str | None, agent: str | None, attempt: int) -> None:
        """Record one transition: the audit-trail row (its id is the event's sequence number)
        and, after the commit, the event to subscribers."""
        seq = self.next_seq
        self.next_seq += 1
        self.out.batch.event(id=seq, job_id=job_id, at=at, from_state=from_state,
                             to_state=state, reason=reason, agent=agent, attempt=attempt)
        self.out.job_event({"seq": seq, "id": job_id, "at": at, "from_state": from_state,
                            "state": state, "reason": reason, "agent": agent,
                            "attempt": attempt})

    def recover(self, rows: Iterable[dict[str, Any]], now: float, wall: float) -> None:
        """Reload non-terminal jobs after a start (queued ones go back to their queue)."""
        for row in rows:
            extra = row.get("extra") or {}
            requires = extra.get("requires")
            if not isinstance(requires, str):  # never trust a stored value blindly
                requires = f"workload:{row['scenario']}"
            job = Job(
                id=row["id"], scenario=row["scenario"], spec=msgpack.packb(row["spec"]),
                state=row["state"], priority=row["priority"], attempt=row["attempt"],
                max_attempts=row["max_attempts"], rejects=row.get("rejects") or 0,
                requires=requires, retry_timeouts=bool((row["spec"] or {}).get("retry_timeouts")),
                extra={k: v for k, v in extra.items() if k != "requires"},
                agent=row.get("agent"), progress=row.get("progress") or 0.0,
                bytes_in=row.get("bytes_in") or 0, bytes_out=row.get("bytes_out") or 0,
                created_at=row.get("created_at") or 0.0,
                first_wait_s=(row["started_at"] - row["created_at"]
                              if row.get("started_at") and row.get("created_at") else None),
            )
            self._jobs[job.id] = job
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
        out = sm.transition(sm.Core(job.state, job.attempt, job.max_attempts, job.rejects,
                                    job.retry_timeouts), event, reason)
        job.state, job.attempt, job.rejects = out.core.state, out.core.attempt, out.core.rejects
        if job.state not in sm.LIVE:
            self.backstop.forget(job.id)
        upd: dict[str, Any] = {"state": job.state, "attempt": job.attempt, "updated_at": wall,
                               **fields}
        if event in (sm.REJECT, sm.HAND_BACK):
            upd["rejects"] = job.rejects
        elif event == sm.ASSIGN:
            if job.first_wait_s is None and job.created_at > 0:  # the SLA's wait: the first one
                job.first_wait_s = max(0.0, wall - job.created_at)
            self.hooks.job_assigned(job, now)
        if reason is not None or event in (sm.ASSIGN, sm.ACCEPT):
            upd["reason"] = reason
        if before in sm.LIVE and job.state not in sm.LIVE and agent is not None:
            self.on_release(job.id, agent)
        if job.state == sm.QUEUED:
            job.agent = None
            upd["agent"] = None
            if out.retry:
                delay = sm.backoff_s(job.attempt - job.rejects, self.rng, self.cfg.retry_base_s,
                                     self.cfg.retry_cap_s)
                upd["not_before"] = wall + delay
                self.sched.push_delayed(job, now + delay)
                self.hooks.job_retried(reason)
            else:
                self.sched.push(job, now, front=True)
        elif job.state in sm.TERMINAL:
            upd["finished_at"] = wall
            upd["progress"] = job.progress
            upd["bytes_in"], upd["bytes_out"] = job.bytes_in, job.bytes_out
            self.sched.discard(job)
            self._jobs.pop(job.id, None)
            self._dirty.discard(job.id)
            self.finished_total += 1
            verdict = self.sla.verdict(job.state, job.created_at, job.first_wait_s, wall)
            if verdict is not None:  # the SLA verdict joins the job's per-job figures
                upd["extra"] = {**upd.get("extra", stored_extra(job)), "sla_met": verdict}
            self.hooks.job_finished(job, reason, verdict)
        self.out.batch.update(job.id, **upd)
        self._event(job.id, wall, before, job.state, reason, job.agent or agent, job.attempt)
        return out

    def assign(self, job: Job, agent: str, now: float, wall: float) -> dict[str, Any]:
        """Place a picked job on an agent; returns the spec to send in JOB."""
        job.agent = agent
        job.answered = False
        self.transition(job, sm.ASSIGN, now, wall, agent=agent, not_before=None)
        spec: dict[str, Any] = msgpack.unpackb(job.spec)
        if spec.get("timeout_s"):
            self.backstop.arm(job.id, job.attempt, float(spec["timeout_s"]), now)
        self._assigned.append((now + self.cfg.assign_timeout_s, job.id, job.attempt))
        self.dispatched_total += 1
        return spec

    def expire_assignments(self, now: float, wall: float) -> Iterator[tuple[Job, str]]:
        """Attempts not answered by assign_timeout_s: the agent never started, finished or
        refused them (a JOB lost in transit). An assigned one is requeued without charging an
        attempt, a cancelling one is cancelled; each is yielded with the agent it was on, to be
        fenced there."""
        while self._assigned and self._assigned[0][0] <= now:
            _, job_id, attempt = self._assigned.popleft()
            job = self._jobs.get(job_id)
            if job is None or job.attempt != attempt or job.answered \
                    or job.state not in (sm.ASSIGNED, sm.CANCELLING):
                continue
            agent = job.agent or ""
            # assigned -> queued; cancelling (a cancel of a JOB that never arrived) -> cancelled
            self.transition(job, sm.REJECT, now, wall, reason=vocab.UNACKNOWLEDGED)
            yield job, agent

    def accept(self, job: Job, now: float, wall: float) -> None:
        """The agent started the attempt (ACCEPT)."""
        job.answered = True
        if job.state == sm.ASSIGNED:
            self.transition(job, sm.ACCEPT, now, wall, started_at=wall)
            self.backstop.started(job.id, job.attempt, now)

    def can_reject(self, job: Job) -> bool:
        """True if the attempt may still be refused (not after ACCEPT)."""
        return (job.state, sm.REJECT) in sm.TABLE

    def lose(self, job: Job, now: float, wall: float) -> None:
        """The agent holding the attempt is gone: requeue (or fail) with agent_lost."""
        self.transition(job, sm.LOST, now, wall, reason=vocab.AGENT_LOST)

    def progress(self, job: Job, body: dict[str, Any]) -> None:
        """Figures of a PROGRESS of the current attempt; written at the next flush."""
        job.progress = min(1.0, max(0.0, float(body["progress"])))
        job.bytes_in, job.bytes_out = body["bytes_in"], body["bytes_out"]
        extra = job.extra
        for key in _FIGURES:
            if (value := body.get(key)) is not None:
                extra[key] = value
        self._dirty.add(job.id)  # written once at the next flush, however many came
        self.out.publish(f"job.{job.id}.progress", "PROGRESS",
                         {"id": job.id, "attempt": job.attempt, "progress": job.progress,
                          "bytes_in": job.bytes_in, "bytes_out": job.bytes_out, **job.extra})

    def done(self, job: Job, body: dict[str, Any], now: float, wall: float) -> None:
        """The DONE of the current attempt: the job's result and its terminal (or retry) state."""
        event = DONE_EVENTS[body["status"]]
        reason = body.get("reason")
        if event == sm.CANCEL_DONE and job.state != sm.CANCELLING \
                and self.backstop.cancelled(job.id, job.attempt):
            event, reason = sm.TIME_OUT, vocab.TIMEOUT  # our backstop stopped it, not a client
        if event == sm.COMPLETE:
            job.progress = 1.0
        job.bytes_in, job.bytes_out = body["bytes_in"], body["bytes_out"]
        reported = {k: v for k, v in (body.get("extra") or {}).items() if k not in RESERVED}
        extra = {**stored_extra(job), **reported, "duration_s": body["duration_s"]}
        self.hooks.job_done(job, body["status"], reason, body["duration_s"], job.agent or "")
        self.transition(job, event, now, wall, reason=reason, exit_code=body.get("exit_code"),
                        bytes_in=job.bytes_in, bytes_out=job.bytes_out, extra=extra)

    def cancel(self, job: Job, grace_s: float, now: float, wall: float) -> bool:
        """A client CANCEL: a queued job ends at once (True); a live one starts cancelling."""
        if job.state == sm.QUEUED:
            self.transition(job, sm.CANCEL, now, wall, reason=vocab.CANCELLED)  # no process ran
            return True
        if job.state != sm.CANCELLING:
            job.cancel_grace = grace_s
            self.transition(job, sm.CANCEL, now, wall)
        return False

    def reclaim(self, job: Job, now: float) -> None:
        """An agent's HELLO says it still runs this attempt: keep the backstop on it."""
        job.answered = True
        timeout = msgpack.unpackb(job.spec).get("timeout_s")
        if timeout and not self.backstop.watching(job.id):
            # Reclaimed after a master restart: watch it again, from now (generous).
            self.backstop.arm(job.id, job.attempt, float(timeout), now)

    def expire_backstop(self, now: float, wall: float) -> Iterator[tuple[Job, bool]]:
        """Jobs far past their timeout_s: yields (job, give_up); on give_up the job is ended."""
        for job_id, attempt, stage in self.backstop.expired(now):
            job = self._jobs.get(job_id)
            if job is None or job.attempt != attempt or job.state not in sm.LIVE:
                continue
            if stage == GIVE_UP:
                if job.state == sm.CANCELLING:
                    self.transition(job, sm.CANCEL_DONE, now, wall,
                                    reason=vocab.CANCELLED_FORCED)
                else:
                    self.transition(job, sm.TIME_OUT, now, wall, reason=vocab.TIMEOUT)
            yield job, stage == GIVE_UP

    def flush_progress(self, wall: float) -> None:
        """Write coalesced progress of running jobs (bounded rate, not one write per message)."""
        for job_id in self._dirty:
            job = self._jobs.get(job_id)
            if job is not None:
                self.out.batch.update(job_id, progress=job.progress, bytes_in=job.bytes_in,
                                      bytes_out=job.bytes_out, extra=stored_extra(job),
                                      updated_at=wall)
        self._dirty.clear()
