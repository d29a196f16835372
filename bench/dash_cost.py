"""`ffrtmp bench dash-cost`: what a dashboard costs, itself and the master, at a steady job rate.

Issue 12's target: with 1,000 jobs/s flowing, the dashboard uses <= 30 % of a core and the
master's cost of serving it stays <= 5 % of a core.

One local cluster (SQLite, `bench.cluster.LocalCluster`) and the bench's own driver
(`bench.load.Driver`) submitting noop jobs open loop at a fixed `rate`, so every window does the
same work. Each round measures, in a rotating order so drift favours none:

- **without**: no dashboard attached;
- **overview** / **jobs**: a real `ffrtmp dash` in a tmux pane (a real terminal) attached to the
  cluster, on its first screen or after pressing `2` (the Jobs tab, rows churning at the rate).

The dashboard is started before its window and left to settle (start-up and the first fetches
are not counted), then quit with `q` after it. Over each load window (first SUBMIT to the last
terminal event) the kernel's CPU counters give the master's CPU, the dashboard process's CPU and,
for reference, the tmux server's (the terminal emulator drawing what the dashboard writes). The
master's cost of serving a dashboard is the master's CPU with it minus without, per round, then
the median.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.cluster import LocalCluster
from bench.env import ROOT, machine
from bench.load import Driver, LoadError
from bench.profiles import BenchError
from bench.progress import Bar
from bench.report import write_plain
from bench.tmux import Session

NOOP = {"scenario": "noop"}
SIDES = ("without", "overview", "jobs")
TARGET_DASH_PCT = 30.0
TARGET_MASTER_PCT = 5.0


@dataclass
class Config:
    """What `bench dash-cost` runs."""

    rate: float = 1000.0  # jobs/s, open loop
    jobs: int = 20_000  # per window: 20 s at 1,000/s
    batch: int = 50  # specs per SUBMIT (20 SUBMITs/s at 1,000/s)
    agents: int = 2
    slots: int = 16
    simulated: bool = False
    repeat: int = 3
    settle_s: float = 3.0  # a new dashboard runs this long before its window starts
    width: int = 200
    height: int = 50
    timeout: float | None = None

    def check(self) -> None:
        if self.rate <= 0 or self.jobs < 1 or self.repeat < 1 or self.batch < 1:
            raise BenchError("dash-cost: --rate, --jobs, --batch and --repeat must be positive")
        if self.agents < 1 or self.slots < 1:
            raise BenchError("dash-cost: --agents and --slots must be at least 1")

    def window_timeout(self) -> float:
        return self.timeout or 60.0 + 2 * self.jobs / self.rate


def config(args: Any) -> Config:
    """A Config from `ffrtmp bench` arguments (only those given replace the defaults)."""
    cfg = Config(repeat=3 if args.repeat == 1 else args.repeat,  # 1 is the CLI's default
                 simulated=bool(args.simulated))
    for key in ("rate", "jobs", "batch", "agents", "slots", "timeout"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(cfg, key, value)
    return cfg


# ---- the dashboard in a terminal ----------------------------------------------------------------


class DashPane:
    """`ffrtmp dash` in a detached tmux session on a private server socket."""

    def __init__(self, cluster: LocalCluster, width: int, height: int) -> None:
        if not _have_tmux():
            raise BenchError("dash-cost needs tmux (apt-get install tmux)")
        self.session = Session("ffrtmp-bench", width, height, error=BenchError)
        self.session.env.pop("FFRTMP_MASTER", None)
        self.session.env.pop("FFRTMP_EVENTS", None)
        self.cluster = cluster
        self.proc: psutil.Process | None = None
        self.server: psutil.Process | None = None

    def screen(self) -> str:
        return self.session.screen(check=False)

    def keys(self, *keys: str) -> None:
        self.session.keys(*keys)

    def start(self, timeout: float = 30.0) -> None:
        """Start the dashboard and wait until it shows the cluster (live, agents counted)."""
        argv = [sys.executable, "-m", "ffrtmp", "--master", self.cluster.clients_ep,
                "--events-ep", self.cluster.events_ep, "dash"]
        # Textual draws on stderr, so nothing is redirected (remain-on-exit keeps its screen).
        self.session.start(f"exec {shlex.join(argv)}", ROOT)
        self.server = psutil.Process(self.session.pid("pid"))
        self.proc = psutil.Process(self.session.pid("pane_pid"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = self.session.tmux("display-message", "-p", "-t", self.session.target,
                                     "#{pane_dead}")
            if dead.strip() == "1":
                raise BenchError(f"the dashboard exited at start:\n{self.screen()}")
            if _ready(self.screen()):
                return
            time.sleep(0.1)  # start-up poll in a tool, not a test
        raise BenchError(f"the dashboard did not show the cluster within {timeout:g}s:\n"
                         f"{self.screen()}")

    def stop(self) -> float | None:
        """`q`, then kill the tmux server; seconds the dashboard took to exit (None: killed)."""
        took = None
        try:
            if _alive(self.proc):
                pressed = time.monotonic()
                self.keys("q")
                # Not proc.wait(): tmux does not always reap its dead pane's process at once,
                # and an unreaped zombie has ended all the same.
                while _alive(self.proc) and time.monotonic() - pressed < 10:
                    time.sleep(0.01)
                if not _alive(self.proc):
                    took = time.monotonic() - pressed
        finally:
            self.session.kill()
            if self.proc is not None:
                with contextlib.suppress(psutil.Error):
                    self.proc.kill()
        return took


def _have_tmux() -> bool:
    return shutil.which("tmux") is not None


def _ready(screen: str) -> bool:
    """The dashboard shows the cluster: the status line is live (or, for a dashboard without
    one, an `agents N` count is drawn) and nothing says the master is unreachable."""
    if "unreachable" in screen or "connecting" in screen:
        return False
    return "● live" in screen or re.search(r"\bagents \d+", screen) is not None


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    with contextlib.suppress(psutil.Error):
        t = proc.cpu_times()
        return t.user + t.system
    return 0.0


def _alive(proc: psutil.Process | None) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc is not None and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    return False


# ---- the measurement ----------------------------------------------------------------------------


def _window(cfg: Config, driver: Driver, master: psutil.Process,
            pane: DashPane | None) -> dict[str, Any]:
    dash = pane.proc if pane else None
    server = pane.server if pane else None
    m0, d0, s0 = _cpu(master), _cpu(dash), _cpu(server)
    try:
        o = driver.run([NOOP] * cfg.jobs, cfg.batch, rate=cfg.rate,
                       timeout=cfg.window_timeout(), sample_s=1.0)
    except LoadError as e:
        raise BenchError(str(e)) from e
    wall = time.perf_counter() - o.first_send
    m1, d1, s1 = _cpu(master), _cpu(dash), _cpu(server)
    done = sum(1 for s, _ in o.final.values() if s == "completed")
    if o.timed_out or done < cfg.jobs:
        raise BenchError(f"{done} of {cfg.jobs} jobs completed in the window")
    out = {"wall_s": round(wall, 3), "jobs_per_s": round(cfg.jobs / (o.end - o.first_send), 1),
           "master_cpu_pct": round(100 * (m1 - m0) / wall, 2),
           "jobs_in_db": max(o.ids)}  # the table grows every window: per-job costs show it
    if pane is not None:
        out["dash_cpu_pct"] = round(100 * (d1 - d0) / wall, 2)
        out["tmux_cpu_pct"] = round(100 * (s1 - s0) / wall, 2)
        out["dash_alive"] = _alive(dash)
        out["screen_ok"] = _ready(pane.screen())  # not frozen on "unreachable" under load
    return out


def _side(cfg: Config, side: str, cluster: LocalCluster, driver: Driver,
          master: psutil.Process) -> dict[str, Any]:
    """One window of one side: start a dashboard (unless "without"), load, quit it."""
    if side == "without":
        return _window(cfg, driver, master, None)
    pane = DashPane(cluster, cfg.width, cfg.height)
    try:
        pane.start()
        if side == "jobs":
            pane.keys("2")
        time.sleep(cfg.settle_s)  # let it settle: its start-up is not what is measured
        fig = _window(cfg, driver, master, pane)
    finally:
        quit_s = pane.stop()
    fig["quit_s"] = round(quit_s, 3) if quit_s is not None else None
    return fig


def run(cfg: Config, out: Path, bar: Bar) -> dict[str, Path]:
    """Measure every side `repeat` times on one cluster; write report.json and report.md."""
    cfg.check()
    if not _have_tmux():
        raise BenchError("dash-cost needs tmux (apt-get install tmux)")
    base = Path(tempfile.mkdtemp(prefix="ffrtmp-dash-cost-"))
    cluster = LocalCluster(None, cfg.agents, cfg.slots, workdir=base / "cluster",
                           simulated=cfg.simulated)
    raw: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    host = machine()
    started = time.monotonic()
    ok = False
    try:
        bar.phase(f"starting a master (SQLite) and {cfg.agents}x{cfg.slots} "
                  f"{'simulated ' if cfg.simulated else ''}agents")
        cluster.start()
        master = cluster.processes()["master"]
        with Driver(cluster.clients_ep, cluster.events_ep) as driver:
            driver.warm_up()
            bar.phase("warm-up: 2 s of load, no dashboard")
            driver.run([NOOP] * int(min(cfg.jobs, 2 * cfg.rate)), cfg.batch, rate=cfg.rate,
                       timeout=cfg.window_timeout())
            for i in range(cfg.repeat):
                k = i % len(SIDES)
                for side in SIDES[k:] + SIDES[:k]:
                    bar.phase(f"round {i + 1}/{cfg.repeat}: {side}, {cfg.jobs:,} noop jobs at "
                              f"{cfg.rate:g}/s [{time.monotonic() - started:.0f}s]")
                    raw[side].append(_side(cfg, side, cluster, driver, master))
        ok = True
    finally:
        cluster.stop()
        if ok:  # else the logs stay for a look
            shutil.rmtree(base, ignore_errors=True)
    host["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report = _report(cfg, raw, host, time.monotonic() - started)
    return write_plain(out, report, _markdown(report))


def _spread(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {"median": round(statistics.median(xs), 2), "min": round(min(xs), 2),
            "max": round(max(xs), 2), "runs": [round(x, 2) for x in xs]}


def _report(cfg: Config, raw: dict[str, list[dict[str, Any]]], host: dict[str, Any],
            elapsed: float) -> dict[str, Any]:
    without = [r["master_cpu_pct"] for r in raw["without"]]
    sides: dict[str, Any] = {}
    for side, runs in raw.items():
        row: dict[str, Any] = {"master_cpu_pct": _spread([r["master_cpu_pct"] for r in runs]),
               "jobs_per_s": _spread([r["jobs_per_s"] for r in runs])}
        if side != "without":
            # per round: the two windows of one round ran back to back
            row["master_delta_pct"] = _spread([r["master_cpu_pct"] - w
                                               for r, w in zip(runs, without, strict=True)])
            row["dash_cpu_pct"] = _spread([r["dash_cpu_pct"] for r in runs])
            row["tmux_cpu_pct"] = _spread([r["tmux_cpu_pct"] for r in runs])
            row["quit_s"] = _spread([r["quit_s"] for r in runs if r.get("quit_s") is not None])
            row["all_alive_and_live"] = all(r["dash_alive"] and r["screen_ok"] for r in runs)
        sides[side] = row
    dash_worst = max(sides[s]["dash_cpu_pct"]["median"] for s in SIDES[1:])
    delta_worst = max(sides[s]["master_delta_pct"]["median"] for s in SIDES[1:])
    return {"tool": "ffrtmp bench dash-cost", "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": host, "config": asdict(cfg), "elapsed_s": round(elapsed, 1),
            "new_dashboard": "TabbedContent" in (ROOT / "tui" / "app.py").read_text(),
            "raw": raw, "sides": sides,
            "verdict": {"dash_cpu_pct": dash_worst, "dash_ok": dash_worst <= TARGET_DASH_PCT,
                        "master_delta_pct": delta_worst,
                        "master_ok": delta_worst <= TARGET_MASTER_PCT}}


def _fmt(s: dict[str, Any], digits: int = 1) -> str:
    if s.get("median") is None:
        return "-"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f} – {s['max']:.{digits}f})"


def _markdown(r: dict[str, Any]) -> str:
    c, v = r["config"], r["verdict"]
    agents = f"{c['agents']}{' simulated' if c['simulated'] else ''} x {c['slots']}"
    lines = [f"# ffrtmp bench dash-cost ({r['created_at']}, {r['elapsed_s']} s)", "",
             f"{c['jobs']:,} noop jobs per window at {c['rate']:g} jobs/s, {c['repeat']} rounds "
             f"(median, min – max), agents {agents}, dashboard at {c['width']}x{c['height']} "
             f"({'new' if r['new_dashboard'] else 'old'} app); load average at start "
             f"{r['machine'].get('loadavg_at_start')}, at the end "
             f"{r['machine'].get('loadavg_at_end')}. CPU in % of one core.", "",
             "| dashboard | master CPU % | master Δ vs without | dash CPU % | tmux CPU % "
             "| jobs/s | q → exit s |", "|---|---|---|---|---|---|---|"]
    for side, row in r["sides"].items():
        if side == "without":
            lines.append(f"| none | {_fmt(row['master_cpu_pct'])} | – | – | – | "
                         f"{_fmt(row['jobs_per_s'], 0)} | – |")
        else:
            lines.append(f"| {side} | {_fmt(row['master_cpu_pct'])} | "
                         f"{_fmt(row['master_delta_pct'])} | {_fmt(row['dash_cpu_pct'])} | "
                         f"{_fmt(row['tmux_cpu_pct'])} | {_fmt(row['jobs_per_s'], 0)} | "
                         f"{_fmt(row['quit_s'], 2)} |")
    lines += ["", f"Dashboard: **{v['dash_cpu_pct']:.1f} %** of a core (target ≤ "
              f"{TARGET_DASH_PCT:g} %: {'met' if v['dash_ok'] else 'MISSED'}); the master's cost "
              f"of serving it: **{v['master_delta_pct']:+.1f} %** (target ≤ "
              f"{TARGET_MASTER_PCT:g} %: {'met' if v['master_ok'] else 'MISSED'}). Worst tab's "
              "median.", ""]
    return "\n".join(lines)
