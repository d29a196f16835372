"""`ffrtmp bench`: parse, build a RunSpec (or a suite), run it, write the report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench.profiles import (
    CEILING_JOBS,
    PROFILES,
    WORKLOADS,
    BenchError,
    customize,
    profile,
    workload,
)

if TYPE_CHECKING:  # the rest of the bench is imported when it runs, not with `ffrtmp`'s grammar
    from bench import overhead
    from bench.run import RunSpec

MODES = ("run", "matrix", "depth", "store", "overhead", "wait", "dash-cost", "ceiling", "compare")
# The depth sweep measures the master's dispatch: many in-agent slots, 10k measured jobs.
DEPTH_DEFAULTS = {"agents": 3, "slots": 16, "jobs": 10_000, "batch": 1000, "latency_samples": 0}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the bench subcommand."""
    p = sub.add_parser(
        "bench", help="measure the system: throughput, latency, resources (writes a report)",
        description="Run a load profile against a local cluster it starts (or a running one) "
                    "and write report.json, report.md and plot.svg. `bench matrix` runs the "
                    "test matrix, `bench depth` the queue-depth sweep.")
    p.add_argument("mode", nargs="?", default="run",
                   metavar="{run,matrix,depth,store,overhead,wait,dash-cost,ceiling,compare}",
                   help="run (default): one profile; matrix: the comparison matrix; "
                        "depth: dispatch rate with 0, 10k, 100k jobs already queued; "
                        "store: what the database alone absorbs per group-commit size; "
                        "overhead: one agent's cost per job (sleep jobs against the ideal, "
                        "short ffmpeg jobs against xargs -P); wait: `ffrtmp submit --count N "
                        "--wait` against the bench's own driver on one cluster; dash-cost: CPU of "
                        "`ffrtmp dash` (in tmux) and of the master serving it at --rate "
                        "(default 1000) noop jobs/s, with and without, --repeat (default 3); "
                        "ceiling: the bus alone (raw pyzmq dispatch + ack, no database), "
                        "--agents x --slots (default 3 x 16), --jobs (default 20,000); compare: "
                        "ffrtmp, Celery and RQ at --concurrency (default 2), --jobs (default "
                        "5,000) each, alternating, --repeat (default 3)")
    p.add_argument("--profile", default="quick",
                   help=f"{', '.join(f'{k} ({v.jobs:,} jobs)' for k, v in PROFILES.items())}")
    p.add_argument("--workload", default="noop", help=f"{', '.join(WORKLOADS)} (default noop)")
    p.add_argument("--db", default="sqlite",
                   help="sqlite (a fresh file), postgresql (a fresh database on FFRTMP_BENCH_PG "
                        "or the local test server, dropped afterwards), or a URL used as is")
    p.add_argument("--pg", default=None, help="PostgreSQL server for fresh bench databases")
    p.add_argument("--agents", type=int, default=None, help="agents (default: the profile's)")
    p.add_argument("--slots", type=int, default=None, help="slots per agent")
    p.add_argument("--simulated", action="store_true",
                   help="simulate the agents in one process (noop only; the scale profile does)")
    p.add_argument("--jobs", type=int, default=None, help="jobs per run (default: the profile's)")
    p.add_argument("--batch", type=int, default=None, help="job specs per SUBMIT")
    p.add_argument("--rate", type=float, default=None,
                   help="submit at this many jobs/s (default: as fast as the master accepts)")
    p.add_argument("--queued", type=int, default=None,
                   help="low-priority jobs queued before the (high-priority) measured ones")
    p.add_argument("--idle", type=float, default=None,
                   help="seconds of idle master CPU to measure before the load")
    p.add_argument("--latency-samples", type=int, default=None,
                   help="unloaded single-job round trips measured before the load")
    p.add_argument("--sleep", type=float, default=None, help="seconds per sleep job (0.2)")
    p.add_argument("--scenario", default=None, help="ffmpeg scenario (720p-h264)")
    p.add_argument("--input", default=None, help="ffmpeg input (testsrc:duration=2)")
    p.add_argument("--no-direct", action="store_true",
                   help="ffmpeg: skip the xargs -P baseline")
    p.add_argument("--master", dest="target", default=None, metavar="EP",
                   help="client endpoint of a running master (nothing is started)")
    p.add_argument("--events", default=None, metavar="EP",
                   help="its events endpoint (needed with --master)")
    p.add_argument("--metrics-url", default=None,
                   help="its /metrics URL, for database and bus figures (with --master)")
    p.add_argument("--repeat", type=int, default=None, help="runs per configuration (median, "
                                                            "min-max; default 1, compare 3)")
    p.add_argument("--timeout", type=float, default=None, help="give up a load after S seconds")
    p.add_argument("--out", default=None, help="report directory (default: "
                                               "bench-out/<time>-<what>)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--depths", default="0,10000,100000",
                   help="depth mode: queue depths to compare (comma-separated)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="matrix mode: workloads to include")
    p.add_argument("--dbs", default="sqlite,postgresql", help="matrix and store modes: "
                                                              "databases")
    p.add_argument("--ffmpeg-jobs", type=int, default=None,
                   help="overhead mode: ffmpeg jobs per run (default 40; 0: sleep only)")
    p.add_argument("--tree", default=None, metavar="DIR",
                   help="overhead mode: run the master and agent from this source tree")
    p.add_argument("--baseline-tree", default=None, metavar="DIR",
                   help="overhead mode: also measure the master and agent of this source tree "
                        "(e.g. the previous commit), interleaved with the measured side")
    p.add_argument("--concurrency", type=int, default=2,
                   help="compare mode: tasks in parallel on every side (default 2)")
    p.add_argument("--ceiling-jobs", type=int, default=CEILING_JOBS,
                   help="run mode: jobs of the bus ceiling measured after the runs "
                        f"(default {CEILING_JOBS:,})")
    p.set_defaults(func=run)


def _spec(args: argparse.Namespace) -> RunSpec:
    from bench.run import RunSpec

    prof = customize(profile(args.profile), agents=args.agents, slots=args.slots,
                     jobs=args.jobs, batch=args.batch, queued=args.queued, idle_s=args.idle,
                     latency_samples=args.latency_samples,
                     simulated=True if args.simulated else None)
    wl = workload(args.workload, sleep_s=args.sleep, scenario=args.scenario, input=args.input)
    return RunSpec(profile=prof, workload=wl, db=args.db, pg=args.pg, target=args.target,
                   events=args.events, metrics_url=args.metrics_url, repeat=args.repeat,
                   rate=args.rate, timeout=args.timeout, direct=not args.no_direct,
                   label=f"{prof.name}/{wl.name}")


def _overhead_config(args: argparse.Namespace) -> overhead.Config:
    from bench import overhead

    cfg = overhead.Config(repeat=args.repeat, tree=args.tree, baseline_tree=args.baseline_tree,
                          timeout=args.timeout)
    for key, value in (("jobs", args.jobs), ("sleep_s", args.sleep), ("slots", args.slots),
                       ("ffmpeg_jobs", args.ffmpeg_jobs), ("scenario", args.scenario),
                       ("input", args.input)):
        if value is not None:
            setattr(cfg, key, value)
    return cfg


def _out(args: argparse.Namespace, what: str) -> Path:
    if args.out:
        return Path(args.out)
    return Path("bench-out") / f"{time.strftime('%Y%m%d-%H%M%S')}-{what}"


def run(args: argparse.Namespace) -> int:
    """Run the chosen mode; a one-line error and status 2 on a bad invocation."""
    from bench import ceiling, compare, dash_cost, overhead, suite, wait
    from bench.env import machine
    from bench.progress import Bar
    from bench.report import aggregate, write
    from bench.run import run_all, versions

    bar = Bar(quiet=args.quiet)
    repeat_given = args.repeat is not None
    if not repeat_given:
        args.repeat = 1
    try:
        if args.mode not in MODES:
            raise BenchError(f"unknown mode {args.mode!r} (choose from {', '.join(MODES)})")
        if args.mode == "matrix":
            out = _out(args, "matrix")
            paths = suite.matrix(out, bar, repeat=args.repeat, pg=args.pg,
                                 workloads=_list(args.workloads), dbs=_list(args.dbs))
        elif args.mode == "depth":
            out = _out(args, "depth")
            for key, value in DEPTH_DEFAULTS.items():  # unless given on the command line
                if getattr(args, key) is None:
                    setattr(args, key, value)
            spec = _spec(args)
            paths = suite.depth(out, bar, spec, [_int(d) for d in _list(args.depths)])
        elif args.mode == "store":
            out = _out(args, "store")
            paths = suite.store(out, bar, _list(args.dbs), args.jobs or 20_000, args.pg,
                                repeat=args.repeat)
        elif args.mode == "wait":
            out = _out(args, "wait")
            cfg = wait.Config(repeat=max(args.repeat, 1))
            for key, value in (("jobs", args.jobs), ("agents", args.agents),
                               ("slots", args.slots), ("timeout", args.timeout)):
                if value is not None:
                    setattr(cfg, key, value)
            paths = wait.run(cfg, out, bar)
        elif args.mode == "dash-cost":
            out = _out(args, "dash-cost")
            paths = dash_cost.run(dash_cost.config(args), out, bar)
        elif args.mode == "ceiling":
            out = _out(args, "ceiling")
            paths = ceiling.run_mode(out, args.agents or 3, args.slots or 16,
                                     args.jobs or CEILING_JOBS, args.repeat, machine())
        elif args.mode == "compare":
            out = _out(args, "compare")
            paths = compare.run(compare.Config(
                concurrency=args.concurrency, jobs=args.jobs or 5_000,
                repeat=args.repeat if repeat_given else 3, timeout=args.timeout), out, bar)
        elif args.mode == "overhead":
            out = _out(args, "overhead")
            paths = overhead.run(_overhead_config(args), out, bar)
        else:
            spec = _spec(args)
            out = _out(args, f"{spec.profile.name}-{spec.workload.name}")
            runs = run_all(spec, bar)
            report = aggregate({**spec.describe(), **versions(spec)}, machine(), runs)
            report["ceiling"] = ceiling.for_run(spec, report, bar, args.ceiling_jobs)
            paths = write(out, report, runs)
            bar.phase(_headline(report))
    except BenchError as e:
        print(f"ffrtmp bench: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a cluster that did not come up
        print(f"ffrtmp bench: {e}", file=sys.stderr)
        return 1
    bar.phase(f"report: {paths['md']}")
    print(paths["json"])
    return 0


def _headline(r: dict) -> str:
    lat = r.get("latency_ms") or {}
    return (f"{r['completed']:,}/{r['jobs']:,} completed, {r.get('completion_rate') or 0:,.0f} "
            f"jobs/s, latency p50 {lat.get('p50')} ms p99 {lat.get('p99')} ms")


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _int(text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise BenchError(f"not a number: {text!r}") from None
