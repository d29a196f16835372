"""One supervised child process: own process group, timeout, graceful-then-forced stop.

The runner is polled (`poll(now)`) by the agent loop; it never blocks and never sleeps.
Cross-cutting concerns (cgroup limits, ffmpeg progress, byte counters, stall and disk watch) are
`Hook`s: the runner calls them at fixed points and never mentions what they do.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class Hook:
    """A concern attached to one run; every method is optional (the defaults do nothing)."""

    def before_spawn(self, run: ProcessRun) -> None:
        """Prepare (create a cgroup, adjust run.argv/run.env); raising OSError fails the run."""

    def in_child(self) -> None:
        """Runs in the child between fork and exec (join a cgroup): async-signal-safe work only."""

    def poll(self, run: ProcessRun, now: float) -> str | None:
        """Observe the running child; return a reason ('stalled', 'disk_limit') to stop it."""
        return None

    def progress(self) -> dict[str, Any] | None:
        """Fields for a PROGRESS message (progress, bytes_in, bytes_out, fps, …), if any."""
        return None

    def classify(self, run: ProcessRun, code: int) -> tuple[str, str] | None:
        """After exit: (status, reason) if this hook knows better (e.g. 'failed', 'oom_killed')."""
        return None

    def after_exit(self, run: ProcessRun, result: Result) -> Result:
        """Clean up (remove the cgroup, move the output); may amend the result."""
        return result


@dataclass(frozen=True)
class Result:
    """How an attempt ended, in the terms of the DONE message."""

    status: str  # completed | failed | timed_out | cancelled
    reason: str | None
    exit_code: int | None
    duration_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0


class ProcessRun:
    """A child in its own session and process group, stopped as a whole tree."""

    def __init__(self, argv: list[str], workdir: Path, timeout_s: float | None,
                 env: dict[str, str] | None = None, hooks: list[Hook] | None = None,
                 stdout_pipe: bool = False, kill_grace_s: float = 5.0) -> None:
        self.argv = argv
        self.exited = False  # set once the child has exited, before hooks take a last look
        self.hooks = hooks or []
        self.stdout_pipe = stdout_pipe
        self.workdir = workdir
        self.timeout_s = timeout_s
        self.env = env
        self.kill_grace_s = kill_grace_s  # SIGTERM -> SIGKILL delay for timeouts and hook stops
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self._stop_reason: str | None = None  # "cancel" or "timeout"
        self._kill_at: float | None = None
        self._forced = False

    @property
    def pid(self) -> int | None:
        """The child's pid (and process group id) once started."""
        return self.proc.pid if self.proc else None

    def start(self, now: float) -> None:
        """Spawn the child; raises OSError if it cannot be started."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for hook in self.hooks:
            hook.before_spawn(self)
        in_child = [h.in_child for h in self.hooks if type(h).in_child is not Hook.in_child]

        def child_setup() -> None:
            _die_with_parent()
            for fn in in_child:
                fn()

        stdout = subprocess.PIPE if self.stdout_pipe else subprocess.DEVNULL
        try:
            with open(self.workdir / "stderr.log", "wb") as err:
                self.proc = subprocess.Popen(
                    self.argv, cwd=self.workdir, stdin=subprocess.DEVNULL,
                    stdout=stdout, stderr=err, start_new_session=True,
                    preexec_fn=child_setup, env=self.env, close_fds=True,
                )
        except (OSError, subprocess.SubprocessError) as e:  # incl. an in_child failure
            failed = Result("failed", "exit_code", None, 0.0)
            for hook in self.hooks:  # let them undo before_spawn (remove the cgroup)
                with contextlib.suppress(Exception):
                    hook.after_exit(self, failed)
            raise OSError(f"cannot start {self.argv[0]}: {e}") from e
        if self.proc.stdout is not None:
            os.set_blocking(self.proc.stdout.fileno(), False)
        self.started = now

    def stop(self, now: float, grace_s: float, why: str = "cancel") -> None:
        """SIGTERM the process group now and SIGKILL it after grace_s (idempotent)."""
        if self.proc is None or self.proc.returncode is not None or self._exited():
            return  # it already ended on its own: that result stands (a cancel lost the race)
        if self._stop_reason is None:
            self._stop_reason = why
        self._signal(signal.SIGTERM)
        kill_at = now + max(0.0, grace_s)
        if self._kill_at is None or kill_at < self._kill_at:
            self._kill_at = kill_at
        if grace_s <= 0:
            self._force()

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def _force(self) -> None:
        if not self._forced:
            self._forced = True
            self._signal(signal.SIGKILL)

    def _exited(self) -> bool:
        """True once the child has exited; it is left a zombie (not reaped) for a last look."""
        assert self.proc is not None
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def poll(self, now: float) -> Result | None:
        """Advance timers; the Result once the child has exited, else None."""
        assert self.proc is not None
        if self.proc.returncode is None and not self._exited():
            for hook in self.hooks:
                why = hook.poll(self, now)
                if why is not None and self._stop_reason is None:
                    self.stop(now, grace_s=self.kill_grace_s, why=why)
            if (self.timeout_s is not None and self._stop_reason is None
                    and now - self.started >= self.timeout_s):
                self.stop(now, grace_s=self.kill_grace_s, why="timeout")
            if self._kill_at is not None and now >= self._kill_at:
                self._force()
            return None
        self.exited = True
        for hook in self.hooks:
            hook.poll(self, now)  # a last look at the zombie: final progress, byte counts
        code = self.proc.wait()  # reap only now, so /proc/<pid> stayed readable until here
        self._signal(signal.SIGKILL)  # whatever is left of its process group goes too
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        result = self._result(code, now)
        for hook in self.hooks:
            result = hook.after_exit(self, result)
        return result

    def progress(self) -> dict[str, Any]:
        """The merged progress fields of all hooks."""
        out: dict[str, Any] = {}
        for hook in self.hooks:
            out.update(hook.progress() or {})
        return out

    def _result(self, code: int, now: float) -> Result:
        duration = round(now - self.started, 6)
        if self._stop_reason == "cancel":
            reason = "cancelled_forced" if self._forced else "cancelled_graceful"
            return Result("cancelled", reason, code, duration)
        if self._stop_reason == "timeout":
            return Result("timed_out", "timeout", code, duration)
        if self._stop_reason is not None:  # a hook stopped it: stalled, disk_limit
            return Result("failed", self._stop_reason, code, duration,
                          {"stderr": self.stderr_tail()})
        for hook in self.hooks:
            verdict = hook.classify(self, code)
            if verdict is not None:
                return Result(verdict[0], verdict[1], code, duration,
                              {"stderr": self.stderr_tail()})
        if code == 0:
            return Result("completed", None, 0, duration)
        return Result("failed", "exit_code", code, duration, {"stderr": self.stderr_tail()})

    def stderr_tail(self, limit: int = 2000) -> str:
        """The last bytes the child wrote to stderr."""
        try:
            with open(self.workdir / "stderr.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - limit))
                return f.read().decode("utf-8", "replace").replace("\x00", "")
        except OSError:
            return ""

    def kill_now(self) -> None:
        """SIGKILL the whole group and reap the child (agent shutdown)."""
        if self.proc is not None and self.proc.returncode is None:
            self._force()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    def cleanup(self) -> None:
        """Remove the attempt's work directory."""
        shutil.rmtree(self.workdir, ignore_errors=True)
