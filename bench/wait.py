"""`ffrtmp bench wait`: the user's path against the bench's, on one cluster, in one run.

Both sides push the same number of noop jobs through the same running master and agents,
alternating (bench, CLI, CLI, bench, ...), `repeat` times each:

- bench: `bench.load.Driver` (pipelined SUBMITs, events on one SUB) — its rate is jobs over
  first SUBMIT to last terminal event;
- cli: `ffrtmp submit noop --count N --wait` as a subprocess, as a user types it — its rate is
  jobs over the process's whole wall time (start-up and imports included: the user waits for
  them too); the report also gives the start-up time of `ffrtmp --help` for reference.

The ratio cli/bench of the medians is the figure (issue 11: >= 0.8).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cluster import LocalCluster
from bench.env import machine
from bench.load import Driver
from bench.profiles import BenchError
from bench.progress import Bar

NOOP = {"scenario": "noop"}


@dataclass
class Config:
    """What `bench wait` runs."""

    jobs: int = 20_000
    agents: int = 3
    slots: int = 16
    repeat: int = 3
    batch: int = 5000  # the CLI submits in chunks of 5000 too
    timeout: float = 300.0


def _cli(cluster: LocalCluster, jobs: int, timeout: float) -> float:
    """Seconds `ffrtmp submit noop --count jobs --wait` took, wall clock; raises on failure."""
    argv = [sys.executable, "-m", "ffrtmp", "--master", cluster.clients_ep, "--events-ep",
            cluster.events_ep, "submit", "noop", "--count", str(jobs), "--wait"]
    env = {**os.environ, "FFRTMP_LOG": "warning"}
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(f"ffrtmp submit --wait exited {proc.returncode}: "
                         f"{proc.stderr.strip().splitlines()[-1:] or ''}")
    return took


def _startup() -> float:
    """Seconds `ffrtmp --help` takes (interpreter start and imports): the CLI's fixed cost."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ffrtmp", "--help"], capture_output=True, check=True)
    return time.perf_counter() - start


def _bench(cluster: LocalCluster, jobs: int, batch: int, timeout: float) -> float:
    with Driver(cluster.clients_ep, cluster.events_ep) as driver:
        driver.warm_up()
        out = driver.run([NOOP] * jobs, batch, timeout=timeout)
    if out.timed_out or len(out.final) < jobs:
        raise BenchError(f"bench side: {len(out.final)} of {jobs} jobs finished")
    return out.end - out.first_send


def run(cfg: Config, out: Path, bar: Bar) -> dict[str, Path]:
    """Measure both sides on one local cluster; write report.json and report.md."""
    cluster = LocalCluster(None, cfg.agents, cfg.slots, workdir=out / "cluster")
    seconds: dict[str, list[float]] = {"bench": [], "cli": []}
    try:
        bar.phase(f"starting a master and {cfg.agents}x{cfg.slots} agents")
        cluster.start()
        _bench(cluster, min(cfg.jobs, 2000), cfg.batch, cfg.timeout)  # warm up both paths
        for r in range(cfg.repeat):
            order = ("bench", "cli") if r % 2 == 0 else ("cli", "bench")
            for side in order:
                bar.phase(f"run {r + 1}/{cfg.repeat}: {side}, {cfg.jobs:,} noop jobs")
                took = (_bench(cluster, cfg.jobs, cfg.batch, cfg.timeout) if side == "bench"
                        else _cli(cluster, cfg.jobs, cfg.timeout))
                seconds[side].append(took)
        startup = statistics.median(_startup() for _ in range(3))
    finally:
        cluster.stop()
    rates = {k: [cfg.jobs / s for s in v] for k, v in seconds.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    report: dict[str, Any] = {
        "tool": "ffrtmp bench wait", "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine(), "config": cfg.__dict__,
        "seconds": seconds, "jobs_per_s": rates, "median_jobs_per_s": med,
        "ratio_cli_to_bench": med["cli"] / med["bench"], "cli_startup_s": startup,
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# ffrtmp bench wait ({report['created_at']})", "",
        f"{cfg.jobs:,} noop jobs per run on one master with {cfg.agents}x{cfg.slots} agent "
        f"slots (SQLite), {cfg.repeat} runs per side, alternating.", "",
        "| side | jobs/s (median) | runs |", "|---|---|---|",
        *(f"| {k} | {med[k]:,.0f} | {', '.join(f'{x:,.0f}' for x in rates[k])} |"
          for k in ("bench", "cli")),
        "", f"Ratio cli/bench: **{report['ratio_cli_to_bench']:.2f}** (the CLI's wall time "
        f"includes its start-up, {startup * 1000:.0f} ms for `ffrtmp --help`).", ""]
    paths["md"].write_text("\n".join(lines))
    bar.phase(f"cli/bench = {report['ratio_cli_to_bench']:.2f} "
              f"({med['cli']:,.0f} vs {med['bench']:,.0f} jobs/s)")
    return paths
