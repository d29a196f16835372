"""Client subcommands: submit, jobs, nodes. They only parse, call bus.client and print."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from bus.client import Client, EventFollower, NotLeader, advertised
from bus.errors import ClientError
from bus.security import PeerKeys
from bus.vocab import COMPLETED, PRIORITIES, RUNNING, STATES, TERMINAL
from ffrtmp import render

MAX_IDS = 10_000  # ids per GET or CANCEL request (docs/protocol.md)
SUBMIT_CHUNK = 5_000  # specs per SUBMIT request
LIST_PAGE = 1_000  # jobs per LIST request (the master's most)
MAX_COUNT = 100_000  # jobs per `submit --count`
MAX_NAMED = 1_000_000  # ids one `jobs cancel` may name (ranges included)
PROBE_S = 5.0  # a wait that heard nothing this long checks that the master still answers
MASTER_PROBE_S = 1.0  # `nodes list`: how long each master's INFO is waited for
SHOWN = 50  # finished jobs printed a line each; a wait on more prints a summary
FAILURES_SHOWN = 20  # failed jobs listed under a summary
NOT_DONE = ",".join(s for s in STATES if s in TERMINAL and s != COMPLETED)


class UsageError(Exception):
    """A command line refused before the master is asked: one line on stderr, status 2."""


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


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ---- ids, ranges, times ------------------------------------------------------------------------

_ID_ITEM = re.compile(r"^(\d+)(?:\.\.(\d+))?$")
_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def format_ids(ids: list[int]) -> str:
    """[107, 108, …, 306, 400] -> '107..306,400': runs, as `jobs cancel` accepts them."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ",".join(f"{a}..{b}" if b > a else str(a) for a, b in runs[:10])
    return text + (f",… ({len(runs)} runs)" if len(runs) > 10 else "")


def parse_ids(tokens: list[str], command: str = "jobs cancel") -> list[int]:
    """Ids from `42`, `107..306` and comma-separated mixes of them, in the order given,
    each once; UsageError for anything else."""
    out: dict[int, None] = {}
    for token in tokens:
        for item in token.split(","):
            item = item.strip()
            if not item:
                continue
            m = _ID_ITEM.match(item)
            if not m:
                raise UsageError(f"ffrtmp {command}: {item!r} is not a job id or a range "
                                 "FIRST..LAST (e.g. 42 or 107..306)")
            first = int(m.group(1))
            last = int(m.group(2)) if m.group(2) else first
            if last < first:
                raise UsageError(f"ffrtmp {command}: range {item!r} ends before it starts")
            if len(out) + last - first + 1 > MAX_NAMED:
                raise UsageError(f"ffrtmp {command}: more than {MAX_NAMED} ids named")
            out.update(dict.fromkeys(range(first, last + 1)))
    return list(out)


def parse_since(text: str, now: float) -> float:
    """`--since`: an age (`30s`, `10m`, `2h`, `1d`, `1w`) or an ISO date/time (local unless it
    names an offset) -> epoch seconds."""
    m = _AGE.match(text.strip().lower())
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"ffrtmp jobs list: --since {text!r}: expected an age (10m, 2h, 1d) "
                         "or an ISO date (2026-12-01, 2026-12-01T14:30)") from None
    return when.timestamp()  # a naive time is local


def _states(text: str | None) -> list[str] | None:
    if not text or text.strip() == "all":
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


# ---- submit ------------------------------------------------------------------------------------


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The job spec the submit options describe."""
    params: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"ffrtmp submit: --set takes KEY=VALUE, got {item!r}")
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
    # Sent only when asked for: false is the default, and a 1.0 master knows neither key.
    if args.overwrite:
        spec["overwrite"] = True
    if args.retry_timeouts:
        spec["retry_timeouts"] = True
    return spec


def _specs(spec: dict[str, Any], start: int, n: int) -> list[dict[str, Any]]:
    """n copies of spec for the jobs start..start+n-1 of a --count; `{n}` in the output is
    filled in here (the index in the whole --count, which the master could not know when the
    count is sent in several SUBMITs); `{id}` is the master's."""
    output = spec.get("output")
    if not output or "{n}" not in output:
        return [spec] * n
    return [{**spec, "output": output.replace("{n}", str(start + i))} for i in range(n)]


def cmd_submit(args: argparse.Namespace, client: Client) -> int:
    """Submit --count copies of one spec; with --wait follow them to the end."""
    if not 1 <= args.count <= MAX_COUNT:
        raise UsageError(f"ffrtmp submit: --count must be between 1 and {MAX_COUNT}")
    spec = build_spec(args)
    output = spec.get("output")
    if args.count > 1 and output and "{id}" not in output and "{n}" not in output:
        raise UsageError(f"ffrtmp submit: --count {args.count} would write every job to "
                         f"{output!r}: put {{id}} or {{n}} in --output (e.g. clips/{{n}}.mp4)")
    if args.wait:  # before submitting: the stream position the wait follows from
        events, head = follow_from(args, client)
    ids: list[int] = []
    # Always a key: a SUBMIT resent to another master (a failover mid-call) then makes its
    # jobs once. Without --idempotency-key, one of this invocation's own.
    import uuid  # submit only

    base = args.idempotency_key or uuid.uuid4().hex
    for start in range(0, args.count, SUBMIT_CHUNK):
        n = min(SUBMIT_CHUNK, args.count - start)
        key = f"{base}:{start}"
        try:
            ids += client.submit(_specs(spec, start, n), idempotency_key=key)
        except ClientError as e:
            if not ids:
                raise
            raise ClientError(e.code, f"{e.text} (after {len(ids)} of {args.count} jobs were "
                                      f"submitted: {format_ids(ids)})") from e
    if args.json and not args.wait:
        _print_json({"ids": ids})
    elif not args.json:
        print(f"submitted {len(ids)} job(s): {format_ids(ids)}", flush=True)
    if not args.wait:
        return 0
    known: dict[int, dict[str, Any]] = {}
    if args.idempotency_key:  # a repeated key answers with the first submit's jobs: some may
        got = views(client, ids)  # have ended before `head`, out of the stream's reach
        known = {i: got.get(i) or {"id": i, "state": "not_found", "reason": None} for i in ids
                 if i not in got or got[i]["state"] in TERMINAL}
    ended = wait_for(client, [i for i in ids if i not in known], events, head,
                     progress=not args.json) if len(known) < len(ids) else {}
    jobs, status = finish(client, ids, {**known, **ended}, args.json)
    if args.json:
        _print_json({"ids": ids, "jobs": jobs})
    return status


# ---- following jobs to the end -----------------------------------------------------------------


class Progress:
    """What a wait shows on stderr: one job's states and progress bar, or a line of counts for
    many (at most twice a second on a terminal, every 10 s otherwise)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.running_since: float | None = None
        self.next_line = 0.0
        self.dirty = False

    def _emit(self, line: str, now: float, every: float) -> None:
        if self.tty:
            print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)
            self.dirty = True
        else:
            print(line, file=sys.stderr, flush=True)
        self.next_line = now + every

    def state(self, job_id: int, state: str) -> None:
        """A single job entered a (non-terminal) state."""
        if not self.enabled or self.total != 1 or state in TERMINAL:
            return
        now = time.monotonic()
        if state == RUNNING:
            self.running_since = now
        self._emit(f"job {job_id}: {state}", now, 0.0)
        if self.tty:
            print(file=sys.stderr)
            self.dirty = False

    def progress(self, job_id: int, body: dict[str, Any]) -> None:
        """A PROGRESS report of a single job."""
        if not self.enabled or self.total != 1:
            return
        now = time.monotonic()
        if now < self.next_line and not self.tty:
            return
        since = self.running_since or now
        self.running_since = since
        self._emit(render.progress_line(job_id, body, now - since), now,
                   0.0 if self.tty else 1.0)

    def counts(self, counts: dict[str, int], force: bool = False) -> None:
        """How many of many jobs have finished."""
        if not self.enabled or self.total == 1:
            return
        now = time.monotonic()
        if now < self.next_line and not force:
            return
        self._emit(render.batch_line(self.total, counts, now - self.started), now,
                   0.5 if self.tty else 10.0)

    def close(self) -> None:
        if self.dirty:
            print(file=sys.stderr, flush=True)
            self.dirty = False


def follow_from(args: argparse.Namespace, client: Client) -> tuple[str, int]:
    """(events endpoint, sequence number to follow after), from one INFO: read before the
    jobs are submitted or looked at, so no event of theirs can come before it."""
    info = client.info()
    return (str(args.events) if args.events else advertised(info["events"], client.endpoint),
            int(info["head"]))


def wait_for(client: Client, ids: list[int], events: str, after: int, progress: bool = True
             ) -> dict[int, dict[str, Any]]:
    """Follow jobs to terminal states on the event stream (EventFollower: every event after
    `after` exactly once, gaps filled from the master's log); no per-job polling.

    Returns each job's terminal event (id, state, reason, ...) by id."""
    pending = set(ids)
    ended: dict[int, dict[str, Any]] = {}
    counts: Counter[str] = Counter()
    shown = Progress(len(ids), progress)
    single = len(ids) == 1 and progress
    heard = [time.monotonic()]  # when the stream last said anything about these jobs

    def on_progress(body: dict[str, Any]) -> None:
        heard[0] = time.monotonic()
        shown.progress(body["id"], body)

    follower = EventFollower(client, events, after=after, ids=ids,
                             progress_ids=ids if single else (), on_progress=on_progress)
    down = False
    try:
        while pending:
            batch = follower.poll(0.5)
            now = time.monotonic()
            if batch:
                heard[0] = now
                if down:  # events came (stream or read-back): the master is back
                    down = _back(shown)
            elif now - heard[0] >= PROBE_S:  # quiet: say so if the master is gone
                heard[0] = now
                down = _probe(client, down, shown)
            for ev in batch:
                job_id = ev["id"]
                if job_id not in pending:
                    continue
                if ev["state"] in TERMINAL:
                    pending.discard(job_id)
                    ended[job_id] = ev
                    counts[ev["state"]] += 1
                else:
                    shown.state(job_id, ev["state"])
            shown.counts(counts)
        shown.counts(counts, force=True)
    finally:
        shown.close()
        follower.close()
    return ended


def _probe(client: Client, down: bool, shown: Progress) -> bool:
    """Ask the master whether it is there; say once when it stops and when it is back (the wait
    goes on either way: it resumes from the master's event log after a restart). Returns
    whether the master is down."""
    try:
        client.info()
    except ClientError as e:
        if not down:
            shown.close()
            print(f"ffrtmp: {e.code}: {e.text}; still waiting (Ctrl-C to stop)",
                  file=sys.stderr, flush=True)
        return True
    return _back(shown) if down else False


def _back(shown: Progress) -> bool:
    """Say once that the master answers again; returns False (no longer down)."""
    shown.close()
    print("ffrtmp: the master answers again", file=sys.stderr, flush=True)
    return False


def _get(client: Client, ids: list[int]) -> tuple[list[dict[str, Any]], list[int]]:
    """GET, halving a request whose reply would be too large (views with stderr tails)."""
    try:
        return client.get(ids)
    except ClientError as e:
        if e.code != "too_large" or len(ids) < 2:
            raise
        half = len(ids) // 2
        first, second = _get(client, ids[:half]), _get(client, ids[half:])
        return first[0] + second[0], first[1] + second[1]


def views(client: Client, ids: list[int]) -> dict[int, dict[str, Any]]:
    """The master's views of jobs by id: one GET per MAX_IDS ids."""
    out: dict[int, dict[str, Any]] = {}
    for chunk in _chunks(ids, MAX_IDS):
        out.update((j["id"], j) for j in _get(client, chunk)[0])
    return out


def report(ids: list[int], ended: dict[int, dict[str, Any]], shown: dict[int, dict[str, Any]],
           as_json: bool) -> int:
    """Print each finished job once, from its view if there is one, else its terminal event:
    a line each for a few, a summary and the failures for many. Text: all on stdout; JSON
    (stdout holds the jobs): the failures on stderr. Returns 0 if all completed, else 1."""
    rows = [shown.get(i) or ended[i] for i in ids if i in shown or i in ended]
    bad = [r for r in rows if r["state"] != COMPLETED]
    out = sys.stderr if as_json else sys.stdout
    if len(rows) <= SHOWN:
        for row in rows:
            if row["state"] != COMPLETED or not as_json:
                print(render.final_line(row), file=out)
    else:
        if not as_json:
            print(render.summary_line(rows))
        for row in bad[:FAILURES_SHOWN]:
            print(render.final_line(row), file=out)
        if len(bad) > FAILURES_SHOWN:
            print(f"… and {len(bad) - FAILURES_SHOWN} more not completed "
                  f"(ffrtmp jobs list --state {NOT_DONE})", file=out)
    return 1 if bad or len(rows) < len(ids) else 0


def finish(client: Client, ids: list[int], ended: dict[int, dict[str, Any]],
           as_json: bool) -> tuple[list[dict[str, Any]], int]:
    """After a wait: the views worth fetching (all for --json or a few jobs, else only the
    failures listed) and the exit status from printing them."""
    if as_json or len(ids) <= SHOWN:
        wanted = ids
    else:
        wanted = [i for i in ids if ended[i]["state"] != COMPLETED][:FAILURES_SHOWN]
    got = views(client, wanted)
    return [got[i] for i in ids if i in got], report(ids, ended, got, as_json)


# ---- jobs --------------------------------------------------------------------------------------


def list_jobs(client: Client, args: argparse.Namespace, states: list[str] | None,
              limit: int | None) -> tuple[list[dict[str, Any]], bool]:
    """Up to `limit` (None: all) matching jobs, newest first, paging through LIST; and whether
    more match past them."""
    since = parse_since(args.since, time.time()) if getattr(args, "since", None) else None
    scenarios = [s.strip() for item in (getattr(args, "scenario", None) or [])
                 for s in item.split(",") if s.strip()] or None
    agent = getattr(args, "agent", None)
    jobs: list[dict[str, Any]] = []
    before = getattr(args, "before", None)
    while True:
        want = LIST_PAGE if limit is None else min(LIST_PAGE, limit - len(jobs))
        page, more = client.list_page(states, want, before, scenarios, agent, since)
        jobs += page
        if not more or not page or (limit is not None and len(jobs) >= limit):
            return jobs, more
        before = page[-1]["id"]


def _took(job: dict[str, Any], now: float) -> float | None:
    took = render.job_duration(job, now)
    return took if took is not None else (job.get("extra") or {}).get("duration_s")


def _output_cell(job: dict[str, Any]) -> str:
    return render.clean(render.written(job) or job.get("output") or "-")


def print_table(jobs: list[dict[str, Any]], now: float) -> None:
    """The `jobs list` table, as wide as the terminal allows (all columns when piped)."""
    headers = ["ID", "SCENARIO", "STATE", "PRIO", "ATT", "AGENT", "PROG", "CREATED", "TOOK",
               "REASON", "OUTPUT"]
    rows = [[str(j["id"]), j["scenario"], j["state"], j["priority"],
             f"{j['attempt']}/{j['max_attempts']}", j["agent"] or "-",
             f"{100 * (j['progress'] or 0):.0f}%", render.short_time(j["created_at"], now),
             render.human_duration(_took(j, now)), j["reason"] or "-",
             _output_cell(j)] for j in jobs]
    width = shutil.get_terminal_size((100_000, 24)).columns
    # Narrow terminals lose the least telling columns first; the output path is cut last.
    for line in render.fit_columns(rows, headers, width, drop_order=[3, 4, 6, 8, 5, 7, 9],
                                   align_right=frozenset({0, 6})):
        print(line)


def show_job(job: dict[str, Any]) -> None:
    """`jobs show` text: what the job was asked to do, what it did, where the output landed,
    the ffmpeg command line, the stderr tail, then the audit trail."""
    extra = job.get("extra") or {}
    spec = job.get("spec") or {}

    def field(name: str, value: Any) -> None:
        if value not in (None, "", [], {}):
            print(f"{name:>12}: {value}")

    print(f"job {job['id']}: {job['state']}"
          + (f" ({job['reason']})" if job.get("reason") else ""))
    field("scenario", f"{job['scenario']}  priority {job['priority']}, attempt "
                      f"{job['attempt']}/{job['max_attempts']}")
    field("agent", job.get("agent"))
    field("input", render.clean(str(spec["input"])) if spec.get("input") else None)
    field("output", render.clean(str(job["output"])) if job.get("output") else None)
    params = spec.get("params") or {}
    field("params", "  ".join(f"{k}={v}" for k, v in params.items()))
    field("policy", ", ".join(text for key, text in (("overwrite", "overwrite the output"),
                                                     ("retry_timeouts", "retry timeouts"))
                              if spec.get(key)))
    where = render.written(job)
    if where:
        size = extra.get("output_bytes")
        field("written", render.clean(where) + (f"  ({render.human_bytes(size)})" if size
                                                else ""))
    elif job["state"] in TERMINAL and spec.get("preset"):  # an ffmpeg job that wrote nothing
        field("written", "nothing")
    argv = extra.get("argv")
    if isinstance(argv, list):
        field("ffmpeg", render.clean(shlex.join(str(a) for a in argv)))
    field("created", render.local_time(job.get("created_at")))
    field("started", render.local_time(job.get("started_at")) if job.get("started_at")
          else None)
    took = _took(job, time.time())
    if job.get("finished_at"):
        field("finished", render.local_time(job["finished_at"])
              + (f"  (took {render.human_duration(took)})" if took is not None else ""))
    elif took is not None:
        field("running", render.human_duration(took))
    field("exit code", job.get("exit_code"))
    err = render.error_line(job)
    if err and job["state"] != COMPLETED:
        field("error", err)
    limits = job.get("resource_limits") or {}
    field("limits", "  ".join(f"{k}={v}" for k, v in limits.items()))
    field("timeout", f"{job['timeout_s']:g}s" if job.get("timeout_s") else None)
    field("progress", f"{100 * (job.get('progress') or 0):.1f}%  in "
                      f"{render.human_bytes(job.get('bytes_in') or 0)}, out "
                      f"{render.human_bytes(job.get('bytes_out') or 0)}")
    field("bandwidth", render.bandwidth(job))
    if extra.get("speed") is not None:
        field("encoder", f"{extra.get('fps') or 0:.0f} fps, speed {extra['speed']:.2f}x")
    known = {"argv", "stderr", "error", "output_path", "output_bytes", "output_url",
             "duration_s", "fps", "speed", "out_time_s", "progress"}
    rest = {k: v for k, v in extra.items() if k not in known}
    field("extra", render.clean("  ".join(f"{k}={v}" for k, v in rest.items()))[:400])
    stderr = extra.get("stderr")
    if isinstance(stderr, str) and stderr.strip():
        print("  stderr tail:")
        for line in render.clean(stderr).rstrip().splitlines()[-15:]:
            print(f"    | {line}")
    print("  events:")
    for ev in job.get("events") or []:
        state = ev.get("state") or ev.get("to_state")
        seq = f"#{ev['seq']}" if ev.get("seq") is not None else ""
        print(f"    {seq:>8}  {render.local_time(ev['at'])}  {ev['from_state'] or '-':>10} -> "
              f"{state:<10}  attempt {ev['attempt']}  {ev['agent'] or '-':<12}  "
              f"{ev['reason'] or ''}".rstrip())


def _cancel(args: argparse.Namespace, client: Client) -> int:
    ids = parse_ids(args.ids)
    states = _states(args.state) if args.state else None
    if args.state:
        if states is None:
            raise UsageError("ffrtmp jobs cancel: --state needs states (e.g. queued)")
        named = set(ids)
        listed, _ = list_jobs(client, args, states, None)
        ids += [j["id"] for j in listed if j["id"] not in named]
    if not ids:
        if args.state:
            print(f"no {args.state} jobs to cancel")
            return 0
        raise UsageError("ffrtmp jobs cancel: name jobs (42, 107..306) or --state STATE")
    results: list[dict[str, Any]] = []
    for chunk in _chunks(ids, MAX_IDS):
        results += client.cancel(chunk, grace_s=args.grace)
    if args.json:
        _print_json(results)
    elif len(results) <= 20 and not args.state:
        for r in results:
            print(f"job {r['id']}: {r['result']}")
    else:
        counts = Counter(r["result"] for r in results)
        print(f"{len(results)} job(s): " + ", ".join(
            f"{counts[k]} {k}" for k in ("cancelled", "cancelling", "terminal", "not_found")
            if counts[k]))
    missing = [r["id"] for r in results if r["result"] == "not_found"]
    if missing:  # the others were cancelled; still an error, said once on stderr
        print(f"ffrtmp: not_found: job{'s' if len(missing) > 1 else ''} "
              f"{format_ids(missing)} not found", file=sys.stderr)
        return 1
    return 0


def cmd_jobs(args: argparse.Namespace, client: Client) -> int:
    """jobs list|show|cancel|retry|watch."""
    if args.jobs_cmd == "list":
        if not 1 <= args.limit <= 100_000:
            raise UsageError("ffrtmp jobs list: --limit must be between 1 and 100000")
        jobs, more = list_jobs(client, args, _states(args.state), args.limit)
        if args.json:
            _print_json(jobs)
        else:
            print_table(jobs, time.time())
        if more and jobs:
            print(f"… more; use --limit or --before {jobs[-1]['id']}", file=sys.stderr)
        return 0
    if args.jobs_cmd == "show":
        jobs, missing = client.get([args.id], events=True)
        if missing:
            raise ClientError("not_found", f"job {args.id} not found")
        if args.json:
            _print_json(jobs[0])
        else:
            show_job(jobs[0])
        return 0
    if args.jobs_cmd == "cancel":
        return _cancel(args, client)
    if args.jobs_cmd == "retry":
        new_id = client.retry(args.id)
        if args.json:
            _print_json({"id": new_id, "retry_of": args.id})
        else:
            print(f"job {args.id} resubmitted as job {new_id}")
        return 0
    # watch: the stream position first, then the job, so no event can fall between them
    events, head = follow_from(args, client)
    jobs, missing = client.get([args.id])
    if missing:
        raise ClientError("not_found", f"job {args.id} not found")
    job = jobs[0]
    ended = {job["id"]: job}
    if job["state"] not in TERMINAL:
        if not args.json:
            print(f"job {job['id']}: {job['state']}", file=sys.stderr, flush=True)
        ended = wait_for(client, [args.id], events, head, progress=not args.json)
        job = views(client, [args.id]).get(args.id) or ended[args.id]
    if args.json:
        _print_json(job)
    return report([args.id], ended, {args.id: job}, as_json=args.json)


def master_role(ep: str, keys: PeerKeys | None, timeout: float = MASTER_PROBE_S
                ) -> dict[str, Any]:
    """What one master endpoint says it is, from its INFO: {endpoint, role ("leader",
    "standby", "unreachable" or the ERROR code it answered), epoch, leader, instance}."""
    out: dict[str, Any] = {"endpoint": ep, "role": "unreachable", "epoch": None,
                           "leader": None, "instance": None}
    try:
        with Client(ep, timeout=timeout, keys=keys) as one:
            info = one.request("INFO")
    except NotLeader as e:  # a standby: it names the leader it knows (or none)
        leader = e.leader or {}
        return {**out, "role": "standby", "epoch": leader.get("epoch", 0), "leader": e.leader}
    except ClientError as e:
        return out if e.code == "timeout" else {**out, "role": e.code}
    role = str(info.get("role") or "leader")  # a 1.1 master has no role: it is the only one
    return {**out, "role": role, "epoch": info.get("epoch", 0), "instance": info.get("master"),
            "leader": info.get("leader")}


def cmd_nodes(args: argparse.Namespace, client: Client) -> int:
    """nodes list|drain."""
    if args.nodes_cmd == "drain":
        reply = client.drain(args.name, on=not args.undo)
        print(f"agent {reply['name']}: {'draining' if reply['draining'] else 'accepting work'}")
        return 0
    nodes = client.nodes()
    # With several masters, each one's role first (after NODES: a master that does not answer
    # at all is one error line and nothing on stdout, as for every command).
    masters = [master_role(ep, client.keys) for ep in client.endpoints] \
        if len(client.endpoints) > 1 else []
    if args.json:
        _print_json({"masters": masters, "nodes": nodes} if masters else nodes)
        return 0
    for m in masters:
        print(render.master_line(m))
    print(f"{'NAME':<20} {'STATE':<9} {'SLOTS':>5} {'BUSY':>4}  {'CGROUP':<6} {'LIMITS':<11} "
          "LAST SEEN")
    for n in nodes:
        print(f"{n['name']:<20} {n['state']:<9} {n['slots']:>5} {n['busy']:>4}  "
              f"{n['cgroup']:<6} {n['limits']:<11} {n['last_seen_s']:.1f}s ago")
    return 0


# ---- the grammar -------------------------------------------------------------------------------

JSON_HELP = "print JSON (the wire objects, times as epoch seconds) instead of text"
WAIT_HELP = ("follow the jobs to their end: one job's progress bar, a count for many; exit 0 "
             "only if all completed (events from --events-ep, FFRTMP_EVENTS, or the endpoint "
             "the master announces)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register submit, jobs and nodes."""
    p = sub.add_parser("submit", help="submit jobs",
                       description="Submit one job, or --count copies of it.")
    p.add_argument("scenario", help="a scenario or workload (`ffrtmp scenarios list`)")
    p.add_argument("--input", help="testsrc:duration=S[,size=WxH,rate=FPS], a path under the "
                                   "agent's --input-root, or an http/https/rtmp URL")
    p.add_argument("--output", help="a path under the agent's --output-root (or an rtmp:// URL "
                                    "for h264); templates {id} (the job id) and {n} (0-based "
                                    "index in --count), e.g. clips/{id}.mp4 (default: "
                                    "job-ID.EXT)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file (default: the job fails with "
                        "output_exists)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a scenario override or workload parameter, repeatable "
                        "(`ffrtmp scenarios show NAME` lists them)")
    p.add_argument("--priority", default="normal", choices=list(PRIORITIES),
                   help="queue priority")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="seconds an attempt may run before it ends timed_out (default: none)")
    p.add_argument("--retry-timeouts", action="store_true",
                   help="retry an attempt that timed out while attempts are left (default: a "
                        "timeout ends the job)")
    p.add_argument("--max-attempts", type=int, default=3, metavar="N",
                   help="attempts before the job fails for good")
    p.add_argument("--cpu", type=int, metavar="PCT", help="max CPU percent (100 = one core)")
    p.add_argument("--memory", type=int, metavar="MB", help="max memory, MB")
    p.add_argument("--disk", type=int, metavar="MB", help="max scratch disk, MB")
    p.add_argument("--count", type=int, default=1, metavar="N",
                   help=f"submit N copies (1..{MAX_COUNT}, sent {SUBMIT_CHUNK} per request)")
    p.add_argument("--idempotency-key", metavar="KEY",
                   help="submitting again with the same key returns the same jobs (default: "
                        "a random key per invocation, so a SUBMIT resent across a master "
                        "failover makes its jobs once)")
    p.add_argument("--wait", action="store_true", help=WAIT_HELP)
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_submit)

    j = sub.add_parser("jobs", help="list, show, cancel, retry or watch jobs",
                       description="Jobs: list, show, cancel, retry, watch.")
    jsub = j.add_subparsers(dest="jobs_cmd", required=True)
    jl = jsub.add_parser("list", help="jobs, newest first",
                         description="Jobs, newest first, filtered; says when there are more.")
    jl.add_argument("--state", metavar="STATES",
                    help="comma-separated states, e.g. queued,running (default: all)")
    jl.add_argument("--scenario", action="append", metavar="NAME",
                    help="only these scenarios (comma-separated or repeated)")
    jl.add_argument("--agent", metavar="NAME", help="only jobs last placed on this agent")
    jl.add_argument("--since", metavar="WHEN",
                    help="only jobs created since: an age (30s, 10m, 2h, 1d) or an ISO date "
                         "(2026-12-01, 2026-12-01T14:30; local time)")
    jl.add_argument("--limit", type=int, default=50, metavar="N", help="jobs to show")
    jl.add_argument("--before", type=int, metavar="ID", help="page: only ids below this")
    jl.add_argument("--json", action="store_true", help=JSON_HELP)
    js = jsub.add_parser("show", help="one job: input, output, ffmpeg argv, stderr, events",
                         description="One job in full, with its audit trail.")
    js.add_argument("id", type=int, help="job id")
    js.add_argument("--json", action="store_true", help=JSON_HELP)
    jc = jsub.add_parser("cancel", help="cancel jobs by id, range or state",
                         description="Cancel jobs: ids, ranges as submit prints them "
                                     "(107..306), and/or every job in --state.")
    jc.add_argument("ids", nargs="*", metavar="ID",
                    help="job ids and ranges: 42 107..306 400,401")
    jc.add_argument("--state", metavar="STATES",
                    help="also every job in these states, e.g. queued (paged through LIST, "
                         f"cancelled {MAX_IDS} per request)")
    jc.add_argument("--grace", type=float, default=30.0, metavar="S",
                    help="seconds a running job gets between SIGTERM and SIGKILL")
    jc.add_argument("--json", action="store_true", help=JSON_HELP)
    jr = jsub.add_parser("retry", help="submit a terminal job again as a new job")
    jr.add_argument("id", type=int, help="job id (completed, failed, timed_out or cancelled)")
    jr.add_argument("--json", action="store_true", help=JSON_HELP)
    jw = jsub.add_parser("watch", help="follow one job to its end (exit 0 if it completed)")
    jw.add_argument("id", type=int, help="job id")
    jw.add_argument("--json", action="store_true", help="print the final job as JSON")
    j.set_defaults(func=cmd_jobs)

    n = sub.add_parser("nodes", help="list or drain agents")
    nsub = n.add_subparsers(dest="nodes_cmd", required=True)
    nl = nsub.add_parser("list", help="every agent the master knows",
                         description="Every agent the master knows. With several --master "
                                     "endpoints (FFRTMP_MASTER),\nfirst one line per master "
                                     "from its INFO: leader and its epoch, standby and\nthe "
                                     "leader it names, or unreachable.")
    nl.add_argument("--json", action="store_true",
                    help=JSON_HELP + "; with several masters an object {masters, nodes}")
    nd = nsub.add_parser("drain", help="stop dispatching to an agent (running jobs finish)")
    nd.add_argument("name", help="agent name")
    nd.add_argument("--undo", action="store_true", help="resume dispatching to the agent")
    n.set_defaults(func=cmd_nodes)
    for parser in (p, j, n):
        parser.set_defaults(client=True, events=None)
