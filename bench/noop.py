"""End-to-end noop throughput and latency: `python -m bench.noop [--db URL] [--jobs N] …`.

Measures submit -> completed (durably committed: the master publishes a job's final state only
after the commit) for `noop` jobs through the real master, agents, store and bus. A quick script;
`ffrtmp bench` (bench/cli.py) is the full load runner, and measures latency with events instead
of the GET polling used here (polling adds its own round trips to what it measures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from bench.cluster import LocalCluster
from bus.client import Client, Subscriber


def _wait_completed(sub: Subscriber, ids: set[int], timeout: float) -> tuple[int, float]:
    done = 0
    deadline = time.monotonic() + timeout
    while done < len(ids) and time.monotonic() < deadline:
        item = sub.recv(1.0)
        if item is None:
            continue
        msg = item[1]
        if msg.command == "STATE" and msg["state"] == "completed" and msg["id"] in ids:
            done += 1
    return done, time.perf_counter()


def throughput(cluster: LocalCluster, jobs: int, batch: int, timeout: float,
               priority: str = "normal") -> dict[str, Any]:
    """Submit `jobs` noop jobs in batches and time until all are completed."""
    sub = Subscriber(["job."], cluster.events_ep)
    with Client(cluster.clients_ep, timeout=60) as client:
        time.sleep(0.3)  # let the SUB connect (slow joiner) before the first event
        procs = cluster.processes()
        cpu0 = {k: p.cpu_times() for k, p in procs.items()}
        start = time.perf_counter()
        ids: set[int] = set()
        for i in range(0, jobs, batch):
            ids.update(client.submit([{"scenario": "noop", "priority": priority}]
                                     * min(batch, jobs - i)))
        submitted = time.perf_counter()
        done, end = _wait_completed(sub, ids, timeout)
        cpu = {k: round(sum(p.cpu_times()[:2]) - sum(cpu0[k][:2]), 3)
               for k, p in procs.items()}
        rss = {k: p.memory_info().rss // 2**20 for k, p in procs.items()}
    sub.close()
    elapsed = end - start
    return {"jobs": jobs, "completed": done, "duration_s": round(elapsed, 3),
            "submit_rate": round(jobs / (submitted - start), 1),
            "completion_rate": round(done / elapsed, 1), "cpu_s": cpu, "rss_mb": rss}


def latency(cluster: LocalCluster, samples: int) -> dict[str, float]:
    """Unloaded submit -> completed round trip of single jobs, in ms."""
    out = []
    with Client(cluster.clients_ep, timeout=10) as client:
        for _ in range(samples):
            t0 = time.perf_counter()
            (job_id,) = client.submit([{"scenario": "noop"}])
            while True:
                jobs, _ = client.get([job_id])
                if jobs[0]["state"] == "completed":
                    break
            out.append((time.perf_counter() - t0) * 1000)
    out.sort()
    return {"p50": round(statistics.median(out), 3),
            "p95": round(out[int(0.95 * (len(out) - 1))], 3),
            "p99": round(out[int(0.99 * (len(out) - 1))], 3)}


def preload(cluster: LocalCluster, n: int) -> None:
    """Queue n low-priority jobs that wait behind the measured (high) ones: a deep queue."""
    with Client(cluster.clients_ep, timeout=120) as client:
        for i in range(0, n, 5000):
            client.submit([{"scenario": "noop", "priority": "low"}] * min(5000, n - i))


def main(argv: list[str] | None = None) -> int:
    """Run one measurement and print JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.noop")
    p.add_argument("--db", default=None)
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--latency-samples", type=int, default=200)
    p.add_argument("--queued", type=int, default=0, help="jobs queued before measuring")
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args(argv)
    cluster = LocalCluster(args.db, args.agents, args.slots)
    cluster.start()
    try:
        if args.queued:
            # Drained agents take nothing, so the preloaded jobs are all still queued when
            # the measured high-priority jobs arrive (aging 60 s keeps them behind).
            with Client(cluster.clients_ep) as c:
                for n in c.nodes():
                    c.drain(n["name"])
            preload(cluster, args.queued)
            with Client(cluster.clients_ep) as c:
                for n in c.nodes():
                    c.drain(n["name"], on=False)
        result: dict[str, Any] = {"config": vars(args)}
        if args.latency_samples:
            result["latency_ms"] = latency(cluster, args.latency_samples)
        result["throughput"] = throughput(cluster, args.jobs, args.batch, args.timeout,
                                          "high" if args.queued else "normal")
    finally:
        cluster.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
