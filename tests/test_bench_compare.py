"""`ffrtmp bench ceiling`, the ceiling section of run reports, and `ffrtmp bench compare`.

Shape and correctness only (every side completes every task, the reports hold their fields and
clean up after themselves); no speed is asserted: the bench measures, tests do not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bench import ceiling
from conftest import require, wait_for

ROOT = Path(__file__).resolve().parent.parent


def _bench(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`ffrtmp bench ARGS` in tmp_path, its temp files under tmp_path/tmp; on a timeout it is
    interrupted (SIGINT runs its clean-up), then killed."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "ffrtmp", "bench", "--quiet", *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"ffrtmp bench {' '.join(args)} timed out:\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _ours(tmp: str) -> list[tuple[int, str]]:
    """Live processes that inherited the bench's TMPDIR (so: it or something it started)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and p.environ().get("TMPDIR") == tmp:
                found.append((p.info["pid"], " ".join(p.info["cmdline"] or [])))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _no_leftovers(tmp_path: Path) -> None:
    """Nothing the bench started still runs, and its temp dirs are gone."""
    tmp = str(tmp_path / "tmp")
    wait_for(lambda: not _ours(tmp), 15, message=f"the bench's processes to end: {_ours(tmp)}")
    assert not any((tmp_path / "tmp").iterdir()), list((tmp_path / "tmp").iterdir())


def test_measure_returns_the_ceiling_figures() -> None:
    res = ceiling.measure(2, 2, 2000, warmup=200)
    assert res["rate"] > 0 and res["master_us_per_job"] > 0
    assert (res["agents"], res["slots"], res["jobs"]) == (2, 2, 2000)
    assert res["job_body_bytes"] > 100  # a JOB the size of the real one, spec included


def test_ceiling_mode_writes_its_report(tmp_path: Path) -> None:
    r = _bench(tmp_path, "ceiling", "--jobs", "2000", "--agents", "2", "--slots", "2",
               "--out", "c")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["tool"] == "ffrtmp bench ceiling"
    for key in ("rate", "master_us_per_job", "agents", "slots", "jobs"):
        assert key in report, key
    assert report["rate"] > 0 and report["master_us_per_job"] > 0
    assert (report["agents"], report["slots"], report["jobs"]) == (2, 2, 2000)
    md = (tmp_path / "c" / "report.md").read_text()
    assert "dispatch + ack rate" in md and "µs per job" in md
    _no_leftovers(tmp_path)


def test_run_report_states_its_share_of_the_ceiling(tmp_path: Path) -> None:
    r = _bench(tmp_path, "--profile", "quick", "--latency-samples", "0", "--ceiling-jobs", "2000",
               "--out", "q")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    c = report["ceiling"]
    prof = report["config"]["profile"]
    assert (c["agents"], c["slots"], c["jobs"]) == (prof["agents"], prof["slots"], 2000)
    assert c["rate"] > 0 and c["master_us_per_job"] > 0
    assert c["completion_pct_of_ceiling"] == pytest.approx(
        100 * report["completion_rate"] / c["rate"], rel=0.01)
    assert c["master_cpu_x_ceiling"] == pytest.approx(
        report["processes"]["master"]["cpu_us_per_job"] / c["master_us_per_job"], rel=0.01)
    assert "after the runs" in c["when"]
    md = (tmp_path / "q" / "report.md").read_text()
    assert "## Bus ceiling" in md
    assert f"completion rate = **{c['completion_pct_of_ceiling']:,.1f} % of the bus ceiling**" \
        in md
    assert f"master CPU per job = **{c['master_cpu_x_ceiling']:,.2f} × the ceiling's**" in md
    _no_leftovers(tmp_path)


def test_run_against_a_running_master_says_why_there_is_no_ceiling() -> None:
    class Spec:
        target = "tcp://127.0.0.1:1"

    c = ceiling.for_run(Spec(), {}, None)
    assert "--master" in c["skipped"]
    assert "Not measured" in "\n".join(ceiling.markdown_lines({"ceiling": c}))


@pytest.mark.slow
def test_compare_runs_every_side_to_completion(tmp_path: Path) -> None:
    require(shutil.which("redis-server") is not None, "redis-server (apt-get install "
                                                      "redis-server)")
    for mod in ("celery", "rq", "redis"):
        require(importlib.util.find_spec(mod) is not None, f"{mod} (pip install -e '.[test]')")
    r = _bench(tmp_path, "compare", "--jobs", "200", "--repeat", "1", "--out", "cmp",
               timeout=280)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert report["tool"] == "ffrtmp bench compare"
    assert report["config"]["concurrency"] == 2 and report["config"]["jobs"] == 200
    assert set(report["sides"]) == {"ffrtmp", "celery", "rq", "rq-simple"}
    (rnd,) = report["rounds"]
    assert sorted(rnd["order"]) == sorted(report["sides"])
    for name, side in report["sides"].items():
        assert side["jobs"] == 200, name
        assert side["completed"] == 200, (name, side)
        assert side["failed"] == 0, (name, side)
        assert side["rate"]["median"] > 0, name
        assert side["guarantees"], name
        assert rnd[name]["completed"] == 200, name
    for key in ("ffrtmp/celery", "ffrtmp/rq", "ffrtmp/rq-simple"):
        assert report["ratios"][key]["per_round"] == [rnd["ratios"][key]]
        assert rnd["ratios"][key] == pytest.approx(
            rnd["ffrtmp"]["rate"] / rnd[key.split("/")[1]]["rate"], rel=0.01)
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "## What each side guarantees" in md and "ffrtmp/celery" in md
    _no_leftovers(tmp_path)


def test_compare_without_redis_server_says_what_to_install(tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    r = subprocess.run([sys.executable, "-m", "ffrtmp", "bench", "compare", "--quiet"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "PATH": str(bare)})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "ffrtmp bench: redis-server not found: apt-get install redis-server"]
