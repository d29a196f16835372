"""The runner hook for ffmpeg jobs: progress from `-progress pipe:1`, byte counters, stall watch,
and moving a completed output into place atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from agent.ffmpeg.argv import Plan
from agent.ffmpeg.progress import ProgressParser, Snapshot
from agent.runner import Hook, ProcessRun, Result

IO_EVERY_S = 0.5


def tree_read_bytes(pid: int) -> int | None:
    """Bytes read by a process and its children (/proc/<pid>/io rchar), if readable."""
    try:
        root = psutil.Process(pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.io_counters().read_chars
        return total
    except psutil.Error:
        return None


class FFmpegHook(Hook):
    """Follows one ffmpeg process."""

    def __init__(self, plan: Plan, stall_s: float) -> None:
        self.plan = plan
        self.stall_s = stall_s
        self.parser = ProgressParser()
        self.last: Snapshot | None = None
        self.last_change = 0.0
        self.last_out_time: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self._next_io = 0.0
        self.ended = False

    def before_spawn(self, run: ProcessRun) -> None:
        run.stdout_pipe = True
        if self.plan.final_output is not None:
            self.plan.final_output.parent.mkdir(parents=True, exist_ok=True)

    def poll(self, run: ProcessRun, now: float) -> str | None:
        if not self.last_change:
            self.last_change = now
        self._read(run, now)
        if (now >= self._next_io or run.exited) and run.pid is not None:
            self._next_io = now + IO_EVERY_S
            read = tree_read_bytes(run.pid)
            if read is not None:
                self.bytes_in = max(self.bytes_in, read)
        if self.stall_s and now - self.last_change > self.stall_s:
            return "stalled"
        return None

    def _read(self, run: ProcessRun, now: float) -> None:
        out = run.proc.stdout if run.proc is not None else None
        if out is None or out.closed:
            return
        while True:
            try:
                chunk = os.read(out.fileno(), 65536)
            except BlockingIOError:
                return
            except OSError:
                return
            if not chunk:
                return
            for snap in self.parser.feed(chunk):
                if snap.out_time_s != self.last_out_time or snap.end:
                    self.last_change = now
                    self.last_out_time = snap.out_time_s
                if snap.total_size is not None:
                    self.bytes_out = max(self.bytes_out, snap.total_size)
                self.ended = self.ended or snap.end
                self.last = snap

    def progress(self) -> dict[str, Any] | None:
        snap = self.last
        if snap is None:
            return {"progress": 0.0, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}
        fraction = 0.0
        if self.ended:
            fraction = 1.0
        elif self.plan.duration_s and snap.out_time_s is not None:
            fraction = max(0.0, min(0.999, snap.out_time_s / self.plan.duration_s))
        out: dict[str, Any] = {"progress": fraction, "bytes_in": self.bytes_in,
                               "bytes_out": self.bytes_out}
        for key in ("fps", "speed", "out_time_s"):
            value = getattr(snap, key)
            if value is not None:
                out[key] = value
        return out

    def after_exit(self, run: ProcessRun, result: Result) -> Result:
        extra = dict(result.extra)
        extra.update({k: v for k, v in (self.progress() or {}).items()
                      if k not in ("progress", "bytes_in", "bytes_out")})
        if result.status == "completed" and self.plan.tmp_output is not None:
            final = self.plan.final_output
            assert final is not None
            try:
                size = self.plan.tmp_output.stat().st_size
                move_into_place(self.plan.tmp_output, final)
            except OSError as e:
                extra["error"] = f"cannot move output into place: {e}"
                return replace(result, status="failed", reason="exit_code", extra=extra,
                               bytes_in=self.bytes_in, bytes_out=self.bytes_out)
            self.bytes_out = size
            extra.update(output_path=str(final), output_bytes=size)
        if self.plan.live:
            extra["output_url"] = True
        return replace(result, extra=extra, bytes_in=self.bytes_in, bytes_out=self.bytes_out)


def move_into_place(src: Path, dst: Path) -> None:
    """Atomically publish src at dst: rename, or copy beside dst then rename across filesystems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
        return
    except OSError as e:
        if e.errno != 18:  # EXDEV: another filesystem
            raise
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
