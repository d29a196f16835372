"""A hand-written SVG (no plotting dependency): jobs over time, and the latency distribution."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

W, H = 900, 720
PANEL_H = 250
LEFT, RIGHT = 70, 20
COLORS = {"submitted": "#1f77b4", "completed": "#2ca02c", "in flight": "#ff7f0e",
          "dispatched": "#9467bd", "failed": "#d62728"}


def _nice(x: float) -> float:
    """A round axis maximum >= x."""
    if x <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= x:
            return m * mag
    return 10 * mag


def _fmt(v: float) -> str:
    if v >= 10_000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def _axes(top: float, xmax: float, ymax: float, xlabel: str, ylabel: str,
          xlog: bool = False) -> list[str]:
    x0, x1, y0, y1 = LEFT, W - RIGHT, top + PANEL_H, top
    out = [f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{PANEL_H}" fill="none" '
           'stroke="#888"/>']
    for i in range(6):
        yv = ymax * i / 5
        y = y0 - PANEL_H * i / 5
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(yv)}</text>')
    ticks = _log_ticks(xmax) if xlog else [xmax * i / 5 for i in range(6)]
    for xv in ticks:
        x = _xpos(xv, xmax, xlog)
        out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + 5}" stroke="#888"/>')
        out.append(f'<text x="{x:.1f}" y="{y0 + 18}" text-anchor="middle">{_fmt(round(xv, 3))}'
                   '</text>')
    out.append(f'<text x="{(x0 + x1) / 2}" y="{y0 + 36}" text-anchor="middle">'
               f'{escape(xlabel)}</text>')
    out.append(f'<text x="16" y="{top + PANEL_H / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {top + PANEL_H / 2})">{escape(ylabel)}</text>')
    return out


def _log_ticks(xmax: float) -> list[float]:
    ticks, v = [], 0.1
    while v <= xmax * 1.0001:
        ticks.append(v)
        v *= 10
    return ticks or [xmax]


def _xpos(v: float, xmax: float, xlog: bool) -> float:
    span = W - RIGHT - LEFT
    if xlog:
        lo, hi = math.log10(0.1), math.log10(max(xmax, 0.2))
        return LEFT + span * (math.log10(max(v, 0.1)) - lo) / (hi - lo)
    return LEFT + span * (v / xmax if xmax else 0)


def _legend(top: float, names: Sequence[str]) -> list[str]:
    out = []
    for i, name in enumerate(names):
        x = LEFT + 10 + i * 130
        out.append(f'<line x1="{x}" y1="{top - 8}" x2="{x + 20}" y2="{top - 8}" '
                   f'stroke="{COLORS[name]}" stroke-width="3"/>')
        out.append(f'<text x="{x + 26}" y="{top - 4}">{escape(name)}</text>')
    return out


def render(title: str, timeline: Sequence[Sequence[float]], latencies_ms: Sequence[float],
           subtitle: str = "") -> str:
    """The SVG text: timeline rows are (t, submitted, dispatched, completed, failed)."""
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{LEFT}" y="22" font-size="16" font-weight="bold">{escape(title)}</text>',
             f'<text x="{LEFT}" y="40" fill="#555">{escape(subtitle)}</text>']
    top1 = 70
    rows = list(timeline)
    tmax = _nice(max((r[0] for r in rows), default=1.0))
    series = {
        "submitted": [(r[0], r[1]) for r in rows],
        "dispatched": [(r[0], r[2]) for r in rows],
        "completed": [(r[0], r[3]) for r in rows],
        "in flight": [(r[0], r[1] - r[3]) for r in rows],
    }
    if any(r[4] for r in rows):
        series["failed"] = [(r[0], r[4]) for r in rows]
    ymax = _nice(max((v for pts in series.values() for _, v in pts), default=1.0))
    parts += _axes(top1, tmax, ymax, "seconds since the first SUBMIT", "jobs")
    for name, pts in series.items():
        path = " ".join(f"{_xpos(t, tmax, False):.1f},{top1 + PANEL_H * (1 - v / ymax):.1f}"
                        for t, v in pts)
        if path:
            parts.append(f'<polyline points="{path}" fill="none" stroke="{COLORS[name]}" '
                         'stroke-width="2"/>')
    parts += _legend(top1, list(series))
    top2 = top1 + PANEL_H + 80
    parts += _histogram(top2, latencies_ms)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _histogram(top: float, values: Sequence[float]) -> list[str]:
    """Log-spaced histogram of submit -> done latency, with p50/p95/p99 marks."""
    v = sorted(x for x in values if x > 0)
    if not v:
        return [f'<text x="{LEFT}" y="{top + 20}">no latency samples</text>']
    xmax = 10 ** math.ceil(math.log10(max(v[-1], 0.2)))
    lo, hi = math.log10(0.1), math.log10(xmax)
    nbins = 60
    counts = [0] * nbins
    for x in v:
        i = int((math.log10(max(x, 0.1)) - lo) / (hi - lo) * nbins)
        counts[min(max(i, 0), nbins - 1)] += 1
    ymax = _nice(max(counts))
    out = _axes(top, xmax, ymax, "submit -> done latency, ms (log scale)", "jobs", xlog=True)
    span = W - RIGHT - LEFT
    for i, c in enumerate(counts):
        if not c:
            continue
        x = LEFT + span * i / nbins
        h = PANEL_H * c / ymax
        out.append(f'<rect x="{x:.1f}" y="{top + PANEL_H - h:.1f}" width="{span / nbins - 1:.1f}" '
                   f'height="{h:.1f}" fill="#1f77b4" opacity="0.8"/>')
    for row, (q, color) in enumerate(((50, "#2ca02c"), (95, "#ff7f0e"), (99, "#d62728"))):
        pv = v[min(len(v), max(1, math.ceil(q / 100 * len(v)))) - 1]
        x = _xpos(pv, xmax, True)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + PANEL_H}" '
                   f'stroke="{color}" stroke-dasharray="4 3"/>')
        anchor = "end" if x > W - RIGHT - 120 else "start"
        tx = x - 3 if anchor == "end" else x + 3
        out.append(f'<text x="{tx:.1f}" y="{top + 14 + 14 * row}" fill="{color}" '
                   f'text-anchor="{anchor}">p{q} {pv:.3g} ms</text>')
    return out
