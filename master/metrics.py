"""Master metrics on an injected registry.

Counters and histograms change in hooks the core calls at its transitions (`job_assigned`,
`job_done`, `job_finished`, `job_retried`); gauges that describe state are read at scrape time
from the snapshot the loop hands over with `refresh()` (never from the HTTP thread walking live
dicts). Every label is bounded: scenarios are the known ones (others count as "other"), reasons
the protocol's, agent names at most MAX_AGENT_LABELS; never a job id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from bus.vocab import (
    CANCELLED,
    CANCELLED_FORCED,
    OOM_KILLED,
    REASONS,
    STALLED,
    STATUSES,
    TIMED_OUT,
    WORKLOADS,
)
from master.sla import SlaPolicy

OTHER = "other"
MAX_AGENT_LABELS = 256

QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
RUN_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
# bytes/s: 8 kbit/s audio up to ~800 Mbit/s mezzanine files.
BANDWIDTH_BUCKETS = (1e3, 1e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6, 5e6, 1e7, 2.5e7, 5e7, 1e8)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class TrackedJob(Protocol):
    """What the hooks read of a live job (master.scheduler.Job)."""

    scenario: str
    state: str
    enqueued: float
    created_at: float
    first_wait_s: float | None
    bytes_in: int
    bytes_out: int


class LabelClamp:
    """Maps a label value onto a bounded set: known values pass, the first `extra` unknown ones
    are admitted as they come, everything after that becomes "other"; None becomes "none"."""

    def __init__(self, known: Iterable[str] = (), extra: int = 0) -> None:
        self.known = set(known)
        self.room = extra

    def __call__(self, value: str | None) -> str:
        if value is None:
            return "none"
        if value in self.known:
            return value
        if self.room > 0:
            self.room -= 1
            self.known.add(value)
            return value
        return OTHER


class MasterMetrics:
    """Counters and histograms the master updates as it works, and its state gauges."""

    def __init__(self, registry: CollectorRegistry, scenarios: Iterable[str] = (),
                 sla: SlaPolicy | None = None) -> None:
        self.registry = registry
        self.sla = sla or SlaPolicy()
        self.sla_counts = {"met": 0, "missed": 0}  # verdicts since start (STATS `sla`)
        self.scenario = LabelClamp([*WORKLOADS, *scenarios])
        self.reason = LabelClamp(REASONS)
        self.agent = LabelClamp(extra=MAX_AGENT_LABELS)
        self._snapshot: Callable[[], dict[str, Any]] | None = None
        self._nodes: Callable[[], list[dict[str, Any]]] = list
        self._state: tuple[dict[str, Any], list[dict[str, Any]], float] | None = None
        self._children: dict[tuple[Any, ...], Any] = {}  # labelled children, looked up once

        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(name, doc, list(labels), registry=registry)

        self.submitted = counter("ffrtmp_jobs_submitted_total", "Jobs accepted by SUBMIT")
        self.dispatched = counter("ffrtmp_jobs_dispatched_total", "JOB messages sent to agents")
        self.finished = counter("ffrtmp_jobs_finished_total",
                                "Jobs that reached a terminal state, by state and reason",
                                ["state", "reason"])
        self.retries = counter("ffrtmp_job_retries_total",
                               "Failed attempts requeued with backoff, by reason", ["reason"])
        self.timed_out = counter("ffrtmp_jobs_timed_out_total", "Jobs ended by their time limit")
        self.cancelled = counter("ffrtmp_jobs_cancelled_total",
                                 "Jobs cancelled, by how they stopped", ["mode"])
        for mode in ("graceful", "forced"):
            self.cancelled.labels(mode)
        self.oom_kills = counter("ffrtmp_oom_kills_total",
                                 "Attempts killed by the kernel's OOM killer in their cgroup")
        self.stalled = counter("ffrtmp_jobs_stalled_total",
                               "Attempts an agent stopped because their progress stalled")
        self.fenced = counter("ffrtmp_fenced_messages_total",
                              "Messages about attempts that were no longer current")
        self.agents_lost = counter("ffrtmp_agents_lost_total", "Agents declared dead")
        self.agent_joins = counter("ffrtmp_agent_hellos_total", "Agent HELLOs accepted")
        self.hellos_refused = counter("ffrtmp_agent_hellos_refused_total",
                                      "Agent HELLOs refused (bad_body, forbidden, name_taken)",
                                      ["code"])
        self.credit_capped = counter("ffrtmp_agent_credit_capped_total",
                                     "CREDIT beyond an agent's free slots, not granted")
        self.replies_dropped = counter("ffrtmp_client_replies_dropped_total",
                                       "Replies dropped: the client's reply queue was full")
        self.client_busy = counter("ffrtmp_client_busy_total",
                                   "Requests refused with ERROR busy (a client's turn share)")
        self.messages = counter("ffrtmp_bus_messages_total",
                                "Bus messages by socket and direction", ["socket", "direction"])
        self.bad_frames = counter("ffrtmp_bus_bad_frames_total", "Malformed frames received",
                                  ["socket", "reason"])
        self.db_errors = counter("ffrtmp_db_errors_total", "Failed commits or reads", ["op"])
        for op in ("commit", "read", "retention", "open", "fenced"):  # exported at 0: increase()
            self.db_errors.labels(op)
        self.client_errors = counter("ffrtmp_client_errors_total", "ERROR replies to clients",
                                     ["code"])
        self.bytes_in = counter("ffrtmp_job_bytes_in_total",
                                "Input bytes read by finished attempts, by agent", ["agent"])
        self.bytes_out = counter("ffrtmp_job_bytes_out_total",
                                 "Output bytes written by finished attempts, by agent", ["agent"])
        self.sla_jobs = counter("ffrtmp_sla_jobs_total",
                                "Judged jobs by SLA verdict (cancelled jobs are not judged)",
                                ["verdict"])
        for verdict in ("met", "missed"):
            self.sla_jobs.labels(verdict)
        self.retention_forgotten_agents = counter(
            "ffrtmp_retention_forgotten_agents_total",
            "Lost or left agent records deleted by retention")
        self.retention_deleted = counter("ffrtmp_retention_deleted_jobs_total",
                                         "Terminal jobs deleted by retention")
        self.maintenance = counter("ffrtmp_db_maintenance_total",
                                   "Scheduled database maintenance runs by operation and result",
                                   ["op", "result"])
        self.leadership = counter("ffrtmp_master_leadership_changes_total",
                                  "Times this master became leader or stood down, and why",
                                  ["to", "why"])
        self.commit_seconds = Histogram("ffrtmp_db_commit_seconds",
                                        "Duration of one group commit", buckets=COMMIT_BUCKETS,
                                        registry=registry)
        self.queue_wait = Histogram("ffrtmp_job_queue_wait_seconds",
                                    "Time a job waited in its queue before an assignment",
                                    ["scenario"], buckets=QUEUE_WAIT_BUCKETS, registry=registry)
        self.run_seconds = Histogram("ffrtmp_job_run_seconds",
                                     "Run time of attempts as the agent measured it",
                                     ["scenario", "status"], buckets=RUN_BUCKETS,
                                     registry=registry)
        self.bandwidth = Histogram("ffrtmp_job_bandwidth_bytes_per_second",
                                   "Output bytes per second of run time of completed jobs",
                                   ["scenario"], buckets=BANDWIDTH_BUCKETS, registry=registry)
        ProcessCollector(namespace="ffrtmp_master", registry=registry)

    # ---- hooks the core calls (master loop thread) -----------------------------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        # .labels() takes a lock and builds a tuple on every call; the hooks run per job.
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def job_assigned(self, job: TrackedJob, now: float) -> None:
        """A queued job got an assignment: its queue wait."""
        self._child(self.queue_wait, self.scenario(job.scenario)).observe(
            max(0.0, now - job.enqueued))

    def job_done(self, job: TrackedJob, status: str, reason: str | None, duration_s: float,
                 agent: str) -> None:
        """The DONE of a current attempt: run time, bandwidth, bytes per agent, OOM and stalls."""
        scenario = self.scenario(job.scenario)
        bytes_in, bytes_out = job.bytes_in, job.bytes_out
        self._child(self.run_seconds, scenario, status if status in STATUSES else OTHER).observe(
            max(0.0, duration_s))
        if status == "completed" and duration_s > 0 and bytes_out > 0:
            self._child(self.bandwidth, scenario).observe(bytes_out / duration_s)
        name = self.agent(agent)
        if bytes_in > 0:
            self._child(self.bytes_in, name).inc(bytes_in)
        if bytes_out > 0:
            self._child(self.bytes_out, name).inc(bytes_out)
        else:
            self._child(self.bytes_out, name)  # the series exists from the agent's first job
            self._child(self.bytes_in, name)
        if reason == OOM_KILLED:
            self.oom_kills.inc()
        elif reason == STALLED:
            self.stalled.inc()

    def job_retried(self, reason: str | None) -> None:
        """A failed attempt went back to the queue with a backoff."""
        self._child(self.retries, self.reason(reason)).inc()

    def job_finished(self, job: TrackedJob, reason: str | None, verdict: bool | None) -> None:
        """A job reached its terminal state, with its SLA verdict (None: not judged)."""
        self._child(self.finished, job.state, self.reason(reason)).inc()
        if job.state == TIMED_OUT:
            self.timed_out.inc()
        elif job.state == CANCELLED:
            mode = "forced" if reason == CANCELLED_FORCED else "graceful"
            self._child(self.cancelled, mode).inc()
        if verdict is not None:
            key = "met" if verdict else "missed"
            self._child(self.sla_jobs, key).inc()
            self.sla_counts[key] += 1

    # ---- state gauges ------------------------------------------------------------------------

    def watch(self, snapshot: Callable[[], dict[str, Any]],
              nodes: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        """Register the state gauges, fed by snapshot() (and nodes()) at each refresh(); a later
        call only changes what feeds them."""
        first = self._snapshot is None
        self._snapshot = snapshot
        self._nodes = nodes or list
        self.refresh()
        if first:
            self.registry.register(_StateCollector(self))

    def refresh(self) -> dict[str, Any]:
        """Take the snapshot now (from the loop thread) for the next scrapes; returns it."""
        assert self._snapshot is not None, "watch() first"
        snap = self._snapshot()
        self._state = (snap, self._nodes(), time.monotonic())
        return snap


class _StateCollector(Collector):
    """Gauges from the last snapshot; runs on the HTTP thread, so it only reads that tuple."""

    def __init__(self, metrics: MasterMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._m._state
        if state is None:
            return
        snap, nodes, taken = state
        yield _labelled("ffrtmp_queue_depth", "Queued jobs by priority", "priority",
                        snap["queued_by_priority"])
        yield GaugeMetricFamily("ffrtmp_queue_delayed", "Jobs waiting out a retry backoff",
                                value=snap["delayed"])
        yield _labelled("ffrtmp_jobs_live", "Non-terminal jobs by state", "state",
                        snap["live_by_state"])
        yield GaugeMetricFamily("ffrtmp_agents_alive", "Connected agents", value=snap["agents"])
        yield GaugeMetricFamily("ffrtmp_slots", "Slots of connected agents", value=snap["slots"])
        yield GaugeMetricFamily("ffrtmp_slots_busy", "Slots holding a job",
                                value=snap["slots_busy"])
        yield GaugeMetricFamily("ffrtmp_master_up", "1 while the master serves metrics",
                                value=1)
        yield GaugeMetricFamily("ffrtmp_master_loop_lag_seconds",
                                "Seconds since the master loop last refreshed these gauges "
                                "(about the stats interval when healthy)",
                                value=max(0.0, time.monotonic() - taken))
        yield GaugeMetricFamily("ffrtmp_master_leader",
                                "1 while this master leads, 0 while it stands by",
                                value=1 if snap.get("role") == "leader" else 0)
        yield GaugeMetricFamily("ffrtmp_master_epoch",
                                "The epoch (fencing token) this master leads with, or of the "
                                "leader it knows", value=snap.get("epoch", 0))
        yield GaugeMetricFamily("ffrtmp_master_uptime_seconds", "Seconds since the master started",
                                value=snap.get("uptime_s", 0.0))
        sla = self._m.sla
        yield GaugeMetricFamily("ffrtmp_sla_target_ratio",
                                "Fraction of judged jobs that should meet the SLA",
                                value=sla.target)
        yield GaugeMetricFamily("ffrtmp_sla_done_seconds",
                                "SLA: submission to completion at most this long", value=sla.done_s)
        yield GaugeMetricFamily("ffrtmp_sla_wait_seconds",
                                "SLA: first queue wait at most this long", value=sla.wait_s)
        families = {
            key: GaugeMetricFamily(f"ffrtmp_node_{key}", doc, labels=["agent"])
            for key, doc in (("slots", "Slots of each connected agent"),
                             ("busy", "Jobs each connected agent holds"),
                             ("credit", "Unused credit each connected agent granted"),
                             ("draining", "1 if the agent is draining"))
        }
        for node in nodes:
            for key, fam in families.items():
                value = node["state"] == "draining" if key == "draining" else node[key]
                fam.add_metric([node["name"]], float(value))
        yield from families.values()


def _labelled(name: str, doc: str, label: str, values: dict[str, Any]) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, doc, labels=[label])
    for key, n in values.items():
        fam.add_metric([key], n)
    return fam
