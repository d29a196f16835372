"""What a run observes besides its own jobs: process CPU and peak RSS, and the master's metrics."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families


class ProcSampler:
    """CPU seconds and peak RSS of named processes (children included) over a window.

    A background thread samples RSS every `interval` s (peaks between samples can be missed;
    the figure is a lower bound on the true peak). CPU comes from the kernel's counters, so it
    is exact.
    """

    def __init__(self, procs: dict[str, psutil.Process], interval: float = 0.1) -> None:
        self.procs = procs
        self.interval = interval
        self._cpu0: dict[str, tuple[float, float]] = {}
        self._t0 = 0.0
        self.peak_rss: dict[str, int] = {}
        self.peak_tree_rss: dict[str, int] = {}  # with its children (ffmpeg, sleep)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _tree(proc: psutil.Process) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return [proc, *proc.children(recursive=True)]
        return []

    def _cpu(self, proc: psutil.Process) -> tuple[float, float]:
        """CPU seconds (user + system) of proc itself, and of its children (live or reaped)."""
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            kids = t.children_user + t.children_system
            for c in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    kids += sum(c.cpu_times()[:2])
            return t.user + t.system, kids
        return 0.0, 0.0

    def _sample(self) -> None:
        for name, proc in self.procs.items():
            own = tree = 0
            for i, p in enumerate(self._tree(proc)):
                with contextlib.suppress(psutil.Error):
                    rss = p.memory_info().rss
                    tree += rss
                    if i == 0:  # proc itself
                        own = rss
            self.peak_rss[name] = max(self.peak_rss.get(name, 0), own)
            self.peak_tree_rss[name] = max(self.peak_tree_rss.get(name, 0), tree)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> ProcSampler:
        """Begin the window."""
        self._cpu0 = {n: self._cpu(p) for n, p in self.procs.items()}
        self._t0 = time.perf_counter()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="proc-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, dict[str, float]]:
        """End the window: {name: {cpu_s, cpu_pct (of one core), peak_rss_mb}}."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        wall = max(1e-9, time.perf_counter() - self._t0)
        out = {}
        for name, proc in self.procs.items():
            own, kids = self._cpu(proc)
            own0, kids0 = self._cpu0.get(name, (0.0, 0.0))
            cpu = own - own0
            out[name] = {"cpu_s": round(cpu, 3), "cpu_pct": round(100 * cpu / wall, 1),
                         "children_cpu_s": round(max(0.0, kids - kids0), 3),
                         "peak_rss_mb": round(self.peak_rss.get(name, 0) / 2**20, 1),
                         "peak_rss_with_children_mb":
                             round(self.peak_tree_rss.get(name, 0) / 2**20, 1)}
        return out


def self_cpu() -> float:
    """CPU seconds used so far by this (the bench) process."""
    t = psutil.Process().cpu_times()
    return t.user + t.system


# ---- the master's /metrics -------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str | None, timeout: float = 5.0) -> Samples | None:
    """All samples of a Prometheus text endpoint, keyed by (name, sorted labels); None if down."""
    if not url:
        return None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - local URL
            text = resp.read().decode("utf-8")
    except OSError:
        return None
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def _delta(before: Samples, after: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value - before.get((n, labels), 0.0)
            for (n, labels), value in after.items() if n == name}


def _bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus histogram_quantile over cumulative (upper bound, count) pairs."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def metrics_figures(before: Samples | None, after: Samples | None,
                    seconds: float) -> dict[str, Any] | None:
    """Commit latency and transactions/s, bus messages/s, over a window of `seconds`."""
    if before is None or after is None:
        return None
    seconds = max(seconds, 1e-9)
    commits = sum(_delta(before, after, "ffrtmp_db_commit_seconds_count").values())
    commit_sum = sum(_delta(before, after, "ffrtmp_db_commit_seconds_sum").values())
    raw = _delta(before, after, "ffrtmp_db_commit_seconds_bucket")
    buckets = sorted((float(dict(labels)["le"]), count) for labels, count in raw.items())
    db: dict[str, Any] = {
        "commits": int(commits),
        "tx_per_s": round(commits / seconds, 1),
        "commit_ms_mean": round(1000 * commit_sum / commits, 3) if commits else None,
        "busy_pct": round(100 * commit_sum / seconds, 1),
        "errors": int(sum(_delta(before, after, "ffrtmp_db_errors_total").values())),
    }
    for q in (0.5, 0.95, 0.99):
        v = _bucket_quantile(buckets, q)
        db[f"commit_ms_p{int(q * 100)}"] = round(1000 * v, 3) if v is not None else None
    msgs = _delta(before, after, "ffrtmp_bus_messages_total")
    by_socket = {f"{dict(k).get('socket')}_{dict(k).get('direction')}": round(v / seconds, 1)
                 for k, v in sorted(msgs.items())}
    bus = {"messages_per_s": round(sum(msgs.values()) / seconds, 1), "by_socket": by_socket,
           "bad_frames": int(sum(_delta(before, after, "ffrtmp_bus_bad_frames_total").values()))}
    dispatched = sum(_delta(before, after, "ffrtmp_jobs_dispatched_total").values())
    return {"db": db, "bus": bus, "dispatched": int(dispatched),
            "dispatch_rate": round(dispatched / seconds, 1)}
