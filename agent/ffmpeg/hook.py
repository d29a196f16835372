"""The runner hook for ffmpeg jobs: progress from `-progress pipe:1`, the input's duration from a
probe run beside the job, byte counters, stall watch, ffmpeg's last error line, a corrupt local
input told from other failures, the argv as run, and publishing a completed output (atomically,
under the spec's overwrite policy: agent/ffmpeg/publish.py)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import unicodedata
from dataclasses import replace
from typing import IO, Any

from agent.ffmpeg.argv import Plan, parse_duration
from agent.ffmpeg.progress import ProgressParser, Snapshot
from agent.ffmpeg.publish import OutputExists, publish
from agent.runner import _PRCTL, PR_SET_PDEATHSIG, Hook, ProcessRun, Result
from bus.vocab import AGENT_ERROR, EXIT_CODE, FAILED, INVALID_INPUT, OUTPUT_EXISTS

IO_EVERY_S = 0.5
PROBE_TIMEOUT_S = 20.0
PROBE_LOG_MAX = 1 << 20
ERROR_LINE_MAX = 300
ANSI_ESCAPE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-_])")
# ffmpeg's generic trailers: the line before them says what went wrong.
GENERIC_LINES = frozenset({"Conversion failed!"})
# DONE.extra.argv bounds: characters per argument, UTF-8 bytes in all.
ARG_MAX_CHARS = 1024
ARGV_MAX_BYTES = 4096
# How ffmpeg reports an input it could not open or probe: "<input>: <error>" (ffmpeg <= 5),
# "[in#0 @ 0x..] Error opening input: <error>" and "Error opening input files: <error>" (6+).
OPEN_ERROR = re.compile(r"^(?:\[in#\d+[^\]]*\] )?Error opening input(?: files)?: (.+)$")
# Errors that say the data is not media ffmpeg can read (a corrupt, truncated or foreign file;
# a format off the demuxer allowlist): the same file fails the same way on every retry. Not
# among them: I/O errors, memory, timeouts (they may pass).
DATA_ERRORS = ("Invalid data found when processing input", "Invalid argument", "End of file",
               "could not find codec parameters", "moov atom not found", "not on whitelist")


def corrupt_input(stderr: str, path: str) -> bool:
    """True if ffmpeg's stderr says it could not open or probe the local input `path` as
    media (DATA_ERRORS, on the line naming the input or ffmpeg's "Error opening input")."""
    prefix = path + ": "
    for raw in stderr.splitlines():
        line = raw.strip()
        if line.startswith(prefix):
            message = line[len(prefix):]
        else:
            m = OPEN_ERROR.match(line)
            if m is None:
                continue
            message = m.group(1)
        if any(e in message for e in DATA_ERRORS):
            return True
    return False


def bounded_argv(argv: list[str], limit: int = ARGV_MAX_BYTES) -> list[str]:
    """The argv for DONE.extra.argv: valid UTF-8, each argument at most ARG_MAX_CHARS
    characters, at most `limit` bytes in all (middle arguments give way to one "…", the first
    and the last two - the output - are kept)."""
    def clean(arg: str) -> str:
        text = os.fsencode(arg).decode("utf-8", "replace")
        return text if len(text) <= ARG_MAX_CHARS else text[:ARG_MAX_CHARS - 1] + "…"

    def size(arg: str) -> int:
        return len(arg.encode("utf-8"))

    args = [clean(str(a)) for a in argv]
    if sum(map(size, args)) <= limit:
        return args
    tail = args[-2:]
    budget = limit - sum(map(size, tail)) - size("…")
    head: list[str] = []
    for arg in args[:-2]:
        if size(arg) > budget:
            break
        head.append(arg)
        budget -= size(arg)
    return head + ["…"] + tail


def _probe_setup(parent: int) -> Any:
    """The probe's preexec_fn: SIGKILL it if the agent dies (it is the agent's, not a job's)."""

    def setup() -> None:
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if os.getppid() != parent:  # the agent died before the prctl took hold
                os.kill(os.getpid(), signal.SIGKILL)

    return setup


def last_error_line(text: str, limit: int = ERROR_LINE_MAX) -> str | None:
    """The last non-empty line of ffmpeg's stderr, without escape sequences or control
    characters, at most `limit` characters (a generic 'Conversion failed!' is skipped when a
    line precedes it)."""
    lines = []
    for raw in text.splitlines():
        line = ANSI_ESCAPE.sub("", raw).replace("\t", " ")
        line = "".join(c for c in line if unicodedata.category(c)[0] != "C").strip()
        if line:
            lines.append(line)
    while len(lines) > 1 and lines[-1] in GENERIC_LINES:
        lines.pop()
    return lines[-1][:limit] if lines else None


def read_chars(pid: int) -> int | None:
    """Bytes the process has read (/proc/<pid>/io rchar), if readable. The job's pid is ffmpeg
    itself (its launcher execs it); reading one file costs a fraction of walking /proc for
    children, which was a third of the agent's CPU during short ffmpeg jobs."""
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            for line in f.read().splitlines():
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class FFmpegHook(Hook):
    """Follows one ffmpeg process."""

    def __init__(self, plan: Plan, stall_s: float,
                 probe_timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self.plan = plan
        self.stall_s = stall_s
        self.duration_s = plan.duration_s  # the expected output duration, once known
        self.probe_timeout_s = probe_timeout_s
        self.probe: subprocess.Popen[bytes] | None = None
        self._probe_log: IO[bytes] | None = None
        self._probe_deadline: float | None = None
        self._probe_started = False
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

    # ---- the duration probe: `ffmpeg -i INPUT` as a child, never waited for -------------------

    def _start_probe(self, run: ProcessRun, now: float) -> None:
        """Start the probe beside the job (first poll: the job is running, so after_exit is
        sure to come and reap it)."""
        self._probe_started = True
        if not self.plan.probe_argv:
            return
        try:
            self._probe_log = open(run.workdir / "probe.log", "w+b")  # noqa: SIM115
            self.probe = subprocess.Popen(
                self.plan.probe_argv, cwd=run.workdir, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=self._probe_log, start_new_session=True,
                preexec_fn=_probe_setup(os.getpid()), close_fds=True)
        except (OSError, subprocess.SubprocessError):
            self._close_probe_log()
            self.probe = None  # no duration: percent stays 0 until the end
            return
        self._probe_deadline = now + self.probe_timeout_s

    def _check_probe(self, now: float) -> None:
        probe = self.probe
        if probe is None or probe.returncode is not None and self._probe_log is None:
            return
        if probe.poll() is None:
            if self._probe_deadline is not None and now >= self._probe_deadline:
                self._stop_probe()
            return
        log = self._probe_log
        if log is not None:
            with contextlib.suppress(OSError, ValueError):
                log.seek(0)
                probed = parse_duration(log.read(PROBE_LOG_MAX))
                if probed:
                    cut = self.plan.duration_s
                    self.duration_s = min(probed, cut) if cut else probed
        self._close_probe_log()

    def _stop_probe(self) -> None:
        """Kill the probe's process group if it still runs, and reap it (no orphan, no zombie)."""
        probe = self.probe
        if probe is not None and probe.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(probe.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                probe.wait(timeout=5)
        self._close_probe_log()

    def _close_probe_log(self) -> None:
        if self._probe_log is not None:
            with contextlib.suppress(OSError):
                self._probe_log.close()
            self._probe_log = None

    # ---- the runner's calls -------------------------------------------------------------------

    def poll(self, run: ProcessRun, now: float) -> str | None:
        if not self.last_change:
            self.last_change = now
        if not self._probe_started and not run.exited:
            self._start_probe(run, now)
        self._check_probe(now)
        self._read(run, now)
        if (now >= self._next_io or run.exited) and run.pid is not None:
            self._next_io = now + IO_EVERY_S
            read = read_chars(run.pid)
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
        elif self.duration_s and snap.out_time_s is not None:
            fraction = max(0.0, min(0.999, snap.out_time_s / self.duration_s))
        out: dict[str, Any] = {"progress": fraction, "bytes_in": self.bytes_in,
                               "bytes_out": self.bytes_out}
        for key in ("fps", "speed", "out_time_s"):
            value = getattr(snap, key)
            if value is not None:
                out[key] = value
        return out

    def after_exit(self, run: ProcessRun, result: Result) -> Result:
        self._check_probe(float("inf"))  # read it if it has just ended, else kill it …
        self._stop_probe()  # … and reap it: a probe never outlives its job
        extra = dict(result.extra)
        if result.status in ("failed", "timed_out") and "error" not in extra:
            line = last_error_line(run.stderr_tail())
            if line:
                extra["error"] = line
        extra.update({k: v for k, v in (self.progress() or {}).items()
                      if k not in ("progress", "bytes_in", "bytes_out")})
        extra["argv"] = bounded_argv(run.argv)
        local = self.plan.local_input
        if (result.status == FAILED and result.reason == EXIT_CODE and local is not None
                and self.last is None and corrupt_input(run.stderr_tail(), local)):
            # ffmpeg could not open or probe a local file as media: a retry reads the same bytes
            result = replace(result, reason=INVALID_INPUT)
        if result.status == "completed" and self.plan.tmp_output is not None:
            final = self.plan.final_output
            assert final is not None
            try:
                if os.path.realpath(final.parent) != str(final.parent):
                    raise OSError(f"{final.parent} changed (a symlink?) since the job started")
                size = self.plan.tmp_output.stat().st_size
                publish(self.plan.tmp_output, final, self.plan.job_id, self.plan.overwrite)
            except (OSError, OutputExists) as e:
                exists = isinstance(e, OutputExists)
                extra["error"] = str(e) if exists else f"cannot move output into place: {e}"
                return replace(result, status=FAILED,
                               reason=OUTPUT_EXISTS if exists else AGENT_ERROR, extra=extra,
                               bytes_in=self.bytes_in, bytes_out=self.bytes_out)
            self.bytes_out = size
            extra.update(output_path=str(final), output_bytes=size)
        if self.plan.live:
            extra["output_url"] = True
        return replace(result, extra=extra, bytes_in=self.bytes_in, bytes_out=self.bytes_out)

