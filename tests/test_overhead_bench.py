"""`ffrtmp bench overhead` at a tiny size: it runs end to end and writes its figures (no timing
is asserted: the figures themselves are for docs/PERFORMANCE.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.overhead import Config
from bench.profiles import BenchError

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.ffmpeg, pytest.mark.timeout(240)]


def test_overhead_mode_runs_both_loads_and_a_baseline_tree(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "ffrtmp", "bench", "overhead", "--jobs", "8", "--sleep", "0.02",
         "--slots", "2", "--ffmpeg-jobs", "2", "--input", "testsrc:duration=0.2,size=320x240",
         "--repeat", "2", "--baseline-tree", str(ROOT), "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=200, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["jobs"] == 8 and report["config"]["slots"] == 2
    assert report["ideal_sleep_makespan_s"] == pytest.approx(8 * 0.02 / 2)
    for side in ("agent", "baseline"):
        sleep = report["sleep"][side]
        assert len(sleep["makespan_s"]["runs"]) == 2
        assert 0 < sleep["pct_of_ideal"]["median"] <= 100
        assert "overhead_pct" in report["ffmpeg"][side]
    assert len(report["ffmpeg"]["xargs"]["makespan_s"]["runs"]) == 2
    md = (out / "report.md").read_text()
    assert "% of ideal" in md and "overhead vs xargs" in md
    assert md in proc.stdout  # the table is printed too


def test_overhead_config_is_checked() -> None:
    with pytest.raises(BenchError, match="not both 0"):
        Config(jobs=0, ffmpeg_jobs=0).check()
    with pytest.raises(BenchError, match="--sleep"):
        Config(sleep_s=0).check()
    with pytest.raises(BenchError, match="not an ffrtmp source tree"):
        Config(baseline_tree="/").check()
