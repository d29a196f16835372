"""Small statistics: exact percentiles of samples, and median/min/max across repeated runs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values; NaN if empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary(values: Iterable[float], digits: int = 3) -> dict[str, Any]:
    """{n, p50, p95, p99, mean, min, max} of samples (values None when there are none)."""
    v = sorted(values)
    if not v:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "mean": None, "min": None,
                "max": None}
    return {"n": len(v), "p50": round(percentile(v, 50), digits),
            "p95": round(percentile(v, 95), digits), "p99": round(percentile(v, 99), digits),
            "mean": round(statistics.fmean(v), digits), "min": round(v[0], digits),
            "max": round(v[-1], digits)}


def spread(values: Iterable[float | None], digits: int = 3) -> dict[str, Any]:
    """{median, min, max, n} across runs, ignoring runs that have no value."""
    v = sorted(x for x in values if x is not None and not math.isnan(x))
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0}
    med = statistics.median(v)
    if all(isinstance(x, int) for x in v) and float(med).is_integer():
        med = int(med)  # counts stay counts
    return {"median": round(med, digits), "min": round(v[0], digits),
            "max": round(v[-1], digits), "n": len(v)}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, int | float]:
    """Numeric leaves of a nested dict as {'a.b.c': value} (lists are skipped)."""
    out: dict[str, int | float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[key] = v
    return out


def rate(count: int, seconds: float) -> float | None:
    """count per second, or None for an empty window."""
    return round(count / seconds, 1) if seconds > 0 and count else None
