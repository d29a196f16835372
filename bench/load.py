"""The load driver: pipelined SUBMITs on one DEALER, job events on one SUB, one thread.

Timing is taken where it is honest: a job's submit time is when its SUBMIT left this process
(`time.perf_counter`), its end is when its terminal STATE event arrived here (the master publishes
it only after the result is committed), so submit -> done latency is what a client sees. Queue
wait is `assigned.at - queued.at`, both stamped by the master's clock. Events come from the
`events` topic (every job event, consecutive sequence numbers); a gap (the PUB socket dropped
some) is read back with EVENTS and counted (`events_missed`, those jobs get no latency sample),
never silently guessed; a quiet stream with jobs unfinished is checked the same way.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from bus.codec import decode, encode
from bus.errors import ProtocolError
from bus.schemas import MASTER_TO_CLIENT
from bus.sockets import connect_dealer, connect_sub
from bus.vocab import ASSIGNED, COMPLETED, QUEUED, TERMINAL

GET_CHUNK = 1000
STALL_S = 2.0  # no terminal event for this long -> ask the master with GET


class LoadError(Exception):
    """The master refused a request or never answered."""


@dataclass
class Progress:
    """A snapshot for the progress bar and the timeline."""

    t: float  # seconds since the first SUBMIT
    total: int
    submitted: int  # acknowledged by SUBMITTED
    dispatched: int  # first `assigned` event seen
    done: int  # terminal
    failed: int  # terminal but not completed


@dataclass
class Outcome:
    """Everything one driven load produced, raw (figures are computed by the report)."""

    jobs: int
    ids: list[int]
    first_send: float  # perf_counter
    last_reply: float  # perf_counter of the last SUBMITTED
    end: float  # perf_counter of the last terminal event (or of giving up)
    latency_ms: list[float]  # submit -> terminal event received, per finished job
    queue_wait_ms: list[float]  # first assigned.at - queued.at (master clock), per job
    # submit -> queued event received (client clock); queued -> assigned and assigned -> done
    # (master clock, stamped at the start of the loop turn that made the change)
    breakdown_ms: dict[str, list[float]]
    final: dict[int, tuple[str, str | None]]  # id -> (state, reason)
    assigned_at: list[float]  # master wall times of first assignment (for the dispatch rate)
    timeline: list[Progress]
    events_missed: int  # terminal states read back with EVENTS because PUB dropped the event
    timed_out: bool
    requests: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Driver:
    """Submits `specs()` in batches and follows every job to its terminal state."""

    def __init__(self, clients_ep: str, events_ep: str, ctx: zmq.Context | None = None,
                 request_timeout: float = 60.0) -> None:
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.dealer = connect_dealer(self.ctx, clients_ep)
        self.sub = connect_sub(self.ctx, events_ep, ["events"])
        self.seq: int | None = None  # the last event sequence number seen (None: none yet)
        self.request_timeout = request_timeout
        self._rids = itertools.count(1)
        self._poller = zmq.Poller()
        self._poller.register(self.dealer, zmq.POLLIN)
        self._poller.register(self.sub, zmq.POLLIN)
        self._reset()

    def close(self) -> None:
        """Close both sockets (and the context if the driver made it)."""
        self.dealer.close(linger=0)
        self.sub.close(linger=0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reset(self) -> None:
        self.sent: dict[int, float] = {}
        self.queued_at: dict[int, float] = {}
        self.queued_recv: dict[int, float] = {}
        self.assigned_at: dict[int, float] = {}
        self.final: dict[int, tuple[str, str | None, float, float]] = {}  # state, reason, at, recv
        self.waiting: dict[Any, tuple[str, Any, float]] = {}  # rid -> (kind, payload, sent)
        self.done = self.failed = self.dispatched = self.missed = 0
        self.last_terminal = self.last_reply = 0.0

    # ---- requests -----------------------------------------------------------------------------

    def _request(self, command: str, body: dict[str, Any], kind: str, payload: Any) -> None:
        rid = next(self._rids)
        frames = encode(command, {**body, "rid": rid})
        # Stamped before the send: the master, woken by it, may run before this process does
        # again, and a stamp taken after the send would then swallow the whole round trip.
        sent = time.perf_counter()
        self.dealer.send_multipart(frames)
        self.waiting[rid] = (kind, payload, sent)

    def call(self, command: str, **body: Any) -> dict[str, Any]:
        """One blocking request (events keep being recorded while waiting)."""
        rid = next(self._rids)
        self.dealer.send_multipart(encode(command, {**body, "rid": rid}))
        deadline = time.perf_counter() + self.request_timeout
        while time.perf_counter() < deadline:
            for reply_rid, msg in self._pump(0.05):
                if reply_rid == rid:
                    if msg.command == "ERROR":
                        raise LoadError(f"{command}: {msg['code']}: {msg['text']}")
                    return msg.body
        raise LoadError(f"{command}: no reply within {self.request_timeout:g}s")

    def _pump(self, timeout: float) -> Iterator[tuple[Any, Any]]:
        """Wait up to timeout s, record events, yield replies not claimed by the driver."""
        self._poller.poll(max(1, round(timeout * 1000)) if timeout > 0 else 0)
        self._drain_events()
        while True:
            try:
                frames = self.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(frames, MASTER_TO_CLIENT)
            except ProtocolError:
                continue
            rid = msg.get("rid")
            pending = self.waiting.pop(rid, None)
            if pending is None:
                yield rid, msg
            else:
                self._on_reply(pending, msg)

    def _on_reply(self, pending: tuple[str, Any, float], msg: Any) -> None:
        kind, payload, sent = pending
        if msg.command == "ERROR":
            raise LoadError(f"{kind}: {msg['code']}: {msg['text']}")
        now = time.perf_counter()
        if kind == "submit":
            self.last_reply = now
            for job_id in msg["ids"]:
                self.sent[job_id] = sent
                state = self.final.get(job_id)
                if state is not None:
                    self._count_final(state[0])
                if job_id in self.assigned_at:
                    self.dispatched += 1
        elif kind == "events":  # a gap read back: no honest receive time for these
            self._record(msg["events"], now, replayed=True)
            if msg.get("more"):
                self._request("EVENTS", {"after": msg["last"], "limit": 10_000}, "events", None)
            elif self.seq is not None:
                self.seq = max(self.seq, msg["last"])

    def _count_final(self, state: str) -> None:
        self.done += 1
        if state != COMPLETED:
            self.failed += 1
        self.last_terminal = time.perf_counter()

    # ---- events -------------------------------------------------------------------------------

    def _drain_events(self) -> None:
        sub, now = self.sub, time.perf_counter()
        for _ in range(100_000):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 4 or frames[2] != b"EVENTS":
                continue
            try:
                events = msgpack.unpackb(frames[3], raw=False)["events"]
                first = events[0]["seq"]
            except Exception:  # not ours to judge; the master counts bad frames
                continue
            if self.seq is not None and first > self.seq + 1:  # dropped: read them back
                self._request("EVENTS", {"after": self.seq, "limit": 10_000}, "events", None)
            self._record(events, now)

    def _record(self, events: list[dict[str, Any]], now: float, replayed: bool = False) -> None:
        """Fold events in; `replayed` ones (read back with EVENTS) have no receive time."""
        for ev in events:
            try:
                seq, job_id, state = ev["seq"], ev["id"], ev["state"]
            except (KeyError, TypeError):
                continue
            if not replayed:
                self.seq = seq if self.seq is None else max(self.seq, seq)
            at = ev.get("at") or 0.0
            if state == QUEUED:
                if job_id not in self.queued_at:
                    self.queued_at[job_id] = at
                    if not replayed:
                        self.queued_recv[job_id] = now
            elif state == ASSIGNED:
                if job_id not in self.assigned_at:
                    self.assigned_at[job_id] = at
                    if job_id in self.sent:
                        self.dispatched += 1
            elif state in TERMINAL and job_id not in self.final:
                if replayed:
                    self.missed += 1
                self.final[job_id] = (state, ev.get("reason"), 0.0 if replayed else at, now)
                if job_id in self.sent:
                    self._count_final(state)

    def warm_up(self, timeout: float = 10.0) -> None:
        """Wait until the SUB really receives (slow joiner): submit one noop, see its event."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            (job_id,) = self.call("SUBMIT", specs=[{"scenario": "noop"}])["ids"]
            until = time.perf_counter() + 0.5
            while time.perf_counter() < until:
                for _ in self._pump(0.05):
                    pass
                if job_id in self.queued_at:
                    self._reset()
                    return
        raise LoadError("subscribed to events but none arrived; is --events right?")

    # ---- the load -----------------------------------------------------------------------------

    def run(self, specs: list[dict[str, Any]], batch: int, *, window: int = 2,
            concurrency: int | None = None, rate: float | None = None,
            timeout: float = 300.0, sample_s: float = 0.1,
            on_progress: Callable[[Progress], None] | None = None) -> Outcome:
        """Submit specs (batch per SUBMIT, at most `window` SUBMITs unanswered, at most
        `concurrency` jobs unfinished, at most `rate` jobs/s) and follow them to the end."""
        self._reset()
        total = len(specs)
        batch = max(1, min(batch, 10_000))
        if concurrency is not None:
            batch = min(batch, concurrency)
        next_spec = 0
        start = time.perf_counter()
        self.last_reply = start
        timeline: list[Progress] = []
        next_sample = start
        deadline = start + timeout
        last_poll = start
        requests = 0
        timed_out = False
        while True:
            now = time.perf_counter()
            # -- send what the window, the concurrency bound and the rate allow
            while next_spec < total:
                in_window = sum(1 for k, _, _ in self.waiting.values() if k == "submit")
                if in_window >= window:
                    break
                n = min(batch, total - next_spec)
                if concurrency is not None:
                    unfinished = next_spec - self.done
                    n = min(n, concurrency - unfinished)
                    if n <= 0:
                        break
                if rate is not None and now < start + next_spec / rate:
                    break
                self._request("SUBMIT", {"specs": specs[next_spec:next_spec + n]}, "submit", n)
                requests += 1
                next_spec += n
            if next_spec >= total and self.done >= total:
                break
            if now >= deadline:
                timed_out = True
                break
            if now >= next_sample:
                snap = Progress(now - start, total, len(self.sent), self.dispatched, self.done,
                                self.failed)
                timeline.append(snap)
                if on_progress is not None:
                    on_progress(snap)
                next_sample = now + sample_s
            # -- the last events of a run may be dropped with nothing after them: ask (rarely)
            quiet = now - max(self.last_terminal, last_poll, self.last_reply)
            if next_spec >= total and not self.waiting and quiet > STALL_S:
                self._request("EVENTS", {"after": self.seq or 0, "limit": 10_000}, "events",
                              None)
                requests += 1
                last_poll = now
            wait = min(0.05, max(0.0, next_sample - now))
            if rate is not None and next_spec < total:
                wait = min(wait, max(0.0, start + next_spec / rate - now))
            for rid, _ in self._pump(wait):
                del rid  # a late reply to a GET that was already answered: nothing to do
        end = self.last_terminal if not timed_out else time.perf_counter()
        final = time.perf_counter()
        timeline.append(Progress(final - start, total, len(self.sent), self.dispatched,
                                 self.done, self.failed))
        if on_progress is not None:
            on_progress(timeline[-1])
        return self._outcome(total, start, end, timeline, timed_out, requests)

    def _outcome(self, total: int, start: float, end: float, timeline: list[Progress],
                 timed_out: bool, requests: int) -> Outcome:
        ids = sorted(self.sent)
        latency, wait, assigned = [], [], []
        breakdown: dict[str, list[float]] = {"submit_to_queued": [], "queued_to_assigned": [],
                                             "assigned_to_done": []}
        final: dict[int, tuple[str, str | None]] = {}
        for job_id in ids:
            sent = self.sent[job_id]
            q_at = self.queued_at.get(job_id)
            a_at = self.assigned_at.get(job_id)
            if a_at is not None:
                assigned.append(a_at)
                if q_at is not None:
                    wait.append(1000 * (a_at - q_at))
                    breakdown["queued_to_assigned"].append(1000 * (a_at - q_at))
            if job_id in self.queued_recv:
                breakdown["submit_to_queued"].append(1000 * (self.queued_recv[job_id] - sent))
            fin = self.final.get(job_id)
            if fin is None:
                continue
            state, reason, at, recv = fin
            final[job_id] = (state, reason)
            if at:  # from the stream (a read-back end has no honest receive time)
                latency.append(1000 * (recv - sent))
                if a_at is not None:
                    breakdown["assigned_to_done"].append(1000 * (at - a_at))
        return Outcome(
            jobs=total, ids=ids, first_send=start, last_reply=self.last_reply, end=end,
            latency_ms=latency, queue_wait_ms=wait, breakdown_ms=breakdown, final=final,
            assigned_at=assigned, timeline=timeline, events_missed=self.missed,
            timed_out=timed_out, requests=requests)

    def get_jobs(self, ids: list[int]) -> list[dict[str, Any]]:
        """Job views by id (chunked GETs), for per-job figures such as encoder fps."""
        out: list[dict[str, Any]] = []
        for i in range(0, len(ids), GET_CHUNK):
            out.extend(self.call("GET", ids=ids[i:i + GET_CHUNK])["jobs"])
        return out
