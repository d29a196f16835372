"""Metrics of real processes after a real run: a master and an agent with /metrics on, real
ffmpeg, a timeout, a cancellation, a retry, a client error and a bad frame.

Proves (1) every metric a rule in alerting/rules.yml or a Grafana panel uses is exported by the
live master or agent, with samples, and (2) the values match what the run did.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from bus.errors import ClientError
from conftest import free_port, wait_for
from harness import Cluster
from test_alerting import used_metric_names

pytestmark = [pytest.mark.ffmpeg, pytest.mark.timeout(240)]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Scrape text -> {(sample name, labels): value}."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the series of `name` whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def names(samples: Samples) -> set[str]:
    return {n for n, _ in samples}


@dataclass
class Run:
    jobs: dict[int, dict[str, Any]]
    ids: dict[str, list[int]]
    master: Samples
    agent: Samples


def _bad_frame(endpoint: str) -> None:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(endpoint)
        sock.send_multipart([b"XYZ\x01\x00", b"STATS", b"\x80"])  # not the FFR header
        sock.poll(5000)  # the master answers ERROR bad_frame
        sock.close()
    finally:
        ctx.term()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp: Path = tmp_path_factory.mktemp("live")
    c = Cluster(tmp, f"sqlite:///{tmp}/ffrtmp.db", metrics=True,
                master_args=["--maintenance-interval", "0.5", "--retry-base", "0.2"])
    try:
        c.start_master()
        c.start_agent("a1", 4, "--bandwidth-mbps", "1000", "--allow-url", "127.0.0.1")
        sub = c.client.submit
        ids = {
            "noop": sub([{"scenario": "noop"}] * 5),
            "sleep": sub([{"scenario": "sleep", "params": {"seconds": 0.2}}] * 2),
            "timeout": sub([{"scenario": "sleep", "params": {"seconds": 30}, "timeout_s": 0.5,
                             "max_attempts": 1}]),
            "cancel": sub([{"scenario": "sleep", "params": {"seconds": 30}}]),
            "ffmpeg": sub([{"scenario": "720p-h264", "output": "live.mp4",
                            "input": "testsrc:duration=2,size=320x240,rate=25"}]),
            "retry": sub([{"scenario": "720p-h264", "max_attempts": 2,
                           "input": f"http://127.0.0.1:{free_port()}/nothing.mp4"}]),
        }
        wait_for(lambda: c.job(ids["cancel"][0])["state"] == "running", 30,
                 message="the job to cancel did not start")
        c.client.cancel(ids["cancel"], grace_s=5)
        with pytest.raises(ClientError):
            c.client.cancel([1], grace_s=1e9)  # ERROR bad_body: a client error
        _bad_frame(c.clients_ep)
        every = [i for group in ids.values() for i in group]
        jobs = c.wait_terminal(every, 120)

        def settled() -> tuple[Samples, Samples] | None:
            master, agent = parse(c.scrape()), parse(c.scrape("agent-a1"))
            done = value(master, "ffrtmp_jobs_finished_total") == len(every)
            upkeep = value(master, "ffrtmp_db_maintenance_total", result="ok") > 0
            idle = value(master, "ffrtmp_slots_busy") == 0 and value(
                agent, "ffrtmp_agent_jobs_running") == 0
            # The state gauges come from a snapshot the loop takes every second: wait for one
            # taken with the agent connected (the first is taken before it registers).
            fresh = value(master, "ffrtmp_agents_alive") == 1
            return (master, agent) if done and upkeep and idle and fresh else None

        scraped = wait_for(settled, 30, interval=0.2, message="metrics to settle")
        assert scraped is not None
        master, agent = scraped
        yield Run(jobs, ids, master, agent)
    finally:
        c.close()


def test_every_metric_used_by_rules_and_dashboard_is_exported_live(run: Run) -> None:
    exported = names(run.master) | names(run.agent)
    wanted = used_metric_names()
    if importlib.util.find_spec("agent.admission") is None:  # admission gauges come with it
        wanted = {n for n in wanted if not n.startswith("ffrtmp_agent_admission_")}
    missing = sorted(wanted - exported)
    assert not missing, f"used by rules or dashboard but not exported: {missing}"


def test_master_counts_what_the_run_did(run: Run) -> None:
    m, ids = run.master, run.ids
    total = sum(len(v) for v in ids.values())
    assert value(m, "ffrtmp_jobs_submitted_total") == total
    states = {s: value(m, "ffrtmp_jobs_finished_total", state=s)
              for s in ("completed", "failed", "timed_out", "cancelled")}
    assert states == {"completed": 8, "failed": 1, "timed_out": 1, "cancelled": 1}, states
    assert value(m, "ffrtmp_jobs_finished_total", state="failed", reason="exit_code") == 1
    assert value(m, "ffrtmp_jobs_finished_total", state="timed_out", reason="timeout") == 1
    assert value(m, "ffrtmp_jobs_timed_out_total") == 1
    assert value(m, "ffrtmp_jobs_cancelled_total", mode="graceful") == 1
    assert value(m, "ffrtmp_jobs_cancelled_total", mode="forced") == 0
    assert value(m, "ffrtmp_job_retries_total", reason="exit_code") == 1
    assert value(m, "ffrtmp_jobs_dispatched_total") == total + 1  # one retry
    assert value(m, "ffrtmp_job_queue_wait_seconds_count") == total + 1
    assert value(m, "ffrtmp_job_queue_wait_seconds_count", scenario="720p-h264") == 3
    assert value(m, "ffrtmp_job_run_seconds_count", scenario="noop", status="completed") == 5
    assert value(m, "ffrtmp_job_run_seconds_count", scenario="720p-h264", status="failed") == 2
    assert value(m, "ffrtmp_oom_kills_total") == 0
    assert value(m, "ffrtmp_bus_bad_frames_total", socket="client", reason="bad_frame") == 1
    assert value(m, "ffrtmp_client_errors_total", code="bad_body") == 1
    assert value(m, "ffrtmp_db_errors_total") == 0
    assert value(m, "ffrtmp_db_commit_seconds_count") > 0
    assert value(m, "ffrtmp_agents_alive") == 1 and value(m, "ffrtmp_slots") == 4
    assert value(m, "ffrtmp_node_slots", agent="a1") == 4
    assert value(m, "ffrtmp_master_up") == 1
    assert 0 <= value(m, "ffrtmp_master_loop_lag_seconds") < 5
    assert sum(value(m, "ffrtmp_queue_depth", priority=p) for p in ("high", "normal", "low")) == 0


def test_bytes_and_bandwidth_of_the_real_encode(run: Run) -> None:
    m, a = run.master, run.agent
    encoded = run.jobs[run.ids["ffmpeg"][0]]
    assert encoded["state"] == "completed" and encoded["bytes_out"] > 0, encoded
    duration = encoded["extra"]["duration_s"]
    # Only the encode wrote bytes (noop/sleep write none; the failed input wrote nothing).
    assert value(m, "ffrtmp_job_bytes_out_total", agent="a1") == encoded["bytes_out"]
    # Every finished attempt's input bytes (the failed input's attempts read some too), as the
    # agent itself counted them.
    assert value(m, "ffrtmp_job_bytes_in_total", agent="a1") == value(
        a, "ffrtmp_agent_job_bytes_in_total") >= encoded["bytes_in"] > 0
    assert value(m, "ffrtmp_job_bandwidth_bytes_per_second_count", scenario="720p-h264") == 1
    assert value(m, "ffrtmp_job_bandwidth_bytes_per_second_sum") == pytest.approx(
        encoded["bytes_out"] / duration)
    assert value(a, "ffrtmp_agent_job_bytes_out_total") == encoded["bytes_out"]
    assert value(a, "ffrtmp_agent_link_capacity_bytes_per_second") == 1000e6 / 8
    assert value(a, "ffrtmp_agent_bandwidth_utilisation_ratio", direction="out") == 0  # idle


def test_agent_counts_what_it_ran(run: Run) -> None:
    a = run.agent
    assert value(a, "ffrtmp_agent_jobs_finished_total", status="completed") == 8
    assert value(a, "ffrtmp_agent_jobs_finished_total", status="failed", reason="exit_code") == 2
    assert value(a, "ffrtmp_agent_jobs_finished_total", status="timed_out") == 1
    assert value(a, "ffrtmp_agent_jobs_finished_total", status="cancelled") == 1
    assert value(a, "ffrtmp_agent_connects_total") == 1
    assert value(a, "ffrtmp_agent_connected") == 1 and value(a, "ffrtmp_agent_slots") == 4
    assert value(a, "ffrtmp_agent_info", agent="a1") == 1
    assert value(a, "ffrtmp_agent_host_memory_total_bytes") > 0
    assert 0 < value(a, "ffrtmp_agent_disk_free_bytes") <= value(a, "ffrtmp_agent_disk_total_bytes")
    assert value(a, "ffrtmp_agent_host_cpu_seconds_total", mode="idle") > 0


def test_sla_verdicts_are_stored_per_job_and_counted(run: Run) -> None:
    verdicts = {i: j["extra"].get("sla_met") for i, j in run.jobs.items()}
    for i in run.ids["noop"] + run.ids["sleep"] + run.ids["ffmpeg"]:
        assert verdicts[i] is True, run.jobs[i]
    for i in run.ids["timeout"] + run.ids["retry"]:
        assert verdicts[i] is False, run.jobs[i]
    assert verdicts[run.ids["cancel"][0]] is None  # cancelled: not judged
    assert value(run.master, "ffrtmp_sla_jobs_total", verdict="met") == 8
    assert value(run.master, "ffrtmp_sla_jobs_total", verdict="missed") == 2
    assert value(run.master, "ffrtmp_sla_target_ratio") == 0.95
