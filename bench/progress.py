"""A live progress line on stderr (redrawn on a terminal, a line every few seconds otherwise)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from bench.load import Progress


class Bar:
    """Phase messages and a progress bar; `quiet` silences both."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label = ""
        self._last_draw = 0.0
        self._open = False

    def phase(self, text: str) -> None:
        """A one-line message about what happens next."""
        if self.quiet:
            return
        self._end_line()
        self.stream.write(f"bench: {text}\n")
        self.stream.flush()

    def update(self, p: Progress) -> None:
        """Redraw the bar (rate-limited) for a snapshot of the load."""
        if self.quiet:
            return
        now = time.monotonic()
        final = p.done >= p.total
        if not final and now - self._last_draw < (0.1 if self.tty else 5.0):
            return
        self._last_draw = now
        width = 24
        full = int(width * p.done / p.total) if p.total else width
        bar = "#" * full + "." * (width - full)
        rate = p.done / p.t if p.t > 0 else 0.0
        line = (f"{self.label}[{bar}] {p.done:,}/{p.total:,} done  {rate:,.0f} jobs/s  "
                f"in flight {p.submitted - p.done:,}  failed {p.failed:,}  {p.t:.1f}s")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self._open = True
            if final:
                self._end_line()
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _end_line(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False
