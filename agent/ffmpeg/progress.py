"""A pure parser of ffmpeg's `-progress` stream (key=value lines, blocks ended by `progress=`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Snapshot:
    """One completed progress block."""

    out_time_s: float | None = None
    frame: int | None = None
    fps: float | None = None
    speed: float | None = None
    total_size: int | None = None
    end: bool = False


def _float(text: str) -> float | None:
    text = text.strip().rstrip("x")
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and value not in (float("inf"), float("-inf")) else None


def _int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


@dataclass
class ProgressParser:
    """Feed bytes in any chunking; get a Snapshot for every block the bytes complete."""

    _buf: bytes = b""
    _cur: dict[str, str] = field(default_factory=dict)
    max_line: int = 4096

    def feed(self, data: bytes) -> list[Snapshot]:
        """Parse more of the stream; returns the snapshots completed by it, in order."""
        self._buf += data
        out: list[Snapshot] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self.max_line:  # garbage without newlines: drop it
                    self._buf = b""
                return out
            line, self._buf = self._buf[:nl], self._buf[nl + 1:]
            key, sep, value = line.decode("utf-8", "replace").strip().partition("=")
            if not sep:
                continue
            key = key.strip()
            if key == "progress":
                out.append(self._snapshot(value.strip() == "end"))
                self._cur = {}
            else:
                self._cur[key] = value

    def _snapshot(self, end: bool) -> Snapshot:
        cur = self._cur
        out_time = None
        if "out_time_us" in cur:
            us = _int(cur["out_time_us"])
            out_time = us / 1e6 if us is not None and us >= 0 else None
        elif "out_time_ms" in cur:  # despite the name, microseconds in every ffmpeg release
            us = _int(cur["out_time_ms"])
            out_time = us / 1e6 if us is not None and us >= 0 else None
        size = _int(cur.get("total_size", ""))
        return Snapshot(
            out_time_s=out_time,
            frame=_int(cur.get("frame", "")),
            fps=_float(cur.get("fps", "")),
            speed=_float(cur.get("speed", "")),
            total_size=size if size is not None and size >= 0 else None,
            end=end,
        )
