"""Client subcommands: submit, jobs, nodes. They only parse, call bus.client and print."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from bus.client import Client, Subscriber
from bus.errors import ClientError
from bus.sockets import DEFAULT_EVENTS
from bus.vocab import COMPLETED, PRIORITIES, RUNNING, TERMINAL
from ffrtmp.render import bandwidth, final_line, progress_line


def _value(text: str) -> Any:
    """--set values: numbers become numbers, everything else stays a string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=None if isinstance(data, list) and len(data) > 50 else 2)
    sys.stdout.write("\n")


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The job spec the submit options describe."""
    params: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"ffrtmp submit: --set takes KEY=VALUE, got {item!r}")
        params[key] = _value(value)
    limits = {k: v for k, v in (("max_cpu_percent", args.cpu), ("max_memory_mb", args.memory),
                                ("max_disk_mb", args.disk)) if v is not None}
    spec: dict[str, Any] = {"scenario": args.scenario, "params": params,
                            "priority": args.priority, "max_attempts": args.max_attempts,
                            "resource_limits": limits}
    for key, value in (("input", args.input), ("output", args.output),
                       ("timeout_s", args.timeout)):
        if value is not None:
            spec[key] = value
    return spec


def cmd_submit(args: argparse.Namespace, client: Client) -> int:
    """Submit --count copies of one spec; with --wait follow them to the end."""
    if not 1 <= args.count <= 100_000:
        raise SystemExit("ffrtmp submit: --count must be between 1 and 100000")
    spec = build_spec(args)
    ids: list[int] = []
    for start in range(0, args.count, 5000):
        n = min(5000, args.count - start)
        key = f"{args.idempotency_key}:{start}" if args.idempotency_key else None
        ids += client.submit([spec] * n, idempotency_key=key)
    if args.json and not args.wait:
        _print_json({"ids": ids})
    elif not args.json:
        print(f"submitted {len(ids)} job(s): " + (f"{ids[0]}..{ids[-1]}" if len(ids) > 1
                                                  else str(ids[0])))
    if not args.wait:
        return 0
    jobs = wait_for(client, ids, args.events, quiet=args.json)
    if args.json:
        _print_json({"ids": ids, "jobs": jobs})
    bad = [j for j in jobs if j["state"] != COMPLETED]
    for job in bad[:20]:
        print(f"job {job['id']}: {job['state']} ({job['reason']})", file=sys.stderr)
    return 1 if bad else 0


def wait_for(client: Client, ids: list[int], events: str, quiet: bool) -> list[dict[str, Any]]:
    """Follow jobs to terminal states: events for liveliness, GET polling for certainty."""
    sub = Subscriber(["job."] if len(ids) > 20 else [f"job.{i}." for i in ids], events,
                     keys=client.keys)
    pending = set(ids)
    final: dict[int, dict[str, Any]] = {}
    next_poll = next_line = 0.0
    started: float | None = None
    tty = sys.stderr.isatty()
    single = len(ids) == 1 and not quiet
    try:
        while pending:
            item = sub.recv(0.2)
            now = time.monotonic()
            if item is not None and single:
                msg = item[1]
                if msg.command == "PROGRESS" and (tty or now >= next_line):
                    started = started or now
                    line = progress_line(msg["id"], msg.body, now - started)
                    print(f"\r{line}\033[K" if tty else line, end="" if tty else "\n",
                          file=sys.stderr, flush=True)
                    next_line = now + 1.0
                elif msg.command == "STATE" and msg["state"] not in TERMINAL:
                    if msg["state"] == RUNNING:
                        started = now
                    print(("\r" if tty else "") + f"job {msg['id']}: {msg['state']}"
                          + ("\033[K" if tty else ""), file=sys.stderr, flush=True)
            if now >= next_poll or (item and item[1].command == "STATE"
                                    and item[1]["state"] in TERMINAL):
                chunk = sorted(pending)[:1000]
                jobs, missing = client.get(chunk)
                for job in jobs:
                    if job["state"] in TERMINAL:
                        final[job["id"]] = job
                        pending.discard(job["id"])
                for job_id in missing:
                    pending.discard(job_id)
                if not quiet and len(ids) > 1:
                    print(f"\r  {len(ids) - len(pending)}/{len(ids)} finished", end="",
                          file=sys.stderr)
                next_poll = now + 0.5
    finally:
        sub.close()
    if not quiet:
        if tty or len(ids) > 1:
            print(file=sys.stderr)
        for job_id in ids[:50]:
            if job_id in final:
                print(final_line(final[job_id]))
    return [final[i] for i in ids if i in final]


def _row(job: dict[str, Any]) -> str:
    return (f"{job['id']:>8}  {job['scenario']:<12} {job['state']:<10} {job['priority']:<6} "
            f"{job['attempt']}/{job['max_attempts']}  {job['agent'] or '-':<14} "
            f"{100 * job['progress']:5.1f}%  {job['reason'] or ''}")


def cmd_jobs(args: argparse.Namespace, client: Client) -> int:
    """jobs list|show|cancel|retry|watch."""
    if args.jobs_cmd == "list":
        states = args.state.split(",") if args.state else None
        jobs = client.list_jobs(states=states, limit=args.limit, before_id=args.before)
        if args.json:
            _print_json(jobs)
        else:
            print(f"{'ID':>8}  {'SCENARIO':<12} {'STATE':<10} {'PRIO':<6} ATT  {'AGENT':<14} "
                  f"PROG    REASON")
            for job in jobs:
                print(_row(job))
        return 0
    if args.jobs_cmd == "show":
        jobs, missing = client.get([args.id], events=True)
        if missing:
            raise ClientError("not_found", f"job {args.id} not found")
        job = jobs[0]
        if args.json:
            _print_json(job)
            return 0
        for key in ("id", "scenario", "state", "priority", "attempt", "max_attempts", "agent",
                    "progress", "bytes_in", "bytes_out", "exit_code", "reason", "created_at",
                    "started_at", "finished_at", "timeout_s", "output", "resource_limits",
                    "extra"):
            print(f"{key:>15}: {job[key]}")
        extra = job.get("extra") or {}
        if bandwidth(job):
            print(f"{'bandwidth':>15}: {bandwidth(job)}")
        if extra.get("speed") is not None:
            print(f"{'encoder':>15}: {extra.get('fps', 0):.0f} fps, speed {extra['speed']:.2f}x")
        print("         events:")
        for ev in job["events"]:
            print(f"  {ev['at']}  {ev['from_state'] or '-':>10} -> {ev['to_state']:<10} "
                  f"attempt {ev['attempt']}  {ev['agent'] or ''}  {ev['reason'] or ''}")
        return 0
    if args.jobs_cmd == "cancel":
        results = client.cancel(args.ids, grace_s=args.grace)
        if args.json:
            _print_json(results)
        else:
            for r in results:
                print(f"job {r['id']}: {r['result']}")
        missing = [str(r["id"]) for r in results if r["result"] == "not_found"]
        if missing:  # the others were cancelled; still an error, said once on stderr
            print(f"ffrtmp: not_found: job{'s' if len(missing) > 1 else ''} "
                  f"{', '.join(missing)} not found", file=sys.stderr)
            return 1
        return 0
    if args.jobs_cmd == "retry":
        new_id = client.retry(args.id)
        if args.json:
            _print_json({"id": new_id, "retry_of": args.id})
        else:
            print(f"job {args.id} resubmitted as job {new_id}")
        return 0
    job = wait_for(client, [args.id], args.events, quiet=False)
    return 0 if job and job[0]["state"] == COMPLETED else 1


def cmd_nodes(args: argparse.Namespace, client: Client) -> int:
    """nodes list|drain."""
    if args.nodes_cmd == "drain":
        reply = client.drain(args.name, on=not args.undo)
        print(f"agent {reply['name']}: {'draining' if reply['draining'] else 'accepting work'}")
        return 0
    nodes = client.nodes()
    if args.json:
        _print_json(nodes)
        return 0
    print(f"{'NAME':<20} {'STATE':<9} {'SLOTS':>5} {'BUSY':>4}  {'CGROUP':<6} {'LIMITS':<11} "
          "LAST SEEN")
    for n in nodes:
        print(f"{n['name']:<20} {n['state']:<9} {n['slots']:>5} {n['busy']:>4}  "
              f"{n['cgroup']:<6} {n['limits']:<11} {n['last_seen_s']:.1f}s ago")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register submit, jobs and nodes."""
    p = sub.add_parser("submit", help="submit jobs")
    p.add_argument("scenario")
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--priority", default="normal", choices=list(PRIORITIES))
    p.add_argument("--timeout", type=float)
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--cpu", type=int, help="max CPU percent (100 = one core)")
    p.add_argument("--memory", type=int, help="max memory, MB")
    p.add_argument("--disk", type=int, help="max scratch disk, MB")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--idempotency-key")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_submit)

    j = sub.add_parser("jobs", help="list, show, cancel, retry or watch jobs")
    jsub = j.add_subparsers(dest="jobs_cmd", required=True)
    jl = jsub.add_parser("list")
    jl.add_argument("--state", help="comma-separated states")
    jl.add_argument("--limit", type=int, default=50)
    jl.add_argument("--before", type=int, help="page: ids below this")
    jl.add_argument("--json", action="store_true")
    js = jsub.add_parser("show")
    js.add_argument("id", type=int)
    js.add_argument("--json", action="store_true")
    jc = jsub.add_parser("cancel")
    jc.add_argument("ids", type=int, nargs="+")
    jc.add_argument("--grace", type=float, default=30.0)
    jc.add_argument("--json", action="store_true")
    jr = jsub.add_parser("retry")
    jr.add_argument("id", type=int)
    jr.add_argument("--json", action="store_true")
    jw = jsub.add_parser("watch")
    jw.add_argument("id", type=int)
    j.set_defaults(func=cmd_jobs)

    n = sub.add_parser("nodes", help="list or drain agents")
    nsub = n.add_subparsers(dest="nodes_cmd", required=True)
    nl = nsub.add_parser("list")
    nl.add_argument("--json", action="store_true")
    nd = nsub.add_parser("drain")
    nd.add_argument("name")
    nd.add_argument("--undo", action="store_true", help="resume dispatching to the agent")
    n.set_defaults(func=cmd_nodes)
    for parser in (p, j, n):
        parser.set_defaults(client=True, events=DEFAULT_EVENTS)
