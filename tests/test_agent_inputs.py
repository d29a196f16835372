"""What an agent accepts as a job's input and output, whatever the master sends (docs/INPUTS.md).

Real files, real ffmpeg, real sockets: bad paths are InvalidInput (never an OSError that kills the
agent), only media demuxers run, URL destinations go through the network policy, presets through
the one schema, the duration probe never blocks, and a failed ffmpeg says why in extra.error.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ffmpeg.argv import FORMAT_WHITELIST, InvalidInput, Plan, build_plan
from agent.ffmpeg.hook import FFmpegHook, last_error_line
from agent.ffmpeg.netpolicy import NetPolicy, PolicyError, parse_literal, rtmp_app
from agent.runner import ProcessRun, Result
from bus.scenarios import (
    BUILTIN,
    EXTRA_OPTIONS,
    MAX_NAME_BYTES,
    ScenarioError,
    check_input,
    check_output,
    check_preset,
    load_toml,
)
from conftest import find_ffmpeg, require, wait_for
from master.scenarios import load_presets, make_checks
from master.spec import SpecError, validate_spec

CHECKS = make_checks(load_presets(None))
LOOPBACK = NetPolicy.parse(["127.0.0.0/8", "::1"])


def submit(**kw: Any) -> dict[str, Any]:
    """A spec as the master stores it (validated, preset resolved)."""
    return validate_spec({"scenario": "720p-h264", "input": "testsrc:duration=1", **kw},
                         CHECKS).spec


def plan_for(spec: dict[str, Any], tmp: Path, ffmpeg: str = "ffmpeg",
             **kw: Any) -> Plan:
    return build_plan(spec, ffmpeg, tmp / "in", tmp / "out", tmp / "work", 1, **kw)


def with_input(tmp: Path, name: str, **kw: Any) -> dict[str, Any]:
    """A spec naming a local input as a (possibly fake) master could send it, unchecked."""
    spec = submit(output="o.mp4", **kw)
    spec["input"] = name
    return spec


def ffmpeg_or_skip() -> str:
    exe = find_ffmpeg()
    require(exe is not None, "no ffmpeg")
    assert exe is not None
    return exe


def make_media(path: Path, seconds: float = 2, video: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg = ffmpeg_or_skip()
    args = [ffmpeg, "-v", "error", "-y"]
    if video:
        args += ["-f", "lavfi", "-i", f"testsrc2=size=160x120:rate=10:duration={seconds}",
                 "-f", "lavfi", "-i", f"sine=duration={seconds}", "-c:v", "libx264",
                 "-preset", "ultrafast", "-c:a", "aac", "-shortest"]
    else:
        args += ["-f", "lavfi", "-i", f"sine=duration={seconds}"]
    subprocess.run(args + [str(path)], check=True, timeout=60, capture_output=True)
    return path


def run_plan(plan: Plan, workdir: Path, hook: FFmpegHook | None = None, timeout: float = 90
             ) -> tuple[Result, FFmpegHook, list[dict[str, Any]]]:
    """Run a plan's argv with real ffmpeg under the runner and the ffmpeg hook."""
    hook = hook or FFmpegHook(plan, stall_s=60)
    if plan.tmp_output is not None:
        workdir = plan.tmp_output.parent  # where the plan's ffmpeg writes
    run = ProcessRun(plan.argv, workdir, 120, hooks=[hook], kill_grace_s=2)
    run.start(time.monotonic())
    seen: list[dict[str, Any]] = []

    def finished() -> Result | None:
        result = run.poll(time.monotonic())
        if result is None:
            seen.append(run.progress())
        return result

    try:
        result = wait_for(finished, timeout, message="ffmpeg to end")
    except BaseException:
        run.kill_now()
        wait_for(lambda: run.poll(time.monotonic()), 10, message="the killed ffmpeg to end")
        raise
    assert result is not None
    return result, hook, seen


# ---- 1. bad paths: InvalidInput with a precise message, never an OSError --------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path


def test_an_overlong_input_name_is_invalid_input_not_an_oserror(root: Path) -> None:
    # The agent used to die: Path.is_file() raised OSError ENAMETOOLONG out of build_plan.
    with pytest.raises(InvalidInput, match="too long"):
        plan_for(with_input(root, "a" * 300 + ".wav"), root)
    deep = "/".join(["d" * 200] * 30) + "/x.wav"  # every component fine, 6000+ bytes in all
    with pytest.raises(InvalidInput, match="too long"):
        plan_for(with_input(root, deep), root)


def test_a_symlink_loop_in_the_input_root_is_invalid_input(root: Path) -> None:
    # The agent used to die: Path.resolve() raised RuntimeError "Symlink loop".
    (root / "in" / "self.wav").symlink_to("self.wav")
    (root / "in" / "a.wav").symlink_to("b.wav")
    (root / "in" / "b.wav").symlink_to("a.wav")
    (root / "in" / "dir").symlink_to("dir")
    for name in ("self.wav", "a.wav", "dir/x.wav"):
        with pytest.raises(InvalidInput, match="symlink loop"):
            plan_for(with_input(root, name), root)


def test_every_other_bad_input_path_is_invalid_input_with_a_precise_message(root: Path) -> None:
    inp = root / "in"
    make_media(inp / "ok.mp4", 1)
    (inp / "folder.mp4").mkdir()
    os.mkfifo(inp / "pipe.mp4")
    (inp / "escape.mp4").symlink_to(root / "out" / "elsewhere.mp4")
    make_media(root / "out" / "elsewhere.mp4", 1)
    (inp / "empty.mp4").write_bytes(b"")
    cases = {
        "missing.mp4": "does not exist",
        "folder.mp4": "is a directory, not a regular file",
        "pipe.mp4": "is a fifo, not a regular file",
        "ok.mp4/x.mp4": "not a directory",
        "escape.mp4": "resolves outside the agent's input root",
        "empty.mp4": "is empty",
        "\udcff.mp4": "UTF-8",  # a lone surrogate: not encodable, never reaches the OS
    }
    try:
        os.mknod(inp / "dev.mp4", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        cases["dev.mp4"] = "is a character device, not a regular file"
    except PermissionError:
        pass  # no CAP_MKNOD here: the device case is covered where it can be made
    for name, message in cases.items():
        with pytest.raises(InvalidInput, match=message):
            plan_for(with_input(root, name), root)
    assert plan_for(with_input(root, "ok.mp4"), root).final_output == root / "out" / "o.mp4"
    with pytest.raises(InvalidInput, match="input root"):
        build_plan(with_input(root, "ok.mp4"), "ffmpeg", root / "nope", root / "out",
                   root / "w", 1)


def test_an_unreadable_input_is_invalid_input() -> None:
    """Agents run as root, who reads everything: as root, the check runs with the effective uid
    of `nobody` (restored at once), else with the permissions taken away."""
    base = Path(tempfile.mkdtemp(prefix="ffrtmp-unreadable-"))
    try:
        base.chmod(0o755)
        (base / "in").mkdir(mode=0o755)
        (base / "out").mkdir(mode=0o777)
        secret = make_media(base / "in" / "secret.mp4", 1)
        (base / "in" / "locked").mkdir()
        make_media(base / "in" / "locked" / "x.mp4", 1)
        as_root = os.geteuid() == 0
        secret.chmod(0o600 if as_root else 0)
        (base / "in" / "locked").chmod(0o700 if as_root else 0)
        spec = with_input(base, "secret.mp4")
        cases = {"secret.mp4": "cannot be read: permission denied",
                 "locked/x.mp4": "permission denied"}
        for name, message in cases.items():
            spec["input"] = name
            if as_root:
                os.seteuid(65534)
            try:
                with pytest.raises(InvalidInput, match=message):
                    build_plan(spec, "ffmpeg", base / "in", base / "out", base / "w", 1)
            finally:
                if as_root:
                    os.seteuid(0)
    finally:
        (base / "in" / "locked").chmod(0o700)
        shutil.rmtree(base, ignore_errors=True)


def test_bad_output_paths_are_invalid_input(root: Path) -> None:
    out = root / "out"
    (out / "loop").symlink_to("loop")
    (out / "self.mp4").symlink_to("self.mp4")
    (out / "file").write_bytes(b"x")
    (out / "dir.mp4").mkdir()
    (out / "esc").symlink_to(root / "in")
    cases = {
        "o" * 300 + ".mp4": "too long",
        "loop/x.mp4": "symlink loop",
        "self.mp4": "symlink loop",
        "file/x.mp4": "cannot create its directory",
        "file/deeper/x.mp4": "cannot create its directory",
        "dir.mp4": "exists and is a directory",
        "esc/x.mp4": "resolves outside the agent's output root",
    }
    for name, message in cases.items():
        spec = submit()
        spec["output"] = name
        with pytest.raises(InvalidInput, match=message):
            plan_for(spec, root)
    fine = plan_for(submit(output="new/deeper/x.mp4"), root)
    assert fine.final_output == (out / "new" / "deeper" / "x.mp4").resolve()


# ---- 2. the master bounds path and URL lengths at submit --------------------------------------


@pytest.mark.parametrize(("kw", "field", "message"), [
    ({"input": "a" * 300 + ".wav"}, "input", "component too long"),
    ({"input": "é" * 128 + ".wav"}, "input", "component too long"),  # 260 bytes, 132 chars
    ({"input": "/".join(["d" * 200] * 6)}, "input", "path too long"),
    ({"output": "o" * 256 + ".mp4"}, "output", "component too long"),
    ({"output": "/".join(["d" * 250] * 5) + ".mp4"}, "output", "path too long"),
    ({"input": "http://h.example/" + "x" * 2100}, "input", "URL too long"),
    ({"output": "rtmp://h.example/live/" + "x" * 2100}, "output", "URL too long"),
    ({"input": "http://h.example:99999/x"}, "input", "malformed URL"),
    ({"input": "http://[::1/x"}, "input", "malformed URL"),
    ({"input": "http://h.example/a b"}, "input", "ASCII without spaces"),
    ({"input": "http://h\u00e9.example/x"}, "input", "ASCII"),
])
def test_overlong_paths_and_urls_are_refused_at_submit(kw: dict[str, Any], field: str,
                                                        message: str) -> None:
    with pytest.raises(SpecError, match=rf"^{field}: .*{message}"):
        submit(**kw)


def test_path_bounds_count_utf8_bytes_and_allow_the_maximum() -> None:
    check_input("é" * 125 + ".wav")  # 254 bytes
    check_input("a" * (MAX_NAME_BYTES - 4) + ".wav")
    check_input("/".join(["d" * 200] * 5))  # 1004 bytes
    check_output("rtmp://h.example/live/" + "x" * 2000, BUILTIN["720p-h264"])
    with pytest.raises(ScenarioError, match="UTF-8"):
        check_input("\udcff.wav")


# ---- 3. local inputs only through media demuxers ----------------------------------------------


def test_local_inputs_get_the_demuxer_and_protocol_allowlists(root: Path) -> None:
    make_media(root / "in" / "a.mp4", 1)
    plan = plan_for(with_input(root, "a.mp4"), root)
    i = plan.argv.index("-i")
    head = plan.argv[:i]
    assert head[head.index("-protocol_whitelist") + 1] == "file"
    allowed = head[head.index("-format_whitelist") + 1].split(",")
    assert allowed == FORMAT_WHITELIST.split(",")
    for refused in ("hls", "concat", "tty", "image2", "image2pipe", "lavfi", "srt", "ass",
                    "webvtt", "ffmetadata", "sdp", "dash", "bin", "data"):
        assert refused not in allowed


def test_a_playlist_naming_a_file_outside_the_root_is_refused_before_ffmpeg(root: Path) -> None:
    secret = make_media(root / "secret" / "outside.wav", 1, video=False)
    playlist = (f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n{secret}\n"
                "#EXT-X-ENDLIST\n")
    for name in ("list.m3u8", "list.mp4", "list"):
        (root / "in" / name).write_text(playlist)
    (root / "in" / "list.ffconcat").write_text(f"ffconcat version 1.0\nfile '{secret}'\n")
    (root / "in" / "x.txt").write_bytes(b"\x89PNG binary-looking but named .txt\x00\x01")
    (root / "in" / "notes.mp4").write_text("HELLO SECRET\n" * 100)
    (root / "in" / "art.mp4").write_bytes(b"\x1b[31mANSI art\x1b[0m\n" * 50)
    expect = {"list.m3u8": r"\.m3u8 files", "list.mp4": "is text", "list": "is text",
              "list.ffconcat": r"\.ffconcat files", "x.txt": r"\.txt files",
              "notes.mp4": "is text", "art.mp4": "is text"}
    for name, message in expect.items():
        with pytest.raises(InvalidInput, match=message):
            plan_for(with_input(root, name), root)


@pytest.mark.ffmpeg
def test_the_demuxer_allowlist_stops_ffmpeg_itself(root: Path) -> None:
    """Defense in depth: ffmpeg run with the plan's options refuses what the checks let by."""
    ffmpeg = ffmpeg_or_skip()
    make_media(root / "in" / "ok.mp4", 1)
    secret = make_media(root / "secret" / "outside.wav", 1, video=False)
    hls = root / "in" / "sneaky.bin"
    hls.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n{secret}\n"
                   "#EXT-X-ENDLIST\n")
    text = root / "in" / "story.txt"
    text.write_text("HELLO SECRET rendered as video?\n" * 200)
    png = root / "in" / "pic.png"
    subprocess.run([ffmpeg, "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=64x64",
                    "-frames:v", "1", str(png)], check=True, timeout=60)
    good = plan_for(with_input(root, "ok.mp4", params={"duration": 1}), root, ffmpeg)
    for i, sneaky in enumerate((hls, text, png)):
        # The plan of a good input, with the path swapped after the checks (a race, say).
        argv = [str(sneaky) if a == good.argv[good.argv.index("-i") + 1] else a
                for a in good.argv]
        plan = dataclasses.replace(good, argv=argv, probe_argv=None)
        result, _, _ = run_plan(plan, root / f"w{i}")
        assert result.status == "failed", (sneaky, result)
        assert "not on whitelist" in result.extra["stderr"], result.extra
        assert not good.final_output or not good.final_output.exists()


# ---- 4. URL inputs and rtmp outputs: the destination policy (SSRF) ----------------------------


def test_ip_literals_in_every_spelling_are_caught() -> None:
    refused = ["127.0.0.1", "2130706433", "0x7f.1", "0x7f000001", "0177.0.0.1", "127.1",
               "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:127.0.0.1]",
               "[64:ff9b::7f00:1]", "[2002:7f00:1::1]", "10.0.0.1", "172.16.5.4",
               "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "0", "[::]",
               "224.0.0.1", "255.255.255.255", "240.0.0.1", "[fd00::1]", "[fe80::1]",
               "[ff02::1]", "192.0.2.1", "198.18.0.1", "localhost", "LOCALHOST.",
               "127.0.0.1."]
    policy = NetPolicy()
    for host in refused:
        with pytest.raises(ValueError, match="refused|cannot resolve"):
            policy.check_url(f"http://{host}:8080/x.mp4")
    for host in ("1.1.1.1", "[2606:4700:4700::1111]", "16843009"):
        assert policy.check_url(f"http://{host}/x.mp4").addresses
    assert str(parse_literal("0x7f.1")) == "127.0.0.1"
    assert parse_literal("deadbeef.cafe") is None
    # A literal in an odd spelling reaches ffmpeg in its canonical form.
    assert NetPolicy.parse(["127.0.0.0/8"]).check_url("http://2130706433:80/a").url == \
        "http://127.0.0.1:80/a"
    mapped = LOOPBACK.check_url("http://[::ffff:127.0.0.1]/a")
    assert (mapped.url, mapped.addresses) == ("http://127.0.0.1/a", ("127.0.0.1",))


def test_the_allow_list_syntax() -> None:
    policy = NetPolicy.parse(["10.0.0.0/8,media.example.com", "*.cdn.example", " fd00::/8 ",
                              "192.168.1.7"])
    assert [str(n) for n in policy.networks] == ["10.0.0.0/8", "fd00::/8", "192.168.1.7/32"]
    assert policy.names == ("media.example.com", "*.cdn.example")
    assert policy.allows_name("MEDIA.example.com.") and policy.allows_name("a.b.cdn.example")
    assert not policy.allows_name("cdn.example") and not policy.allows_name("xmedia.example.com")
    assert policy.check_url("http://10.1.2.3/a.mp4").addresses == ("10.1.2.3",)
    trusted = policy.check_url("http://media.example.com/a.mp4")
    assert (trusted.url, trusted.addresses) == ("http://media.example.com/a.mp4", ())
    with pytest.raises(ValueError, match="refused"):
        policy.check_url("http://192.168.1.8/a.mp4")
    assert NetPolicy.parse(["cafe", "beef.example"]).names == ("cafe", "beef.example")
    assert NetPolicy().check_url("HTTP://1.1.1.1/a?b#c").url == "http://1.1.1.1/a?b#c"
    for bad in ("10.0.0.0/33", "http://x", "a b/c", "exa mple/", "-bad-.com", "0x7f.1",
                "media.example.com:80", "*"):
        with pytest.raises(PolicyError, match="--allow-url"):
            NetPolicy.parse([bad])


def test_names_are_resolved_and_pinned_against_rebinding() -> None:
    http = LOOPBACK.check_url("http://user:pw@localhost:8080/a.mp4?x=1")
    assert http.url == "http://user:pw@127.0.0.1:8080/a.mp4?x=1"
    assert http.args == ("-max_redirects", "0", "-headers", "Host: localhost:8080\r\n")
    rtmp = LOOPBACK.check_url("rtmp://localhost/live/cam1", "output")
    assert rtmp.url == "rtmp://127.0.0.1/live/cam1"
    assert rtmp.args == ("-rtmp_tcurl", "rtmp://localhost:1935/live")
    tls = LOOPBACK.check_url("https://localhost/a.mp4")  # TLS keeps the name (SNI, certs)
    assert (tls.url, tls.args, tls.addresses) == ("https://localhost/a.mp4",
                                                   ("-max_redirects", "0"), ("127.0.0.1",))
    assert rtmp_app("/live/cam1") == "live" and rtmp_app("/app/inst/stream") == "app/inst"
    assert rtmp_app("/vod/mp4:file/x") == "vod" and rtmp_app("/live") == "live"
    with pytest.raises(ValueError, match="cannot resolve"):
        NetPolicy().check_url("http://no-such-host.invalid/a.mp4")


@pytest.fixture
def http_server() -> Iterator[tuple[int, dict[str, tuple[int, dict[str, str], bytes]],
                                    list[tuple[str, str | None]]]]:
    """A real HTTP server on loopback: (port, routes path -> (status, headers, body), requests)."""
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
    requests: list[tuple[str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            requests.append((self.path, self.headers.get("Host")))
            status, headers, body = routes.get(self.path.split("?")[0],
                                               (404, {}, b"not found"))
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port, routes, requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


TEXT_BODY = b"HELLO SSRF SECRET: this must never be rendered into a video\n" * 150


@pytest.mark.ffmpeg
def test_a_loopback_url_is_refused_and_when_allowed_never_rendered_as_text(
        root: Path, http_server: Any) -> None:
    port, routes, requests = http_server
    routes["/x"] = (200, {"Content-Type": "text/plain"}, TEXT_BODY)
    url = f"http://127.0.0.1:{port}/x?x=.txt"
    spec = submit(input=url, output="ssrf.mp4", params={"duration": 1})
    for source in (url, f"http://localhost:{port}/x?x=.txt", f"http://2130706433:{port}/x",
                   f"http://[::ffff:127.0.0.1]:{port}/x"):
        spec["input"] = source
        with pytest.raises(InvalidInput, match="loopback"):
            plan_for(spec, root)
    assert requests == [], "a refused URL must not be fetched"
    # Allowed by the operator: fetched, but the tty demuxer is not on the whitelist.
    spec["input"] = url
    plan = plan_for(spec, root, ffmpeg_or_skip(), allow_url=NetPolicy.parse(["127.0.0.1"]))
    assert plan.argv[plan.argv.index("-format_whitelist") + 1] == FORMAT_WHITELIST
    result, _, _ = run_plan(plan, root / "work")
    assert requests, "the allowed URL was not fetched"
    assert result.status == "failed", result
    assert "Format not on whitelist" in result.extra["stderr"], result.extra
    assert result.extra["error"] == last_error_line(result.extra["stderr"])
    assert not (root / "out" / "ssrf.mp4").exists()


@pytest.mark.ffmpeg
def test_an_allowed_name_is_fetched_from_the_checked_address_with_its_host_header(
        root: Path, http_server: Any) -> None:
    port, routes, requests = http_server
    routes["/a.wav"] = (200, {"Content-Type": "audio/wav"},
                        make_media(root / "src" / "a.wav", 2, video=False).read_bytes())
    routes["/moved"] = (302, {"Location": "/a.wav"}, b"")
    spec = submit(scenario="audio-aac", input=f"http://localhost:{port}/a.wav",
                  output="fetched.m4a")
    plan = plan_for(spec, root, ffmpeg_or_skip(), allow_url=LOOPBACK)
    assert plan.argv[plan.argv.index("-i") + 1] == f"http://127.0.0.1:{port}/a.wav"
    result, _, _ = run_plan(plan, root / "w1")
    assert result.status == "completed", result
    assert (root / "out" / "fetched.m4a").stat().st_size > 0
    assert requests == [("/a.wav", f"localhost:{port}")]
    # Redirects are never followed: their targets were not checked.
    spec["input"] = f"http://127.0.0.1:{port}/moved"
    result, _, _ = run_plan(plan_for(spec, root, ffmpeg_or_skip(), allow_url=LOOPBACK),
                            root / "w2")
    assert result.status == "failed" and requests[-1][0] == "/moved", (result, requests)


def test_rtmp_outputs_go_through_the_same_policy(root: Path) -> None:
    spec = submit(output="rtmp://127.0.0.1:1935/live/cam1")
    with pytest.raises(InvalidInput, match="output: 127.0.0.1 is a loopback address"):
        plan_for(spec, root)
    spec["output"] = "rtmp://localhost:1935/live/cam1"
    with pytest.raises(InvalidInput, match="output: localhost resolves to 127.0.0.1"):
        plan_for(spec, root)
    plan = plan_for(spec, root, allow_url=LOOPBACK)
    assert plan.argv[-5:] == ["-rtmp_tcurl", "rtmp://localhost:1935/live", "-f", "flv",
                              "rtmp://127.0.0.1:1935/live/cam1"]


# ---- 5. the agent validates the preset the master sends ---------------------------------------


def test_every_builtin_preset_passes_the_schema_unchanged() -> None:
    for preset in BUILTIN.values():
        assert check_preset(preset.to_wire()) == preset
    for name in BUILTIN:
        spec = submit(scenario=name, output=f"x.{BUILTIN[name].extension}")
        assert check_preset(spec["preset"]).to_wire() == spec["preset"]


@pytest.mark.parametrize(("change", "message"), [
    ({"extra_args": ["-f", "image2", "/tmp/pwned.png"]}, "odd count"),
    ({"extra_args": ["-f", "image2", "-y", "/tmp/pwned.png"]}, r"extra_args\[0\]: option '-f'"),
    ({"extra_args": ["-y", "/etc/x"]}, "option '-y' not allowed"),
    ({"extra_args": ["-movflags", "/etc/x"]}, r"extra_args\[1\]: bad value"),
    ({"extra_args": ["-g", "-y"]}, "bad value"),
    ({"extra_args": ["-x265-params", "csv=/tmp/x.csv"]}, "bad value"),
    ({"extra_args": ["-g", 5]}, "list of strings"),
    ({"extra_args": ["-g", "5"] * 17}, "at most 32"),
    ({"container": "image2"}, "container: 'image2' not allowed"),
    ({"container": "mp4", "extension": "png"}, "extension"),
    ({"encoder": "png"}, "encoder: 'png' not allowed"),
    ({"audio_encoder": "-y"}, "audio_encoder"),
    ({"width": 10**9}, "width: must be between"),
    ({"width": None}, "width and height go together"),
    ({"fps": float("nan")}, "fps"),
    ({"bitrate": "1G"}, "bitrate"),
    ({"bitrate": "3M -y /etc/x"}, "bitrate"),
    ({"audio_bitrate": True}, "audio_bitrate"),
    ({"crf": 99, "bitrate": None}, "crf"),
    ({"preset": "placebo; rm"}, "preset: must be one of"),
    ({"pix_fmt": "rgb24"}, "pix_fmt: unknown field"),
    ({"name": None}, "name: required"),
])
def test_a_tampered_preset_in_a_job_is_invalid_input(root: Path, change: dict[str, Any],
                                                      message: str) -> None:
    spec = submit(output="o.mp4")
    spec["preset"] = {**spec["preset"], **change}
    with pytest.raises(InvalidInput, match=rf"^bad spec: preset\.\w+(\[\d+\])?: .*{message}|"
                                           rf"{message}"):
        plan_for(spec, root)
    with pytest.raises(ScenarioError):
        check_preset(spec["preset"])
    assert not Path("/tmp/pwned.png").exists()


@pytest.mark.ffmpeg
def test_a_tampered_preset_never_writes_outside_the_roots(root: Path) -> None:
    """The old agent ran `extra_args` verbatim: as root, a fake master wrote anywhere."""
    target = root / "elsewhere" / "pwned.png"
    target.parent.mkdir()
    spec = submit(output="o.mp4", params={"duration": 1})
    spec["preset"]["extra_args"] = ["-frames:v", "1", "-f", "image2", str(target), "-y"]
    with pytest.raises(InvalidInput):
        plan_for(spec, root, ffmpeg_or_skip())
    assert not target.exists()


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(st.sampled_from(sorted(EXTRA_OPTIONS)),
                                st.from_regex(r"\A[A-Za-z0-9+_.][A-Za-z0-9+_.:=,-]{0,20}\Z")),
                      max_size=8),
       name=st.sampled_from(sorted(BUILTIN)))
def test_nothing_is_ever_added_after_the_output_path(pairs: list[tuple[str, str]],
                                                     name: str) -> None:
    base = Path(tempfile.gettempdir()) / "ffrtmp-argv-property"
    spec = submit(scenario=name, output=f"x.{BUILTIN[name].extension}")
    spec["preset"]["extra_args"] = [item for pair in pairs for item in pair]
    plan = build_plan(spec, "ffmpeg", base / "in", base / "out", base / "work", 1)
    assert plan.tmp_output is not None
    assert plan.argv[-3:] == ["-f", BUILTIN[name].container, str(plan.tmp_output)]
    assert plan.argv.count(str(plan.tmp_output)) == 1
    # Every extra value sits right after its allowlisted option.
    for option, value in pairs:
        assert option in plan.argv and value in plan.argv


def test_operator_scenarios_pass_the_same_schema(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[scenarios.tuned]\ncontainer = "mp4"\nextension = "mp4"\n'
                    'encoder = "libx264"\nwidth = 640\nheight = 360\nbitrate = "600k"\n'
                    'extra_args = ["-g", "48", "-movflags", "+faststart", "-tune", "film"]\n')
    assert load_toml(str(path))["tuned"].extra_args == ("-g", "48", "-movflags", "+faststart",
                                                        "-tune", "film")
    path.write_text('[scenarios.evil]\ncontainer = "mp4"\nextension = "mp4"\n'
                    'encoder = "libx264"\nextra_args = ["-f", "image2", "/etc/x"]\n')
    with pytest.raises(ScenarioError, match=r"scenarios\.evil\.extra_args"):
        load_toml(str(path))


# ---- 6. the duration probe never blocks the job (nor the agent's loop) -------------------------

FAKE = """#!/bin/sh
touch "{marker}"
exec sleep 30
"""


def test_build_plan_runs_nothing(root: Path) -> None:
    """The old build_plan ran `ffmpeg -i` synchronously (up to 20 s) on the agent's loop."""
    make_media(root / "in" / "a.mp4", 1)
    fake = root / "fake-ffmpeg"
    marker = root / "ran"
    fake.write_text(FAKE.format(marker=marker))
    fake.chmod(0o755)
    started = time.monotonic()
    plan = plan_for(with_input(root, "a.mp4"), root, str(fake))
    assert time.monotonic() - started < 5
    assert not marker.exists(), "build_plan ran ffmpeg"
    assert plan.duration_s is None and plan.probe_argv is not None
    assert plan.probe_argv[0] == str(fake) and plan.probe_argv[-2:] == ["-i",
                                                                       plan.argv[
                                                                           plan.argv.index(
                                                                               "-i") + 1]]


@pytest.mark.ffmpeg
def test_the_probe_runs_beside_the_job_and_gives_the_duration(root: Path) -> None:
    ffmpeg = ffmpeg_or_skip()
    make_media(root / "in" / "a.mp4", 2)
    plan = plan_for(with_input(root, "a.mp4"), root, ffmpeg)
    result, hook, seen = run_plan(plan, root / "work")
    assert result.status == "completed", result
    assert hook.duration_s is not None and abs(hook.duration_s - 2.0) < 0.2
    assert hook.probe is not None and hook.probe.returncode is not None
    assert seen and [s["progress"] for s in seen] == sorted(s["progress"] for s in seen)
    cut = plan_for(with_input(root, "a.mp4", params={"duration": 1}), root, ffmpeg)
    _, hook, _ = run_plan(cut, root / "work2")
    assert hook.duration_s == 1.0  # min(probed 2 s, -t 1)


@pytest.mark.ffmpeg
def test_a_slow_probe_never_delays_the_job_and_is_killed_and_reaped(root: Path) -> None:
    ffmpeg = ffmpeg_or_skip()
    make_media(root / "in" / "a.mp4", 1)
    plan = plan_for(with_input(root, "a.mp4"), root, ffmpeg)
    slow = dataclasses.replace(plan, probe_argv=[sys.executable, "-c",
                                                 "import time; time.sleep(120)"])
    result, hook, seen = run_plan(slow, root / "work")
    assert result.status == "completed", result
    assert hook.duration_s is None
    assert all(s["progress"] == 0.0 for s in seen[:-1]), seen  # unknown duration: 0 % …
    assert hook.progress() == {**(hook.progress() or {}), "progress": 1.0}  # … then done
    probe = hook.probe
    assert probe is not None and probe.returncode is not None, "probe not reaped"
    assert not psutil.pid_exists(probe.pid) or psutil.Process(probe.pid).status() != \
        psutil.STATUS_ZOMBIE


@pytest.mark.ffmpeg
def test_a_probe_past_its_timeout_is_killed(root: Path) -> None:
    ffmpeg = ffmpeg_or_skip()
    make_media(root / "in" / "a.mp4", 1)
    plan = plan_for(with_input(root, "a.mp4"), root, ffmpeg)
    slow = dataclasses.replace(plan, probe_argv=[sys.executable, "-c",
                                                 "import time; time.sleep(120)"],
                               argv=[sys.executable, "-c", "import time; time.sleep(3)"],
                               tmp_output=None, final_output=None)
    hook = FFmpegHook(slow, stall_s=0, probe_timeout_s=0.2)
    run = ProcessRun(slow.argv, root / "work", 60, hooks=[hook])
    run.start(time.monotonic())
    results: list[Result] = []

    def probe_killed_while_the_job_runs() -> bool:
        result = run.poll(time.monotonic())
        if result is not None:
            results.append(result)
            return True
        return hook.probe is not None and hook.probe.returncode is not None

    wait_for(probe_killed_while_the_job_runs, 10, message="the probe to be killed")
    assert not results, "the job ended before its probe's timeout"
    result = wait_for(lambda: run.poll(time.monotonic()), 20, message="the job to end")
    assert result is not None and result.status == "completed" and hook.duration_s is None


# ---- 7. ffmpeg's last error line in extra.error -----------------------------------------------


@pytest.mark.ffmpeg
def test_a_failed_ffmpeg_reports_its_last_error_line(root: Path) -> None:
    ffmpeg = ffmpeg_or_skip()
    good = make_media(root / "src" / "good.mp4", 2)
    data = good.read_bytes()
    (root / "in" / "corrupt.mp4").write_bytes(data[: len(data) // 2])  # no moov atom
    plan = plan_for(with_input(root, "corrupt.mp4"), root, ffmpeg)
    result, _, _ = run_plan(plan, root / "work")
    # a local file ffmpeg cannot open as media: invalid_input, never retried (issue 11)
    assert (result.status, result.reason) == ("failed", "invalid_input"), result
    error = result.extra["error"]
    assert "Invalid data found when processing input" in error, result.extra
    assert error == result.extra["stderr"].strip().splitlines()[-1].strip()
    assert len(error) <= 300 and error.isprintable()
    assert not (root / "out" / "o.mp4").exists()


def test_the_error_line_is_clean_and_bounded() -> None:
    assert last_error_line("a\n\x1b[31mboom\x1b[0m\x07 \n\n  \n") == "boom"
    assert last_error_line("[x @ 0x1] real cause\nConversion failed!\n") == "[x @ 0x1] real cause"
    assert last_error_line("Conversion failed!\n") == "Conversion failed!"
    assert last_error_line("x" * 1000) == "x" * 300
    assert last_error_line("tab\there\x00\x7f\u202e!") == "tab here!"
    assert last_error_line("") is None and last_error_line("\n \x1b[0m\n") is None


def test_no_errno_escapes_as_anything_but_invalid_input(root: Path) -> None:
    """Whatever a spec holds, build_plan raises InvalidInput or returns a plan."""
    weird: list[Any] = ["", None, 5, ["x"], {"a": 1}, "a\x00b.mp4", "~/x.mp4", "../x.mp4",
                        ".", "./", "in/..", "x" * 5000]
    for value in weird:
        for key in ("input", "output"):
            spec = submit(output="o.mp4")
            spec[key] = value
            try:
                plan_for(spec, root)
            except InvalidInput:
                pass
    odd: list[Any] = [None, [], {"preset": None}, {"preset": {}, "input": "testsrc:duration=1"},
                      {**submit(), "params": ["x"]}]
    for bad in odd:
        with pytest.raises(InvalidInput):
            plan_for(bad, root)
