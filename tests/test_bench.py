"""The load runner: behaviour only (reports exist and add up), never timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cluster import LocalCluster
from bench.load import Driver
from bench.report import aggregate
from bench.stats import percentile, spread, summary
from bus.client import Client
from ffrtmp.cli import main

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("jobs", "completed", "failed", "duration_s", "submit_rate", "completion_rate",
            "latency_ms", "queue_wait_ms")


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ffrtmp", "bench", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def _check_report(out: Path, jobs: int) -> dict:
    report = json.loads((out / "report.json").read_text())
    for key in REQUIRED:
        assert key in report, key
    assert report["jobs"] == jobs
    assert report["completed"] == jobs
    assert report["failed"] == 0
    assert report["failures_by_reason"] == {}
    assert report["duration_s"] > 0
    assert report["submit_rate"] > 0 and report["completion_rate"] > 0
    for key in ("latency_ms", "queue_wait_ms"):
        s = report[key]
        assert 0 <= s["p50"] <= s["p95"] <= s["p99"], (key, s)
        assert s["n"] == jobs
    assert report["machine"]["cpus"] >= 1
    assert report["config"]["profile"]["name"] == "quick"
    procs = report["processes"]
    assert procs["master"]["peak_rss_mb"] > 0
    assert procs["agents"]["count"] == report["config"]["profile"]["agents"]
    db = report["metrics"]["db"]
    assert db["commits"] >= 1 and db["commit_ms_p50"] is not None
    assert report["metrics"]["bus"]["messages_per_s"] > 0
    assert report["unloaded_latency_ms"]["n"] == report["config"]["profile"]["latency_samples"]
    rows = report["timeline"]
    assert rows and rows[-1][3] == jobs  # completed at the end of the timeline
    md = (out / "report.md").read_text()
    assert "## Throughput" in md and "## Latency" in md and "plot.svg" in md
    svg = (out / "plot.svg").read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    return report


def test_quick_profile_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = _bench(tmp_path, "--profile", "quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out / "report.json")
    assert "done" in proc.stderr  # the progress bar
    _check_report(out, 10)


@pytest.mark.postgres
def test_quick_profile_on_a_fresh_postgres_database(tmp_path: Path, pg_server_url: str) -> None:
    out = tmp_path / "report"
    proc = _bench(tmp_path, "--profile", "quick", "--db", "postgresql", "--pg", pg_server_url,
                  "--quiet", "--latency-samples", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = _check_report(out, 10)
    assert report["database"].startswith("PostgreSQL")


@pytest.mark.parametrize(("args", "needle"), [
    (["--profile", "huge"], "unknown profile 'huge' (choose from quick, standard, stress, scale)"),
    (["--workload", "dance"], "unknown workload 'dance' (choose from noop, sleep, ffmpeg)"),
    (["--db", "mysql"], "unknown --db 'mysql'"),
    (["sideways"], "unknown mode 'sideways'"),
    (["--profile", "scale", "--workload", "sleep"], "simulated agents, which run noop only"),
    (["--master", "tcp://127.0.0.1:1"], "--master needs --events too"),
])
def test_bad_invocations_give_one_line(args: list[str], needle: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ffrtmp bench: "), err
    assert needle in err


def test_simulated_agents_register_and_run_jobs(tmp_path: Path) -> None:
    cluster = LocalCluster(f"sqlite:///{tmp_path}/sim.db", 25, 2, workdir=tmp_path,
                           simulated=True)
    cluster.start(timeout=60)
    try:
        with Client(cluster.clients_ep, timeout=10) as client:
            nodes = client.nodes()
        assert len(nodes) == 25
        assert {n["name"] for n in nodes} == {f"sim{i:03d}" for i in range(25)}
        assert all(n["state"] == "alive" and n["slots"] == 2 for n in nodes)
        assert set(cluster.processes()) == {"master", "sim"}
        with Driver(cluster.clients_ep, cluster.events_ep) as driver:
            driver.warm_up()
            outcome = driver.run([{"scenario": "noop"}] * 200, batch=50, timeout=60)
        assert len(outcome.final) == 200
        assert {state for state, _ in outcome.final.values()} == {"completed"}
    finally:
        cluster.stop()


# ---- the pure parts ---------------------------------------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([7.0], 99) == 7.0
    s = summary([3.0, 1.0, 2.0])
    assert (s["n"], s["p50"], s["min"], s["max"]) == (3, 2.0, 1.0, 3.0)
    assert summary([])["p50"] is None


def test_spread_keeps_counts_whole_and_skips_missing() -> None:
    assert spread([3, 1, 2]) == {"median": 2, "min": 1, "max": 3, "n": 3}
    assert spread([1.0, None, 2.0])["median"] == 1.5
    assert spread([None])["n"] == 0


def test_aggregate_takes_medians_and_the_worst_counts() -> None:
    def run(i: int, rate: float, completed: int) -> dict:
        return {"run": i, "jobs": 10, "completed": completed, "failed": 10 - completed,
                "completion_rate": rate, "latency_ms": {"p50": rate / 100},
                "failures_by_reason": {"failed:exit_code": 10 - completed} if completed < 10
                else {}, "timeline": [[0.0, 10, 10, completed, 10 - completed]],
                "_latencies": [1.0]}

    report = aggregate({"label": "x"}, {"cpus": 2},
                       [run(1, 100.0, 10), run(2, 300.0, 9), run(3, 200.0, 10)])
    assert report["completion_rate"] == 200.0
    assert report["latency_ms"]["p50"] == 2.0
    assert report["completed"] == 9 and report["failed"] == 1
    assert report["failures_by_reason"] == {"failed:exit_code": 1}
    assert report["spread"]["completion_rate"] == {"median": 200.0, "min": 100.0,
                                                   "max": 300.0, "n": 3}
    assert report["timeline_run"] == 3 and len(report["runs"]) == 3


def test_store_ceiling_writes_whole_lifecycles(tmp_path: Path) -> None:
    from bench.store import ceiling
    from storage import Store

    result = ceiling(f"sqlite:///{tmp_path}/store.db", tmp_path, [1, 10], jobs=20, repeat=2)
    assert result["backend"] == "sqlite"
    # Each size without and with the epoch check, two rounds each.
    assert [(r["batch"], r["fenced"]) for r in result["rows"]] == [
        (1, False), (1, True), (10, False), (10, True)]
    assert all(r["jobs"] == 20 and r["jobs_per_s"] > 0 and len(r["rounds"]) == 2
               for r in result["rows"])
    with Store(f"sqlite:///{tmp_path}/store.db") as store:
        assert store.counts_by_state() == {"completed": 160}
        assert [e["to_state"] for e in store.events_for(1)] == ["queued", "assigned",
                                                                "completed"]
