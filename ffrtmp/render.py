"""Pure text rendering of job progress and results for the CLI."""

from __future__ import annotations

from typing import Any


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


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


def final_line(job: dict[str, Any]) -> str:
    """One line per finished job: state, output, size, duration, reason."""
    extra = job.get("extra") or {}
    line = f"job {job['id']}: {job['state']}"
    if job.get("reason"):
        line += f" ({job['reason']})"
    where = extra.get("output_path") or job.get("output")
    if where:
        line += f"  -> {where}"
    size = extra.get("output_bytes") or job.get("bytes_out")
    if size:
        line += f"  {human_bytes(size)}"
    if extra.get("out_time_s") is not None:
        line += f"  media {float(extra['out_time_s']):.2f}s"
    if extra.get("duration_s") is not None:
        line += f"  took {float(extra['duration_s']):.2f}s"
    return line


def bandwidth(job: dict[str, Any]) -> str | None:
    """Average output bandwidth of a job, if it ran for a measurable time."""
    extra = job.get("extra") or {}
    took = extra.get("duration_s")
    if not took or not job.get("bytes_out"):
        return None
    return f"{8 * job['bytes_out'] / took / 1e6:.2f} Mbit/s out"
