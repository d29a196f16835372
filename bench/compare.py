"""`ffrtmp bench compare`: ffrtmp against Celery and RQ, on equal terms, in one run.

Equal terms: the same machine at the same time, the same number of no-op tasks, the same
concurrency C (ffrtmp: 1 agent x C slots; Celery: one prefork worker `-c C`; RQ: a worker pool of
C workers; RQ is measured twice, with its default Worker, which forks a work horse per job, and
with its SimpleWorker, which does not), each system's own bulk submission path, and the same
clock: from the first submission to the client seeing the last result, with every worker started
and warmed up beforehand (start-up is not in the rates). The sides alternate: round i starts with
side i mod 4, so drift on a shared machine favours none, and each ratio is taken within a round
before its median is.

Celery and RQ use a redis-server this mode starts itself (a free loopback port, a temp dir,
persistence off: `--save "" --appendonly no`), flushed before every side. ffrtmp runs through the
machinery of `ffrtmp bench` (bench/run.py `run_once`: a fresh master, agent and SQLite file per
round), which commits every transition before acting on it.

The Celery app and the RQ job live here too: the Celery worker is started as
`celery -A bench.compare:celery_app` (built on first access, from FFRTMP_COMPARE_REDIS), the RQ
workers import `bench.compare.noop_job`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.profiles import BenchError, Profile, workload

if TYPE_CHECKING:
    from bench.progress import Bar

# The RQ work horse (a fork per job) imports this module for `noop_job`, and the Celery worker
# for its app: what else the bench needs (the cluster, psutil, ...) is imported where it is used,
# so neither pays for it per task.

SIDES = ("ffrtmp", "celery", "rq", "rq-simple")
RQ_WORKERS = {"rq": "rq.worker.Worker", "rq-simple": "rq.worker.SimpleWorker"}
REDIS_ENV = "FFRTMP_COMPARE_REDIS"
RQ_QUEUE = "ffrtmp-compare"
CELERY_TASK = "ffrtmp_compare.noop"
POLL_S = 0.005  # how often the RQ client looks at its registries (the result's resolution)

GUARANTEES = {
    "ffrtmp": "every transition (queued, assigned, completed) is committed to SQLite (a fresh "
              "file; WAL, synchronous=NORMAL: it survives a process crash, a power loss may "
              "undo the last commits) before the master acts on it or tells the client; a "
              "master crash loses no accepted job, an agent crash requeues its jobs; the "
              "client sees a job done only after that commit (the terminal STATE event)",
    "celery": "Redis broker and result backend without persistence (`--save \"\" --appendonly "
              "no`): a Redis restart loses queued tasks and results; Celery's defaults: the "
              "worker acknowledges a task when it receives it (acks_late off: a worker crash "
              "loses the tasks it holds), prefetch multiplier 4, JSON serializer",
    "rq": "the same Redis without persistence holds queue, jobs and results; RQ's default Worker "
          "forks a work horse per job (a crashed horse fails only its job; a lost worker's job "
          "is moved to the failed registry by a later cleanup)",
    "rq-simple": "as rq, but with RQ's SimpleWorker, which runs every job in the worker process "
                 "itself (no fork: a job that crashes takes the worker with it); RQ's fastest "
                 "mode, the one closest to ffrtmp's in-agent noop",
}
SUBMISSION = {
    "ffrtmp": "SUBMIT of 1,000 specs per request; completions followed on the events socket",
    "celery": "`group(noop.s() x N).apply_async()`, then `GroupResult.get()` (native join on "
              "the Redis backend)",
    "rq": "`Queue.enqueue_many` in one Redis pipeline; completion polled every 5 ms in the "
          "finished/failed registries",
    "rq-simple": "as rq",
}


@dataclass
class Config:
    """What `ffrtmp bench compare` measures."""

    concurrency: int = 2
    jobs: int = 5_000
    repeat: int = 3
    timeout: float | None = None

    def load_timeout(self) -> float:
        """Seconds one side's load may take (RQ's Worker forks a process per job: ~15 jobs/s
        here, so the floor is 5 jobs/s)."""
        return self.timeout or 60.0 + self.jobs / 5


# ---- the tasks (imported by the Celery worker and the RQ workers) ---------------------------


def noop_job() -> None:
    """RQ's no-op job."""
    return None


_CELERY: Any = None
_CLIENT_APPS: dict[str, Any] = {}  # the bench's own client apps, one per Redis URL


def _make_app(url: str) -> Any:
    """A Celery app on Redis `url` (broker and result backend) with the noop task."""
    from celery import Celery

    app = Celery("ffrtmp_compare", broker=url, backend=url)
    app.conf.update(broker_connection_retry_on_startup=True, result_expires=3600,
                    worker_hijack_root_logger=False, worker_redirect_stdouts=False)

    @app.task(name=CELERY_TASK)
    def noop() -> None:
        return None

    return app


def _celery_app() -> Any:
    global _CELERY
    if _CELERY is None:
        url = os.environ.get(REDIS_ENV)
        if not url:  # never a Redis of someone else's by default
            raise RuntimeError(f"{REDIS_ENV} is not set (the bench's own redis-server URL)")
        _CELERY = _make_app(url)
    return _CELERY


def __getattr__(name: str) -> Any:  # `celery -A bench.compare:celery_app`, built lazily
    if name == "celery_app":
        return _celery_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- processes -------------------------------------------------------------------------------


def _env(redis_url: str) -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, REDIS_ENV: redis_url,
            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:  # the child keeps its own copy
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # what lingers in the group (pool children)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tree_cpu(pids: list[int]) -> float:
    """CPU seconds of these processes, their live descendants and their reaped children."""
    import psutil

    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


class Redis:
    """A redis-server of our own: free loopback port, temp dir, no persistence."""

    def __init__(self, workdir: Path) -> None:
        from bench.cluster import free_ports

        self.workdir = workdir
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        """redis:// URL of database `db`."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 20.0) -> None:
        """Start it and wait until it answers PING."""
        import redis

        exe = shutil.which("redis-server")
        if exe is None:
            raise BenchError("redis-server not found: apt-get install redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = _spawn([exe, "--port", str(self.port), "--bind", "127.0.0.1",
                            "--dir", str(self.workdir), "--save", "", "--appendonly", "no",
                            "--daemonize", "no", "--protected-mode", "yes",
                            "--logfile", ""], self.workdir / "redis.log", dict(os.environ))
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_timeout=1.0)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise BenchError(f"redis-server exited with status {self.proc.returncode}; "
                                     f"log in {self.workdir / 'redis.log'}")
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if client.ping():
                        return
                time.sleep(0.05)  # start-up poll in a tool, not a test
        finally:
            client.close()
        raise BenchError(f"redis-server did not answer on port {self.port} in {timeout:g}s")

    def flush(self) -> None:
        """Empty every database (between sides)."""
        import redis

        with redis.Redis(port=self.port) as r:
            r.flushall()

    def version(self) -> str:
        """The server's version."""
        import redis

        with redis.Redis(port=self.port) as r:
            return str(r.info("server").get("redis_version"))

    def pid(self) -> int:
        """The server's pid."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """Stop it (nothing is saved: persistence is off)."""
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


def check_available() -> None:
    """BenchError with the one thing to do if redis-server, Celery, RQ or redis-py is missing."""
    if shutil.which("redis-server") is None:
        raise BenchError("redis-server not found: apt-get install redis-server")
    missing = []
    for mod in ("celery", "rq", "redis"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise BenchError(f"{', '.join(missing)} not installed: pip install 'ffrtmp[compare]'")


def _ver(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- the sides -------------------------------------------------------------------------------


def _side(name: str, jobs: int, completed: int, seconds: float, server_cpu: float | None,
          client_cpu: float | None, **extra: Any) -> dict[str, Any]:
    return {"side": name, "jobs": jobs, "completed": completed, "failed": jobs - completed,
            "duration_s": round(seconds, 4),
            "rate": round(completed / seconds, 1) if seconds > 0 else None,
            "server_cpu_s": round(server_cpu, 3) if server_cpu is not None else None,
            "server_cpu_us_per_task": (round(1e6 * server_cpu / jobs, 1)
                                       if server_cpu is not None else None),
            "client_cpu_s": round(client_cpu, 3) if client_cpu is not None else None, **extra}


def run_ffrtmp(cfg: Config, index: int, workdir: Path, bar: Bar) -> dict[str, Any]:
    """1 agent x C slots, noop, a fresh SQLite file: `ffrtmp bench`'s own run, once."""
    from bench.run import RunSpec, run_once

    prof = Profile("compare", jobs=cfg.jobs, agents=1, slots=cfg.concurrency, batch=1000,
                   latency_samples=0)
    spec = RunSpec(profile=prof, workload=workload("noop"), db="sqlite",
                   timeout=cfg.load_timeout(), label="compare/ffrtmp")
    f = run_once(spec, index, workdir, bar)
    procs = f.get("processes") or {}
    server = ((procs.get("master") or {}).get("cpu_s") or 0.0) + \
        ((procs.get("agents") or {}).get("cpu_s") or 0.0)
    return _side("ffrtmp", f["jobs"], f["completed"], f["duration_s"], server,
                 (procs.get("bench") or {}).get("cpu_s"),
                 master_cpu_us_per_job=(procs.get("master") or {}).get("cpu_us_per_job"))


def run_celery(cfg: Config, redis_srv: Redis, workdir: Path, bar: Bar) -> dict[str, Any]:
    """One prefork worker `-c C`; the client sends a group of N noops and joins it."""
    from celery import group

    url = redis_srv.url(0)
    if url not in _CLIENT_APPS:  # one per process: Celery warns of a task registered twice
        _CLIENT_APPS[url] = _make_app(url)
    app = _CLIENT_APPS[url]
    noop = app.tasks[CELERY_TASK]
    bar.phase(f"celery: starting a prefork worker -c {cfg.concurrency}")
    worker = _spawn([sys.executable, "-m", "celery", "-A", "bench.compare:celery_app", "worker",
                     "-P", "prefork", "-c", str(cfg.concurrency), "-l", "warning",
                     "--without-gossip", "--without-mingle", "--without-heartbeat",
                     "-n", f"compare{os.getpid()}@localhost"],
                    workdir / "celery.log", _env(url))
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the Celery worker did not come up; log in {workdir}")
        # warm-up, not measured: every pool process has run a task
        group(noop.s() for _ in range(4 * cfg.concurrency)).apply_async().get(timeout=60)
        bar.phase(f"celery: {cfg.jobs:,} noop tasks at concurrency {cfg.concurrency}")
        server0 = _tree_cpu([worker.pid, redis_srv.pid()])
        c0, t0 = time.process_time(), time.perf_counter()
        res = group(noop.s() for _ in range(cfg.jobs)).apply_async()
        try:
            res.get(timeout=cfg.load_timeout(), propagate=False)
        except Exception as e:  # a timeout: what completed is counted below
            bar.phase(f"celery: {type(e).__name__}: {e}")
        seconds = time.perf_counter() - t0
        client = time.process_time() - c0
        server = _tree_cpu([worker.pid, redis_srv.pid()]) - server0
        completed = res.completed_count()
    finally:
        _stop(worker)
    return _side("celery", cfg.jobs, completed, seconds, server, client,
                 pool="prefork", workers=1, worker_concurrency=cfg.concurrency)


def run_rq(cfg: Config, redis_srv: Redis, workdir: Path, bar: Bar,
           side: str = "rq") -> dict[str, Any]:
    """`rq worker-pool -n C -w <class>`; the client enqueues N noops in one pipeline and waits
    for all."""
    from redis import Redis as Client
    from rq import Queue, Worker

    url = redis_srv.url(1)
    conn = Client.from_url(url)
    queue = Queue(RQ_QUEUE, connection=conn)
    cls = RQ_WORKERS[side]
    bar.phase(f"{side}: starting a worker pool of {cfg.concurrency} ({cls})")
    pool = _spawn([sys.executable, "-c", "from rq.cli import main; main()", "worker-pool",
                   "-n", str(cfg.concurrency), "-w", cls, "-u", url, "-l", "WARNING", RQ_QUEUE],
                  workdir / "rq.log", _env(url))
    try:
        deadline = time.monotonic() + 60
        while len(Worker.all(connection=conn)) < cfg.concurrency:
            if pool.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the RQ workers did not come up; log in {workdir}")
            time.sleep(0.05)  # start-up poll in a tool, not a test
        finished, failed = queue.finished_job_registry, queue.failed_job_registry

        def settled() -> int:
            return finished.get_job_count(cleanup=False) + failed.get_job_count(cleanup=False)

        # warm-up, not measured: every worker has run a job
        _rq_load(queue, conn, 4 * cfg.concurrency, settled, 0, time.monotonic() + 60)
        base, done0 = settled(), finished.get_job_count(cleanup=False)
        bar.phase(f"{side}: {cfg.jobs:,} noop jobs on {cfg.concurrency} workers")
        server0 = _tree_cpu([pool.pid, redis_srv.pid()])
        c0, t0 = time.process_time(), time.perf_counter()
        _rq_load(queue, conn, cfg.jobs, settled, base, time.monotonic() + cfg.load_timeout())
        seconds = time.perf_counter() - t0
        client = time.process_time() - c0
        server = _tree_cpu([pool.pid, redis_srv.pid()]) - server0
        completed = finished.get_job_count(cleanup=False) - done0
    finally:
        _stop(pool)
        conn.close()
    return _side(side, cfg.jobs, max(0, completed), seconds, server, client,
                 workers=cfg.concurrency, worker_class=cls)


def _rq_load(queue: Any, conn: Any, n: int, settled: Any, base: int, deadline: float) -> None:
    from rq import Queue

    datas = [Queue.prepare_data("bench.compare.noop_job", result_ttl=3600) for _ in range(n)]
    with conn.pipeline() as pipe:
        queue.enqueue_many(datas, pipeline=pipe)
        pipe.execute()
    while settled() - base < n and time.monotonic() < deadline:
        time.sleep(POLL_S)  # the client's completion poll (RQ has no completion stream)


# ---- the mode --------------------------------------------------------------------------------


def _spread(values: list[float | None]) -> dict[str, Any]:
    xs = [v for v in values if v is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3),
            "max": round(max(xs), 3), "n": len(xs)}


def run(cfg: Config, out: Path, bar: Bar) -> dict[str, Path]:
    """`repeat` rounds of the sides, alternating; report.json + report.md in out."""
    if cfg.concurrency < 1 or cfg.jobs < 1 or cfg.repeat < 1:
        raise BenchError("--concurrency, --jobs and --repeat must be at least 1")
    check_available()
    base = Path(tempfile.mkdtemp(prefix="ffrtmp-compare-"))
    redis_srv = Redis(base / "redis")
    rounds: list[dict[str, Any]] = []
    started = time.monotonic()
    done = False
    try:
        redis_srv.start()
        redis_version = redis_srv.version()
        for i in range(cfg.repeat):
            k = i % len(SIDES)
            order = [*SIDES[k:], *SIDES[:k]]
            rnd: dict[str, Any] = {"round": i + 1, "order": order}
            for side in order:
                bar.label = f"compare round {i + 1}/{cfg.repeat} {side} "
                bar.phase(f"round {i + 1}/{cfg.repeat}: {side} "
                          f"({time.monotonic() - started:.0f}s elapsed)")
                work = base / f"r{i}-{side}"
                work.mkdir(parents=True, exist_ok=True)
                if side == "ffrtmp":
                    rnd[side] = run_ffrtmp(cfg, i, work, bar)
                else:
                    redis_srv.flush()
                    if side == "celery":
                        rnd[side] = run_celery(cfg, redis_srv, work, bar)
                    else:
                        rnd[side] = run_rq(cfg, redis_srv, work, bar, side)
            rnd["ratios"] = {f"ffrtmp/{s}": (round(rnd["ffrtmp"]["rate"] / rnd[s]["rate"], 3)
                                             if rnd[s]["rate"] else None)
                             for s in SIDES[1:]}
            rounds.append(rnd)
        done = True
    finally:
        for app in _CLIENT_APPS.values():
            app.close()
        _CLIENT_APPS.clear()
        redis_srv.stop()
        if done:
            shutil.rmtree(base, ignore_errors=True)
        else:
            bar.phase(f"compare did not finish: logs kept in {base}")
    doc = _doc(cfg, rounds, redis_version, time.monotonic() - started)
    from bench.report import write_plain

    return write_plain(out, doc, markdown(doc))


def _doc(cfg: Config, rounds: list[dict[str, Any]], redis_version: str,
         elapsed: float) -> dict[str, Any]:
    from bench.env import machine

    sides = {}
    for s in SIDES:
        rs = [r[s] for r in rounds]
        sides[s] = {"jobs": cfg.jobs, "completed": min(x["completed"] for x in rs),
                    "failed": max(x["failed"] for x in rs),
                    "rate": _spread([x["rate"] for x in rs]),
                    "duration_s": _spread([x["duration_s"] for x in rs]),
                    "server_cpu_us_per_task": _spread([x["server_cpu_us_per_task"] for x in rs]),
                    "guarantees": GUARANTEES[s], "submission": SUBMISSION[s]}
    ratios = {k: {**_spread([r["ratios"][k] for r in rounds]),
                  "per_round": [r["ratios"][k] for r in rounds],
                  "of_medians": (round(sides["ffrtmp"]["rate"]["median"]
                                       / sides[k.split("/")[1]]["rate"]["median"], 3)
                                 if sides[k.split("/")[1]]["rate"]["median"] else None)}
              for k in (f"ffrtmp/{s}" for s in SIDES[1:])}
    return {
        "tool": "ffrtmp bench compare", "schema": 1,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": {"concurrency": cfg.concurrency, "jobs": cfg.jobs, "repeat": cfg.repeat,
                   "ffrtmp": f"1 agent x {cfg.concurrency} slots, noop, SQLite (fresh file)",
                   "celery": f"1 prefork worker -c {cfg.concurrency}, Redis broker + backend",
                   "rq": f"rq worker-pool -n {cfg.concurrency} (Worker: a fork per job), Redis",
                   "rq-simple": f"rq worker-pool -n {cfg.concurrency} -w SimpleWorker, Redis",
                   "redis": redis_version, "celery_version": _ver("celery"),
                   "rq_version": _ver("rq"), "redis_py_version": _ver("redis"),
                   "order": f"alternating: round i starts with side i mod {len(SIDES)}",
                   "clock": "first submission -> last result seen by the client; workers "
                            "started and warmed up before (start-up excluded)"},
        "elapsed_s": round(elapsed, 1),
        "sides": sides, "ratios": ratios, "rounds": rounds,
    }


def markdown(doc: dict[str, Any]) -> str:
    """The human-readable report."""
    from bench.report import cell
    cfg, m, sides, ratios = doc["config"], doc["machine"], doc["sides"], doc["ratios"]
    c = cfg["concurrency"]
    lines = [
        "# ffrtmp bench compare: ffrtmp, Celery and RQ on equal terms", "",
        f"{doc['created_at']} · {m['cpus']} CPUs ({m['cpu_model']}) · Python {m['python']} · "
        f"Redis {cfg['redis']}, Celery {cfg['celery_version']}, RQ {cfg['rq_version']}, "
        f"redis-py {cfg['redis_py_version']} · {doc['elapsed_s']:.0f} s in all", "",
        f"{cfg['jobs']:,} no-op tasks per side per round at concurrency {c}, {cfg['repeat']} "
        f"round(s), sides alternating (round i starts with side i mod {len(SIDES)}). "
        "Rate = tasks / (first submission → last result seen by the client); workers started "
        "and warmed up before the clock starts. Medians, min – max beside them; each ratio is "
        "taken within a round, then its median.", "",
        "| side | setup | done/tasks (worst) | tasks/s median | min – max | server CPU µs/task |",
        "|---|---|---|---|---|---|",
    ]
    for s in SIDES:
        x = sides[s]
        lines.append(f"| {s} | {cfg[s]} | {x['completed']:,}/{x['jobs']:,} | "
                     f"{cell(x['rate']['median'])} | {cell(x['rate']['min'])} – "
                     f"{cell(x['rate']['max'])} | {cell(x['server_cpu_us_per_task']['median'])} |")
    lines += ["", "| ratio | median of rounds | min – max | per round | of the medians |",
              "|---|---|---|---|---|"]
    for k, r in ratios.items():
        lines.append(f"| {k} | **{cell(r['median'], 2)}** | {cell(r['min'], 2)} – "
                     f"{cell(r['max'], 2)} | {', '.join(cell(v, 2) for v in r['per_round'])} | "
                     f"{cell(r['of_medians'], 2)} |")
    lines += ["", "Server CPU: ffrtmp master + agent; Celery worker and its pool + redis-server; "
              "RQ pool, workers and work horses + redis-server (kernel counters, during the "
              "load).", "", "## Rounds (tasks/s)", "",
              "| round | order | " + " | ".join(SIDES) + " | "
              + " | ".join(f"ffrtmp/{s}" for s in SIDES[1:]) + " |",
              "|---|---|" + "---|" * (2 * len(SIDES) - 1)]
    for r in doc["rounds"]:
        lines.append(f"| {r['round']} | {' → '.join(r['order'])} | "
                     + " | ".join(cell(r[s]["rate"]) for s in SIDES) + " | "
                     + " | ".join(cell(r["ratios"][f"ffrtmp/{s}"], 2) for s in SIDES[1:]) + " |")
    lines += ["", "## What each side guarantees", ""]
    lines += [f"- **{s}**: {GUARANTEES[s]}." for s in SIDES]
    lines += ["", "## How each side submits and waits", ""]
    lines += [f"- **{s}**: {SUBMISSION[s]}." for s in SIDES]
    return "\n".join(lines) + "\n"
