"""Master metrics on an injected registry; state gauges are read from a snapshot at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class MasterMetrics:
    """Counters and histograms the master updates as it works."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.submitted = Counter("ffrtmp_jobs_submitted_total", "Jobs accepted by SUBMIT",
                                 registry=registry)
        self.dispatched = Counter("ffrtmp_jobs_dispatched_total", "JOB messages sent to agents",
                                  registry=registry)
        self.finished = Counter("ffrtmp_jobs_finished_total", "Jobs that reached a terminal state",
                                ["state"], registry=registry)
        self.retries = Counter("ffrtmp_job_retries_total", "Attempts requeued with backoff",
                               registry=registry)
        self.fenced = Counter("ffrtmp_fenced_messages_total",
                              "Messages about attempts that were no longer current",
                              registry=registry)
        self.agents_lost = Counter("ffrtmp_agents_lost_total", "Agents declared dead",
                                   registry=registry)
        self.agent_joins = Counter("ffrtmp_agent_hellos_total", "Agent HELLOs accepted",
                                   registry=registry)
        self.messages = Counter("ffrtmp_bus_messages_total", "Bus messages by socket and direction",
                                ["socket", "direction"], registry=registry)
        self.bad_frames = Counter("ffrtmp_bus_bad_frames_total", "Malformed frames received",
                                  ["socket", "reason"], registry=registry)
        self.commit_seconds = Histogram(
            "ffrtmp_db_commit_seconds", "Duration of one group commit",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry)
        self.db_errors = Counter("ffrtmp_db_errors_total", "Failed commits or reads",
                                 ["op"], registry=registry)
        self.client_errors = Counter("ffrtmp_client_errors_total", "ERROR replies to clients",
                                     ["code"], registry=registry)

    def watch(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Register gauges computed from snapshot() at each scrape."""
        self.registry.register(_SnapshotCollector(snapshot))


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self._snapshot()
        depth = GaugeMetricFamily("ffrtmp_queue_depth", "Queued jobs by priority",
                                  labels=["priority"])
        for prio, n in snap["queued_by_priority"].items():
            depth.add_metric([prio], n)
        yield depth
        yield GaugeMetricFamily("ffrtmp_queue_delayed", "Jobs waiting out a retry backoff",
                                value=snap["delayed"])
        live = GaugeMetricFamily("ffrtmp_jobs_live", "Non-terminal jobs by state",
                                 labels=["state"])
        for st, n in snap["live_by_state"].items():
            live.add_metric([st], n)
        yield live
        yield GaugeMetricFamily("ffrtmp_agents_alive", "Connected agents", value=snap["agents"])
        yield GaugeMetricFamily("ffrtmp_slots", "Slots of connected agents", value=snap["slots"])
        yield GaugeMetricFamily("ffrtmp_slots_busy", "Slots holding a job",
                                value=snap["slots_busy"])
        yield GaugeMetricFamily("ffrtmp_master_up", "1 while the master loop runs", value=1)
