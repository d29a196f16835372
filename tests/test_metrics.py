"""Metrics in process: hooks, bounded labels, SLA verdicts, snapshot gauges, the agent's
collector, the metrics endpoint's life cycle and JSON logs (values via get_sample_value)."""

from __future__ import annotations

import io
import json
import logging
import random
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.core import View
from agent.metrics import AgentMetrics, MetricsError, serve, stop_serving
from bus.sockets import BindError
from conftest import free_port
from ffrtmp import logs
from harness import ROOT
from master import state as sm
from master.config import MasterConfig
from master.core import MasterCore
from master.metrics import OTHER, LabelClamp, MasterMetrics
from master.scheduler import Job
from master.server import Master
from master.sla import SlaPolicy

WALL = 1_800_000_000.0


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


# ---------------------------------------------------------------------------- SLA


@pytest.mark.parametrize(("state", "waited", "took", "verdict"), [
    ("completed", 5.0, 100.0, True),
    ("completed", 30.0, 600.0, True),  # both targets are inclusive
    ("completed", 31.0, 100.0, False),  # waited too long
    ("completed", 5.0, 601.0, False),  # took too long
    ("completed", None, 100.0, True),  # wait unknown (assigned before a restart): done only
    ("failed", 1.0, 2.0, False),
    ("timed_out", 1.0, 2.0, False),
    ("cancelled", 1.0, 2.0, None),  # the client's choice: not judged
])
def test_sla_verdict(state: str, waited: float | None, took: float, verdict: bool | None) -> None:
    assert SlaPolicy(600, 30, 0.95).verdict(state, WALL, waited, WALL + took) is verdict


def test_sla_policy_rejects_nonsense() -> None:
    for args in ((0, 30, 0.9), (600, -1, 0.9), (600, 30, 0), (600, 30, 1.5)):
        with pytest.raises(ValueError):
            SlaPolicy(*args)


def test_sla_targets_from_the_cli_are_checked() -> None:
    out = subprocess.run([sys.executable, "-m", "ffrtmp", "master", "--db", "sqlite:///:memory:",
                          "--metrics", "off", "--sla-target", "1.5"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60, check=False)
    assert out.returncode != 0 and "target" in out.stderr


# ---------------------------------------------------------------------------- master hooks


def test_label_clamp_is_bounded() -> None:
    clamp = LabelClamp(["a"], extra=2)
    assert [clamp(v) for v in ("a", "x", "y", "z", "x", None)] == ["a", "x", "y", OTHER, "x",
                                                                    "none"]


def job(scenario: str = "720p-h264", **kw: Any) -> Job:
    return Job(id=kw.pop("id", 1), scenario=scenario, spec=b"\x80", state=sm.QUEUED, priority=1,
               attempt=0, max_attempts=kw.pop("max_attempts", 3), created_at=WALL, **kw)


def test_hooks_count_with_bounded_labels() -> None:
    reg = CollectorRegistry()
    m = MasterMetrics(reg, scenarios=["720p-h264"])
    j = job(enqueued=10.0)
    m.job_assigned(j, now=14.0)
    m.job_assigned(j, now=20.0)
    assert j.first_wait_s is None  # observers read a job, never write it
    assert sample(reg, "ffrtmp_job_queue_wait_seconds_count", scenario="720p-h264") == 2
    assert sample(reg, "ffrtmp_job_queue_wait_seconds_sum", scenario="720p-h264") == 14.0
    j.bytes_in, j.bytes_out = 1000, 4_000_000
    m.job_done(j, "completed", None, 2.0, "a1")
    assert sample(reg, "ffrtmp_job_run_seconds_sum", scenario="720p-h264",
                  status="completed") == 2.0
    assert sample(reg, "ffrtmp_job_bandwidth_bytes_per_second_sum", scenario="720p-h264") == 2e6
    assert sample(reg, "ffrtmp_job_bytes_out_total", agent="a1") == 4_000_000
    m.job_done(job("my-secret-scenario-42"), "failed", "oom_killed", 1.0, "a1")
    m.job_done(job(), "failed", "stalled", 1.0, "a1")
    assert sample(reg, "ffrtmp_job_run_seconds_count", scenario=OTHER, status="failed") == 1
    assert sample(reg, "ffrtmp_oom_kills_total") == 1
    assert sample(reg, "ffrtmp_jobs_stalled_total") == 1
    m.job_retried("agent said: disk on fire")  # free text from an agent never becomes a label
    assert sample(reg, "ffrtmp_job_retries_total", reason=OTHER) == 1
    text = generate_latest(reg).decode()
    assert "my-secret-scenario-42" not in text and "disk on fire" not in text


def test_finished_counts_state_reason_mode_and_sla() -> None:
    reg = CollectorRegistry()
    m = MasterMetrics(reg, sla=SlaPolicy(600, 30, 0.9))
    done = [("completed", None), ("timed_out", "timeout"), ("cancelled", "cancelled_forced"),
            ("cancelled", "cancelled_graceful"), ("failed", "exit_code")]
    verdicts = []
    for state, reason in done:
        j = job(first_wait_s=1.0)
        j.state = state
        verdicts.append(m.sla.verdict(state, j.created_at, j.first_wait_s, WALL + 10))
        m.job_finished(j, reason, verdicts[-1])
    assert verdicts == [True, False, None, None, False]
    assert sample(reg, "ffrtmp_jobs_finished_total", state="timed_out", reason="timeout") == 1
    assert sample(reg, "ffrtmp_jobs_finished_total", state="completed", reason="none") == 1
    assert sample(reg, "ffrtmp_jobs_timed_out_total") == 1
    assert sample(reg, "ffrtmp_jobs_cancelled_total", mode="forced") == 1
    assert sample(reg, "ffrtmp_jobs_cancelled_total", mode="graceful") == 1
    assert sample(reg, "ffrtmp_sla_jobs_total", verdict="met") == 1
    assert sample(reg, "ffrtmp_sla_jobs_total", verdict="missed") == 2


def test_core_stores_the_sla_verdict_in_the_jobs_extra() -> None:
    cfg = MasterConfig(db_url="sqlite:///:memory:", sla_done_s=60, sla_wait_s=5)
    reg = CollectorRegistry()
    metrics = MasterMetrics(reg, ["720p-h264"], SlaPolicy(60, 5))
    core = MasterCore(cfg, 1, metrics, random.Random(0))
    core.jobs.recover([{"id": i, "scenario": "720p-h264", "spec": {}, "state": sm.QUEUED,
                        "priority": 1, "attempt": 0, "max_attempts": 3, "created_at": WALL}
                       for i in (1, 2, 3)], 100.0, WALL)
    fast, slow, gone = (core.jobs.get(i) for i in (1, 2, 3))
    assert fast and slow and gone
    core.jobs.transition(fast, sm.ASSIGN, 101.0, WALL + 1, agent="a1")
    core.jobs.transition(fast, sm.ACCEPT, 101.5, WALL + 1.5)
    core.jobs.transition(fast, sm.COMPLETE, 103.0, WALL + 3, extra={"duration_s": 1.5})
    core.jobs.transition(slow, sm.ASSIGN, 110.0, WALL + 10, agent="a1")  # waited 10 s > 5 s
    assert slow.first_wait_s == 10.0
    core.jobs.transition(slow, sm.COMPLETE, 111.0, WALL + 11, extra={})
    core.jobs.transition(gone, sm.CANCEL, 112.0, WALL + 12, reason="cancelled_graceful")
    updates = core.take_output()[0].updates
    assert updates[1]["extra"] == {"duration_s": 1.5, "sla_met": True}
    assert updates[2]["extra"] == {"sla_met": False}
    assert "extra" not in updates[3]  # cancelled: not judged, nothing written
    assert sample(reg, "ffrtmp_job_queue_wait_seconds_count", scenario="720p-h264") == 2


def test_state_gauges_come_from_the_last_snapshot_not_the_scrape() -> None:
    calls = []

    def snapshot() -> dict[str, Any]:
        calls.append(1)
        return {"queued_by_priority": {"high": 2, "normal": len(calls), "low": 0}, "delayed": 1,
                "live_by_state": {"queued": 3, "running": 1}, "agents": 2, "slots": 8,
                "slots_busy": 1, "uptime_s": 5.0}

    reg = CollectorRegistry()
    m = MasterMetrics(reg, sla=SlaPolicy(900, 60, 0.99))
    m.watch(snapshot, lambda: [{"name": "a1", "state": "draining", "slots": 4, "busy": 1,
                                "credit": 3}])
    for _ in range(3):
        generate_latest(reg)
    assert len(calls) == 1  # scrapes never walk the loop's live state
    assert sample(reg, "ffrtmp_queue_depth", priority="normal") == 1
    m.refresh()
    assert sample(reg, "ffrtmp_queue_depth", priority="normal") == 2
    assert sample(reg, "ffrtmp_agents_alive") == 2 and sample(reg, "ffrtmp_slots_busy") == 1
    assert sample(reg, "ffrtmp_node_draining", agent="a1") == 1
    assert sample(reg, "ffrtmp_node_credit", agent="a1") == 3
    assert sample(reg, "ffrtmp_sla_target_ratio") == 0.99
    assert sample(reg, "ffrtmp_sla_done_seconds") == 900
    assert 0 <= (sample(reg, "ffrtmp_master_loop_lag_seconds") or -1) < 5


# ---------------------------------------------------------------------------- agent


class FakeAdmission:
    def __init__(self) -> None:
        self.fail = 0

    def snapshot(self) -> dict[str, float]:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("dictionary changed size during iteration")
        return {"cpu_reserved_percent": 150.0, "cpu_capacity_percent": 400.0,
                "memory_reserved_mb": 512.0, "memory_capacity_mb": 2048.0,
                "disk_reserved_mb": 0.0, "disk_free_mb": -1.0}


def fake_cfg(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(name="a1", slots=4, work_dir=tmp_path)


def test_agent_gauges_bytes_and_admission(tmp_path: Path) -> None:
    import time

    admission = FakeAdmission()
    reg = CollectorRegistry()
    m = AgentMetrics(reg, fake_cfg(tmp_path), "0.1.0", bandwidth_mbps=8)  # 1e6 bytes/s
    view = View(registered=True, draining=False, stopping=False, granted=2, unacked=0,
                running=[({"bytes_in": 100, "bytes_out": 5000}, time.monotonic() - 10)])
    m.observe(lambda: view, admission.snapshot)
    assert sample(reg, "ffrtmp_agent_jobs_running") == 1
    assert sample(reg, "ffrtmp_agent_job_bytes_out_total") == 5000
    out_rate = sample(reg, "ffrtmp_agent_bandwidth_bytes_per_second", direction="out") or 0
    assert 400 < out_rate <= 500
    assert sample(reg, "ffrtmp_agent_bandwidth_utilisation_ratio",
                  direction="out") == pytest.approx(out_rate / 1e6, rel=0.05)
    # The attempt ends: between leaving `running` and its finish hook the counter never dips.
    view.running.clear()
    assert sample(reg, "ffrtmp_agent_job_bytes_out_total") == 5000
    m.finished("completed", None, 10.0, 120, 6000)
    assert sample(reg, "ffrtmp_agent_job_bytes_out_total") == 6000
    assert sample(reg, "ffrtmp_agent_job_bytes_in_total") == 120
    m.finished("failed", "something an agent made up", 1.0, 0, 0)
    assert sample(reg, "ffrtmp_agent_jobs_finished_total", status="failed", reason="other") == 1
    assert sample(reg, "ffrtmp_agent_admission_cpu_reserved_cores") == 1.5
    assert sample(reg, "ffrtmp_agent_admission_memory_capacity_bytes") == 2048 * 2**20
    assert sample(reg, "ffrtmp_agent_admission_disk_free_bytes") is None  # unknown (-1)
    admission.fail = 2  # the loop was changing reservations: retried
    assert sample(reg, "ffrtmp_agent_admission_cpu_capacity_cores") == 4.0
    assert sample(reg, "ffrtmp_agent_info", agent="a1", version="0.1.0") == 1
    assert (sample(reg, "ffrtmp_agent_disk_free_bytes") or 0) > 0


def test_agent_without_admission_has_no_admission_gauges(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    AgentMetrics(reg, fake_cfg(tmp_path))
    assert "ffrtmp_agent_admission" not in generate_latest(reg).decode()
    assert sample(reg, "ffrtmp_agent_slots") == 4


# ---------------------------------------------------------------------------- the endpoint


def test_serve_on_port_zero_then_stop(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    AgentMetrics(reg, fake_cfg(tmp_path))
    handle = serve(reg, "127.0.0.1:0")
    port = handle[0].server_port
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert b"ffrtmp_agent_up 1.0" in resp.read()
    finally:
        stop_serving(handle)
    with socket.socket() as s:  # nothing listens there any more
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_serve_refuses_bad_addresses_and_taken_ports() -> None:
    reg = CollectorRegistry()
    for bad in ("9471", "127.0.0.1:http", "127.0.0.1:70000"):
        with pytest.raises(MetricsError, match="HOST:PORT"):
            serve(reg, bad)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(MetricsError, match="cannot serve"):
            serve(reg, f"127.0.0.1:{s.getsockname()[1]}")


def test_master_metrics_port_taken_is_a_bind_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        ports = [free_port() for _ in range(3)]
        cfg = MasterConfig(db_url=f"sqlite:///{tmp_path}/m.db",
                           agents=f"tcp://127.0.0.1:{ports[0]}",
                           clients=f"tcp://127.0.0.1:{ports[1]}",
                           events=f"tcp://127.0.0.1:{ports[2]}",
                           metrics=f"127.0.0.1:{s.getsockname()[1]}")
        master = Master(cfg)
        with pytest.raises(BindError, match="metrics"):
            master.bind()


# ---------------------------------------------------------------------------- logs


def test_json_logs_are_one_object_per_line(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.setup("info", "json")
        logging.getLogger("ffrtmp.master").info("agent %s lost", "a1", extra={"agent": "a1"})
        logging.getLogger("ffrtmp.master").debug("not shown")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("ffrtmp.agent").exception("failed")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in err.getvalue().splitlines()]
    assert len(lines) == 2
    assert lines[0]["msg"] == "agent a1 lost" and lines[0]["agent"] == "a1"
    assert lines[0]["level"] == "info" and lines[0]["logger"] == "ffrtmp.master"
    assert lines[0]["ts"].endswith("+00:00")
    assert "ValueError: boom" in lines[1]["exc"]


def test_log_file_and_format_from_the_cli(tmp_path: Path) -> None:
    log = tmp_path / "ffrtmp.log"
    out = subprocess.run([sys.executable, "-m", "ffrtmp", "--log-format", "json", "--log-file",
                          str(log), "db", "migrate", "--db", f"sqlite:///{tmp_path}/x.db"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    bad = subprocess.run([sys.executable, "-m", "ffrtmp", "--log-format", "xml", "db", "migrate"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert bad.returncode != 0
