"""One supervised child process: own process group, timeout, graceful-then-forced stop.

The runner is polled (`poll(now)`) by the agent loop; it never blocks and never sleeps.
Cross-cutting concerns (cgroup limits, ffmpeg progress, byte counters, stall and disk watch) are
`Hook`s: the runner calls them at fixed points and never mentions what they do.

The spawn. Before the job's first instruction the child must be in its job cgroup
(`Hook.join_paths`), die with the agent (PR_SET_PDEATHSIG) and run at its priority (`nice`).
A fork of the agent with Python in the child (`preexec_fn`) does all of it but blocks the loop
~5 ms and costs ~6.6 ms of CPU per spawn (measured: 2 vCPU, 42 MB agent). So, in order:

1. A `Standby` offered by a hook (the cgroup backend's pool): a launcher spawned ahead of time
   that has joined its cgroup, set PR_SET_PDEATHSIG and waits; the job's command line is
   written to it and it execs the job. No set-up is left on the job's path (~0.1 ms).
2. Else a vfork (the loop blocked ~0.3 ms) of a `Launcher` of standard tools that exec one
   another: `setpriv --pdeathsig KILL`, `sh -c 'printf 0 > .../tasks; ...; exec "$@"'`,
   `nice -n N`, then the job (~2.5 ms from spawn to the job's exec).
3. Else (a tool is missing, or a hook needs Python in the child: `in_child`) the fork.

PR_SET_PDEATHSIG fires when the *thread* that spawned the child exits: `start()` must run on a
thread that lives as long as the agent (the loop's), and standbys are spawned by one that does.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import select
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bus.vocab import (
    CANCELLED,
    CANCELLED_FORCED,
    CANCELLED_GRACEFUL,
    COMPLETED,
    EXIT_CODE,
    FAILED,
    SIGNAL,
    TIMED_OUT,
    TIMEOUT,
)

PR_SET_PDEATHSIG = 1
_SIGKILL = int(signal.SIGKILL)
JOIN_FAILED = 125  # the launcher's exit status when it cannot join the job cgroup


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved once per agent (a ctypes.CDLL per spawn cost ~0.8 ms a child)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    fn.restype = ctypes.c_int
    return fn


_PRCTL = _load_prctl()


@dataclass(frozen=True)
class Launcher:
    """The tools that set a vforked child up before it execs the job."""

    sh: str
    setpriv: str
    nice: str
    bash: str | None = None  # the standbys' shell where there is one (exec -a, see named_argv)

    def argv(self, target: list[str], join: list[str], nice: int) -> list[str]:
        """The launcher's argv for a job: death signal, joins, priority, then exec the job."""
        out = [self.setpriv, "--pdeathsig", "KILL", "--"]
        if join:  # the child writes "0" ("the writing task") into each join file
            out += [self.sh, "-c", joins(join) + 'exec "$@"', "ffrtmp-join"]
        if nice:
            out += [self.nice, "-n", str(nice), "--"]
        return out + target


def joins(paths: list[str]) -> str:
    """Shell commands that join the cgroups of these files (`tasks`, `cgroup.procs`) by writing
    "0" into each, or exit JOIN_FAILED: the job never runs outside its cgroup."""
    return "".join(f"printf 0 > {shlex.quote(p)} || exit {JOIN_FAILED}; " for p in paths)


@functools.cache
def launcher() -> Launcher | None:
    """The launcher if its tools are here (setpriv must know --pdeathsig: util-linux 2.33+)."""
    sh, setpriv, nice = "/bin/sh", shutil.which("setpriv"), shutil.which("nice")
    if not (os.access(sh, os.X_OK) and setpriv and nice):
        return None
    try:
        ok = subprocess.run([setpriv, "--pdeathsig", "KILL", "--", nice, "-n", "0", "--", sh,
                             "-c", "exit 0"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return Launcher(sh, setpriv, nice, _bash()) if ok else None


# ---- a program run under another name: a bash wrapper, which a bash standby runs as itself ----

_NAMED = 'exec -a "$0" "$@"'  # bash -c SCRIPT NAME PROGRAM ARGS...: PROGRAM execs as NAME
_NAMED_IGNORING_TERM = "trap '' TERM; " + _NAMED  # SIG_IGN survives the exec


@functools.cache
def _bash() -> str | None:
    return shutil.which("bash")


def named_argv(name: str, argv: list[str], ignore_term: bool = False) -> list[str] | None:
    """An argv that execs `argv` with argv[0] shown as `name` (ps, /proc/<pid>/cmdline), SIGTERM
    ignored if asked: `bash --posix -c 'exec -a ...'` (--posix: no startup file is read). A
    standby that is a bash runs it as its own `exec -a`, without bash starting again. None
    without bash."""
    bash = _bash()
    if bash is None:
        return None
    return [bash, "--posix", "-c", _NAMED_IGNORING_TERM if ignore_term else _NAMED, name, *argv]


def _unwrap_named(argv: list[str]) -> tuple[str, list[str], bool] | None:
    """(name, argv, ignore_term) if argv is named_argv's wrapper, else None."""
    if len(argv) >= 6 and argv[0] == _bash() and argv[1:3] == ["--posix", "-c"] \
            and argv[3] in (_NAMED, _NAMED_IGNORING_TERM):
        return argv[4], argv[5:], argv[3] == _NAMED_IGNORING_TERM
    return None


class Standby:
    """A launcher spawned ahead of its job: it joined its cgroup and set PR_SET_PDEATHSIG, then
    waits for one command line on its stdin, which it evaluates (`cd`, redirections, `exec`).

    Its stdout is a pipe: one newline on it says "ready" (set up, reading); after that it is the
    job's stdout. It inherits the environment of the thread that spawned it. Its shell is bash
    where there is one (`--posix`: no startup file), else /bin/sh.
    """

    SCRIPT = 'echo; IFS= read -r line || exit 0; eval "$line"'

    def __init__(self, proc: subprocess.Popen[bytes], bash: bool = False) -> None:
        self.proc = proc
        self.bash = bash  # it can `exec -a` (named_argv's wrappers run without a second bash)

    @classmethod
    def spawn(cls, join: list[str]) -> Standby | None:
        """A standby that joins the cgroups of these files; None without the launcher."""
        tools = launcher()
        if tools is None:
            return None
        shell = [tools.bash, "--posix"] if tools.bash else [tools.sh]
        argv = [tools.setpriv, "--pdeathsig", "KILL", "--",
                *shell, "-c", joins(join) + cls.SCRIPT, "ffrtmp-standby"]
        return cls(subprocess.Popen(argv, cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, start_new_session=True,
                                    close_fds=True), bash=tools.bash is not None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float) -> bool:
        """Block until it is set up (False: it died or took longer than timeout)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000)) and os.read(fd, 1) == b"\n"

    def activate(self, argv: list[str], workdir: Path, stdout_pipe: bool,
                 nice: int) -> subprocess.Popen[bytes] | None:
        """Make it exec the job (stdin /dev/null, stderr to workdir/stderr.log); its Popen, or
        None if it cannot take this job (it is dead, or an argument holds a newline)."""
        if self.proc.poll() is not None or any("\n" in a or "\0" in a for a in argv):
            return None
        if nice:  # exact: it is one sleeping thread that has not exec'd the job yet
            with contextlib.suppress(OSError):
                base = os.getpriority(os.PRIO_PROCESS, 0)
                os.setpriority(os.PRIO_PROCESS, self.pid, min(19, base + nice))
        out = "" if stdout_pipe else " >/dev/null"
        named = _unwrap_named(argv) if self.bash else None
        if named is not None:
            name, target, ignore_term = named
            run = (("trap '' TERM; " if ignore_term else "")
                   + f"exec -a {shlex.quote(name)} {shlex.join(target)}")
        else:
            run = f"exec {shlex.join(argv)}"
        line = (f"cd -- {shlex.quote(str(workdir))} || exit 126; "
                f"exec </dev/null 2>stderr.log{out}; {run}\n")
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.close()
        except OSError:  # it died meanwhile (EPIPE)
            return None
        self.proc.stdin = None
        if not stdout_pipe and self.proc.stdout is not None:
            self.proc.stdout.close()
            self.proc.stdout = None
        return self.proc

    def discard(self) -> None:
        """Kill it and reap it (it leaves its cgroup empty)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.proc.pid, _SIGKILL)
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def child_setup(parent: int, nice: int, steps: list[Callable[[], None]]) -> Callable[[], None]:
    """The function run in the child between fork and exec (`preexec_fn`, the fallback)."""

    def setup() -> None:
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the agent died before the prctl took hold: go with it
                os.kill(os.getpid(), _SIGKILL)
        for step in steps:  # the joins first: nothing of the job runs unconfined
            step()
        if nice:
            os.nice(nice)  # relative to the agent; an OSError (raising it unprivileged) aborts

    return setup


def _writer(fd: int) -> Callable[[], None]:
    def join() -> None:  # a raw write, no allocation: an OSError aborts the spawn
        os.write(fd, b"0")

    return join


def signal_name(number: int) -> str:
    """'SIGKILL' for 9; real-time signals as 'SIGRTMIN+n'; unknown ones as 'SIG<n>'."""
    try:
        return signal.Signals(number).name
    except ValueError:
        rtmin, rtmax = getattr(signal, "SIGRTMIN", 0), getattr(signal, "SIGRTMAX", -1)
        if rtmin < number <= rtmax:
            return f"SIGRTMIN+{number - rtmin}"
        return f"SIG{number}"


class Hook:
    """A concern attached to one run; every method is optional (the defaults do nothing)."""

    def before_spawn(self, run: ProcessRun) -> None:
        """Prepare (create a cgroup, adjust run.argv/run.env); raising OSError fails the run."""

    def standby(self) -> Standby | None:
        """A launcher already set up for this run (in its cgroup) to exec the job instead of a
        new spawn; the runner owns it from here (it discards one it cannot use)."""
        return None

    def join_paths(self) -> list[str]:
        """Files (a cgroup's `tasks` or `cgroup.procs`) the single-threaded child writes "0" to,
        joining those cgroups, before it execs; if one cannot be joined the job never runs
        (spawn error, or exit status JOIN_FAILED from the launcher)."""
        return []

    def in_child(self) -> None:
        """Runs in the child between fork and exec: async-signal-safe work only. A hook that
        has one makes the spawn a fork of the agent (slow); prefer `join_paths`."""

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
                 stdout_pipe: bool = False, kill_grace_s: float = 5.0, nice: int = 0) -> None:
        self.argv = argv
        self.nice = nice  # the child runs this much nicer than the agent (0: the same)
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
        standby: Standby | None = None
        fds: list[int] = []
        try:
            for hook in self.hooks:
                hook.before_spawn(self)
            standby = next((sb for h in self.hooks if (sb := h.standby()) is not None), None)
            join = [p for h in self.hooks for p in h.join_paths()]
            in_child = [h.in_child for h in self.hooks if type(h).in_child is not Hook.in_child]
            tools = None if in_child else launcher()
            exe = None
            if tools is not None:
                exe = shutil.which(self.argv[0], path=(self.env or os.environ).get("PATH"))
                if exe is None:  # the launcher would fail later with 127: fail the start now
                    raise FileNotFoundError(f"{self.argv[0]}: not found or not executable")
            if standby is not None:
                if exe is not None and self.env is None and not in_child:
                    self.proc = standby.activate([exe, *self.argv[1:]], self.workdir,
                                                 self.stdout_pipe, self.nice)
                if self.proc is None:
                    standby.discard()  # it cannot take this job: a spawn joins the cgroup
                standby = None
            if self.proc is None:
                self.proc = self._spawn(tools, exe, join, in_child, fds)
        except (OSError, subprocess.SubprocessError) as e:  # incl. a failure in the child
            if standby is not None:
                standby.discard()
            failed = Result(FAILED, EXIT_CODE, None, 0.0)
            for hook in self.hooks:  # let them undo before_spawn (remove the cgroup)
                with contextlib.suppress(Exception):
                    hook.after_exit(self, failed)
            raise OSError(f"cannot start {self.argv[0]}: {e}") from e
        finally:
            for fd in fds:
                os.close(fd)
        if self.proc.stdout is not None:
            os.set_blocking(self.proc.stdout.fileno(), False)
        self.started = now

    def _spawn(self, tools: Launcher | None, exe: str | None, join: list[str],
               in_child: list[Callable[[], None]], fds: list[int]) -> subprocess.Popen[bytes]:
        """A new child: vfork + launcher, or a fork with preexec_fn (fds: opened here, for the
        caller to close)."""
        if tools is not None and exe is not None:
            argv = tools.argv([exe, *self.argv[1:]], join, self.nice)
            setup = None
        else:
            fds += [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in join]
            argv = self.argv
            setup = child_setup(os.getpid(), self.nice, [*map(_writer, fds), *in_child])
        stdout = subprocess.PIPE if self.stdout_pipe else subprocess.DEVNULL
        with open(self.workdir / "stderr.log", "wb") as err:
            return subprocess.Popen(argv, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                    stdout=stdout, stderr=err, start_new_session=True,
                                    preexec_fn=setup, env=self.env, close_fds=True)

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
            reason = CANCELLED_FORCED if self._forced else CANCELLED_GRACEFUL
            return Result(CANCELLED, reason, code, duration)
        if self._stop_reason == "timeout":
            return Result(TIMED_OUT, TIMEOUT, code, duration)
        if self._stop_reason is not None:  # a hook stopped it: stalled, disk_limit
            return Result(FAILED, self._stop_reason, code, duration,
                          {"stderr": self.stderr_tail()})
        for hook in self.hooks:  # first: the cgroup knows an OOM kill from any other SIGKILL
            verdict = hook.classify(self, code)
            if verdict is not None:
                return Result(verdict[0], verdict[1], code, duration,
                              {"stderr": self.stderr_tail()})
        if code == 0:
            return Result(COMPLETED, None, 0, duration)
        if code < 0:  # killed by a signal nobody here sent: say which (exit_code stays -N)
            return Result(FAILED, SIGNAL, code, duration,
                          {"signal": signal_name(-code), "stderr": self.stderr_tail()})
        return Result(FAILED, EXIT_CODE, code, duration, {"stderr": self.stderr_tail()})

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
        try:  # the usual case, without a tree walk: only the stderr log in it (~10x cheaper)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.workdir / "stderr.log")
            os.rmdir(self.workdir)
        except FileNotFoundError:
            pass
        except OSError:
            shutil.rmtree(self.workdir, ignore_errors=True)
