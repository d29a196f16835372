"""`ffrtmp bench overhead`: what one agent costs per job, against the ideal and against xargs.

Two loads on a real master and one real agent (its own cgroups, as deployed), each repeated with
the order of the sides rotated every repeat so that drift on a shared machine favours none:

- **sleep**: N `sleep S` jobs through 1 agent x `slots`; the ideal makespan is N x S / slots
  (nothing but the sleeps). Reported as % of ideal throughput = ideal / makespan.
- **ffmpeg**: M short transcodes (2 s testsrc at 480p, x264 veryfast by default) through the
  agent, against the identical ffmpeg commands (rebuilt with the agent's own `build_plan`) run by
  `xargs -P slots`. Reported as the agent's overhead = agent makespan / xargs makespan - 1.

`--baseline-tree DIR` adds the same measurements, interleaved, for the master and agent of another
source tree (e.g. the previous commit: `git archive HEAD~1 | tar -x -C /tmp/before`), so a change
is measured before and after in one run; `--tree DIR` runs this side from a tree too.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.cluster import free_ports
from bench.env import machine
from bench.load import Driver, LoadError
from bench.profiles import BenchError
from bench.progress import Bar
from bench.report import write_plain
from bus.client import Client

# A 480p x264 scenario (an operator scenario, given to the master with --scenarios).
SCENARIO_TOML = """\
[scenarios.480p-h264]
container = "mp4"
extension = "mp4"
encoder = "libx264"
width = 854
height = 480
fps = 30
bitrate = "1500k"
preset = "veryfast"
"""
DEFAULT_SCENARIO = "480p-h264"
DEFAULT_INPUT = "testsrc:duration=2,size=854x480"


@dataclass
class Config:
    """One `bench overhead` invocation."""

    jobs: int = 200  # sleep jobs per run
    sleep_s: float = 0.05
    slots: int = 4
    ffmpeg_jobs: int = 40  # 0: no ffmpeg comparison
    scenario: str = DEFAULT_SCENARIO
    input: str = DEFAULT_INPUT
    repeat: int = 3
    tree: str | None = None  # run the measured side from this source tree (default: installed)
    baseline_tree: str | None = None  # also measure this tree, interleaved
    timeout: float | None = None

    def check(self) -> None:
        if self.jobs < 0 or self.ffmpeg_jobs < 0 or (self.jobs == 0 and self.ffmpeg_jobs == 0):
            raise BenchError("overhead: --jobs (sleep) and --ffmpeg-jobs must be >= 0, "
                             "not both 0")
        if self.slots < 1 or self.repeat < 1:
            raise BenchError("overhead: --slots and --repeat must be at least 1")
        if not (self.sleep_s > 0 and math.isfinite(self.sleep_s)):
            raise BenchError("overhead: --sleep must be a positive number of seconds")
        for tree in (self.tree, self.baseline_tree):
            if tree is not None and not (Path(tree) / "agent" / "runner.py").is_file():
                raise BenchError(f"overhead: {tree} is not an ffrtmp source tree")


class TreeCluster:
    """A master and one agent as real processes, importing the code of a source tree (or the
    installed package), with only the options every version has."""

    def __init__(self, tree: str | None, slots: int, workdir: Path, scenarios: Path) -> None:
        self.tree = str(Path(tree).resolve()) if tree else None
        self.slots = slots
        self.workdir = workdir
        self.scenarios = scenarios
        pa, pc, pe = free_ports(3)
        self.agents_ep = f"tcp://127.0.0.1:{pa}"
        self.clients_ep = f"tcp://127.0.0.1:{pc}"
        self.events_ep = f"tcp://127.0.0.1:{pe}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, label: str, args: list[str]) -> None:
        env = {**os.environ, "FFRTMP_LOG": "warning"}
        if self.tree:  # before the installed package on sys.path; the workloads inherit it
            env["PYTHONPATH"] = self.tree + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.workdir / f"{label}.log", "wb") as log:
            self.procs[label] = subprocess.Popen(
                [sys.executable, "-m", "ffrtmp", *args], stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, cwd=self.tree or None)

    def start(self, timeout: float = 60.0) -> None:
        """Start the master and the agent; wait until the agent is registered."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._spawn("master", ["master", "--db", f"sqlite:///{self.workdir}/bench.db",
                               "--agents", self.agents_ep, "--clients", self.clients_ep,
                               "--events", self.events_ep, "--metrics", "off",
                               "--scenarios", str(self.scenarios)])
        self._spawn("agent0", ["agent", "--master", self.agents_ep, "--name", "overhead0",
                               "--slots", str(self.slots), "--work-dir",
                               str(self.workdir / "agent0"), "--metrics", "off"])
        deadline = time.monotonic() + timeout
        with Client(self.clients_ep, timeout=1.0) as client:
            while time.monotonic() < deadline:
                for label, proc in self.procs.items():
                    if proc.poll() is not None:
                        raise BenchError(f"{label} exited with status {proc.returncode} during "
                                         f"start; logs in {self.workdir}")
                with contextlib.suppress(Exception):
                    if client.nodes():
                        return
                time.sleep(0.1)  # start-up poll in a tool, not a test
        raise BenchError(f"cluster did not come up; logs in {self.workdir}")

    def process(self, label: str) -> psutil.Process:
        """The agent's ("agent0") or the master's process, for CPU figures."""
        return psutil.Process(self.procs[label].pid)

    def stop(self) -> None:
        """SIGTERM both, then SIGKILL what lingers (an agent may first let running jobs finish
        for its stop grace, 30 s by default)."""
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def _spread(xs: list[float]) -> dict[str, Any]:
    return {"median": _median(xs), "min": round(min(xs), 3) if xs else None,
            "max": round(max(xs), 3) if xs else None, "runs": [round(x, 3) for x in xs]}


def _cpu(proc: psutil.Process) -> tuple[float, float]:
    """(own CPU s, reaped children's CPU s) of a process."""
    t = proc.cpu_times()
    return t.user + t.system, t.children_user + t.children_system


class Side:
    """One agent cluster under measurement (this tree or the baseline), kept up for the run."""

    def __init__(self, label: str, tree: str | None, cfg: Config, workdir: Path,
                 toml: Path) -> None:
        self.label = label
        self.cluster = TreeCluster(tree, cfg.slots, workdir, toml)
        self.driver: Driver | None = None
        self.agent: psutil.Process | None = None
        self.master: psutil.Process | None = None

    def start(self) -> None:
        self.cluster.start(timeout=60)
        self.driver = Driver(self.cluster.clients_ep, self.cluster.events_ep)
        self.driver.warm_up()
        self.agent = self.cluster.process("agent0")
        self.master = self.cluster.process("master")

    def run(self, specs: list[dict[str, Any]], timeout: float) -> dict[str, Any]:
        """Submit the specs at once; makespan (first SUBMIT to last terminal event), CPU."""
        assert self.driver is not None and self.agent is not None and self.master is not None
        own0, kids0 = _cpu(self.agent)
        master0, _ = _cpu(self.master)
        try:
            o = self.driver.run(specs, batch=len(specs), timeout=timeout, sample_s=1.0)
        except LoadError as e:
            raise BenchError(f"{self.label}: {e}") from e
        own1, kids1 = _cpu(self.agent)
        master1, _ = _cpu(self.master)
        bad = [f"{s}:{r}" for s, r in o.final.values() if s != "completed"]
        if bad or len(o.final) < len(specs) or o.timed_out:
            raise BenchError(f"{self.label}: {len(bad)} of {len(specs)} jobs did not complete "
                             f"({', '.join(sorted(set(bad))[:3]) or 'timed out'}); logs in "
                             f"{self.cluster.workdir}")
        n = len(specs)
        return {"makespan_s": o.end - o.first_send,
                "agent_cpu_ms_per_job": 1e3 * (own1 - own0) / n,
                "master_cpu_ms_per_job": 1e3 * (master1 - master0) / n,
                "children_cpu_ms_per_job": 1e3 * (kids1 - kids0) / n}

    def stop(self) -> None:
        if self.driver is not None:
            self.driver.close()
        self.cluster.stop()


def _resolve(spec: dict[str, Any], toml: Path) -> dict[str, Any]:
    from master.scenarios import load_presets, make_checks
    from master.spec import SpecError, validate_spec

    try:
        return validate_spec(dict(spec), make_checks(load_presets(str(toml)))).spec
    except SpecError as e:
        raise BenchError(f"ffmpeg workload: {e}") from e


def direct_commands(spec: dict[str, Any], n: int, toml: Path, root: Path) -> list[str]:
    """The shell lines xargs runs: each job's ffmpeg argv exactly as the agent would build it."""
    from agent.ffmpeg.argv import build_plan
    from agent.ffmpeg.discovery import find_ffmpeg

    ffmpeg = find_ffmpeg()
    resolved = _resolve(spec, toml)
    shutil.rmtree(root, ignore_errors=True)
    (root / "inputs").mkdir(parents=True)
    (root / "outputs").mkdir()
    lines = []
    for i in range(n):
        job_dir = root / "jobs" / str(i)
        job_dir.mkdir(parents=True)
        plan = build_plan(resolved, ffmpeg, root / "inputs", root / "outputs", job_dir, i)
        lines.append(shlex.join(plan.argv) + " >/dev/null")
    return lines


def run_xargs(lines: list[str], parallel: int, root: Path) -> dict[str, Any]:
    """Run the lines with `xargs -P parallel`; makespan and CPU."""
    from bench.direct import xargs  # imports the agent's argv builder: only when it runs

    for out in (root / "outputs").iterdir():
        out.unlink()
    makespan, cpu = xargs(lines, parallel, root, "xargs")
    return {"makespan_s": makespan, "children_cpu_ms_per_job": 1e3 * cpu / len(lines)}


def run(cfg: Config, out: Path, bar: Bar) -> dict[str, Path]:
    """Run the whole comparison; writes report.json and report.md into `out`."""
    cfg.check()
    if cfg.ffmpeg_jobs and shutil.which("xargs") is None:
        raise BenchError("the ffmpeg comparison needs xargs")
    base = Path(tempfile.mkdtemp(prefix="ffrtmp-overhead-"))
    toml = base / "scenarios.toml"
    toml.write_text(SCENARIO_TOML)
    sides = [Side("agent", cfg.tree, cfg, base / "agent", toml)]
    if cfg.baseline_tree:
        sides.append(Side("baseline", cfg.baseline_tree, cfg, base / "baseline", toml))
    sleep_spec = {"scenario": "sleep", "params": {"seconds": cfg.sleep_s}}
    ffmpeg_spec = {"scenario": cfg.scenario, "input": cfg.input}
    sleep_timeout = cfg.timeout or 60 + 5 * cfg.jobs * cfg.sleep_s / cfg.slots
    ffmpeg_timeout = cfg.timeout or 120 + 10 * cfg.ffmpeg_jobs / cfg.slots
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {"sleep": {}, "ffmpeg": {}}
    host = machine()
    started = time.monotonic()
    ok = False
    try:
        lines = (direct_commands(ffmpeg_spec, cfg.ffmpeg_jobs, toml, base / "direct")
                 if cfg.ffmpeg_jobs else [])
        for side in sides:
            bar.phase(f"starting master + 1 agent x {cfg.slots} slots ({side.label}"
                      f"{': ' + str(side.cluster.tree) if side.cluster.tree else ''})")
            side.start()
        if lines:  # one untimed pass so every side starts with warm caches
            bar.phase("warm-up: one ffmpeg job per side")
            run_xargs(lines[:1], 1, base / "direct")
            for side in sides:
                side.run([ffmpeg_spec], ffmpeg_timeout)
        for i in range(cfg.repeat):
            if cfg.jobs:
                order = sides[i % len(sides):] + sides[:i % len(sides)]
                for side in order:
                    bar.phase(f"run {i + 1}/{cfg.repeat}: {cfg.jobs} x sleep {cfg.sleep_s:g}s "
                              f"({side.label}) [{time.monotonic() - started:.0f}s]")
                    raw["sleep"].setdefault(side.label, []).append(
                        side.run([sleep_spec] * cfg.jobs, sleep_timeout))
            if lines:
                names: list[Any] = [*sides, "xargs"]
                k = i % len(names)
                for who in names[k:] + names[:k]:
                    label = who if isinstance(who, str) else who.label
                    bar.phase(f"run {i + 1}/{cfg.repeat}: {cfg.ffmpeg_jobs} x ffmpeg "
                              f"{cfg.scenario} ({label}) [{time.monotonic() - started:.0f}s]")
                    if isinstance(who, str):
                        fig = run_xargs(lines, cfg.slots, base / "direct")
                    else:
                        fig = who.run([ffmpeg_spec] * cfg.ffmpeg_jobs, ffmpeg_timeout)
                    raw["ffmpeg"].setdefault(label, []).append(fig)
        ok = True
    finally:
        for side in sides:
            with contextlib.suppress(Exception):
                side.stop()
        if ok:  # else the logs stay for the error message's pointer
            shutil.rmtree(base, ignore_errors=True)
    host["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report = _report(cfg, raw, time.monotonic() - started, host,
                     {s.label: s.cluster.tree or "installed" for s in sides})
    return write_plain(out, report, _markdown(report))


def _report(cfg: Config, raw: dict[str, dict[str, list[dict[str, Any]]]], elapsed: float,
            host: dict[str, Any], trees: dict[str, str]) -> dict[str, Any]:
    ideal = cfg.jobs * cfg.sleep_s / cfg.slots
    sleep: dict[str, Any] = {}
    for label, runs in raw["sleep"].items():
        spans = [r["makespan_s"] for r in runs]
        sleep[label] = {
            "makespan_s": _spread(spans),
            "pct_of_ideal": _spread([100 * ideal / s for s in spans]),
            "overhead_ms_per_job": _spread([1e3 * (s - ideal) * cfg.slots / cfg.jobs
                                            for s in spans]),
            "agent_cpu_ms_per_job": _spread([r["agent_cpu_ms_per_job"] for r in runs]),
            "children_cpu_ms_per_job": _spread([r["children_cpu_ms_per_job"] for r in runs]),
        }
    ffmpeg: dict[str, Any] = {}
    direct = [r["makespan_s"] for r in raw["ffmpeg"].get("xargs", [])]
    for label, runs in raw["ffmpeg"].items():
        spans = [r["makespan_s"] for r in runs]
        row: dict[str, Any] = {
            "makespan_s": _spread(spans),
            "children_cpu_ms_per_job": _spread([r["children_cpu_ms_per_job"] for r in runs])}
        if label != "xargs":
            # per-run ratio (the sides of one repeat ran back to back), then the median
            pairs = zip(spans, direct, strict=True)
            row["overhead_pct"] = _spread([100 * (a / d - 1) for a, d in pairs if d > 0])
            row["agent_cpu_ms_per_job"] = _spread([r["agent_cpu_ms_per_job"] for r in runs])
            # the system's own CPU (agent + master) per CPU second of ffmpeg: what noise from
            # other processes hardly moves, unlike the wall-clock makespans
            row["system_cpu_pct_of_ffmpeg"] = _spread([
                100 * (r["agent_cpu_ms_per_job"] + r["master_cpu_ms_per_job"])
                / r["children_cpu_ms_per_job"] for r in runs if r["children_cpu_ms_per_job"]])
        ffmpeg[label] = row
    return {"tool": "ffrtmp bench overhead", "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": host, "config": asdict(cfg), "trees": trees,
            "elapsed_s": round(elapsed, 1), "ideal_sleep_makespan_s": round(ideal, 3),
            "sleep": sleep, "ffmpeg": ffmpeg}


def _fmt(s: dict[str, Any], digits: int = 1) -> str:
    if s.get("median") is None:
        return "-"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f} – {s['max']:.{digits}f})"


def _markdown(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [f"# ffrtmp bench overhead ({r['created_at']}, {r['elapsed_s']} s)", "",
             f"1 agent x {c['slots']} slots, {c['repeat']} repeats (median, min – max); "
             f"trees: {', '.join(f'{k}={v}' for k, v in r['trees'].items())}; "
             f"load average at start {r['machine'].get('loadavg_at_start')}, at the end "
             f"{r['machine'].get('loadavg_at_end')}", ""]
    if r["sleep"]:
        lines += [f"## {c['jobs']} x sleep {c['sleep_s']:g} s (ideal makespan "
                  f"{r['ideal_sleep_makespan_s']} s)", "",
                  "| side | makespan s | % of ideal | overhead ms/job/slot | agent CPU ms/job "
                  "| child CPU ms/job |", "|---|---|---|---|---|---|"]
        for label, row in r["sleep"].items():
            lines.append(f"| {label} | {_fmt(row['makespan_s'], 2)} | "
                         f"{_fmt(row['pct_of_ideal'])} | {_fmt(row['overhead_ms_per_job'])} | "
                         f"{_fmt(row['agent_cpu_ms_per_job'], 2)} | "
                         f"{_fmt(row['children_cpu_ms_per_job'], 2)} |")
        lines.append("")
    if r["ffmpeg"]:
        lines += [f"## {c['ffmpeg_jobs']} x ffmpeg {c['scenario']} {c['input']} vs xargs -P "
                  f"{c['slots']}", "",
                  "| side | makespan s | overhead vs xargs % | agent CPU ms/job "
                  "| agent + master CPU, % of ffmpeg's | ffmpeg CPU ms/job |",
                  "|---|---|---|---|---|---|"]
        for label, row in r["ffmpeg"].items():
            over = _fmt(row["overhead_pct"], 2) if "overhead_pct" in row else "–"
            cpu = _fmt(row["agent_cpu_ms_per_job"], 2) if "agent_cpu_ms_per_job" in row else "–"
            sys_cpu = (_fmt(row["system_cpu_pct_of_ffmpeg"], 2)
                       if "system_cpu_pct_of_ffmpeg" in row else "–")
            lines.append(f"| {label} | {_fmt(row['makespan_s'], 2)} | {over} | {cpu} | "
                         f"{sys_cpu} | {_fmt(row['children_cpu_ms_per_job'], 0)} |")
        lines.append("")
    return "\n".join(lines)
