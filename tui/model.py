"""The dashboard's state and its rendering to rows (pure: no terminal, no bus, no clock of its own).

Everything arrives from the feed thread (tui/feed.py) as plain data and is folded in here on the
UI thread; time is passed in (`now`, monotonic s; `wall`, epoch s) so tests can fix it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.text import Text

from bus.vocab import (
    ASSIGNED,
    CANCELLING,
    COMPLETED,
    FAILED,
    PRIORITIES,
    QUEUED,
    RUNNING,
    STATES,
    TERMINAL,
    TIMED_OUT,
)

HISTORY_S = 300  # seconds of history behind each sparkline
RECENT = 300  # finished jobs kept for the jobs table
LOG_LINES = 1000  # event log lines kept
DOWN_AFTER_S = 1.5  # nothing heard from the master this long: it is shown unreachable
# Jobs table order: what is moving first, then the queue in the order it is served.
STATE_ORDER = {RUNNING: 0, CANCELLING: 1, ASSIGNED: 2, QUEUED: 3}
FAILED_STATES = (FAILED, TIMED_OUT)
SERIES = ("completed/s", "failed/s", "dispatched/s", "queued high", "queued normal",
          "queued low", "in B/s", "out B/s")


def human_bytes(n: float) -> str:
    """1536 -> '1.5K' (binary prefixes, one decimal below 10)."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.1f}{unit}" if unit and abs(n) < 10 else f"{n:.0f}{unit}"
        n /= 1024
    return f"{n:.0f}T"  # pragma: no cover (the loop returns)


def human_age(seconds: float) -> str:
    """A short age: 4s, 3m, 2h, 5d."""
    s = max(0.0, seconds)
    for limit, div, unit in ((120, 1, "s"), (7200, 60, "m"), (172800, 3600, "h")):
        if s < limit:
            return f"{s / div:.0f}{unit}"
    return f"{s / 86400:.0f}d"


def bar(fraction: float, width: int = 10) -> str:
    """A progress bar with its percentage: '█████░░░░░  50%'."""
    f = min(1.0, max(0.0, fraction))
    full = int(f * width)
    return "█" * full + "░" * (width - full) + f" {100 * f:3.0f}%"


@dataclass
class Filter:
    """What the jobs view shows: `state:failed,timed_out scenario:720p-h264 agent:a1 123`.

    A bare number (or `id:N`) selects one job id. Unknown tokens are an error, said once."""

    states: frozenset[str] = frozenset()
    scenarios: frozenset[str] = frozenset()
    agent: str | None = None
    job_id: int | None = None
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> Filter:
        """Parse the filter box; raises ValueError with a message for the status line."""
        states: set[str] = set()
        scenarios: set[str] = set()
        agent: str | None = None
        job_id: int | None = None
        for token in text.split():
            key, sep, value = token.partition(":")
            if not sep:
                key, value = "id", token
            values = [v for v in value.split(",") if v]
            if key == "state":
                bad = [v for v in values if v not in STATES]
                if bad:
                    raise ValueError(f"unknown state {bad[0]!r} (one of {', '.join(STATES)})")
                states.update(values)
            elif key == "scenario":
                scenarios.update(values)
            elif key == "agent" and value:
                agent = value
            elif key == "id" and value.isdigit():
                job_id = int(value)
            else:
                raise ValueError(f"cannot filter by {token!r}: use state:S scenario:S "
                                 "agent:NAME or a job id")
        return cls(frozenset(states), frozenset(scenarios), agent, job_id, text.strip())

    def __bool__(self) -> bool:
        return bool(self.states or self.scenarios or self.agent or self.job_id is not None)

    def matches(self, job: dict[str, Any]) -> bool:
        """True if the job is in this view."""
        return ((not self.states or job.get("state") in self.states)
                and (not self.scenarios or job.get("scenario") in self.scenarios)
                and (self.agent is None or job.get("agent") == self.agent)
                and (self.job_id is None or job.get("id") == self.job_id))


@dataclass
class Series:
    """One value per second over the last HISTORY_S seconds (for a sparkline)."""

    points: deque[float] = field(default_factory=lambda: deque([0.0] * 2, maxlen=HISTORY_S))

    def add(self, value: float) -> None:
        self.points.append(float(value))

    @property
    def last(self) -> float:
        return self.points[-1] if self.points else 0.0


@dataclass
class DashModel:
    """What the dashboard shows. One writer: the UI thread, from the feed's updates."""

    endpoint: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    live: dict[int, dict[str, Any]] = field(default_factory=dict)  # non-terminal jobs
    recent: OrderedDict[int, dict[str, Any]] = field(default_factory=OrderedDict)  # finished
    series: dict[str, Series] = field(default_factory=lambda: {k: Series() for k in SERIES})
    log: deque[tuple[float, str, str]] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    logged: int = 0  # lines ever logged (the ring keeps the last LOG_LINES)
    filter: Filter = field(default_factory=Filter)
    heard_at: float | None = None  # monotonic: last reply or message from the master
    updated_wall: float | None = None  # epoch: when the shown data was last fresh
    error: str | None = None
    # per-second counters, closed by tick()
    _counts: dict[str, int] = field(default_factory=lambda: {"completed": 0, "failed": 0,
                                                             "dispatched": 0})
    _bytes: dict[int, tuple[int, int]] = field(default_factory=dict)  # job -> last (in, out)
    _rate_in: dict[str, float] = field(default_factory=dict)  # agent -> bytes in this second
    _rate_out: dict[str, float] = field(default_factory=dict)
    agent_rates: dict[str, tuple[float, float]] = field(default_factory=dict)  # last second
    last_seq: int = 0

    # ---- connection -----------------------------------------------------------------------

    def heard(self, now: float, wall: float) -> None:
        """The master answered or published something."""
        self.heard_at = now
        self.updated_wall = wall
        self.error = None

    def failed_request(self, error: str) -> None:
        """A request failed (timeout, refused): the reason shown while the master is down."""
        self.error = error

    def down_for(self, now: float) -> float | None:
        """Seconds the master has been unreachable, None while it is live."""
        if self.heard_at is None:
            return None if self.error is None else 0.0
        quiet = now - self.heard_at
        if quiet > DOWN_AFTER_S or (self.error is not None and quiet > 0.5):
            return quiet
        return None

    # ---- folding updates ------------------------------------------------------------------

    def set_snapshot(self, stats: dict[str, Any], nodes: list[dict[str, Any]],
                     live: list[dict[str, Any]], recent: list[dict[str, Any]], now: float,
                     wall: float) -> list[str]:
        """Replace stats, agents and jobs with a fresh poll; returns agent-change log lines."""
        self.heard(now, wall)
        self.stats = stats
        lines = self._node_changes({n["name"]: n for n in nodes}, wall)
        self.nodes = {n["name"]: n for n in nodes}
        fresh = {j["id"]: j for j in live if j.get("state") not in TERMINAL}
        for job_id, job in fresh.items():  # keep progress figures newer than the poll
            old = self.live.get(job_id)
            if old is not None and old.get("attempt") == job.get("attempt"):
                job["progress"] = max(job.get("progress") or 0.0, old.get("progress") or 0.0)
                job["extra"] = {**(job.get("extra") or {}), **(old.get("extra") or {})}
        self.live = fresh
        self._bytes = {k: v for k, v in self._bytes.items() if k in fresh}  # bounded by live
        for job in sorted(recent, key=lambda j: j["id"]):
            if job.get("state") in TERMINAL:
                self._finish(job)
        for job_id in [i for i in self.recent if i in self.live]:
            del self.recent[job_id]
        return lines

    def _node_changes(self, nodes: dict[str, dict[str, Any]], wall: float) -> list[str]:
        if not self.nodes and not self.log:
            return []  # the first poll: nothing changed, it was just not known
        out = []
        for name, node in nodes.items():
            old = self.nodes.get(name)
            if old is None:
                out.append(self._log(wall, "agent", f"agent {name} appeared ({node['state']})"))
            elif old["state"] != node["state"]:
                out.append(self._log(wall, "agent",
                                     f"agent {name}: {old['state']} -> {node['state']}"))
        return out

    def _log(self, wall: float, kind: str, text: str) -> str:
        self.log.append((wall, kind, text))
        self.logged += 1
        return text

    def _finish(self, job: dict[str, Any]) -> None:
        self.recent[job["id"]] = job
        self.recent.move_to_end(job["id"])
        while len(self.recent) > RECENT:
            self.recent.popitem(last=False)

    def apply_events(self, events: Iterable[dict[str, Any]], wall: float) -> bool:
        """Fold job events (docs/protocol.md *Events*) in; True if a shown job changed."""
        changed = False
        for e in events:
            self.last_seq = max(self.last_seq, int(e.get("seq") or 0))
            state, job_id = e.get("state"), e.get("id")
            if state == ASSIGNED:
                self._counts["dispatched"] += 1
            elif state == COMPLETED:
                self._counts["completed"] += 1
            elif state in FAILED_STATES:
                self._counts["failed"] += 1
                self._log(e.get("at") or wall, "job",
                          f"job {job_id} {state} ({e.get('reason') or '-'})"
                          + (f" on {e['agent']}" if e.get("agent") else ""))
            job = self.live.get(job_id) if isinstance(job_id, int) else None
            if job is None or not isinstance(job_id, int):
                continue  # not in view: the next poll brings it if it belongs there
            changed = True
            job["state"] = state
            if e.get("agent"):
                job["agent"] = e["agent"]
            if e.get("attempt"):
                job["attempt"] = e["attempt"]
            if state in TERMINAL:
                job["reason"] = e.get("reason")
                job["finished_at"] = e.get("at")
                del self.live[job_id]
                self._bytes.pop(job_id, None)
                self._finish(job)
        return changed

    def apply_progress(self, body: dict[str, Any]) -> bool:
        """Fold one PROGRESS body in (progress, fps, speed, bytes and the agent's rate)."""
        job = self.live.get(body.get("id", -1))
        if job is None:
            return False
        job["progress"] = float(body.get("progress") or 0.0)
        extra = job.setdefault("extra", {})
        for key in ("fps", "speed", "out_time_s"):
            if isinstance(body.get(key), int | float):
                extra[key] = body[key]
        b_in, b_out = int(body.get("bytes_in") or 0), int(body.get("bytes_out") or 0)
        job["bytes_in"], job["bytes_out"] = b_in, b_out
        prev_in, prev_out = self._bytes.get(job["id"], (b_in, b_out))
        self._bytes[job["id"]] = (b_in, b_out)
        agent = job.get("agent") or "-"
        self._rate_in[agent] = self._rate_in.get(agent, 0.0) + max(0, b_in - prev_in)
        self._rate_out[agent] = self._rate_out.get(agent, 0.0) + max(0, b_out - prev_out)
        return True

    def apply_agent_event(self, body: dict[str, Any], wall: float) -> None:
        """An `agent.<name>` event: joined, left, lost, draining, resumed."""
        name, event = str(body.get("name", "?")), str(body.get("event", "?"))
        self._log(wall, "agent", f"agent {name} {event}")

    def tick(self) -> None:
        """Close one second: rates and queue depth become the sparklines' newest points."""
        for key, name in (("completed", "completed/s"), ("failed", "failed/s"),
                          ("dispatched", "dispatched/s")):
            self.series[name].add(self._counts[key])
            self._counts[key] = 0
        queued = self.stats.get("queued_by_priority") or {}
        for prio in PRIORITIES:
            self.series[f"queued {prio}"].add(queued.get(prio, 0))
        self.series["in B/s"].add(sum(self._rate_in.values()))
        self.series["out B/s"].add(sum(self._rate_out.values()))
        self.agent_rates = {a: (self._rate_in.get(a, 0.0), self._rate_out.get(a, 0.0))
                            for a in set(self._rate_in) | set(self._rate_out)}
        self._rate_in.clear()
        self._rate_out.clear()

    # ---- views ----------------------------------------------------------------------------

    def status(self, now: float) -> Text:
        """The one status line (plain Text: names and errors come from the network)."""
        s = self.stats
        q = s.get("queued_by_priority") or {}
        figures = (f"master {self.endpoint}  agents {s.get('agents', 0)}  slots "
                   f"{s.get('slots_busy', 0)}/{s.get('slots', 0)}  queued "
                   f"{q.get('high', 0)}·{q.get('normal', 0)}·{q.get('low', 0)}")
        down = self.down_for(now)
        if down is None and self.heard_at is not None:
            return Text.assemble(("● live", "bold green"), "  ", figures)
        if self.heard_at is None and down is None:
            return Text.assemble(("… connecting", "bold yellow"), f"   master {self.endpoint}")
        why = f"   {self.error}" if self.error else ""
        return Text.assemble(("✖ master unreachable", "bold red"),
                             f" for {human_age(down or 0)} · rows are stale{why}")

    def jobs(self) -> list[dict[str, Any]]:
        """The jobs of the view, in the order shown: running, cancelling, assigned, queued (by
        priority, then id: the order they are served), then finished (newest first)."""
        f = self.filter
        live = sorted((j for j in self.live.values() if f.matches(j)),
                      key=lambda j: (STATE_ORDER.get(j["state"], 9),
                                     PRIORITIES.get(j.get("priority", "normal"), 1), j["id"]))
        done = [j for j in reversed(self.recent.values()) if f.matches(j)]
        return live + done

    def open_ids(self) -> list[int]:
        """Ids of the view's jobs that a cancel can still act on."""
        return [j["id"] for j in self.jobs() if j["state"] not in TERMINAL]

    def job_cells(self, job: dict[str, Any], wall: float) -> dict[str, str]:
        """Every column's text for one job (the table picks the columns that fit)."""
        extra = job.get("extra") or {}
        fps = f"{extra['fps']:.0f}" if isinstance(extra.get("fps"), int | float) else ""
        speed = (f"{extra['speed']:.2f}x" if isinstance(extra.get("speed"), int | float)
                 else "")
        state = job["state"]  # the reason is in the detail (enter) and the event log
        started = job.get("started_at") or job.get("created_at")
        end = job.get("finished_at") or wall
        return {
            "id": str(job["id"]),
            "state": state,
            "progress": bar(job.get("progress") or 0.0) if job["state"] != QUEUED else "",
            "scenario": str(job.get("scenario", "")),
            "agent": str(job.get("agent") or "-"),
            "prio": str(job.get("priority", "")),
            "fps": fps,
            "speed": speed,
            "eta": eta(job, wall),
            "attempt": f"{job.get('attempt', 0)}/{job.get('max_attempts', 0)}",
            "age": human_age(end - started) if isinstance(started, int | float) else "",
        }

    def node_cells(self, node: dict[str, Any]) -> dict[str, str]:
        """Every column's text for one agent."""
        res = node.get("resources") or {}
        rate_in, rate_out = self.agent_rates.get(node["name"], (0.0, 0.0))
        encoders = node.get("encoders") or []
        cpus = res.get("cpus")
        mem = res.get("memory_mb")
        return {
            "agent": str(node["name"]),
            "state": str(node["state"]),
            "slots": str(node.get("slots", "")),
            "busy": str(node.get("busy", "")),
            "limits": f"{node.get('limits', '')} ({node.get('cgroup', '')})",
            "cpu": f"{cpus:g}" if isinstance(cpus, int | float) else "",
            "mem": human_bytes(mem * 2**20) if isinstance(mem, int | float) else "",
            "in/s": human_bytes(rate_in),
            "out/s": human_bytes(rate_out),
            "encoders": encoders_summary(encoders),
            "seen": f"{human_age(float(node.get('last_seen_s') or 0))} ago",
        }

    def overview(self) -> Text:
        """Agents, slots and the SLA in words, beside the sparklines."""
        s = self.stats
        nodes = list(self.nodes.values())
        alive = sum(1 for n in nodes if n["state"] != "lost")
        busy = sum(1 for n in nodes if n.get("busy"))
        draining = sum(1 for n in nodes if n["state"] == "draining")
        lost = sum(1 for n in nodes if n["state"] == "lost")
        sla = s.get("sla") or {}
        met, missed = int(sla.get("met", 0)), int(sla.get("missed", 0))
        if met + missed:
            ratio = met / (met + missed)
            ok = ratio >= float(sla.get("target", 0.95))
            verdict: tuple[str, str] = (f"{100 * ratio:.1f} % met", "green" if ok else "bold red")
        else:
            verdict = ("no verdicts yet", "dim")
        return Text.assemble(
            f"agents alive {alive} · busy {busy} · draining {draining} · lost {lost}   slots "
            f"{s.get('slots_busy', 0)}/{s.get('slots', 0)}   retry wait {s.get('delayed', 0)}\n"
            f"dispatched {s.get('dispatched_total', 0)} · finished {s.get('completed_total', 0)}"
            f" since the master started ({human_age(float(s.get('uptime_s') or 0))} ago)\n"
            "SLA ", verdict,
            f" (target {100 * float(sla.get('target', 0.95)):.0f} %: done ≤ "
            f"{sla.get('done_s', '?')} s, wait ≤ {sla.get('wait_s', '?')} s; met {met} · "
            f"missed {missed})")

    def log_lines(self, after: int = 0) -> list[tuple[float, str, str]]:
        """The event log's lines logged after the first `after` ever (those still kept),
        oldest first."""
        n = min(self.logged - after, len(self.log))
        return list(self.log)[-n:] if n > 0 else []


def eta(job: dict[str, Any], wall: float) -> str:
    """Time left from progress and run time so far ('' when it cannot be told)."""
    p = job.get("progress") or 0.0
    started = job.get("started_at")
    if job.get("state") != RUNNING or not isinstance(started, int | float) or not 0.02 < p < 1:
        return ""
    return human_age((wall - started) * (1 - p) / p)


def encoders_summary(encoders: list[Any]) -> str:
    """'libx264 libvpx-vp9 +3': the first two, then a count."""
    names = [str(e.get("name", e)) if isinstance(e, dict) else str(e) for e in encoders]
    head = " ".join(names[:2])
    return head + (f" +{len(names) - 2}" if len(names) > 2 else "")
