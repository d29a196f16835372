"""`ffrtmp demo`: a master on SQLite, two local agents, a mixed batch with live progress."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bus.client import Client, Subscriber
from bus.vocab import COMPLETED, RUNNING, TERMINAL
from ffrtmp.render import bar, human_bytes


def demo_specs() -> list[dict[str, Any]]:
    """The demo's mixed batch: real transcodes of synthetic sources, plus a few quick jobs."""
    src = "testsrc:duration={d},size=1280x720,rate=30"
    specs: list[dict[str, Any]] = [
        {"scenario": "1080p-h264", "input": src.format(d=6), "output": "demo/1080p.mp4",
         "priority": "high"},
        {"scenario": "720p-h264", "input": src.format(d=8), "output": "demo/720p.mp4",
         "params": {"bitrate": "2M"}},
        {"scenario": "1080p-h265", "input": src.format(d=3), "output": "demo/1080p-hevc.mp4"},
        {"scenario": "1080p-vp9", "input": src.format(d=3), "output": "demo/1080p.webm"},
        {"scenario": "480p-av1", "input": src.format(d=3), "output": "demo/480p-av1.mp4"},
        {"scenario": "audio-aac", "input": src.format(d=20), "output": "demo/audio.m4a",
         "priority": "low"},
    ]
    for spec in specs:  # the demo's own folder: a re-run in the same --dir replaces them
        spec["overwrite"] = True
    specs += [{"scenario": "noop", "priority": "low"} for _ in range(10)]
    return specs


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 if every job completed."""
    import tempfile

    from bench.cluster import LocalCluster  # psutil: only when the demo runs

    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ffrtmp-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(f"sqlite:///{workdir}/demo.db", agents=2, slots=2, workdir=workdir,
                           agent_prefix="agent")
    print(f"ffrtmp demo: master (SQLite at {workdir}/demo.db) + 2 agents x 2 slots")
    cluster.start()
    try:
        with Client(cluster.clients_ep, timeout=10) as client:
            sub = Subscriber(["job."], cluster.events_ep)
            ids = client.submit(demo_specs())
            print(f"submitted {len(ids)} jobs: {ids[0]}..{ids[-1]}\n")
            final = _follow(client, sub, ids, args.timeout)
            sub.close()
            _summary(final)
            nodes = client.nodes()
        print("\nagents: " + ", ".join(f"{n['name']} ({n['slots']} slots)" for n in nodes))
        print(f"outputs: {workdir}/agent*/outputs/demo   database and logs: {workdir}")
        return 0 if all(j["state"] == COMPLETED for j in final.values()) else 1
    finally:
        cluster.stop()


def _follow(client: Client, sub: Subscriber, ids: list[int],
            timeout: float) -> dict[int, dict[str, Any]]:
    final: dict[int, dict[str, Any]] = {}
    progress: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    next_poll = 0.0
    while len(final) < len(ids) and time.monotonic() < deadline:
        item = sub.recv(0.2)
        if item is not None and item[1].command == "PROGRESS":
            progress[item[1]["id"]] = float(item[1].get("progress", 0.0))
        if time.monotonic() >= next_poll:
            jobs, _ = client.get([i for i in ids if i not in final])
            for job in jobs:
                if job["state"] in TERMINAL:
                    final[job["id"]] = job
                else:
                    progress[job["id"]] = max(progress.get(job["id"], 0.0), job["progress"])
            running = [j for j in jobs if j["state"] == RUNNING]
            line = "  ".join(f"#{j['id']} {j['scenario']} {bar(progress.get(j['id'], 0), 10)} "
                             f"{100 * progress.get(j['id'], 0):3.0f}%" for j in running[:4])
            sys.stdout.write(f"\r{len(final):>3}/{len(ids)} done  {line:<110}")
            sys.stdout.flush()
            next_poll = time.monotonic() + 0.25
    print()
    return final


def _summary(final: dict[int, dict[str, Any]]) -> None:
    print(f"\n{'ID':>4}  {'SCENARIO':<11} {'STATE':<10} {'AGENT':<7} {'TOOK':>6} {'FPS':>5} "
          f"{'SIZE':>10}  OUTPUT")
    for job in sorted(final.values(), key=lambda j: j["id"]):
        extra = job.get("extra") or {}
        took = f"{extra['duration_s']:.1f}s" if extra.get("duration_s") else "-"
        fps = f"{extra['fps']:.0f}" if extra.get("fps") else "-"
        size = human_bytes(job["bytes_out"]) if job["bytes_out"] else "-"
        print(f"{job['id']:>4}  {job['scenario']:<11} {job['state']:<10} {job['agent'] or '-':<7} "
              f"{took:>6} {fps:>5} {size:>10}  {extra.get('output_path') or ''}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the demo subcommand."""
    p = sub.add_parser("demo", help="run a local demo cluster with a mixed batch of jobs")
    p.add_argument("--dir", help="where the database, logs and outputs go (default: a new "
                                 "temporary directory, kept)")
    p.add_argument("--timeout", type=float, default=300, metavar="S",
                   help="seconds the batch may take before the demo gives up")
    p.set_defaults(func=run)
