"""The README's first command: `ffrtmp demo` runs real transcodes to completion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness import ROOT

pytestmark = pytest.mark.ffmpeg


@pytest.mark.slow  # left out of the per-version CI runs
def test_demo_runs_a_mixed_batch_to_completion(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "ffrtmp", "demo", "--dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "16/16 done" in out and "failed" not in out
    for name in ("1080p.mp4", "720p.mp4", "1080p-hevc.mp4", "1080p.webm", "480p-av1.mp4",
                 "audio.m4a"):
        assert name in out
        assert list(tmp_path.glob(f"agent*/outputs/demo/{name}")), name
    assert "%" in out  # live progress was shown
