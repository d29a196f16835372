"""Suites of configurations with one comparison table: the test matrix and the depth sweep."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.env import machine, pg_reachable
from bench.profiles import WORKLOADS, BenchError, Profile, workload
from bench.progress import Bar
from bench.report import aggregate, cell, write
from bench.run import RunSpec, run_once, versions

# 1 agent at 1, 2, 4, 8 slots; 3 and 5 agents at 4 slots.
TOPOLOGIES = ((1, 1), (1, 2), (1, 4), (1, 8), (3, 4), (5, 4))
# Sized so the whole matrix (36 cells) stays well under 10 minutes on a 2-core box.
MATRIX_JOBS = {"noop": 3000, "sleep": 32, "ffmpeg": 12}
MATRIX_KNOBS: dict[str, dict[str, Any]] = {
    "noop": {}, "sleep": {"sleep_s": 0.25}, "ffmpeg": {"input": "testsrc:duration=1"}}


def _cell(spec: RunSpec, out: Path, bar: Bar, repeat: int) -> dict[str, Any]:
    runs = []
    for i in range(repeat):
        bar.label = f"{spec.label} run {i + 1}/{repeat} "
        runs.append(run_once(spec, i, out / "work" / f"run{i}", bar))
    report = aggregate({**spec.describe(), **versions(spec)}, machine(), runs)
    write(out, report, runs)
    shutil.rmtree(out / "work", ignore_errors=True)  # databases, logs, encoded outputs
    return report


def matrix(out: Path, bar: Bar, repeat: int = 1, pg: str | None = None,
           workloads: list[str] | None = None, dbs: list[str] | None = None) -> dict[str, Path]:
    """Every workload x database x topology; a comparison table in matrix.md."""
    workloads = workloads or list(WORKLOADS)
    dbs = dbs or ["sqlite", "postgresql"]
    for w in workloads:
        workload(w)  # unknown names fail before anything starts
    for d in dbs:
        if d not in ("sqlite", "postgresql"):
            raise BenchError(f"unknown database {d!r} in --dbs (sqlite, postgresql)")
    skipped = []
    if "postgresql" in dbs and (why := pg_reachable(pg)) is not None:
        dbs = [d for d in dbs if d != "postgresql"]
        skipped.append(f"PostgreSQL skipped: {why}")
        bar.phase(skipped[-1])
    cells = [(w, d, a, s) for w in workloads for d in dbs for a, s in TOPOLOGIES]
    rows = []
    started = time.monotonic()
    for n, (w, d, agents, slots) in enumerate(cells, 1):
        label = f"{w}-{d}-{agents}x{slots}"
        bar.phase(f"[{n}/{len(cells)}] {label} ({time.monotonic() - started:.0f}s elapsed)")
        prof = Profile("matrix", jobs=MATRIX_JOBS[w], agents=agents, slots=slots,
                       batch=500 if w == "noop" else MATRIX_JOBS[w],
                       latency_samples=20 if w == "noop" else 0)
        spec = RunSpec(profile=prof, workload=workload(w, **MATRIX_KNOBS[w]), db=d, pg=pg,
                       label=label, repeat=repeat)
        try:
            report = _cell(spec, out / "cells" / label, bar, repeat)
        except (BenchError, RuntimeError) as e:  # one broken cell must not lose the others
            bar.phase(f"{label} failed: {e}")
            rows.append({"workload": w, "db": d, "agents": agents, "slots": slots,
                         "error": str(e)})
            continue
        rows.append(_row(report, w, d, agents, slots) | {"report": f"cells/{label}/report.md"})
    elapsed = time.monotonic() - started
    doc = {"tool": "ffrtmp bench matrix", "created_at": _now(), "machine": machine(),
           "repeat": repeat, "elapsed_s": round(elapsed, 1), "skipped": skipped,
           "jobs_per_cell": {w: MATRIX_JOBS[w] for w in workloads}, "rows": rows}
    return _write_suite(out, "matrix", doc, _matrix_md(doc))


def depth(out: Path, bar: Bar, base: RunSpec, depths: list[int]) -> dict[str, Path]:
    """The same load with 0, 10k, 100k ... jobs already queued; interleaved repeats."""
    if base.target:
        raise BenchError("depth mode starts its own clusters (no --master)")
    if any(d < 0 for d in depths):
        raise BenchError("--depths must be >= 0")
    runs: dict[int, list[dict[str, Any]]] = {d: [] for d in depths}
    specs = {d: replace(base, profile=replace(base.profile, queued=d),
                        label=f"depth-{d}") for d in depths}
    started = time.monotonic()
    for i in range(base.repeat):  # interleaved: drift over time hits every depth alike
        for d in depths:
            bar.phase(f"depth {d:,} run {i + 1}/{base.repeat} "
                      f"({time.monotonic() - started:.0f}s elapsed)")
            bar.label = f"depth {d:,} "
            runs[d].append(run_once(specs[d], i, out / "work" / f"d{d}-{i}", bar))
    rows = []
    for d in depths:
        report = aggregate(specs[d].describe(), machine(), runs[d])
        write(out / "cells" / f"depth-{d}", report, runs[d])
        rows.append(_row(report, base.workload.name, base.db, base.profile.agents,
                         base.profile.slots) | {"queued": d,
                                                "report": f"cells/depth-{d}/report.md"})
    shutil.rmtree(out / "work", ignore_errors=True)
    ref = rows[0]["dispatch_rate"] if rows else None
    for row in rows:
        row["dispatch_vs_first"] = (round(row["dispatch_rate"] / ref, 3)
                                    if ref and row["dispatch_rate"] else None)
    doc = {"tool": "ffrtmp bench depth", "created_at": _now(), "machine": machine(),
           "repeat": base.repeat, "elapsed_s": round(time.monotonic() - started, 1),
           "config": base.describe(), "rows": rows}
    return _write_suite(out, "depth", doc, _depth_md(doc))


def store(out: Path, bar: Bar, dbs: list[str], jobs: int, pg: str | None = None,
          batches: tuple[int, ...] = (1, 10, 100, 1000), repeat: int = 1) -> dict[str, Path]:
    """The storage ceiling per backend and group-commit size (no master, no sockets)."""
    from bench.store import ceiling

    results, skipped = [], []
    for d in dbs:
        if d not in ("sqlite", "postgresql"):
            raise BenchError(f"unknown database {d!r} in --dbs (sqlite, postgresql)")
        if d == "postgresql" and (why := pg_reachable(pg)) is not None:
            skipped.append(f"PostgreSQL skipped: {why}")
            bar.phase(skipped[-1])
            continue
        bar.phase(f"storage ceiling on {d}: {jobs:,} job lifecycles per group-commit size")
        results.append(ceiling(d, out / "work", list(batches), jobs, pg, repeat))
    shutil.rmtree(out / "work", ignore_errors=True)
    doc = {"tool": "ffrtmp bench store", "created_at": _now(), "machine": machine(),
           "jobs": jobs, "skipped": skipped, "results": results}
    lines = ["# ffrtmp bench store: what the database absorbs", "",
             f"{doc['created_at']} · {jobs:,} noop job lifecycles per row (insert + submitted "
             "event, assigned update + event, completed update + event), applied with "
             "`Store.apply` in group commits of N jobs, no master and no sockets; each size "
             "without and with the leader's epoch check (fencing), alternating, "
             f"{repeat} round(s) each (median).", "",
             *(f"*{s}*" for s in skipped),
             "| database | jobs per commit | epoch check | job lifecycles/s | commit p50 ms | "
             "commit p99 ms | with / without |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        plain = {r["batch"]: r["jobs_per_s"] for r in res["rows"] if not r.get("fenced")}
        for row in res["rows"]:
            ratio = (f"{row['jobs_per_s'] / plain[row['batch']]:.3f}"
                     if row.get("fenced") and plain.get(row["batch"]) else "")
            lines.append(f"| {res['database']} | {row['batch']:,} | "
                         f"{'yes' if row.get('fenced') else 'no'} | {cell(row['jobs_per_s'])} | "
                         f"{cell(row['commit_ms']['p50'], 3)} | {cell(row['commit_ms']['p99'], 3)} "
                         f"| {ratio} |")
    return _write_suite(out, "store", doc, "\n".join(lines) + "\n")


# ---- tables ----------------------------------------------------------------------------------


def _row(r: dict[str, Any], w: str, d: str, agents: int, slots: int) -> dict[str, Any]:
    procs = r.get("processes") or {}
    mt = r.get("metrics") or {}
    lat, wait = r.get("latency_ms") or {}, r.get("queue_wait_ms") or {}
    ff = r.get("ffmpeg") or {}
    return {
        "workload": w, "db": d, "agents": agents, "slots": slots, "jobs": r["jobs"],
        "completed": r["completed"], "failed": r["failed"],
        "completion_rate": r.get("completion_rate"), "dispatch_rate": r.get("dispatch_rate"),
        "submit_rate": r.get("submit_rate"), "duration_s": r.get("duration_s"),
        "latency_p50": lat.get("p50"), "latency_p95": lat.get("p95"),
        "latency_p99": lat.get("p99"), "queue_wait_p50": wait.get("p50"),
        "unloaded_p50": (r.get("unloaded_latency_ms") or {}).get("p50"),
        "master_cpu_pct": (procs.get("master") or {}).get("cpu_pct"),
        "master_rss_mb": (procs.get("master") or {}).get("peak_rss_mb"),
        "agents_cpu_pct": (procs.get("agents") or {}).get("cpu_pct"),
        "commit_ms_p50": (mt.get("db") or {}).get("commit_ms_p50"),
        "tx_per_s": (mt.get("db") or {}).get("tx_per_s"),
        "bus_msgs_per_s": (mt.get("bus") or {}).get("messages_per_s"),
        "fps_p50": (ff.get("fps") or {}).get("p50"),
        "overhead_pct": ff.get("overhead_pct"),
        "completion_rate_range": _rng(r, "completion_rate"),
    }


def _rng(r: dict[str, Any], key: str) -> list[float] | None:
    s = (r.get("spread") or {}).get(key)
    return [s["min"], s["max"]] if s else None


def _matrix_md(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        "# ffrtmp bench matrix", "",
        f"{doc['created_at']} · {m['cpus']} CPUs ({m['cpu_model']}) · Python {m['python']} · "
        f"{doc['repeat']} run(s) per cell (medians) · {doc['elapsed_s']:.0f} s in all", "",
        "Jobs per cell: " + ", ".join(f"{w} {n:,}" for w, n in doc["jobs_per_cell"].items())
        + " (noop in-agent; sleep 0.25 s child processes; ffmpeg 720p-h264 from a 1 s test "
          "source). Latencies in ms, rates in jobs/s, CPU in % of one core.", "",
        *(f"*{s}*" for s in doc["skipped"]),
        "| workload | db | agents x slots | done/jobs | jobs/s | dispatch/s | p50 | p95 | p99 "
        "| queue wait p50 | master CPU % | master RSS MB | agents CPU % | commit p50 ms | tx/s "
        "| fps p50 | overhead vs xargs % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['db']} | {r['agents']} x {r['slots']} | "
                         f"failed: {r['error']} |" + " |" * 13)
            continue
        lines.append(
            f"| [{r['workload']}]({r['report']}) | {r['db']} | {r['agents']} x {r['slots']} | "
            f"{r['completed']}/{r['jobs']} | {cell(r['completion_rate'])} | "
            f"{cell(r['dispatch_rate'])} | {cell(r['latency_p50'], 2)} | "
            f"{cell(r['latency_p95'], 2)} | {cell(r['latency_p99'], 2)} | "
            f"{cell(r['queue_wait_p50'], 2)} | {cell(r['master_cpu_pct'])} | "
            f"{cell(r['master_rss_mb'])} | {cell(r['agents_cpu_pct'])} | "
            f"{cell(r['commit_ms_p50'], 3)} | {cell(r['tx_per_s'])} | {cell(r['fps_p50'])} | "
            f"{cell(r['overhead_pct'], 1)} |")
    return "\n".join(lines) + "\n"


def _depth_md(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    lines = [
        "# ffrtmp bench depth", "",
        f"{doc['created_at']} · {cfg['profile']['jobs']:,} high-priority {cfg['workload']['name']}"
        f" jobs on {cfg['topology']} slots ({cfg['db']}), measured behind N low-priority jobs "
        f"already queued · {doc['repeat']} interleaved run(s) per depth (medians)", "",
        "| jobs queued | dispatch/s | vs first | completion/s | p50 ms | p99 ms "
        "| master CPU % | master peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| [{r['queued']:,}]({r['report']}) | {cell(r['dispatch_rate'])} | "
            f"{cell(r['dispatch_vs_first'], 2)} | {cell(r['completion_rate'])} | "
            f"{cell(r['latency_p50'], 2)} | {cell(r['latency_p99'], 2)} | "
            f"{cell(r['master_cpu_pct'])} | {cell(r['master_rss_mb'])} |")
    return "\n".join(lines) + "\n"


def _write_suite(out: Path, name: str, doc: dict[str, Any], md: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    paths["md"].write_text(md)
    return paths


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
