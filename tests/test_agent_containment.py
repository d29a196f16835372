"""Containment, property-tested: any spec the master accepts, prepared by the agent against a
real filesystem under a temp root, ends as a run, a refusal or a precise failure; never an
exception and never `agent_error` (an unforeseen failure)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from agent.cgroups import NoCgroups
from agent.config import AgentConfig
from agent.ffmpeg.netpolicy import NetPolicy
from agent.kinds import Context, Finished, Ready, Refused, prepare
from bus import vocab
from bus.scenarios import BUILTIN
from master.scenarios import make_checks
from master.spec import SpecError, validate_spec

CHECKS = make_checks(dict(BUILTIN))
ROOT = Path(tempfile.mkdtemp(prefix="ffrtmp-containment-"))
INPUTS, OUTPUTS, WORK = ROOT / "inputs", ROOT / "outputs", ROOT / "work"


def _tree() -> None:
    """A hostile input root: a file, a dir, a loop, a fifo, links out, a deep path."""
    INPUTS.mkdir(parents=True, exist_ok=True)
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    (INPUTS / "ok.wav").write_bytes(b"RIFF" + b"\0" * 64)
    (INPUTS / "text.txt").write_text("secret text\n")
    (INPUTS / "dir").mkdir(exist_ok=True)
    for name, target in (("loop", "loop"), ("out", "/etc/hostname"), ("up", "..")):
        if not (INPUTS / name).is_symlink():
            (INPUTS / name).symlink_to(target)
    if not (INPUTS / "fifo").exists():
        os.mkfifo(INPUTS / "fifo")
    (INPUTS / "list.m3u8").write_text("#EXTM3U\n#EXTINF:1,\n/etc/hostname\n")
    (OUTPUTS / "blocked").write_text("a file where a directory would go")


_tree()

NAMES = st.sampled_from(["ok.wav", "text.txt", "dir", "loop", "loop/x.wav", "out", "up/x",
                         "fifo", "list.m3u8", "missing.wav", "dir/../ok.wav", "a" * 300,
                         "/".join(["b" * 250] * 5), "ok.wav/x", "blocked/x.mp4"])
PATHS = st.one_of(NAMES, st.text(st.characters(blacklist_categories=["Cs"]), max_size=60),
                  st.from_regex(r"[a-z./]{1,40}", fullmatch=True))
INPUTS_ST = st.one_of(
    PATHS,
    st.sampled_from(["testsrc:duration=1", "testsrc:duration=0.5,size=64x64,rate=5",
                     "http://127.0.0.1:9/x?x=.txt", "http://[::1]:9/a.mp4",
                     "http://2130706433/a.mp4", "rtmp://10.0.0.1/live/x", "https://example.com/a",
                     "http://169.254.169.254/latest/meta-data"]),
)
OUTPUTS_ST = st.one_of(st.none(), PATHS, st.sampled_from(["rtmp://127.0.0.1/live/x",
                                                          "rtmp://192.168.1.1/live/y"]))
PARAMS = st.dictionaries(
    st.sampled_from(["bitrate", "crf", "preset", "fps", "duration", "audio_bitrate", "seconds",
                     "cpu_seconds", "mb", "ignore_term"]),
    st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=False, allow_infinity=False),
              st.sampled_from(["5M", "800k", "fast", "x"]), st.booleans()),
    max_size=3)
LIMITS = st.one_of(st.none(), st.fixed_dictionaries({}, optional={
    "max_cpu_percent": st.integers(1, 800), "max_memory_mb": st.integers(16, 4096),
    "max_disk_mb": st.integers(1, 10_000)}))


@st.composite
def accepted_specs(draw: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "scenario": draw(st.sampled_from([*BUILTIN, *vocab.WORKLOADS])),
        "input": draw(INPUTS_ST), "output": draw(OUTPUTS_ST), "params": draw(PARAMS)}
    if (limits := draw(LIMITS)) is not None:
        raw["resource_limits"] = limits
    try:
        return validate_spec(raw, CHECKS).spec
    except SpecError:
        assume(False)
        raise


def _context(ffmpeg: str | None) -> Context:
    cfg = AgentConfig(work_dir=WORK, input_root=INPUTS, output_root=OUTPUTS, cgroup="none",
                      limits="best-effort", allow_url=NetPolicy.parse([]))
    return Context(cfg, ffmpeg, NoCgroups("not here"))


@pytest.mark.slow  # left out of the per-version CI runs
@pytest.mark.ffmpeg
@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(accepted_specs())
def test_any_accepted_spec_is_prepared_without_an_unforeseen_failure(spec: dict[str, Any]
                                                                    ) -> None:
    from conftest import find_ffmpeg

    ffmpeg = find_ffmpeg()
    assert ffmpeg is not None
    outcome = prepare(spec, 1, 1, _context(ffmpeg))
    assert isinstance(outcome, Ready | Refused | Finished)
    event(type(outcome).__name__ + (f" {outcome.result.reason}"
                                    if isinstance(outcome, Finished) else ""))
    if isinstance(outcome, Finished):
        assert outcome.result.reason in (None, vocab.INVALID_INPUT), outcome.result
    if isinstance(outcome, Ready) and spec["scenario"] not in vocab.WORKLOADS:
        argv = outcome.run.argv
        # ffmpeg reads inside the input root and writes inside the work dir only.
        for arg in argv[1:]:
            if arg.startswith("/") and not arg.startswith(str(ROOT)):
                pytest.fail(f"argv names a path outside the roots: {arg!r} in {argv}")
    if isinstance(outcome, Ready):
        outcome.run.cleanup()
