"""The runner with real processes (no cgroups needed): how a child's end is told (exit code,
signal), its priority, the three spawn paths, dying with the agent, and the synthetic workloads.

The cgroup side (join before exec, the standby pool, OOM winning over `signal`) is in
tests/test_cgroups.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent import runner, synthetic
from agent.runner import Hook, ProcessRun, Result
from agent.workloads import NAME, UnsupportedJob, build_argv, python_argv
from conftest import wait_for

pytestmark = pytest.mark.timeout(60)
PY = sys.executable


@pytest.fixture
def runs() -> Iterator[list[ProcessRun]]:
    """Runs started by a test; whatever is still running at the end is killed and reaped."""
    started: list[ProcessRun] = []
    yield started
    for run in started:
        run.kill_now()
        run.cleanup()


def start(runs: list[ProcessRun], argv: list[str], workdir: Path, **kw: object) -> ProcessRun:
    run = ProcessRun(argv, workdir, kw.pop("timeout_s", 30), **kw)  # type: ignore[arg-type]
    run.start(time.monotonic())
    runs.append(run)
    return run


def ended(run: ProcessRun, timeout: float = 20.0) -> Result:
    result = wait_for(lambda: run.poll(time.monotonic()), timeout, interval=0.01,
                      message=f"{run.argv} to end")
    assert result is not None
    return result


def sleep_argv(seconds: float, **params: object) -> list[str]:
    argv = build_argv({"scenario": "sleep", "params": {"seconds": seconds, **params}})
    assert argv is not None
    return argv


def execd(pid: int | None, seconds: str = "30.0") -> bool:
    """True once the sleep job itself runs (the launcher's stages show the name as an argument
    on their way to it)."""
    return pid is not None and psutil.Process(pid).cmdline() == [NAME, seconds]


# ----------------------------------------------------------------------------- reasons (issue)


def test_kill_9_of_a_running_sleep_workload_is_reason_signal(runs: list[ProcessRun],
                                                              tmp_path: Path) -> None:
    run = start(runs, sleep_argv(30), tmp_path / "w")
    assert run.pid is not None
    wait_for(lambda: execd(run.pid), 10, message="sleep running")
    os.kill(run.pid, signal.SIGKILL)  # from outside: not a cancel, not a timeout
    result = ended(run)
    assert (result.status, result.reason, result.exit_code) == ("failed", "signal", -9)
    assert result.extra["signal"] == "SIGKILL"


def test_a_child_that_segfaults_is_reason_signal(runs: list[ProcessRun], tmp_path: Path) -> None:
    run = start(runs, [PY, "-I", "-S", "-c", "import ctypes; ctypes.string_at(0)"],
                tmp_path / "w")
    result = ended(run)
    assert (result.status, result.reason, result.exit_code) == ("failed", "signal", -11)
    assert result.extra["signal"] == "SIGSEGV"
    assert "stderr" in result.extra


def test_a_nonzero_exit_stays_reason_exit_code(runs: list[ProcessRun], tmp_path: Path) -> None:
    run = start(runs, ["sh", "-c", "echo boom >&2; exit 3"], tmp_path / "w")
    result = ended(run)
    assert (result.status, result.reason, result.exit_code) == ("failed", "exit_code", 3)
    assert "signal" not in result.extra and "boom" in result.extra["stderr"]


def test_timeout_and_cancel_keep_their_reasons_though_a_signal_ended_them(
        runs: list[ProcessRun], tmp_path: Path) -> None:
    run = start(runs, sleep_argv(30), tmp_path / "t", timeout_s=0.3, kill_grace_s=0.5)
    result = ended(run)
    assert (result.status, result.reason, result.exit_code) == ("timed_out", "timeout", -15)
    run = start(runs, sleep_argv(30), tmp_path / "c")
    wait_for(lambda: execd(run.pid), 10)
    run.stop(time.monotonic(), 2.0)
    result = ended(run)
    assert (result.status, result.reason, result.exit_code) == \
        ("cancelled", "cancelled_graceful", -15)


def test_signal_names() -> None:
    assert runner.signal_name(9) == "SIGKILL" and runner.signal_name(11) == "SIGSEGV"
    assert runner.signal_name(signal.SIGRTMIN + 2) == "SIGRTMIN+2"
    assert runner.signal_name(200) == "SIG200"


# ----------------------------------------------------------------------------- priority


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_a_child_started_with_nice_10_has_niceness_10(runs: list[ProcessRun],
                                                      tmp_path: Path) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    run = start(runs, sleep_argv(30), tmp_path / "n", nice=10)
    assert run.pid is not None
    wait_for(lambda: execd(run.pid), 10, message="the job itself exec'd")
    assert niceness(run.pid) == min(19, base + 10)
    plain = start(runs, sleep_argv(30), tmp_path / "p")
    assert plain.pid is not None
    wait_for(lambda: execd(plain.pid), 10)
    assert niceness(plain.pid) == base


class PythonInChild(Hook):
    """A hook that needs Python in the child: the spawn falls back to fork + preexec_fn."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def in_child(self) -> None:
        os.close(os.open(self.marker, os.O_CREAT | os.O_WRONLY, 0o600))


def test_the_fork_fallback_runs_in_child_hooks_and_applies_nice(runs: list[ProcessRun],
                                                                tmp_path: Path) -> None:
    marker = tmp_path / "in_child_ran"
    base = os.getpriority(os.PRIO_PROCESS, 0)
    run = start(runs, sleep_argv(30), tmp_path / "f", nice=5, hooks=[PythonInChild(marker)])
    assert run.pid is not None and marker.exists()
    wait_for(lambda: execd(run.pid), 10)
    assert niceness(run.pid) == min(19, base + 5)
    run.stop(time.monotonic(), 0.0)
    assert ended(run).reason == "cancelled_forced"


def test_the_launcher_is_what_starts_children_here(tmp_path: Path) -> None:
    """This host has sh, setpriv (with --pdeathsig) and nice: the vfork path is the one used."""
    tools = runner.launcher()
    assert tools is not None
    argv = tools.argv(["/bin/true"], [str(tmp_path / "procs")], 3)
    assert argv[:2] == [tools.setpriv, "--pdeathsig"] and tools.sh in argv
    assert argv[-5:] == [tools.nice, "-n", "3", "--", "/bin/true"]
    assert subprocess.run(argv, check=False).returncode == 0
    assert (tmp_path / "procs").read_text() == "0"  # the join wrote "0" (itself)


def test_a_missing_binary_fails_the_start(tmp_path: Path) -> None:
    run = ProcessRun(["/nonexistent/binary"], tmp_path / "w", 10)
    with pytest.raises(OSError, match="cannot start"):
        run.start(time.monotonic())
    run.cleanup()
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- dying with the agent


@pytest.mark.parametrize("fallback", [False, True], ids=["launcher", "fork"])
def test_children_die_with_the_agent(tmp_path: Path, fallback: bool) -> None:
    """kill -9 of the process that started a run (the agent): its child gets SIGKILL too."""
    pidfile = tmp_path / "child.pid"
    hooks = "[Inner()]" if fallback else "[]"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from agent.runner import Hook, ProcessRun
        from agent.workloads import build_argv
        class Inner(Hook):
            def in_child(self): pass
        run = ProcessRun(build_argv({{"scenario": "sleep", "params": {{"seconds": 60}}}}),
                         Path({str(tmp_path / "w")!r}), None, hooks={hooks})
        run.start(time.monotonic())
        Path({str(pidfile)!r}).write_text(str(run.pid))
        time.sleep(60)
    """)
    agent = subprocess.Popen([PY, "-c", script])
    found: list[psutil.Process] = []
    try:
        child = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 20,
                             message="the child's pid"))
        proc = psutil.Process(child)
        found.append(proc)
        wait_for(lambda: execd(proc.pid, "60.0"), 10, message="the job exec'd")
        agent.kill()
        agent.wait()
        wait_for(lambda: not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, 10,
                 message="the child died with its agent")
    finally:
        agent.kill()
        agent.wait()
        for proc in found:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


# ----------------------------------------------------------------------------- synthetic workloads


def test_sleep_is_one_cheap_process_named_agent_synthetic(runs: list[ProcessRun],
                                                          tmp_path: Path) -> None:
    run = start(runs, sleep_argv(30, ignore_term=1), tmp_path / "s")
    assert run.pid is not None
    proc = psutil.Process(run.pid)
    wait_for(lambda: execd(run.pid), 10, message="sleep exec'd by name")
    wait_for(lambda: int(Path(f"/proc/{run.pid}/status").read_text().split("SigIgn:")[1]
                         .split()[0], 16) & (1 << (signal.SIGTERM - 1)), 10,
             message="SIGTERM ignored")
    assert proc.children() == []
    run.stop(time.monotonic(), 0.3)  # ignores SIGTERM: killed after the grace
    result = ended(run)
    assert (result.status, result.reason) == ("cancelled", "cancelled_forced")
    t0 = time.monotonic()
    assert ended(start(runs, sleep_argv(0.2), tmp_path / "s2")).status == "completed"
    assert 0.2 <= time.monotonic() - t0 < 5


@pytest.mark.parametrize("argv", [
    python_argv("sleep", "--seconds", "0.1"),
    python_argv("sleep", "--seconds=0.1", "--ignore-term"),
    python_argv("burn", "--cpu-seconds", "0.2"),
    python_argv("hog", "--mb", "16", "--seconds", "0.1"),
    [PY, "-m", "agent.synthetic", "burn", "--cpu-seconds", "0.05"],
], ids=["sleep", "sleep-ignore-term", "burn", "hog", "python-m"])
def test_the_python_workloads_run_in_an_isolated_interpreter(
        runs: list[ProcessRun], tmp_path: Path, argv: list[str]) -> None:
    result = ended(start(runs, argv, tmp_path / "py"))
    assert result.status == "completed", result


def test_burn_and_hog_argv() -> None:
    burn = build_argv({"scenario": "burn", "params": {"cpu_seconds": 2}})
    hog = build_argv({"scenario": "hog", "params": {"mb": 32, "seconds": 1}})
    assert burn is not None and hog is not None
    assert burn[1:5] == ["-I", "-S", "-X", NAME] and burn[-3:] == ["burn", "--cpu-seconds", "2.0"]
    assert hog[-5:] == ["hog", "--mb", "32", "--seconds", "1.0"]
    assert build_argv({"scenario": "noop"}) is None
    with pytest.raises(UnsupportedJob):
        build_argv({"scenario": "sleep", "params": {"seconds": -1}})
    with pytest.raises(UnsupportedJob):
        build_argv({"scenario": "dance"})


def test_synthetic_script_imports_nothing_heavy() -> None:
    code = (f"import sys; exec(open({synthetic.__file__!r}).read(), {{'__name__': 'x'}}); "
            "print(','.join(m for m in ('argparse', 'agent', 'enum', 'site') "
            "if m in sys.modules))")
    out = subprocess.run([PY, "-I", "-S", "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"imported: {out}"


def test_synthetic_command_line_errors_exit_2() -> None:
    assert synthetic.main(["dance"]) == 2
    assert synthetic.main(["sleep", "--seconds"]) == 2
    assert synthetic.main(["sleep", "--seconds", "x"]) == 2
    assert synthetic.main(["sleep", "--ignore-term=1"]) == 2
    assert synthetic.main(["sleep", "--bogus"]) == 2
    assert synthetic.main(["sleep", "--seconds", "0"]) == 0
