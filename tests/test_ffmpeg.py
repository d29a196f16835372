"""Real ffmpeg through the whole system: scenarios, live RTMP push, progress, validation, stalls."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bus.client import Subscriber
from bus.errors import ClientError
from bus.scenarios import BUILTIN
from conftest import find_ffmpeg, free_port, require, wait_for
from harness import Cluster
from storage import Store

pytestmark = [pytest.mark.ffmpeg, pytest.mark.once]

EXPECTED = {  # scenario -> (video codec or None, width, height, audio codec)
    "720p-h264": ("h264", 1280, 720, "aac"),
    "1080p-h264": ("h264", 1920, 1080, "aac"),
    "1080p-h265": ("hevc", 1920, 1080, "aac"),
    "1080p-vp9": ("vp9", 1920, 1080, "opus"),
    "480p-av1": ("av1", 854, 480, "aac"),
    "audio-aac": (None, None, None, "aac"),
}


def ffprobe(path: Path | str) -> dict[str, Any]:
    """Streams and format of a media file, from the real ffprobe."""
    exe = shutil.which("ffprobe")
    require(exe is not None, "ffprobe not installed (apt-get install ffmpeg)")
    assert exe is not None
    out = subprocess.run([exe, "-v", "error", "-show_streams", "-show_format", "-of", "json",
                          str(path)], capture_output=True, check=True, timeout=60)
    return dict(json.loads(out.stdout))



def out_root(c: Cluster, agent: str) -> Path:
    return c.tmp / f"work-{agent}" / "outputs"


def test_every_builtin_scenario_encodes_what_it_promises(cluster: Cluster) -> None:
    assert set(EXPECTED) == set(BUILTIN)
    cluster.start_agent("enc", slots=2)
    specs = [{"scenario": name, "input": "testsrc:duration=2,size=640x360,rate=25",
              "output": f"clips/{name}.{BUILTIN[name].extension}", "max_attempts": 1}
             for name in EXPECTED]
    ids = cluster.client.submit(specs)
    final = cluster.wait_terminal(ids, timeout=240)
    for job_id, spec in zip(ids, specs, strict=True):
        job = final[job_id]
        assert job["state"] == "completed", (job, cluster.dump_logs())
        path = out_root(cluster, "enc") / spec["output"]
        assert path.is_file() and path.stat().st_size == job["bytes_out"] > 0
        info = ffprobe(path)
        vcodec, width, height, acodec = EXPECTED[spec["scenario"]]
        video = [s for s in info["streams"] if s["codec_type"] == "video"]
        audio = [s for s in info["streams"] if s["codec_type"] == "audio"]
        if vcodec is None:
            assert not video
        else:
            assert video[0]["codec_name"] == vcodec
            assert (video[0]["width"], video[0]["height"]) == (width, height)
        assert audio[0]["codec_name"] == acodec
        assert abs(float(info["format"]["duration"]) - 2.0) < 0.25, info["format"]
        assert job["progress"] == 1.0
    assert not list((cluster.tmp / "work-enc" / "jobs").glob("*")), "work dirs left behind"


def test_live_push_to_a_real_rtmp_listener(cluster: Cluster, tmp_path: Path) -> None:
    ffmpeg = find_ffmpeg()
    require(ffmpeg is not None, "no ffmpeg")
    assert ffmpeg is not None
    port = free_port()
    received = tmp_path / "received.flv"
    with open(tmp_path / "listener.log", "wb") as log:
        listener = subprocess.Popen(
            [ffmpeg, "-hide_banner", "-loglevel", "error", "-listen", "1", "-timeout", "30",
             "-i", f"rtmp://127.0.0.1:{port}/live/cam1", "-c", "copy", "-f", "flv",
             str(received)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_for(lambda: _listening(port), 15, message="RTMP listener did not listen")
        cluster.start_agent("live", 1, "--allow-url", "127.0.0.1")  # a local listener
        (job_id,) = cluster.client.submit([{
            "scenario": "720p-h264", "input": "testsrc:duration=3,size=640x360,rate=25",
            "output": f"rtmp://127.0.0.1:{port}/live/cam1", "max_attempts": 1}])
        job = cluster.wait_terminal([job_id], timeout=60)[job_id]
        assert job["state"] == "completed", (job, cluster.dump_logs())
        assert job["bytes_out"] > 0
        listener.wait(timeout=30)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    info = ffprobe(received)
    assert {s["codec_name"] for s in info["streams"]} == {"h264", "aac"}
    assert float(info["format"]["duration"]) > 2.0


def _listening(port: int) -> bool:
    with open("/proc/net/tcp") as f:
        return any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
                   for line in f.readlines()[1:])


def test_progress_events_in_order_to_100_percent_and_cli_renders_them(cluster: Cluster) -> None:
    cluster.start_agent("prog", slots=1)
    sub = Subscriber(["job.", "stats"], cluster.events_ep)
    try:
        # The master publishes stats every second: one arriving means the SUB is connected.
        wait_for(lambda: sub.recv(0.2) is not None, 5, message="no events at all")
        (job_id,) = cluster.client.submit([{"scenario": "720p-h264", "max_attempts": 1,
                                            "input": "testsrc:duration=6,size=640x360,rate=25",
                                            "output": "p.mp4", "params": {"preset": "slow"}}])
        seen: list[float] = []
        states: list[str] = []

        def finished() -> bool:
            item = sub.recv(0.2)
            if item is not None and item[1].get("id") == job_id:
                if item[1].command == "PROGRESS":
                    seen.append(float(item[1]["progress"]))
                elif item[1].command == "STATE":
                    states.append(item[1]["state"])
            return bool(states) and states[-1] == "completed"

        wait_for(finished, 90, interval=0)
    finally:
        sub.close()
    assert states[-1] == "completed" and "running" in states
    assert len(seen) >= 2 and seen == sorted(seen), seen
    # Writing progress figures must not lose what a restarted master needs to place the job.
    with Store(cluster.db_url) as store:
        assert store.get_jobs([job_id])[0]["extra"]["requires"] == "encoder:libx264"
    assert seen[-1] == 1.0 or cluster.jobs([job_id])[job_id]["progress"] == 1.0
    result = cluster.cli("submit", "720p-h264", "--input", "testsrc:duration=3,size=640x360",
                         "--output", "cli.mp4", "--set", "preset=slow", "--wait", timeout=90)
    assert result.returncode == 0, result.stderr
    assert "%" in result.stderr and "ETA" in result.stderr
    assert "completed" in result.stdout and "cli.mp4" in result.stdout


@pytest.mark.parametrize(("spec", "field"), [
    ({"scenario": "720p-h264", "input": "testsrc:duration=1", "output": "../escape.mp4"},
     "output"),
    ({"scenario": "720p-h264", "input": "testsrc:duration=1", "output": "/tmp/abs.mp4"},
     "output"),
    ({"scenario": "720p-h264", "input": "../../etc/passwd"}, "input"),
    ({"scenario": "720p-h264", "input": "/etc/passwd"}, "input"),
    ({"scenario": "720p-h264", "input": "file:///etc/passwd"}, "input"),
    ({"scenario": "720p-h264", "input": "concat:a|b"}, "input"),
    ({"scenario": "720p-h264", "input": "testsrc:duration=1", "params": {"crf": 99}},
     "params.crf"),
    ({"scenario": "720p-h264", "input": "testsrc:duration=1", "params": {"bitrate": "9G"}},
     "params.bitrate"),
    ({"scenario": "720p-h264", "input": "testsrc:duration=1", "params": {"preset": "x"}},
     "params.preset"),
    ({"scenario": "1080p-vp9", "input": "testsrc:duration=1", "output": "rtmp://h/live/x"},
     "output"),
    ({"scenario": "4k-magic", "input": "testsrc:duration=1"}, "scenario"),
    ({"scenario": "720p-h264", "input": "testsrc:size=10x10"}, "input"),
])
def test_bad_specs_are_refused_at_submit_naming_the_field(cluster: Cluster, spec: dict[str, Any],
                                                          field: str) -> None:
    cluster.start_agent("v", slots=1)
    before = cluster.client.stats()["dispatched_total"]
    with pytest.raises(ClientError) as err:
        cluster.client.submit([spec])
    assert err.value.code == "invalid_spec"
    assert err.value.text.startswith((f"specs[0].{field}:", f"specs[0].{field}.")), err.value.text
    assert cluster.client.stats()["dispatched_total"] == before
    assert cluster.client.list_jobs() == []


def test_file_input_under_the_input_root(cluster: Cluster) -> None:
    ffmpeg = find_ffmpeg()
    assert ffmpeg is not None
    inputs = cluster.tmp / "work-files" / "inputs"
    inputs.mkdir(parents=True)
    src = inputs / "in.mp4"
    subprocess.run([ffmpeg, "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:"
                    "duration=2", "-c:v", "libx264", "-preset", "ultrafast", str(src)],
                   check=True, timeout=60)
    (inputs / "link.mp4").symlink_to("/etc/hostname")
    cluster.start_agent("files", slots=1)
    ok, escape = cluster.client.submit([
        {"scenario": "720p-h264", "input": "in.mp4", "output": "from-file.mp4"},
        {"scenario": "720p-h264", "input": "link.mp4", "output": "x.mp4", "max_attempts": 1}])
    final = cluster.wait_terminal([ok, escape], timeout=60)
    assert final[ok]["state"] == "completed", cluster.dump_logs()
    assert final[ok]["bytes_in"] >= src.stat().st_size
    assert abs(float(ffprobe(out_root(cluster, "files") / "from-file.mp4")["format"]["duration"])
               - 2.0) < 0.25
    assert (final[escape]["state"], final[escape]["reason"]) == ("failed", "invalid_input")


FAKE_FFMPEG = """#!{python}
import sys, time
if "-encoders" in sys.argv:
    print("Encoders:\\n ------\\n V....D libx264   fake\\n A....D aac   fake")
    sys.exit(0)
sys.stdout.write("frame=1\\nout_time_us=40000\\nprogress=continue\\n")
sys.stdout.flush()
time.sleep(600)  # the fake stalls: no more progress, ever
"""


def test_a_stalled_ffmpeg_is_killed_as_stalled(cluster: Cluster, tmp_path: Path) -> None:
    fake = tmp_path / "fake-ffmpeg"
    fake.write_text(FAKE_FFMPEG.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    cluster.start_agent("stally", 1, "--ffmpeg", str(fake), "--stall-timeout", "1")
    (job_id,) = cluster.client.submit([{"scenario": "720p-h264", "max_attempts": 1,
                                        "input": "testsrc:duration=5", "output": "s.mp4"}])
    job = cluster.wait_terminal([job_id], timeout=30)[job_id]
    assert (job["state"], job["reason"]) == ("failed", "stalled"), cluster.dump_logs()
    assert not (out_root(cluster, "stally") / "s.mp4").exists()
    assert not [p for p in _procs_with(str(fake))], "stalled fake ffmpeg still running"


def _procs_with(program: str) -> list[int]:
    """Pids of processes running `program` (as argv[0], or as the script of an interpreter)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if program.encode() in argv[:2]:
            out.append(int(pid))
    return out


def test_cancel_removes_partial_outputs(cluster: Cluster) -> None:
    cluster.start_agent("cx", slots=1)
    (job_id,) = cluster.client.submit([{"scenario": "1080p-h264", "output": "partial.mp4",
                                        "input": "testsrc:duration=120", "max_attempts": 1,
                                        "params": {"preset": "slow"}}])
    wait_for(lambda: cluster.jobs([job_id])[job_id]["progress"] > 0, 60,
             message="no progress")
    cluster.client.cancel([job_id], grace_s=2)
    job = cluster.wait_terminal([job_id], timeout=30)[job_id]
    assert job["state"] == "cancelled"
    assert not (out_root(cluster, "cx") / "partial.mp4").exists()
    assert not list((cluster.tmp / "work-cx" / "jobs").glob("*"))
