"""report.json (every figure), report.md (tables a person reads) and plot.svg for one config."""

from __future__ import annotations

import collections
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import plot
from bench.ceiling import markdown_lines as _ceiling_lines
from bench.stats import flatten, spread

PRIVATE = ("_latencies",)


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *path, leaf = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _merge(base: dict[str, Any], numbers: dict[str, Any]) -> dict[str, Any]:
    """base with its numeric leaves replaced by numbers' (strings, lists and None kept)."""
    out = copy.deepcopy(base)
    for key, value in numbers.items():
        if isinstance(value, dict):
            node = out.get(key)
            out[key] = _merge(node if isinstance(node, dict) else {}, value)
        else:
            out[key] = value
    return out


def representative(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose completion rate is the median one (its timeline goes in the plot)."""
    rates = [r.get("completion_rate") or 0.0 for r in runs]
    med = statistics.median(rates)
    return runs[min(range(len(runs)), key=lambda i: abs(rates[i] - med))]


def aggregate(config: dict[str, Any], machine: dict[str, Any],
              runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The report: medians of every figure across runs, with min-max and each run."""
    clean = [{k: v for k, v in r.items() if k not in (*PRIVATE, "timeline")} for r in runs]
    flats = [flatten(r) for r in clean]
    keys = sorted({k for f in flats for k in f})
    spreads = {k: spread([f.get(k) for f in flats]) for k in keys}
    medians = _unflatten({k: s["median"] for k, s in spreads.items()})
    report = _merge(clean[0], medians)
    # Counts where the median would hide a bad run: the worst run speaks.
    report["jobs"] = max(r["jobs"] for r in clean)
    report["completed"] = min(r["completed"] for r in clean)
    report["failed"] = max(r["failed"] for r in clean)
    report["timed_out"] = any(r.get("timed_out") for r in clean)
    report["events_missed"] = sum(r.get("events_missed", 0) for r in clean)
    reasons: collections.Counter[str] = collections.Counter()
    for r in clean:
        reasons.update(r.get("failures_by_reason") or {})
    report["failures_by_reason"] = dict(reasons)
    report.pop("run", None)
    rep = representative(runs)
    return {
        "tool": "ffrtmp bench",
        "schema": 1,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "config": config,
        "repeat": len(runs),
        **report,
        "spread": {k: s for k, s in spreads.items() if s["n"] > 1 and not k.startswith("run")},
        "runs": clean,
        "timeline_run": rep.get("run"),
        "timeline_columns": ["t_s", "submitted", "dispatched", "completed", "failed"],
        "timeline": rep.get("timeline", []),
    }


def write(out: Path, report: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Path]:
    """Write report.json, report.md and plot.svg into out; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "plot": out / "plot.svg"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    rep = representative(runs)
    cfg = report["config"]
    title = f"ffrtmp bench: {cfg.get('label') or cfg['profile']['name']}"
    sub = (f"{report['jobs']:,} x {cfg['spec'].get('scenario')} on {cfg['topology']} slots, "
           f"{cfg['db']}; run {rep.get('run')} of {report['repeat']} (the median one)")
    paths["plot"].write_text(plot.render(title, rep.get("timeline", []),
                                         rep.get("_latencies", []), sub))
    paths["md"].write_text(markdown(report))
    return paths


def write_plain(out: Path, report: dict[str, Any], md: str) -> dict[str, Path]:
    """Write report.json and report.md (no plot) into out, echo the Markdown; returns paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(md)
    sys.stdout.write(md)
    return paths


# ---- Markdown ------------------------------------------------------------------------------


def cell(x: Any, digits: int = 1) -> str:
    """A figure as a Markdown table cell: – for none, thousands separators, `digits` decimals
    for a float (every bench report's tables)."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _range(report: dict[str, Any], key: str, digits: int = 1) -> str:
    s = report["spread"].get(key)
    if not s:
        return ""
    return f"{cell(s['min'], digits)} – {cell(s['max'], digits)}"


def _get(d: dict[str, Any], key: str) -> Any:
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def markdown(r: dict[str, Any]) -> str:
    """The human-readable report."""
    cfg, m = r["config"], r["machine"]
    prof = cfg["profile"]
    lines = [
        f"# ffrtmp bench — {cfg.get('label') or prof['name']}",
        "",
        f"{r['created_at']} · {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_mb']:,} MB · "
        f"Python {m['python']}, pyzmq {m['pyzmq']} / libzmq {m['libzmq']} · "
        f"git {(m.get('git') or {}).get('commit', '?')}"
        f"{' (dirty)' if (m.get('git') or {}).get('dirty') else ''}",
        "",
        "| configuration | |",
        "|---|---|",
        f"| profile | {prof['name']} |",
        f"| workload | `{json.dumps(cfg['spec'])}` |",
        f"| agents x slots | {cfg['topology']} |",
        f"| database | {r.get('database') or cfg['db']} |",
        f"| jobs per run | {r['jobs']:,} ({prof['batch']} per SUBMIT"
        f"{', ' + str(cfg['rate']) + ' jobs/s' if cfg.get('rate') else ', as fast as accepted'}) |",
        f"| jobs queued before the load | {prof['queued']:,} |",
        f"| runs | {r['repeat']} (figures are medians; min – max across runs beside them) |",
        "",
        "## Throughput",
        "",
        "| figure | median | min – max |",
        "|---|---|---|",
    ]
    for key, label, *d in (("completed", "completed (worst run)"),
                           ("failed", "failed (worst run)"),
                       ("duration_s", "duration, s (first SUBMIT → last terminal event)", 3),
                       ("submit_rate", "submission rate, jobs/s"),
                       ("dispatch_rate", "dispatch rate, jobs/s (master clock)"),
                       ("completion_rate", "completion rate, jobs/s")):
        digits = d[0] if d else 1
        lines.append(f"| {label} | {cell(r.get(key), digits)} | {_range(r, key, digits)} |")
    lines += ["", "## Latency (ms)", "", "| | p50 | p95 | p99 | max | samples |",
              "|---|---|---|---|---|---|"]
    for key, label in (("latency_ms", "submit → done, under this load"),
                       ("queue_wait_ms", "queue wait (queued → assigned)"),
                       ("unloaded_latency_ms", "submit → done, unloaded (one noop at a time)"),
                       ("breakdown_ms.submit_to_queued", "  submit → queued event (commit)"),
                       ("breakdown_ms.assigned_to_done", "  assigned → done (master clock)")):
        s = _get(r, key)
        if s:
            lines.append(f"| {label} | {cell(s['p50'], 3)} | {cell(s['p95'], 3)} | "
                         f"{cell(s['p99'], 3)} | {cell(s['max'], 3)} | {cell(s['n'])} |")
    ul = r.get("unloaded_latency_ms") or {}
    for part in ("submit_to_queued", "queued_to_assigned", "assigned_to_done"):
        s = (ul.get("breakdown") or {}).get(part)
        if s and s.get("n"):
            lines.append(f"| unloaded: {part.replace('_', ' ')} | {cell(s['p50'], 3)} | "
                         f"{cell(s['p95'], 3)} | {cell(s['p99'], 3)} | {cell(s['max'], 3)} | "
                         f"{cell(s['n'])} |")
    lines += ["", "Latency is measured by the client: from the moment its SUBMIT left to the "
              "arrival of the job's terminal STATE event, which the master publishes only after "
              "committing the result.", ""]
    lines += _processes(r)
    lines += _metrics(r)
    if r.get("idle"):
        i = r["idle"]
        lines += ["## Idle", "",
                  f"Master CPU with every agent connected and heartbeating, no jobs, over "
                  f"{cell(i.get('seconds'))} s: **{cell(i.get('master_cpu_pct'))} % of one core** "
                  f"({cell(i.get('bus_messages_per_s'))} bus messages/s, RSS "
                  f"{cell(i.get('master_rss_mb'))} MB).", ""]
    if r.get("ffmpeg"):
        lines += _ffmpeg(r)
    lines += _ceiling_lines(r)
    lines += ["## Failures by reason", ""]
    if r["failures_by_reason"]:
        lines += ["| state:reason | jobs (all runs) |", "|---|---|"]
        lines += [f"| {k} | {v:,} |" for k, v in sorted(r["failures_by_reason"].items())]
    else:
        lines.append("None: every job completed.")
    if r.get("events_missed"):
        lines += ["", f"{r['events_missed']} terminal states were read back with EVENTS because "
                  "the PUB socket dropped their events (their latencies are left out)."]
    if r.get("timed_out"):
        lines += ["", "**A run gave up before every job finished (timeout).**"]
    lines += ["", "## Plot", "", "![jobs over time and latency distribution](plot.svg)", ""]
    return "\n".join(lines)


def _processes(r: dict[str, Any]) -> list[str]:
    procs = r.get("processes") or {}
    lines = ["## Processes (during the load)", "",
             "| process | CPU s | CPU % of one core | peak RSS MB | children CPU s |",
             "|---|---|---|---|---|"]
    for name in ("master", "agents", "bench"):
        p = procs.get(name)
        if not p:
            continue
        label = f"agents ({p['count']}, summed; RSS is the largest)" if name == "agents" \
            else ("bench client (submitter + event reader)" if name == "bench" else name)
        lines.append(f"| {label} | {cell(p.get('cpu_s'), 2)} | {cell(p.get('cpu_pct'))} | "
                     f"{cell(p.get('peak_rss_mb'))} | {cell(p.get('children_cpu_s'), 2)} |")
    return [*lines, ""]


def _metrics(r: dict[str, Any]) -> list[str]:
    mt = r.get("metrics")
    if not mt:
        return ["(No master metrics endpoint: database and bus figures unavailable.)", ""]
    db, bus = mt["db"], mt["bus"]
    lines = ["## Database and bus (from the master's /metrics)", "",
             "| figure | value |", "|---|---|",
             f"| group commits (transactions) | {cell(db['commits'])} |",
             f"| transactions/s | {cell(db['tx_per_s'])} |",
             f"| commit latency mean / p50 / p95 / p99, ms | {cell(db['commit_ms_mean'], 3)} / "
             f"{cell(db['commit_ms_p50'], 3)} / {cell(db['commit_ms_p95'], 3)} / "
             f"{cell(db['commit_ms_p99'], 3)} |",
             f"| time in commits, % of the run | {cell(db['busy_pct'])} |",
             f"| bus messages/s (all sockets, in + out) | {cell(bus['messages_per_s'])} |"]
    for k, v in bus["by_socket"].items():
        lines.append(f"| &nbsp; {k.replace('_', ' ')} /s | {cell(v)} |")
    lines.append("")
    lines.append("Commit percentiles are interpolated from the histogram buckets "
                 "(0.5, 1, 2.5, 5, 10, 25 ms …).")
    return [*lines, ""]


def _ffmpeg(r: dict[str, Any]) -> list[str]:
    f = r["ffmpeg"]
    lines = ["## FFmpeg", "", "| figure | p50 | min | max |", "|---|---|---|---|"]
    for key, label in (("fps", "encoder fps (output frames / job wall time)"),
                       ("reported_fps", "fps ffmpeg last reported (-progress)"),
                       ("speed", "speed (x realtime)"), ("job_duration_s", "job duration, s")):
        s = f.get(key) or {}
        if s.get("n"):
            lines.append(f"| {label} | {cell(s['p50'], 2)} | {cell(s['min'], 2)} | "
                         f"{cell(s['max'], 2)} |")
    if "overhead_pct" in f:
        lines += ["", "| makespan, same jobs and parallelism | s (median) | min – max |",
                  "|---|---|---|",
                  f"| through ffrtmp (submit → last done) | {cell(f['agent_makespan_s'], 3)} | "
                  f"{_range(r, 'ffmpeg.agent_makespan_s', 3)} |",
                  f"| directly, `xargs -P` | {cell(f['direct_makespan_s'], 3)} | "
                  f"{_range(r, 'ffmpeg.direct_makespan_s', 3)} |",
                  f"| **agent overhead** | **{cell(f['overhead_pct'], 2)} %** | "
                  f"{_range(r, 'ffmpeg.overhead_pct', 2)} % |", "",
                  "Each run measures both, alternating which goes first; the overhead is the "
                  "per-run ratio, then the median. Wall-clock makespan on a shared machine is "
                  "noisy; the CPU figures below are not.", "",
                  "| CPU | median | min – max |", "|---|---|---|",
                  f"| ffmpeg CPU s under the agents | {cell(f.get('ffmpeg_cpu_s'), 2)} | "
                  f"{_range(r, 'ffmpeg.ffmpeg_cpu_s', 2)} |",
                  f"| ffmpeg CPU s run directly | {cell(f.get('direct_cpu_s'), 2)} | "
                  f"{_range(r, 'ffmpeg.direct_cpu_s', 2)} |",
                  f"| master + agents CPU, % of ffmpeg's | "
                  f"{cell(f.get('system_cpu_pct_of_ffmpeg'), 2)} % | "
                  f"{_range(r, 'ffmpeg.system_cpu_pct_of_ffmpeg', 2)} % |",
                  "", f"Direct command of job 0: `{(r.get('direct') or {}).get('command', '')}`"]
    return [*lines, ""]
