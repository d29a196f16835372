"""Pure text rendering of jobs, progress and results for the CLI (no I/O, no clock reads)."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from datetime import datetime
from typing import Any

# What a job's stderr may carry that must not reach a terminal as is: escape sequences.
_ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-_])")
ERROR_MAX = 300  # characters of an error line shown


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float | None) -> str:
    """0.123 -> '0.12s', 65 -> '1m05s', 7380 -> '2h03m', 200000 -> '2d07h'; None -> '-'."""
    if seconds is None:
        return "-"
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.2f}s" if s < 10 else f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def local_time(at: Any) -> str:
    """A wire time (float epoch seconds) as local ISO 8601 with milliseconds; '-' for none.

    A string (an ISO time from a protocol 1.0 master) is shown as it came."""
    if at is None:
        return "-"
    if isinstance(at, str):
        return at
    return datetime.fromtimestamp(float(at)).astimezone().isoformat(timespec="milliseconds")


def short_time(at: Any, now: float) -> str:
    """A wire time for a table column: 'HH:MM:SS' today, else 'YYYY-MM-DD HH:MM' (local)."""
    if at is None:
        return "-"
    if isinstance(at, str):
        try:
            at = datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return at[:16]
    when = datetime.fromtimestamp(float(at))
    if when.date() == datetime.fromtimestamp(now).date():
        return when.strftime("%H:%M:%S")
    return when.strftime("%Y-%m-%d %H:%M")


def _epoch(at: Any) -> float | None:
    if at is None:
        return None
    if isinstance(at, str):
        try:
            return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return float(at)


def job_duration(job: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds from start to finish (to `now` while it runs); None if it never started."""
    started = _epoch(job.get("started_at"))
    if started is None:
        return None
    finished = _epoch(job.get("finished_at"))
    if finished is None:
        if now is None or job.get("state") in ("completed", "failed", "timed_out", "cancelled"):
            return None
        finished = now
    return max(0.0, finished - started)


def clean(text: str) -> str:
    """Text from a job (ffmpeg's stderr, an error) made safe for a terminal: no escape
    sequences, no control characters but newlines, tabs as spaces."""
    text = _ANSI.sub("", text).replace("\t", " ").replace("\r\n", "\n").replace("\r", "\n")
    return "".join(c for c in text if c == "\n" or unicodedata.category(c)[0] != "C")


def error_line(job: dict[str, Any]) -> str | None:
    """What went wrong, in one line: `extra.error` (ffmpeg's last error line, the agent's
    reason), else the last non-empty line of `extra.stderr`."""
    extra = job.get("extra") or {}
    for text in (extra.get("error"), extra.get("stderr")):
        if isinstance(text, str):
            lines = [ln.strip() for ln in clean(text).splitlines() if ln.strip()]
            if lines:
                line = lines[-1]
                return line if len(line) <= ERROR_MAX else line[:ERROR_MAX - 1] + "…"
    return None


def written(job: dict[str, Any]) -> str | None:
    """Where the job's output landed, only if it was written: the agent's path of the file
    (`extra.output_path`) or, for a stream that was pushed, the output URL."""
    extra = job.get("extra") or {}
    if extra.get("output_path"):
        return str(extra["output_path"])
    if extra.get("output_url") and job.get("state") == "completed" and job.get("output"):
        return str(job["output"])
    return None


def bar(fraction: float, width: int = 24) -> str:
    """A fixed-width progress bar."""
    fraction = min(1.0, max(0.0, fraction))
    full = int(fraction * width)
    return "[" + "#" * full + "-" * (width - full) + "]"


def eta_s(fraction: float, elapsed_s: float) -> float | None:
    """Seconds left at the rate so far, or None before there is a rate."""
    if fraction <= 0.01 or elapsed_s <= 0:
        return None
    return max(0.0, elapsed_s * (1 - fraction) / fraction)


def progress_line(job_id: int, fields: dict[str, Any], elapsed_s: float) -> str:
    """'job 7 [#####----] 42.0%  fps 120  speed 4.0x  ETA 3s  1.2 MiB out'."""
    fraction = float(fields.get("progress") or 0.0)
    parts = [f"job {job_id} {bar(fraction)} {100 * fraction:5.1f}%"]
    if fields.get("fps") is not None:
        parts.append(f"fps {float(fields['fps']):.0f}")
    if fields.get("speed") is not None:
        parts.append(f"speed {float(fields['speed']):.2f}x")
    eta = eta_s(fraction, elapsed_s)
    parts.append(f"ETA {eta:.0f}s" if eta is not None else "ETA -")
    if fields.get("bytes_out"):
        parts.append(f"{human_bytes(fields['bytes_out'])} out")
    return "  ".join(parts)


def batch_line(total: int, counts: dict[str, int], elapsed_s: float) -> str:
    """'  1234/20000 finished (3 failed)  850 jobs/s' for a wait on many jobs."""
    done = sum(counts.values())
    line = f"{done}/{total} finished"
    bad = done - counts.get("completed", 0)
    if bad:
        line += f" ({bad} not completed)"
    if elapsed_s > 0 and done:
        line += f"  {done / elapsed_s:.0f} jobs/s"
    return line


def final_line(job: dict[str, Any]) -> str:
    """One line per finished job.

    completed: 'job 7: completed -> /out/a.mp4  1.2 MiB  media 10.00s  took 2.31s'
    otherwise: 'job 21: failed (exit_code): Error opening input: No such file or directory'
    The arrow appears only for an output that was written."""
    extra = job.get("extra") or {}
    line = f"job {job['id']}: {job['state']}"
    if job["state"] != "completed":
        if job.get("reason"):
            line += f" ({job['reason']})"
        err = error_line(job)
        if err:
            line += f": {err}"
    where = written(job)
    if where:
        line += f" -> {clean(where)}"
    if job["state"] == "completed":
        size = extra.get("output_bytes") or job.get("bytes_out")
        if size:
            line += f"  {human_bytes(size)}"
        if extra.get("out_time_s") is not None:
            line += f"  media {float(extra['out_time_s']):.2f}s"
    took = extra.get("duration_s")
    if took is None:
        took = job_duration(job)
    if took is not None and job["state"] == "completed":
        line += f"  took {human_duration(took)}"
    return line


def summary_line(jobs: list[dict[str, Any]], missing: int = 0) -> str:
    """'20000 jobs: 19990 completed, 7 failed (exit_code 7), 3 timed_out (timeout 3)'."""
    by_state = Counter(j["state"] for j in jobs)
    parts = []
    for state in ("completed", "failed", "timed_out", "cancelled"):
        n = by_state.get(state)
        if not n:
            continue
        reasons = Counter(j.get("reason") or "-" for j in jobs if j["state"] == state)
        text = f"{n} {state}"
        if state != "completed":
            text += " (" + ", ".join(f"{r} {c}" for r, c in reasons.most_common(4)) + ")"
        parts.append(text)
    if missing:
        parts.append(f"{missing} not found")
    return f"{len(jobs) + missing} jobs: " + (", ".join(parts) or "none finished")


def bandwidth(job: dict[str, Any]) -> str | None:
    """Average output bandwidth of a job, if it ran for a measurable time."""
    extra = job.get("extra") or {}
    took = extra.get("duration_s")
    if not took or not job.get("bytes_out"):
        return None
    return f"{8 * job['bytes_out'] / took / 1e6:.2f} Mbit/s out"


def fit_columns(rows: list[list[str]], headers: list[str], width: int,
                drop_order: list[int], align_right: frozenset[int] = frozenset(),
                squeeze: int = 24) -> list[str]:
    """A table as lines no wider than `width`: columns in `drop_order` are dropped (first
    first) while it is too wide even with the last column cut to `squeeze` characters; then
    lines are cut with '…' (the last column first)."""
    keep = list(range(len(headers)))

    def widths() -> dict[int, int]:
        return {i: max([len(headers[i])] + [len(r[i]) for r in rows]) for i in keep}

    def total(w: dict[int, int]) -> int:  # the last column may be cut to `squeeze`
        last = keep[-1]
        return sum(min(v, squeeze) if i == last else v for i, v in w.items()) \
            + 2 * (len(keep) - 1)

    w = widths()
    for i in drop_order:
        if total(w) <= width or len(keep) <= 2:
            break
        if i in keep:
            keep.remove(i)
            w = widths()
    lines = []
    for cells in [headers, *rows]:
        parts = [cells[i].rjust(w[i]) if i in align_right else cells[i].ljust(w[i])
                 for i in keep[:-1]]
        head = "  ".join(parts + [""])
        tail = cells[keep[-1]]
        room = width - len(head)
        if len(tail) > room >= 8:  # keep the end of the last cell (a path's file name)
            tail = "…" + tail[len(tail) - room + 1:]
        line = (head + tail).rstrip()
        if len(line) > width:
            line = line[:max(1, width - 1)] + "…"
        lines.append(line)
    return lines


def master_line(m: dict[str, Any]) -> str:
    """`nodes list`: one master endpoint's role (ffrtmp.client_cli.master_role)."""
    head = f"master {clean(str(m['endpoint']))}  "
    if m["role"] == "leader":
        return f"{head}leader  epoch {m.get('epoch') or 0}"
    if m["role"] == "standby":
        leader = m.get("leader") or {}
        where = leader.get("clients") if isinstance(leader, dict) else None
        return head + (f"standby (leader {clean(str(where))})" if where
                       else "standby (no leader known)")
    return head + clean(str(m["role"]))
