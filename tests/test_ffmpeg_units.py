"""Pure parts of the ffmpeg path: the -progress parser, scenarios and argv building."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ffmpeg.argv import InvalidInput, build_plan
from agent.ffmpeg.netpolicy import NetPolicy
from agent.ffmpeg.progress import ProgressParser
from bus.scenarios import BUILTIN, ScenarioError, apply_overrides, load_toml, parse_testsrc
from master.scenarios import load_presets, make_checks
from master.spec import SpecError, validate_spec

STREAM = (
    b"frame=10\nfps=25.00\nstream_0_0_q=28.0\nbitrate=N/A\ntotal_size=48\nout_time_us=400000\n"
    b"out_time_ms=400000\nout_time=00:00:00.400000\ndup_frames=0\ndrop_frames=0\nspeed=0.8x\n"
    b"progress=continue\n"
    b"frame=50\nfps=31.2\ntotal_size=262192\nout_time_us=2000000\nspeed=1.25x\nprogress=continue\n"
    b"frame=75\nfps=N/A\ntotal_size=400000\nout_time_us=3000000\nspeed=N/A\nprogress=end\n"
)


def test_parser_reads_every_block() -> None:
    snaps = ProgressParser().feed(STREAM)
    assert [s.out_time_s for s in snaps] == [0.4, 2.0, 3.0]
    assert [s.frame for s in snaps] == [10, 50, 75]
    assert [s.total_size for s in snaps] == [48, 262192, 400000]
    assert [s.speed for s in snaps] == [0.8, 1.25, None]
    assert snaps[1].fps == 31.2 and snaps[2].fps is None
    assert [s.end for s in snaps] == [False, False, True]


@settings(max_examples=300)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=40))
def test_parser_is_independent_of_chunking(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    parser = ProgressParser()
    got = [snap for chunk in chunks for snap in parser.feed(chunk)]
    assert got == ProgressParser().feed(STREAM)


@given(st.binary(max_size=2000))
def test_parser_never_raises_on_garbage(data: bytes) -> None:
    ProgressParser().feed(data)


def test_testsrc_parsing_and_bounds() -> None:
    assert parse_testsrc("testsrc:duration=2,size=640x360,rate=25") == {
        "duration": 2.0, "width": 640, "height": 360, "rate": 25.0}
    for bad in ("testsrc:", "testsrc:duration=0", "testsrc:duration=2,size=1x1",
                "testsrc:duration=2,bogus=1", "testsrc:duration=x"):
        with pytest.raises(ScenarioError):
            parse_testsrc(bad)


def test_overrides_are_validated_and_applied() -> None:
    p = apply_overrides(BUILTIN["720p-h264"], {"bitrate": "800k", "preset": "fast", "fps": 25})
    assert (p.bitrate, p.crf, p.preset, p.fps) == ("800k", None, "fast", 25.0)
    p = apply_overrides(BUILTIN["720p-h264"], {"crf": 23})
    assert (p.bitrate, p.crf) == (None, 23)
    with pytest.raises(ScenarioError, match="params.crf"):
        apply_overrides(BUILTIN["720p-h264"], {"crf": 52})
    with pytest.raises(ScenarioError, match="params.fps"):
        apply_overrides(BUILTIN["audio-aac"], {"fps": 30})
    with pytest.raises(ScenarioError, match="params.nope"):
        apply_overrides(BUILTIN["720p-h264"], {"nope": 1})


def test_operator_scenarios_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[scenarios.mobile]\ncontainer = "mp4"\nextension = "mp4"\n'
                    'encoder = "libx264"\nwidth = 640\nheight = 360\nbitrate = "600k"\n')
    presets = load_presets(str(path))
    assert presets["mobile"].requires == "encoder:libx264" and "720p-h264" in presets
    checked = validate_spec({"scenario": "mobile", "input": "testsrc:duration=1"},
                            make_checks(presets))
    assert checked.spec["preset"]["width"] == 640 and checked.requires == "encoder:libx264"
    path.write_text('[scenarios.bad]\ncontainer = "mp4"\nextension = "mp4"\nwidht = 1\n')
    with pytest.raises(ScenarioError, match="widht"):
        load_toml(str(path))


def test_spec_check_names_the_field() -> None:
    checks = make_checks(load_presets(None))
    with pytest.raises(SpecError, match=r"^output:"):
        validate_spec({"scenario": "720p-h264", "input": "testsrc:duration=1",
                       "output": "a/../../b.mp4"}, checks)
    with pytest.raises(SpecError, match=r"^preset: unknown field"):
        validate_spec({"scenario": "720p-h264", "input": "testsrc:duration=1",
                       "preset": {"encoder": "x"}}, checks)


def _spec(**kw: object) -> dict[str, object]:
    checks = make_checks(load_presets(None))
    return validate_spec({"scenario": "720p-h264", "input": "testsrc:duration=2", **kw},
                         checks).spec


def test_argv_is_a_list_with_whitelist_and_atomic_output(tmp_path: Path) -> None:
    plan = build_plan(_spec(output="a/b.mp4", params={"duration": 1}), "ffmpeg",
                      tmp_path / "in", tmp_path / "out", tmp_path / "work", 7)
    assert plan.argv[0] == "ffmpeg" and "-progress" in plan.argv and "pipe:1" in plan.argv
    assert plan.tmp_output == tmp_path / "work" / "output.mp4"
    assert plan.final_output == (tmp_path / "out" / "a" / "b.mp4").resolve()
    assert plan.duration_s == 1 and plan.argv[plan.argv.index("-t") + 1] == "1"
    loopback = NetPolicy.parse(["127.0.0.1"])
    live = build_plan(_spec(output="rtmp://127.0.0.1/live/x"), "ffmpeg", tmp_path, tmp_path,
                      tmp_path, 1, allow_url=loopback)
    assert live.live and "-re" in live.argv and live.argv[-2:] == ["flv",
                                                                   "rtmp://127.0.0.1/live/x"]
    for source, protocols in (("https://example.invalid/a.mp4", "https,tls,tcp"),
                              ("http://1.1.1.1/a.mp4", "http,tcp")):
        url = build_plan(_spec(input=source), "ffmpeg", tmp_path, tmp_path, tmp_path, 1,
                         allow_url=NetPolicy.parse(["example.invalid"]))
        assert url.argv[url.argv.index("-protocol_whitelist") + 1] == protocols
        assert url.argv[url.argv.index("-i") + 1] == source


def test_symlink_escape_and_missing_input_are_invalid(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "link.mp4").symlink_to("/etc/hostname")
    for name in ("link.mp4", "missing.mp4"):
        with pytest.raises(InvalidInput):
            build_plan(_spec(input=name), "ffmpeg", tmp_path / "in", tmp_path / "out",
                       tmp_path / "w", 1)


def test_bad_duration_on_the_agent_is_invalid_input_not_a_crash(tmp_path: Path) -> None:
    spec = _spec()
    for bad in ("x", -1, None):
        spec["params"] = {"duration": bad}
        with pytest.raises(InvalidInput, match="params.duration"):
            build_plan(spec, "ffmpeg", tmp_path, tmp_path, tmp_path, 1)


def test_an_oversized_spec_is_refused_at_submit() -> None:
    with pytest.raises(SpecError, match="bytes packed"):
        validate_spec({"scenario": "sleep", "params": {"seconds": 1, "pad": "x" * 70_000}})
