"""One bench configuration, run `repeat` times on fresh clusters: the figures of each run."""

from __future__ import annotations

import collections
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import observe
from bench.cluster import LocalCluster
from bench.direct import ffmpeg_version, resolve, run_direct
from bench.env import db_version, fresh_db
from bench.load import Driver, LoadError, Outcome
from bench.profiles import BenchError, Profile, Workload
from bench.progress import Bar
from bench.stats import rate, summary
from bus.scenarios import ScenarioError, parse_testsrc

PRELOAD_BATCH = 5000


@dataclass
class RunSpec:
    """A configuration to measure (locally started, or against `target` if given)."""

    profile: Profile
    workload: Workload
    db: str = "sqlite"
    pg: str | None = None  # server for fresh PostgreSQL databases
    target: str | None = None  # client endpoint of a running master
    events: str | None = None  # its events endpoint
    metrics_url: str | None = None  # its /metrics
    repeat: int = 1
    rate: float | None = None  # jobs/s (open loop); None = as fast as the master takes them
    timeout: float | None = None
    direct: bool = True  # ffmpeg: also run the identical commands through xargs -P
    label: str = ""
    workdir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def topology(self) -> str:
        """'3 x 4' or '200 sim x 4' or 'remote'."""
        if self.target:
            return "remote"
        sim = " sim" if self.profile.simulated else ""
        return f"{self.profile.agents}{sim} x {self.profile.slots}"

    def slots(self) -> int:
        """Total slots of the local topology."""
        return self.profile.agents * self.profile.slots

    def describe(self) -> dict[str, Any]:
        """The configuration as plain data (for report.json)."""
        return {"profile": asdict(self.profile), "workload": asdict(self.workload),
                "spec": self.workload.spec(), "db": "remote" if self.target else self.db,
                "target": self.target, "events": self.events, "repeat": self.repeat,
                "rate": self.rate, "timeout_s": self.load_timeout(), "topology": self.topology(),
                "label": self.label, **self.extra}

    def load_timeout(self) -> float:
        """Seconds the load phase may take before the run gives up."""
        if self.timeout:
            return self.timeout
        p = self.profile
        parallel = max(1, min(p.agents * p.slots, 1024))
        return 60.0 + 3 * p.jobs * self.workload.est_job_s() / parallel + p.jobs / 500


def _check(spec: RunSpec) -> None:
    p = spec.profile
    if p.jobs < 1:
        raise BenchError("--jobs must be at least 1")
    if p.agents < 1 or p.slots < 1:
        raise BenchError("--agents and --slots must be at least 1")
    if spec.repeat < 1:
        raise BenchError("--repeat must be at least 1")
    if p.simulated and spec.workload.name != "noop" and not spec.target:
        raise BenchError(f"profile {p.name} uses simulated agents, which run noop only "
                         f"(not {spec.workload.name}): use --workload noop or another profile")
    if spec.target and not spec.events:
        raise BenchError("--master needs --events too (the bench follows jobs by their events)")


def run_all(spec: RunSpec, bar: Bar) -> list[dict[str, Any]]:
    """Every repetition's figures, in order."""
    _check(spec)
    base = spec.workdir or Path(tempfile.mkdtemp(prefix="ffrtmp-bench-"))
    runs = []
    try:
        for i in range(spec.repeat):
            bar.label = f"{spec.label or spec.profile.name} run {i + 1}/{spec.repeat} "
            runs.append(run_once(spec, i, base / f"run{i}", bar))
    finally:
        if spec.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    return runs


def run_once(spec: RunSpec, index: int, workdir: Path, bar: Bar) -> dict[str, Any]:
    """One repetition: start (or reach) a cluster, probe, load, collect every figure."""
    p, w = spec.profile, spec.workload
    cluster: LocalCluster | None = None
    cleanup = None
    figures: dict[str, Any] = {"run": index + 1}
    try:
        if spec.target:
            clients, events, metrics_url = spec.target, spec.events or "", spec.metrics_url
            procs: dict[str, Any] = {}
        else:
            db_url, backend, cleanup = fresh_db(spec.db, workdir, spec.pg)
            figures["database"] = db_version(db_url)
            bar.phase(f"starting master ({backend}) + {spec.topology()} slots "
                      f"{'simulated ' if p.simulated else ''}agents")
            cluster = LocalCluster(db_url, p.agents, p.slots, workdir=workdir, metrics=True,
                                   simulated=p.simulated)
            cluster.start(timeout=60 + p.agents * 0.2)
            clients, events, metrics_url = (cluster.clients_ep, cluster.events_ep,
                                            cluster.metrics_url)
            procs = cluster.processes()
        with Driver(clients, events) as driver:
            driver.warm_up()
            if p.idle_s:
                figures["idle"] = _idle(procs, p.idle_s, metrics_url, bar)
            if p.latency_samples:
                figures["unloaded_latency_ms"] = _probe(driver, p.latency_samples, bar)
            if p.queued:
                _preload(driver, p.queued, bar)
            figures["queued_before"] = p.queued
            direct_first = index % 2 == 1  # alternate the order so drift favours neither
            if w.name == "ffmpeg" and spec.direct and direct_first:
                figures["direct"] = _direct(spec, workdir, bar)
            figures.update(_load(spec, driver, procs, metrics_url, bar))
            if w.name == "ffmpeg":
                figures["ffmpeg"] = _ffmpeg_figures(driver, figures.pop("_ids"), w.spec())
                if spec.direct and not direct_first:
                    figures["direct"] = _direct(spec, workdir, bar)
                if "direct" in figures:
                    figures["ffmpeg"].update(_overhead(figures))
            figures.pop("_ids", None)
    except LoadError as e:
        raise BenchError(str(e)) from e
    finally:
        if cluster is not None:
            cluster.stop()
        if cleanup is not None:
            cleanup()
    return figures


def _idle(procs: dict[str, Any], seconds: float, metrics_url: str | None,
          bar: Bar) -> dict[str, Any]:
    bar.phase(f"measuring idle CPU for {seconds:g}s (agents connected, no jobs)")
    sampler = observe.ProcSampler(procs).start()
    before = observe.scrape(metrics_url)
    time.sleep(seconds)  # the measurement window itself
    after = observe.scrape(metrics_url)
    res = sampler.stop()
    out: dict[str, Any] = {"seconds": seconds}
    if "master" in res:
        out["master_cpu_pct"] = res["master"]["cpu_pct"]
        out["master_rss_mb"] = res["master"]["peak_rss_mb"]
    m = observe.metrics_figures(before, after, seconds)
    if m is not None:
        out["bus_messages_per_s"] = m["bus"]["messages_per_s"]
    return out


def _probe(driver: Driver, samples: int, bar: Bar) -> dict[str, Any]:
    bar.phase(f"unloaded latency: {samples} single noop jobs, one at a time")
    o = driver.run([{"scenario": "noop"}] * samples, batch=1, concurrency=1,
                   timeout=30 + samples * 0.5)
    out = summary(o.latency_ms)
    out["breakdown"] = {k: summary(v) for k, v in o.breakdown_ms.items()}
    return out


def _preload(driver: Driver, n: int, bar: Bar) -> None:
    """Queue n low-priority noops that stay queued behind the measured (high) jobs."""
    bar.phase(f"queueing {n:,} low-priority jobs (agents drained) before the measured load")
    names = [node["name"] for node in driver.call("NODES")["nodes"]
             if node["state"] == "alive"]
    for name in names:
        driver.call("DRAIN", name=name, on=True)
    try:
        for i in range(0, n, PRELOAD_BATCH):
            driver.call("SUBMIT", specs=[{"scenario": "noop", "priority": "low"}]
                        * min(PRELOAD_BATCH, n - i))
    finally:
        for name in names:
            driver.call("DRAIN", name=name, on=False)


def _load(spec: RunSpec, driver: Driver, procs: dict[str, Any], metrics_url: str | None,
          bar: Bar) -> dict[str, Any]:
    p, w = spec.profile, spec.workload
    job = w.spec()
    if p.queued:
        job = {**job, "priority": "high"}
    specs = [job] * p.jobs
    bar.phase(f"load: {p.jobs:,} {w.describe()} jobs, {p.batch} per SUBMIT"
              + (f", {spec.rate:g} jobs/s" if spec.rate else ""))
    sampler = observe.ProcSampler(procs).start()
    before = observe.scrape(metrics_url)
    cpu0 = observe.self_cpu()
    o = driver.run(specs, p.batch, rate=spec.rate, timeout=spec.load_timeout(),
                   sample_s=0.02, on_progress=bar.update)
    bench_cpu = observe.self_cpu() - cpu0
    window = time.perf_counter() - o.first_send
    after = observe.scrape(metrics_url)
    res = sampler.stop()
    return {**_figures(o, window), "processes": _processes(res, bench_cpu, window, o.jobs),
            "metrics": observe.metrics_figures(before, after, window), "_ids": o.ids}


def _figures(o: Outcome, window: float) -> dict[str, Any]:
    completed = sum(1 for s, _ in o.final.values() if s == "completed")
    failures: collections.Counter[str] = collections.Counter(
        f"{s}:{r or '-'}" for s, r in o.final.values() if s != "completed")
    unfinished = o.jobs - len(o.final)
    if unfinished:
        failures["unfinished"] = unfinished
    duration = o.end - o.first_send
    span = (max(o.assigned_at) - min(o.assigned_at)) if len(o.assigned_at) > 1 else 0.0
    return {
        "jobs": o.jobs,
        "completed": completed,
        "failed": o.jobs - completed,
        "duration_s": round(duration, 3),
        "submit_rate": rate(o.jobs, o.last_reply - o.first_send),
        # first to last assignment, on the master's clock
        "dispatch_rate": rate(len(o.assigned_at), span) if span else None,
        "completion_rate": rate(completed, duration),
        "latency_ms": summary(o.latency_ms),
        "queue_wait_ms": summary(o.queue_wait_ms),
        "breakdown_ms": {k: summary(v) for k, v in o.breakdown_ms.items()},
        "failures_by_reason": dict(failures),
        "events_missed": o.events_missed,
        "timed_out": o.timed_out,
        "submit_requests": o.requests,
        "timeline": [[round(s.t, 3), s.submitted, s.dispatched, s.done, s.failed]
                     for s in _thin(o.timeline, 600)],
        "_latencies": o.latency_ms,
    }


def _thin(rows: list[Any], most: int) -> list[Any]:
    """At most `most` rows, evenly spaced, always keeping the first and the last."""
    if len(rows) <= most:
        return rows
    step = (len(rows) - 1) / (most - 1)
    return [rows[round(i * step)] for i in range(most)]


def _processes(res: dict[str, dict[str, float]], bench_cpu: float, window: float,
               jobs: int) -> dict[str, Any]:
    agents = {k: v for k, v in res.items() if k != "master"}
    out: dict[str, Any] = {}
    if "master" in res:
        # CPU per job is the figure that noise from other processes barely moves
        out["master"] = {**res["master"],
                         "cpu_us_per_job": round(1e6 * res["master"]["cpu_s"] / jobs, 1)}
    if agents:
        out["agents"] = {
            "count": len(agents),
            "cpu_s": round(sum(a["cpu_s"] for a in agents.values()), 3),
            "cpu_pct": round(sum(a["cpu_pct"] for a in agents.values()), 1),
            "children_cpu_s": round(sum(a["children_cpu_s"] for a in agents.values()), 3),
            "peak_rss_mb": max(a["peak_rss_mb"] for a in agents.values()),
            "peak_rss_with_children_mb": max(a["peak_rss_with_children_mb"]
                                             for a in agents.values()),
        }
        out["agents"]["cpu_us_per_job"] = round(1e6 * out["agents"]["cpu_s"] / jobs, 1)
    out["bench"] = {"cpu_s": round(bench_cpu, 3),
                    "cpu_pct": round(100 * bench_cpu / window, 1) if window > 0 else None}
    return out


def _frames(spec: dict[str, Any]) -> float | None:
    """Output frames of a testsrc job (duration x output fps), else None."""
    try:
        preset = resolve(spec)["preset"]
        src = parse_testsrc(spec["input"])
    except (BenchError, ScenarioError, KeyError, TypeError):
        return None
    fps = preset.get("fps") or src["rate"]
    return float(src["duration"]) * float(fps) if preset.get("encoder") else None


def _ffmpeg_figures(driver: Driver, ids: list[int], spec: dict[str, Any]) -> dict[str, Any]:
    jobs = driver.get_jobs(ids)
    extra = [j.get("extra") or {} for j in jobs if j["state"] == "completed"]
    num = (int, float)
    durations = [e["duration_s"] for e in extra if isinstance(e.get("duration_s"), num)]
    frames = _frames(spec)
    return {
        # frames / the job's wall time on the agent (process start to exit)
        "fps": summary(frames / d for d in durations if d > 0) if frames else summary([]),
        # what ffmpeg last reported in its -progress output (0 early in a short job)
        "reported_fps": summary(e["fps"] for e in extra if isinstance(e.get("fps"), num)),
        "speed": summary(e["speed"] for e in extra if isinstance(e.get("speed"), num)),
        "job_duration_s": summary(durations),
    }


def _direct(spec: RunSpec, workdir: Path, bar: Bar) -> dict[str, Any]:
    parallel = spec.slots()
    bar.phase(f"baseline: the same {spec.profile.jobs} ffmpeg commands via xargs -P {parallel}")
    out = run_direct([spec.workload.spec()] * spec.profile.jobs, parallel, workdir)
    return out


def _overhead(figures: dict[str, Any]) -> dict[str, Any]:
    direct = figures["direct"]["makespan_s"]
    agent = figures["duration_s"]
    pct = 100 * (agent / direct - 1) if direct > 0 else math.nan
    out = {"agent_makespan_s": agent, "direct_makespan_s": direct,
           "overhead_pct": round(pct, 2)}
    procs = figures.get("processes") or {}
    ffmpeg_cpu = (procs.get("agents") or {}).get("children_cpu_s")
    if ffmpeg_cpu:
        # CPU is what noise from other processes hardly moves: the system's own CPU (master +
        # agents) per CPU second of ffmpeg, and ffmpeg's CPU under the agent vs run directly.
        system = (procs.get("master") or {}).get("cpu_s", 0.0) + procs["agents"]["cpu_s"]
        out["system_cpu_pct_of_ffmpeg"] = round(100 * system / ffmpeg_cpu, 2)
        out["ffmpeg_cpu_s"] = ffmpeg_cpu
        out["direct_cpu_s"] = figures["direct"].get("cpu_s")
    return out


def versions(spec: RunSpec) -> dict[str, Any]:
    """Versions that belong to this configuration (ffmpeg for ffmpeg runs)."""
    if spec.workload.name != "ffmpeg":
        return {}
    from agent.ffmpeg.discovery import find_ffmpeg

    return {"ffmpeg": ffmpeg_version(find_ffmpeg())}
