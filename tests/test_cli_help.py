"""`ffrtmp --help` everywhere, `ffrtmp scenarios list|show`, and the scenario TOML example.

The scenario checks compare what the CLI shows with what the master's own validation accepts,
so the help a user reads cannot drift from the rules a submit meets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bus.scenarios import BUILTIN, Preset
from ffrtmp.cli import HelpFormatter, build_parser
from ffrtmp.scenarios_cli import WORKLOAD_PARAMS, WORKLOAD_TEXT, catalogue
from harness import ROOT, Cluster
from master.scenarios import load_presets, make_checks
from master.spec import WORKLOADS, SpecError

EXAMPLE = ROOT / "examples" / "scenarios.toml"


def ffrtmp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ffrtmp", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def parsers(parser: argparse.ArgumentParser, path: str = "ffrtmp"
            ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the command tree, with its command path."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from parsers(child, f"{path} {name}")


def meaningful(action: argparse.Action) -> bool:
    """An option whose default is worth showing (not unset, not a flag's False)."""
    d = action.default
    return bool(action.option_strings) and d not in (None, False, argparse.SUPPRESS) \
        and not isinstance(d, list | dict)


def test_every_option_of_every_subcommand_has_help_and_shows_its_default() -> None:
    missing, no_default = [], []
    tree = list(parsers(build_parser()))
    assert len(tree) > 20  # master, agent, submit, jobs list/show/…, scenarios list/show, …
    names = {path for path, _ in tree}
    assert {"ffrtmp scenarios list", "ffrtmp scenarios show", "ffrtmp jobs watch"} <= names
    for path, parser in tree:
        assert parser.formatter_class is HelpFormatter, path
        text = parser.format_help()  # renders every help string (a stray % would raise here)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {name}")
                continue
            shown = HelpFormatter("x")._get_help_string(action)
            if meaningful(action) and "default" not in shown.lower():
                no_default.append(f"{path} {name}")
            if meaningful(action) and "%(default)" in shown:
                assert str(action.default) in text, (path, name, action.default)
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help does not show the default: {no_default}"


def test_help_names_the_environment_and_the_submit_templates() -> None:
    top = ffrtmp("--help")
    assert top.returncode == 0
    for var in ("FFRTMP_MASTER", "FFRTMP_EVENTS", "FFRTMP_CLIENT_KEY", "FFRTMP_MASTER_KEY"):
        assert var in top.stdout, var
    assert "scenarios" in top.stdout
    sub = ffrtmp("submit", "--help").stdout
    assert "{id}" in sub and "{n}" in sub and "--overwrite" in sub and "--retry-timeouts" in sub
    assert "(default: normal)" in sub and "(default: 3)" in sub
    cancel = ffrtmp("jobs", "cancel", "--help").stdout
    assert "107..306" in cancel and "(default: 30.0)" in cancel


# ---- scenarios list / show ---------------------------------------------------------------------


def test_scenarios_list_names_every_scenario_and_workload() -> None:
    proc = ffrtmp("scenarios", "list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "KIND", "CONTAINER", "ENCODER"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(BUILTIN) | set(WORKLOADS)
    for name, preset in BUILTIN.items():
        assert rows[name][1:4] == ["ffmpeg", preset.container,
                                   preset.encoder or preset.audio_encoder], rows[name]
    for name in WORKLOADS:
        assert rows[name][1:4] == ["workload", "-", "-"]
    listed = json.loads(ffrtmp("scenarios", "list", "--json").stdout)
    assert [e["name"] for e in listed] == list(catalogue(None))
    assert all(e["description"] for e in listed)


def test_scenarios_show_text_and_json() -> None:
    proc = ffrtmp("scenarios", "show", "1080p-vp9")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("1080p-vp9 (ffmpeg, built-in): 1920x1080 30 fps VP9")
    assert "WebM" in text and "encoder:libvpx-vp9" in text and ".webm" in text
    assert "crf" in text and "0..63" in text and "default 4M" in text
    assert "preset " not in text.split("overrides")[1]  # libvpx-vp9 has no -preset
    assert "example:   ffrtmp submit 1080p-vp9 --input testsrc:duration=10 --output " \
           "clips/{id}.webm --wait" in text
    hog = ffrtmp("scenarios", "show", "hog").stdout
    assert "1..1048576" in hog and "e+06" not in hog and "default 64" in hog
    shown = json.loads(ffrtmp("scenarios", "show", "audio-aac", "--json").stdout)
    assert shown["kind"] == "ffmpeg" and shown["preset"] == BUILTIN["audio-aac"].to_wire()
    assert [o["name"] for o in shown["overrides"]] == ["audio_bitrate", "duration"]

    bad = ffrtmp("scenarios", "show", "no-such")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "unknown scenario 'no-such'" in bad.stderr and "1080p-h264" in bad.stderr


def _check(name: str, presets: dict[str, Preset], params: dict[str, Any]) -> str | None:
    """The master's verdict on a job of `name` with `params`: None (accepted) or the error."""
    spec = {"scenario": name, "input": "testsrc:duration=1", "output": None, "params": params}
    try:
        make_checks(presets)[name](spec)
    except SpecError as e:
        return str(e)
    return None


def _just_outside(value: Any, up: bool) -> Any:
    if isinstance(value, str):  # a bitrate bound: 8k / 200M
        return "7k" if not up else "201M"
    if isinstance(value, int):
        return value + 1 if up else value - 1
    return value * 1.01 if up else value * 0.99


@pytest.mark.parametrize("toml", [None, str(EXAMPLE)], ids=["builtin", "example"])
def test_shown_overrides_are_exactly_what_the_master_accepts(toml: str | None) -> None:
    presets = load_presets(toml)
    for name, entry in catalogue(toml).items():
        if entry["kind"] == "workload":
            assert {o["name"] for o in entry["overrides"]} == set(WORKLOADS[name])
            for o in entry["overrides"]:
                assert (o["min"], o["max"]) == WORKLOADS[name][o["name"]]
                assert (name, o["name"]) in WORKLOAD_PARAMS
            assert name in WORKLOAD_TEXT
            continue
        shown = {o["name"]: o for o in entry["overrides"]}
        for key in ("bitrate", "crf", "preset", "fps", "audio_bitrate", "duration"):
            o = shown.get(key)
            if o is None:  # not shown: the master refuses it for this scenario
                probe = {"bitrate": "1M", "crf": 20, "preset": "fast", "fps": 25,
                         "audio_bitrate": "96k", "duration": 5}[key]
                assert _check(name, presets, {key: probe}) is not None, (name, key)
                continue
            if o["choices"]:
                for choice in o["choices"]:
                    assert _check(name, presets, {key: choice}) is None, (name, key, choice)
                assert _check(name, presets, {key: "placebo"}) is not None
                continue
            for bound, up in ((o["min"], False), (o["max"], True)):
                assert _check(name, presets, {key: bound}) is None, (name, key, bound)
                outside = _just_outside(bound, up)
                assert _check(name, presets, {key: outside}) is not None, (name, key, outside)
        assert _check(name, presets, {"nonsense": 1}) is not None


# ---- the TOML example --------------------------------------------------------------------------


def test_example_toml_loads_through_the_master_and_scenarios_show_shows_it() -> None:
    loaded = load_presets(str(EXAMPLE))
    extra = {n: p for n, p in loaded.items() if BUILTIN.get(n) != p}
    assert set(extra) == {"360p-h264", "archive-h265", "podcast-opus", "720p-h264"}
    assert loaded["720p-h264"].bitrate == "2500k"  # a built-in name replaces the built-in

    listed = ffrtmp("scenarios", "list", "--scenarios", str(EXAMPLE))
    assert listed.returncode == 0, listed.stderr
    for name, preset in extra.items():
        row = next(line.split() for line in listed.stdout.splitlines()
                   if line.split()[0] == name)
        assert row[1:3] == ["ffmpeg", preset.container]
        shown = ffrtmp("scenarios", "show", name, "--scenarios", str(EXAMPLE))
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith(f"{name} (ffmpeg, {EXAMPLE}): ")
        assert f"encoder:{preset.encoder or preset.audio_encoder}" in shown.stdout
        data = json.loads(ffrtmp("scenarios", "show", name, "--scenarios", str(EXAMPLE),
                                 "--json").stdout)
        assert data["preset"] == preset.to_wire()
    assert "podcast-opus" not in ffrtmp("scenarios", "list").stdout


def test_docs_describe_every_preset_field_and_show_the_example() -> None:
    doc = (ROOT / "docs" / "SCENARIOS.md").read_text()
    for field in Preset.__dataclass_fields__:
        if field != "name":
            assert f"`{field}`" in doc, field
    body = EXAMPLE.read_text()
    tables = [line for line in body.splitlines() if line.startswith("[scenarios.")]
    for table in tables:
        assert table in doc, table


def test_a_bad_toml_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[scenarios.web]\ncontainer = "mp4"\nextension = "mkv"\n')
    proc = ffrtmp("scenarios", "list", "--scenarios", str(bad))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"ffrtmp scenarios: {bad}: scenarios.web.extension: 'mkv' does not go with mp4 "
        "(allowed: mp4, m4v)"]


def test_a_master_with_the_example_accepts_its_scenarios(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path}/ffrtmp.db",
                master_args=["--scenarios", str(EXAMPLE)])
    try:
        c.start_master()
        for name, ext in (("360p-h264", "mp4"), ("archive-h265", "mkv"),
                          ("podcast-opus", "opus")):
            proc = c.cli("submit", name, "--input", "testsrc:duration=1", "--output",
                         f"out/{{id}}.{ext}", "--json")
            assert proc.returncode == 0, proc.stderr
            job_id = json.loads(proc.stdout)["ids"][0]
            assert c.job(job_id)["spec"]["preset"] == load_presets(str(EXAMPLE))[name].to_wire()
    finally:
        c.close()
