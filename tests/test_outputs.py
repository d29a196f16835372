"""Outputs and failures a user can trust (issue 11): output templates and collisions, the
extension rule, integer bounds in errors, the overwrite policy, a corrupt local input failing
once as `invalid_input`, and the ffmpeg argv in DONE.extra.

Pure checks of master/spec.py and agent/ffmpeg/{publish,hook}.py, real ffmpeg under the
runner, and a real master and agents (tests/harness.py) end to end.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import agent.ffmpeg.publish as publish_mod
from agent.config import AgentConfig
from agent.ffmpeg.argv import Plan, build_plan
from agent.ffmpeg.hook import FFmpegHook, bounded_argv, corrupt_input
from agent.ffmpeg.netpolicy import NetPolicy
from agent.ffmpeg.publish import OWNER_XATTR, OutputExists, mark_owner, owner_of, publish
from agent.kinds import Context, Finished, prepare
from agent.runner import ProcessRun, Result
from bus import vocab
from bus.errors import ClientError
from bus.scenarios import BUILTIN, ScenarioError, apply_overrides, output_extension
from conftest import find_ffmpeg, require, wait_for
from harness import Cluster
from master.scenarios import load_presets, make_checks
from master.spec import (
    SpecError,
    Validated,
    as_submitted,
    expand_outputs,
    resubmittable,
    validate_spec,
)

CHECKS = make_checks(load_presets(None))
SRC = "testsrc:duration=1,size=320x240,rate=25"


def checked(**kw: Any) -> Validated:
    return validate_spec({"scenario": "720p-h264", "input": SRC, **kw}, CHECKS)


def spec_error(**kw: Any) -> str:
    with pytest.raises(SpecError) as err:
        checked(**kw)
    return str(err.value)


def ffmpeg_or_skip() -> str:
    exe = find_ffmpeg()
    require(exe is not None, "no ffmpeg")
    assert exe is not None
    return exe


def xattrs_here(path: Path) -> bool:
    probe = path / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        return mark_owner(probe, 1)
    finally:
        probe.unlink()


# ---- templates and collisions (master/spec.py) ------------------------------------------------


def test_templates_fill_in_the_job_id_and_the_index() -> None:
    specs = [checked(output="out/{id}-{n}.mp4"), checked(output="out/{id}-{n}.mp4"),
             checked(output="plain.mp4"), checked()]
    before = [dict(v.spec) for v in specs]
    out = expand_outputs(specs, 40)
    assert [v.spec["output"] for v in out] == ["out/40-0.mp4", "out/41-1.mp4", "plain.mp4",
                                               None]
    assert out[0].spec["output_template"] == "out/{id}-{n}.mp4"
    assert "output_template" not in out[2].spec
    assert [v.spec for v in specs] == before, "the specs as submitted must stay as they were"
    assert [as_submitted(v.spec) for v in out] == before  # what a replay is compared with
    # RETRY: a client's spec again (no master keys), writing where the original was to write
    again = resubmittable(out[1].spec)
    assert again["output"] == "out/41-1.mp4" and "preset" not in again
    assert "output_template" not in again
    assert validate_spec(again, CHECKS).spec["output"] == "out/41-1.mp4"


def test_a_template_on_an_rtmp_output() -> None:
    specs = [checked(output="rtmp://live.example/app/cam{n}") for _ in range(2)]
    assert [v.spec["output"] for v in expand_outputs(specs, 1)] == [
        "rtmp://live.example/app/cam0", "rtmp://live.example/app/cam1"]


@pytest.mark.parametrize(("output", "token"), [
    ("a{x}.mp4", "'{x}'"), ("a{ID}.mp4", "'{ID}'"), ("a{id.mp4", "'{id.mp4'"),
    ("a}.mp4", "'}'"), ("a{{id}}.mp4", "'{}'"), ("{}.mp4", "'{}'"),
])
def test_braces_other_than_id_and_n_are_refused(output: str, token: str) -> None:
    text = spec_error(output=output)
    assert text.startswith("output: only {id} (the job id) and {n}"), text
    assert text.endswith(f"got {token}"), text


def test_a_client_may_not_send_the_master_keys() -> None:
    for key in ("output_template", "preset"):
        assert spec_error(**{key: "x"}).startswith(f"{key}: unknown field")


@pytest.mark.parametrize(("a", "b"), [
    ("c.mp4", "c.mp4"), ("c.mp4", "./c.mp4"), ("d/c.mp4", "d//c.mp4"),
    ("c-{n}.mp4", "c-0.mp4"), ("c-{id}.mp4", "c-10.mp4"),
    (None, "job-10.mp4"),  # nil: the agent's default job-<id>.<ext>, here job-10.mp4
    ("rtmp://h.example/live/x", "rtmp://h.example/live/x"),
])
def test_outputs_colliding_in_one_submit_are_refused(a: str | None, b: str) -> None:
    specs = [checked(output=a), checked(output=b)]  # job ids 10 and 11
    with pytest.raises(SpecError) as err:
        expand_outputs(specs, 10)
    text = str(err.value)
    assert text.startswith("specs[1].output: same output as specs[0] ("), text
    assert text.endswith("); use {id} or {n} in the output"), text


def test_the_count_2_case_is_refused_and_n_fixes_it() -> None:
    with pytest.raises(SpecError, match=r"^specs\[1\]\.output: same output as specs\[0\] "
                                        r"\('c\.mp4'\)"):
        expand_outputs([checked(output="c.mp4")] * 2, 1)
    outputs = [v.spec["output"] for v in expand_outputs([checked(output="c-{n}.mp4")] * 3, 1)]
    assert outputs == ["c-0.mp4", "c-1.mp4", "c-2.mp4"]


def test_a_filled_in_output_is_bounded_again() -> None:
    long = "d" * 245 + "{id}.mp4"  # 253 bytes as a template; 249 + the id's digits filled in
    specs = [checked(output=long)]
    assert expand_outputs(specs, 7)[0].spec["output"] == "d" * 245 + "7.mp4"
    with pytest.raises(SpecError, match=r"^specs\[0\]\.output: path component too long"):
        expand_outputs(specs, 10**6)


# ---- the extension rule -----------------------------------------------------------------------


@pytest.mark.parametrize(("scenario", "output", "text"), [
    ("1080p-vp9", "x.mp4", "output: .mp4 does not go with webm (use .webm)"),
    ("720p-h264", "x.webm", "output: .webm does not go with mp4 (use .mp4 or .m4v)"),
    ("audio-aac", "a.mp4", "output: .mp4 does not go with ipod (use .m4a)"),
    ("720p-h264", "clip.final", "output: .final does not go with mp4 (use .mp4 or .m4v)"),
    ("720p-h264", "dir/", "output: names a directory, not a file: 'dir/'"),
])
def test_an_output_extension_must_go_with_the_container(scenario: str, output: str,
                                                        text: str) -> None:
    assert spec_error(scenario=scenario, output=output) == text


@pytest.mark.parametrize(("scenario", "output", "stored"), [
    ("1080p-vp9", "x", "x.webm"), ("720p-h264", "a.b/clip", "a.b/clip.mp4"),
    ("audio-aac", "talk-{id}", "talk-{id}.m4a"), ("720p-h264", "X.MP4", "X.MP4"),
    ("720p-h264", "x.m4v", "x.m4v"), ("720p-h264", "rtmp://h.example/live/x",
                                      "rtmp://h.example/live/x"),
    ("720p-h264", None, None),
])
def test_an_output_without_an_extension_gets_the_presets(scenario: str, output: str | None,
                                                         stored: str | None) -> None:
    assert checked(scenario=scenario, output=output).spec["output"] == stored


def test_the_extension_rule_follows_an_operator_container() -> None:
    mkv = apply_overrides(BUILTIN["720p-h264"], {})
    mkv = type(mkv)(**{**mkv.__dict__, "container": "matroska", "extension": "mkv"})
    assert output_extension("a.mkv", mkv) == "a.mkv" and output_extension("a", mkv) == "a.mkv"
    with pytest.raises(ScenarioError, match=r"^output: \.mp4 does not go with matroska "
                                            r"\(use \.mkv or \.mka\)$"):
        output_extension("a.mp4", mkv)


# ---- integers printed as integers -------------------------------------------------------------


def test_range_errors_print_integers_as_integers() -> None:
    text = spec_error(resource_limits={"max_memory_mb": 2_000_000})
    assert text == ("resource_limits.max_memory_mb: must be between 16 and 1048576, "
                    "got 2000000"), text
    for raw, expected in (
        ({"scenario": "hog", "params": {"mb": 2e6}}, "params.mb: must be between 1 and 1048576"),
        ({"scenario": "sleep", "params": {"seconds": 1e6}},
         "params.seconds: must be between 0 and 86400"),
        ({"scenario": "sleep", "timeout_s": 1e9}, "timeout_s: must be between 0.001 and 604800"),
        ({"scenario": "720p-h264", "input": SRC, "params": {"fps": 500}},
         "params.fps: must be between 1 and 120"),
        ({"scenario": "720p-h264", "input": SRC, "params": {"duration": 1e6}},
         "params.duration: must be between 0.04 and 86400"),
        ({"scenario": "sleep", "resource_limits": {"max_disk_mb": 10**8}},
         "resource_limits.max_disk_mb: must be between 1 and 10485760"),
    ):
        with pytest.raises(SpecError) as err:
            validate_spec(raw, CHECKS)
        assert str(err.value).startswith(expected), err.value
        assert "e+" not in str(err.value).split(", got")[0], err.value


# ---- overwrite and retry_timeouts in the spec -------------------------------------------------


def test_overwrite_and_retry_timeouts_are_validated_and_stored() -> None:
    spec = checked().spec
    assert (spec["overwrite"], spec["retry_timeouts"]) == (False, False)
    spec = checked(overwrite=True, retry_timeouts=True).spec
    assert (spec["overwrite"], spec["retry_timeouts"]) == (True, True)
    assert checked(overwrite=None).spec["overwrite"] is False
    for key in ("overwrite", "retry_timeouts"):
        for bad in (1, "yes", [True]):
            assert spec_error(**{key: bad}).startswith(f"{key}: must be true or false, got ")
    # a spec stored before these keys existed compares equal to its replay
    old = {k: v for k, v in checked().spec.items() if k not in ("overwrite", "retry_timeouts")}
    assert as_submitted(old) == checked().spec


# ---- the overwrite policy on the agent (agent/ffmpeg/publish.py, argv.py) ---------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for d in ("in", "out", "work"):
        (tmp_path / d).mkdir()
    return tmp_path


def plan_for(root: Path, job_id: int = 1, ffmpeg: str = "ffmpeg", **kw: Any) -> Plan:
    spec = checked(**{"output": "o.mp4", **kw}).spec
    return build_plan(spec, ffmpeg, root / "in", root / "out", root / "work", job_id)


def test_an_existing_output_is_refused_before_ffmpeg_unless_it_is_the_jobs(root: Path) -> None:
    final = root / "out" / "o.mp4"
    assert plan_for(root).final_output == final  # nothing there yet
    final.write_bytes(b"precious")
    with pytest.raises(OutputExists, match=r"output 'o\.mp4' exists: not replaced, the spec "
                                           r"has overwrite: false"):
        plan_for(root)
    assert plan_for(root, overwrite=True).overwrite is True
    require(xattrs_here(root / "out"), "no user xattrs on this file system")
    mark_owner(final, 7)
    assert plan_for(root, job_id=7).final_output == final  # its own earlier attempt's file
    with pytest.raises(OutputExists, match=r"exists \(written by job 7\)"):
        plan_for(root, job_id=8)
    assert final.read_bytes() == b"precious"


def test_an_existing_output_fails_the_attempt_output_exists_never_runs(root: Path) -> None:
    (root / "out" / "o.mp4").write_bytes(b"precious")
    cfg = AgentConfig(work_dir=root / "work", input_root=root / "in",
                      output_root=root / "out")
    prepared = prepare(checked(output="o.mp4").spec, 3, 1, Context(cfg, ffmpeg="ffmpeg"))
    assert isinstance(prepared, Finished), prepared
    result = prepared.result
    assert (result.status, result.reason) == ("failed", vocab.OUTPUT_EXISTS)
    assert "o.mp4" in result.extra["error"] and "overwrite: false" in result.extra["error"]
    assert vocab.OUTPUT_EXISTS in vocab.NOT_RETRIED and vocab.OUTPUT_EXISTS in vocab.REASONS


def _src(tmp: Path, data: bytes = b"new") -> Path:
    src = tmp / "work" / "output.mp4"
    src.write_bytes(data)
    return src


def test_publish_never_replaces_a_file_that_appeared(root: Path) -> None:
    dst = root / "out" / "sub" / "o.mp4"
    publish(_src(root), dst, 5, overwrite=False)
    assert dst.read_bytes() == b"new" and not (root / "work" / "output.mp4").exists()
    other = root / "out" / "theirs.mp4"
    other.write_bytes(b"theirs")
    with pytest.raises(OutputExists, match="appeared while the job ran"):
        publish(_src(root), other, 5, overwrite=False)
    assert other.read_bytes() == b"theirs"
    publish(_src(root, b"replaced"), other, 5, overwrite=True)
    assert other.read_bytes() == b"replaced"


def test_publish_replaces_the_jobs_own_earlier_output(root: Path) -> None:
    require(xattrs_here(root / "out"), "no user xattrs on this file system")
    dst = root / "out" / "o.mp4"
    publish(_src(root, b"attempt 1"), dst, 9, overwrite=False)
    assert owner_of(dst) == 9 and os.getxattr(dst, OWNER_XATTR) == b"9"
    publish(_src(root, b"attempt 2"), dst, 9, overwrite=False)
    assert dst.read_bytes() == b"attempt 2"
    with pytest.raises(OutputExists, match=r"written by job 9"):
        publish(_src(root, b"job 10"), dst, 10, overwrite=False)
    assert dst.read_bytes() == b"attempt 2"


def test_publish_without_renameat2_links_then_unlinks(root: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish_mod, "_RENAMEAT2", None)
    dst = root / "out" / "o.mp4"
    dst.write_bytes(b"theirs")
    with pytest.raises(OutputExists):
        publish(_src(root), dst, 1, overwrite=False)
    assert dst.read_bytes() == b"theirs"
    dst.unlink()
    publish(_src(root), dst, 1, overwrite=False)
    assert dst.read_bytes() == b"new" and not (root / "work" / "output.mp4").exists()


def test_publish_across_file_systems_links_a_copy_into_place(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The work dir on another file system: every move out of it fails EXDEV."""
    work = root / "work"
    real_rename, real_link, real_replace = publish_mod.rename_noreplace, os.link, os.replace

    def cross(fn: Any) -> Any:
        def wrapped(src: Any, dst: Any, *a: Any, **kw: Any) -> Any:
            if Path(src).parent == work:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return fn(src, dst, *a, **kw)
        return wrapped

    monkeypatch.setattr(publish_mod, "rename_noreplace", cross(real_rename))
    monkeypatch.setattr(os, "link", cross(real_link))
    monkeypatch.setattr(os, "replace", cross(real_replace))
    dst = root / "out" / "o.mp4"
    dst.write_bytes(b"theirs")
    with pytest.raises(OutputExists):
        publish(_src(root), dst, 4, overwrite=False)
    assert dst.read_bytes() == b"theirs"
    dst.unlink()
    publish(_src(root), dst, 4, overwrite=False)
    assert dst.read_bytes() == b"new"
    publish(_src(root, b"newer"), dst, 99, overwrite=True)
    assert dst.read_bytes() == b"newer"
    assert sorted(p.name for p in (root / "out").iterdir()) == ["o.mp4"], "a partial was left"


# ---- corrupt inputs and DONE.extra.argv (agent/ffmpeg/hook.py) --------------------------------


def test_corrupt_input_is_told_from_other_failures() -> None:
    path = "/srv/in/a.mp4"
    assert corrupt_input(f"{path}: Invalid data found when processing input\n", path)
    assert corrupt_input("[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55] moov atom not found\n"
                         f"{path}: Invalid data found when processing input\n", path)
    assert corrupt_input(f"[png_pipe @ 0x5] Format not on whitelist 'mov'\n{path}: Invalid "
                         "argument\n", path)
    assert corrupt_input(f"{path}: could not find codec parameters\n", path)
    # ffmpeg 6 and later
    assert corrupt_input("[in#0 @ 0x5609] Error opening input: Invalid data found when "
                         f"processing input\nError opening input file {path}.\nError opening "
                         "input files: Invalid data found when processing input\n", path)
    # not the input's data: I/O trouble may pass; an output error is not the input's fault
    assert not corrupt_input(f"{path}: Input/output error\n", path)
    assert not corrupt_input(f"{path}: Cannot allocate memory\n", path)
    assert not corrupt_input("/work/jobs/1-1/output.mp4: Invalid argument\n", path)
    assert not corrupt_input("Error opening output files: Invalid argument\n", path)
    assert not corrupt_input("", path)


def test_the_argv_in_done_extra_is_bounded() -> None:
    argv = ["ffmpeg", "-i", "/in/a.mp4", "-f", "mp4", "/w/output.mp4"]
    assert bounded_argv(argv) == argv
    huge = ["ffmpeg", *[f"-x{i}" for i in range(2000)], "-f", "mp4", "/w/output.mp4"]
    out = bounded_argv(huge)
    assert sum(len(a.encode()) for a in out) <= 4096
    assert out[0] == "ffmpeg" and out[-2:] == ["mp4", "/w/output.mp4"] and "…" in out
    long = bounded_argv(["ffmpeg", "x" * 5000, os.fsdecode(b"/in/\xff.mp4")])
    assert len(long[1]) == 1024 and long[1].endswith("…")
    assert long[2] == "/in/\ufffd.mp4"  # valid UTF-8 on the wire, whatever the file system


def run_plan(plan: Plan, timeout: float = 90) -> Result:
    """A plan's argv under the runner and the ffmpeg hook, with real ffmpeg."""
    assert plan.tmp_output is not None
    run = ProcessRun(plan.argv, plan.tmp_output.parent, 120, hooks=[FFmpegHook(plan, 60)],
                     kill_grace_s=2)
    run.start(time.monotonic())
    result = wait_for(lambda: run.poll(time.monotonic()), timeout, message="ffmpeg to end")
    assert isinstance(result, Result)
    run.cleanup()
    return result


def make_media(ffmpeg: str, path: Path, seconds: float = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([ffmpeg, "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size=160x120:rate=25:duration={seconds}", "-c:v", "libx264",
                    "-preset", "ultrafast", str(path)], check=True, timeout=60)
    return path


@pytest.mark.ffmpeg
def test_a_retry_of_the_same_job_replaces_its_own_output(root: Path) -> None:
    ffmpeg = ffmpeg_or_skip()
    require(xattrs_here(root / "out"), "no user xattrs on this file system")
    final = root / "out" / "o.mp4"
    first = run_plan(plan_for(root, 7, ffmpeg, input="testsrc:duration=1,size=160x120"))
    assert first.status == "completed", first
    assert owner_of(final) == 7
    before = final.stat().st_ino
    # attempt 2 of job 7 (its DONE was lost, say): builds, runs and replaces the file
    second = run_plan(plan_for(root, 7, ffmpeg, input="testsrc:duration=2,size=160x120"))
    assert second.status == "completed", second
    assert final.stat().st_ino != before and owner_of(final) == 7
    with pytest.raises(OutputExists, match=r"written by job 7"):
        plan_for(root, 8, ffmpeg)  # another job: refused before ffmpeg


@pytest.mark.ffmpeg
def test_a_garbage_local_input_is_invalid_input_with_ffmpegs_line(root: Path) -> None:
    ffmpeg = ffmpeg_or_skip()
    (root / "in" / "garbage.mp4").write_bytes(os.urandom(8192))
    good = make_media(ffmpeg, root / "src" / "good.mp4")
    data = good.read_bytes()
    (root / "in" / "truncated.mp4").write_bytes(data[: len(data) // 3])
    for name in ("garbage.mp4", "truncated.mp4"):
        result = run_plan(plan_for(root, 1, ffmpeg, input=name))
        assert (result.status, result.reason) == ("failed", "invalid_input"), result
        assert "Invalid data found when processing input" in result.extra["error"]
        assert result.extra["argv"][0] == ffmpeg and name in " ".join(result.extra["argv"])
    assert not (root / "out" / "o.mp4").exists()


@pytest.fixture
def http_garbage() -> Iterator[int]:
    body = os.urandom(8192)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.ffmpeg
def test_a_network_input_failing_the_same_way_stays_exit_code(root: Path,
                                                              http_garbage: int) -> None:
    ffmpeg = ffmpeg_or_skip()
    spec = checked(input=f"http://127.0.0.1:{http_garbage}/g.mp4", output="o.mp4").spec
    plan = build_plan(spec, ffmpeg, root / "in", root / "out", root / "work", 1,
                      allow_url=NetPolicy.parse(["127.0.0.1"]))
    result = run_plan(plan)
    assert (result.status, result.reason) == ("failed", "exit_code"), result
    assert "Invalid data found when processing input" in result.extra["error"]


# ---- end to end: a real master and agents -----------------------------------------------------


def outputs(c: Cluster, agent: str) -> Path:
    return c.tmp / f"work-{agent}" / "outputs"


def test_submit_fills_templates_and_a_replay_returns_the_first_ids(cluster: Cluster) -> None:
    specs = [{"scenario": "720p-h264", "input": SRC, "output": "t/{id}-{n}"}] * 3
    ids = cluster.client.submit(specs, idempotency_key="tmpl")
    jobs = cluster.jobs(ids)
    assert [jobs[i]["output"] for i in ids] == [f"t/{i}-{n}.mp4" for n, i in enumerate(ids)]
    assert jobs[ids[0]]["spec"]["output_template"] == "t/{id}-{n}.mp4"
    assert cluster.client.submit(specs, idempotency_key="tmpl") == ids  # committed by now
    with pytest.raises(ClientError) as err:
        cluster.client.submit([{**specs[0], "output": "t/{id}"}] * 3, idempotency_key="tmpl")
    assert err.value.code == "conflict"
    assert len(cluster.client.list_jobs()) == 3


@pytest.mark.parametrize(("spec", "text"), [
    ({"output": "c.mp4", "count": 2},
     "specs[1].output: same output as specs[0] ('c.mp4'); use {id} or {n} in the output"),
    ({"scenario": "1080p-vp9", "output": "x.mp4"},
     "specs[0].output: .mp4 does not go with webm (use .webm)"),
    ({"resource_limits": {"max_memory_mb": 2_000_000}},
     "specs[0].resource_limits.max_memory_mb: must be between 16 and 1048576, got 2000000"),
    ({"output": "c{x}.mp4"}, "specs[0].output: only {id} (the job id) and {n}"),
], ids=["count-2-one-file", "webm-under-mp4", "integer-bounds", "braces"])
def test_bad_outputs_are_refused_at_submit(cluster: Cluster, spec: dict[str, Any],
                                           text: str) -> None:
    count = spec.pop("count", 1)
    with pytest.raises(ClientError) as err:
        cluster.client.submit([{"scenario": "720p-h264", "input": SRC, **spec}] * count)
    assert err.value.code == "invalid_spec"
    assert err.value.text.startswith(text), err.value.text
    assert cluster.client.list_jobs() == []


def test_the_cli_refuses_count_2_with_one_output(cluster: Cluster) -> None:
    result = cluster.cli("submit", "720p-h264", "--input", SRC, "--count", "2", "--output",
                         "c.mp4")
    assert result.returncode != 0
    # the master's refusal, or the CLI's own before it asks the master
    assert "'c.mp4'" in result.stderr and "{id} or {n}" in result.stderr, result.stderr
    assert cluster.client.list_jobs() == []
    result = cluster.cli("submit", "720p-h264", "--input", SRC, "--count", "2", "--output",
                         "c-{id}.mp4")
    assert result.returncode == 0, result.stderr
    assert sorted(j["output"] for j in cluster.client.list_jobs()) == ["c-1.mp4", "c-2.mp4"]


@pytest.mark.ffmpeg
def test_overwrite_false_keeps_an_existing_file_true_replaces_it(cluster: Cluster) -> None:
    cluster.start_agent("o", slots=2)
    out = outputs(cluster, "o")
    out.mkdir(parents=True, exist_ok=True)
    (out / "kept.mp4").write_bytes(b"precious")
    (out / "replaced.mp4").write_bytes(b"old")
    # the default (no overwrite key, as a client of 1.0 sends it): the file is kept
    (kept,) = cluster.client.submit([{"scenario": "720p-h264", "input": SRC,
                                      "output": "kept.mp4"}])
    job = cluster.wait_terminal([kept], timeout=90)[kept]
    assert (out / "kept.mp4").read_bytes() == b"precious", "an existing file was overwritten"
    assert (job["state"], job["reason"]) == ("failed", "output_exists"), job
    assert job["attempt"] == 1, "output_exists must not be retried"
    assert "kept.mp4" in job["extra"]["error"]
    (replaced,) = cluster.client.submit([{"scenario": "720p-h264", "input": SRC,
                                          "output": "replaced.mp4", "overwrite": True}])
    job = cluster.wait_terminal([replaced], timeout=90)[replaced]
    assert job["state"] == "completed", (job, cluster.dump_logs())
    assert (out / "replaced.mp4").stat().st_size == job["extra"]["output_bytes"] > 100
    assert job["extra"]["output_path"] == str((out / "replaced.mp4").resolve())
    argv = job["extra"]["argv"]
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert argv[argv.index("-c:v") + 1] == "libx264" and argv[-1].endswith("output.mp4")
    assert sum(len(a.encode()) for a in argv) <= 4096


@pytest.mark.ffmpeg
def test_a_garbage_local_input_fails_once_as_invalid_input(cluster: Cluster) -> None:
    inputs = cluster.tmp / "work-g" / "inputs"
    inputs.mkdir(parents=True)
    (inputs / "garbage.mp4").write_bytes(os.urandom(16384))
    cluster.start_agent("g", slots=1)
    (job_id,) = cluster.client.submit([{"scenario": "720p-h264", "input": "garbage.mp4",
                                        "output": "g.mp4", "max_attempts": 3}])
    job = cluster.wait_terminal([job_id], timeout=60)[job_id]
    assert (job["state"], job["reason"]) == ("failed", "invalid_input"), job
    assert job["attempt"] == 1, job
    assert "Invalid data found when processing input" in job["extra"]["error"], job["extra"]
    assert "garbage.mp4" in job["extra"]["error"] or "Error opening input" in job["extra"]["error"]
    ran = [e for e in cluster.job(job_id, events=True)["events"] if e["state"] == "running"]
    assert len(ran) <= 1, ran  # one attempt (it may fail before reporting running)
    assert not (outputs(cluster, "g") / "g.mp4").exists()
    assert "garbage.mp4" in " ".join(job["extra"]["argv"])
