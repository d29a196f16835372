"""Agent metrics on an injected registry, served on `--metrics HOST:PORT`.

Counters change in hooks the loop calls (`connected`, `finished`); everything that describes
state (slots, running jobs, host CPU/memory/disk, live bandwidth, admission reservations) is read
at scrape time. The scrape runs on the HTTP server's thread, so it only takes copies of what the
loop holds and never walks a dict the loop may be resizing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.defaults import METRICS_HOST
from bus.vocab import REASONS, STATUSES

log = logging.getLogger("ffrtmp.agent")

TURN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
RUN_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
MB = 2**20


class MetricsError(Exception):
    """The metrics endpoint cannot be served (bad HOST:PORT or the port is taken)."""


class AgentMetrics:
    """The agent's counters and its scrape-time collector."""

    def __init__(self, registry: CollectorRegistry, cfg: Any, version: str = "",
                 bandwidth_mbps: float | None = None) -> None:
        self.registry = registry
        self.finished_jobs = Counter("ffrtmp_agent_jobs_finished_total",
                                     "Attempts this agent finished, by status and reason",
                                     ["status", "reason"], registry=registry)
        self.run_seconds = Histogram("ffrtmp_agent_job_run_seconds",
                                     "Run time of this agent's attempts", ["status"],
                                     buckets=RUN_BUCKETS, registry=registry)
        self.connects = Counter("ffrtmp_agent_connects_total",
                                "Connections (HELLOs) to the master, reconnects included",
                                registry=registry)
        self.stale = Counter("ffrtmp_agent_stale_master_messages_total",
                             "Messages of a deposed master (an epoch older than one seen), "
                             "ignored, by command", ["command"], registry=registry)
        for command in ("WELCOME", "JOB", "JOBS", "DONE_ACK", "CANCEL"):
            self.stale.labels(command)
        self.turn_seconds = Histogram("ffrtmp_agent_loop_turn_seconds",
                                      "Duration of the agent loop's turns (its heartbeat waits "
                                      "at most this long)", buckets=TURN_BUCKETS,
                                      registry=registry)
        self._lock = threading.Lock()
        self._done = [0, 0]  # bytes in, out of finished attempts
        self._reported = [0.0, 0.0]  # keeps the byte counters monotonic across a finish
        self.worst_turn = 0.0  # the longest loop turn since start, s
        self.view: Callable[[], Any] | None = None  # the core's View (agent/core.py)
        self.admission: Callable[[], dict[str, float]] | None = None
        registry.register(_AgentCollector(self, cfg, version, bandwidth_mbps))
        ProcessCollector(namespace="ffrtmp_agent", registry=registry)

    def observe(self, view: Callable[[], Any],
                admission: Callable[[], dict[str, float]] | None = None) -> None:
        """What the scrape reads: the core's view and admission's snapshot (both copies)."""
        self.view, self.admission = view, admission

    def turn(self, seconds: float) -> None:
        """One loop turn took this long."""
        self.turn_seconds.observe(seconds)
        if seconds > self.worst_turn:
            self.worst_turn = seconds

    def connected(self) -> None:
        """A new connection to the master (first or reconnect)."""
        self.connects.inc()

    def stale_message(self, command: str) -> None:
        """A message of a deposed master was ignored."""
        self.stale.labels(command).inc()

    def finished(self, status: str, reason: str | None, duration_s: float, bytes_in: int,
                 bytes_out: int) -> None:
        """An attempt ended (loop thread)."""
        status = status if status in STATUSES else "other"
        label = "none" if reason is None else reason if reason in REASONS else "other"
        self.finished_jobs.labels(status, label).inc()
        self.run_seconds.labels(status).observe(max(0.0, duration_s))
        with self._lock:
            self._done[0] += max(0, int(bytes_in))
            self._done[1] += max(0, int(bytes_out))

    def byte_totals(self, live_in: int, live_out: int) -> tuple[float, float]:
        """Finished plus live bytes, never below what was reported before (counter semantics)."""
        with self._lock:
            totals = (self._done[0] + live_in, self._done[1] + live_out)
            self._reported = [max(r, float(t)) for r, t in zip(self._reported, totals,
                                                                  strict=True)]
            return self._reported[0], self._reported[1]


def link_capacity_bytes(mbps: float | None) -> float:
    """Bytes/s of the agent's link: mbps if given, else the fastest up non-loopback NIC, else 0."""
    if mbps:
        return mbps * 1e6 / 8
    try:
        stats = psutil.net_if_stats()
    except OSError:
        return 0.0
    speeds = [s.speed for name, s in stats.items() if s.isup and name != "lo" and s.speed > 0]
    return max(speeds, default=0) * 1e6 / 8


class _AgentCollector(Collector):
    def __init__(self, metrics: AgentMetrics, cfg: Any, version: str,
                 bandwidth_mbps: float | None) -> None:
        self._m = metrics
        self._cfg = cfg
        self._version = version
        self._capacity = link_capacity_bytes(bandwidth_mbps)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        cfg = self._cfg

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        info = GaugeMetricFamily("ffrtmp_agent_info", "Always 1: the agent's name and version",
                                 labels=["agent", "version"])
        info.add_metric([cfg.name, self._version], 1)
        yield info
        yield gauge("ffrtmp_agent_up", "1 while the agent serves metrics", 1)
        yield gauge("ffrtmp_agent_slots", "Jobs this agent runs at once", cfg.slots)
        yield gauge("ffrtmp_agent_loop_worst_turn_seconds",
                    "The longest loop turn since the agent started (liveness: the heartbeat "
                    "waits at most this long)", self._m.worst_turn)
        view = self._m.view() if self._m.view is not None else None
        if view is not None:
            yield gauge("ffrtmp_agent_connected", "1 while the master has welcomed this agent",
                        float(view.registered))
            yield gauge("ffrtmp_agent_draining", "1 while the master has this agent draining",
                        float(view.draining))
            yield gauge("ffrtmp_agent_stopping", "1 while this agent is stopping (SIGTERM)",
                        float(view.stopping))
            yield gauge("ffrtmp_agent_jobs_running", "Attempts running now", len(view.running))
            yield gauge("ffrtmp_agent_credit_granted", "Credit granted and not yet used",
                        view.granted)
            yield gauge("ffrtmp_agent_results_unacked",
                        "Results the master has not acknowledged", view.unacked)
            yield from self._bytes(view.running)
        yield from self._host(cfg)
        yield from self._admission()

    def _bytes(self, running: list[tuple[dict[str, Any] | None, float]]
               ) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        now = time.monotonic()
        live_in = live_out = 0
        rate_in = rate_out = 0.0
        for last_progress, started in running:
            fields = last_progress or {}
            b_in, b_out = int(fields.get("bytes_in") or 0), int(fields.get("bytes_out") or 0)
            live_in, live_out = live_in + b_in, live_out + b_out
            elapsed = now - (started or now)
            if elapsed > 0:
                rate_in, rate_out = rate_in + b_in / elapsed, rate_out + b_out / elapsed
        total_in, total_out = self._m.byte_totals(live_in, live_out)
        yield CounterMetricFamily("ffrtmp_agent_job_bytes_in",
                                  "Input bytes read by this agent's attempts (running included)",
                                  value=total_in)
        yield CounterMetricFamily("ffrtmp_agent_job_bytes_out",
                                  "Output bytes written by this agent's attempts "
                                  "(running included)", value=total_out)
        bw = GaugeMetricFamily("ffrtmp_agent_bandwidth_bytes_per_second",
                               "Sum over running attempts of their bytes per second so far",
                               labels=["direction"])
        bw.add_metric(["in"], rate_in)
        bw.add_metric(["out"], rate_out)
        yield bw
        yield GaugeMetricFamily("ffrtmp_agent_link_capacity_bytes_per_second",
                                "Capacity of the agent's link (--bandwidth-mbps, else the NIC "
                                "speed; 0 if unknown)", value=self._capacity)
        if self._capacity > 0:
            util = GaugeMetricFamily("ffrtmp_agent_bandwidth_utilisation_ratio",
                                     "Job bandwidth over link capacity, per direction",
                                     labels=["direction"])
            util.add_metric(["in"], rate_in / self._capacity)
            util.add_metric(["out"], rate_out / self._capacity)
            yield util

    def _host(self, cfg: Any) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        cpu = CounterMetricFamily("ffrtmp_agent_host_cpu_seconds",
                                  "CPU time of the agent's host by mode (all cores)",
                                  labels=["mode"])
        for mode, seconds in psutil.cpu_times()._asdict().items():
            cpu.add_metric([mode], seconds)
        yield cpu
        yield GaugeMetricFamily("ffrtmp_agent_host_cpus", "Logical CPUs of the agent's host",
                                value=float(os.cpu_count() or 1))
        yield GaugeMetricFamily("ffrtmp_agent_host_load1", "1-minute load average of the host",
                                value=os.getloadavg()[0])
        mem = psutil.virtual_memory()
        yield GaugeMetricFamily("ffrtmp_agent_host_memory_total_bytes", "Host memory",
                                value=float(mem.total))
        yield GaugeMetricFamily("ffrtmp_agent_host_memory_available_bytes",
                                "Host memory available without swapping",
                                value=float(mem.available))
        try:
            disk = psutil.disk_usage(str(cfg.work_dir))
        except OSError:
            return
        yield GaugeMetricFamily("ffrtmp_agent_disk_total_bytes",
                                "Size of the work dir's filesystem", value=float(disk.total))
        yield GaugeMetricFamily("ffrtmp_agent_disk_free_bytes",
                                "Free space of the work dir's filesystem", value=float(disk.free))

    def _admission(self) -> Iterator[GaugeMetricFamily]:
        if self._m.admission is None:
            return
        snap: dict[str, float] | None = None
        for _ in range(3):  # the loop may be changing its reservations right now
            try:
                snap = self._m.admission()
                break
            except RuntimeError:
                continue
        if not snap:
            return
        for key, name, scale, doc in (
            ("cpu_reserved_percent", "cpu_reserved_cores", 0.01, "CPU reserved by running jobs"),
            ("cpu_capacity_percent", "cpu_capacity_cores", 0.01, "CPU admission may reserve"),
            ("memory_reserved_mb", "memory_reserved_bytes", MB, "Memory reserved by running jobs"),
            ("memory_capacity_mb", "memory_capacity_bytes", MB, "Memory admission may reserve"),
            ("disk_reserved_mb", "disk_reserved_bytes", MB, "Scratch disk reserved by jobs"),
            ("disk_free_mb", "disk_free_bytes", MB, "Free disk admission last saw"),
        ):
            value = snap.get(key)
            if isinstance(value, int | float) and value >= 0:
                yield GaugeMetricFamily(f"ffrtmp_agent_admission_{name}", doc,
                                        value=float(value) * scale)


def serve(registry: CollectorRegistry, address: str,
          tries: int = 1) -> tuple[Any, threading.Thread]:
    """Serve registry on http://HOST:PORT/metrics (PORT 0: any free port); with tries > 1 a
    taken port moves on to the next ones (the default port, so that several agents on one host
    need no flag). MetricsError if it cannot be served."""
    host, sep, port = address.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not 0 <= number <= 65535:
        raise MetricsError(f"--metrics {address!r}: expected HOST:PORT or 'off'")
    host = host or METRICS_HOST
    for attempt in range(max(1, tries)):
        try:
            server, thread = _start_http_server(number + attempt, host, registry=registry)
            break
        except OSError as e:
            if attempt + 1 >= max(1, tries) or number == 0 or number + attempt >= 65535:
                flag = "another --metrics HOST:PORT or --metrics off" if tries <= 1 else \
                    "--metrics HOST:PORT or --metrics off"
                raise MetricsError(f"cannot serve metrics on {host}:{number + attempt}: {e} "
                                   f"(give {flag})") from e
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server, thread


def stop_serving(handle: tuple[Any, threading.Thread] | None) -> None:
    """Shut a serve() endpoint down and wait for its thread (idempotent for None)."""
    if handle is None:
        return
    server, thread = handle
    server.shutdown()
    server.server_close()
    thread.join(timeout=2)
