"""`ffrtmp scenarios list|show`: what each scenario and workload does and what a job may change.

Everything shown comes from the data the master validates a job with: the presets of
bus/scenarios.py (plus an operator's TOML file, loaded by master/scenarios.py's loader) and
master/spec.py's WORKLOADS bounds. tests/test_cli_scenarios.py checks the override bounds shown
here against what the master's own check accepts, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a scenarios command runs, not with `ffrtmp`'s grammar
    from bus.scenarios import Preset

FFMPEG, WORKLOAD = "ffmpeg", "workload"

VIDEO_NAMES = {
    "libx264": "H.264", "libx265": "H.265/HEVC", "libvpx": "VP8", "libvpx-vp9": "VP9",
    "libaom-av1": "AV1", "libsvtav1": "AV1 (SVT)", "librav1e": "AV1 (rav1e)",
    "libopenh264": "H.264 (OpenH264)", "mpeg4": "MPEG-4 Part 2", "h264_nvenc": "H.264 (NVENC)",
    "hevc_nvenc": "HEVC (NVENC)", "av1_nvenc": "AV1 (NVENC)",
}
AUDIO_NAMES = {
    "aac": "AAC", "libfdk_aac": "AAC (fdk)", "libopus": "Opus", "libvorbis": "Vorbis",
    "libmp3lame": "MP3", "flac": "FLAC", "alac": "ALAC", "ac3": "AC-3", "eac3": "E-AC-3",
    "pcm_s16le": "PCM",
}
CONTAINER_NAMES = {
    "mp4": "MP4", "mov": "QuickTime", "ipod": "M4A", "webm": "WebM", "matroska": "Matroska",
    "flv": "FLV", "mpegts": "MPEG-TS", "ogg": "Ogg", "adts": "ADTS AAC", "mp3": "MP3",
    "wav": "WAV", "flac": "FLAC",
}

# The synthetic workloads: what they do, and what each parameter means and defaults to on the
# agent (agent/workloads.py). Bounds come from master/spec.py WORKLOADS.
WORKLOAD_TEXT: dict[str, str] = {
    "noop": "does nothing and completes at once, with no process (measures the system's own "
            "per-job overhead)",
    "sleep": "a child process that sleeps for `seconds` (load and cancellation tests)",
    "burn": "a child process that spins one core until it has used `cpu_seconds` of CPU "
            "(CPU limits)",
    "hog": "a child process that allocates and touches `mb` MiB and holds it for `seconds` "
           "(memory limits)",
}
WORKLOAD_PARAMS: dict[tuple[str, str], tuple[str, Any]] = {
    ("sleep", "seconds"): ("seconds to sleep", 1.0),
    ("sleep", "ignore_term"): ("1: ignore SIGTERM, so a cancel must escalate to SIGKILL", 0),
    ("burn", "cpu_seconds"): ("seconds of CPU time to use", 1.0),
    ("hog", "mb"): ("MiB to allocate and touch", 64),
    ("hog", "seconds"): ("seconds to hold the memory", 1.0),
}
WORKLOAD_EXAMPLE = {
    "noop": "ffrtmp submit noop --count 1000 --wait",
    "sleep": "ffrtmp submit sleep --set seconds=2 --count 10 --wait",
    "burn": "ffrtmp submit burn --set cpu_seconds=5 --cpu 50 --wait",
    "hog": "ffrtmp submit hog --set mb=256 --set seconds=2 --memory 512 --wait",
}


@dataclass(frozen=True)
class Override:
    """One `--set KEY=VALUE` a job may give a scenario."""

    name: str
    text: str
    default: Any = None
    low: Any = None
    high: Any = None
    choices: tuple[str, ...] = ()
    shown: str = ""  # what the text says when the default is None


    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "text": self.text, "default": self.default,
                "min": self.low, "max": self.high, "choices": list(self.choices) or None,
                "default_text": self.shown if self.default is None and self.shown
                else _default(self.default)}


def overrides(preset: Preset) -> list[Override]:
    """The params an ffmpeg scenario accepts (bus.scenarios.apply_overrides), with the bounds
    the master's check enforces for this preset."""
    from bus.scenarios import CRF_MAX, PRESETS_BY_ENCODER

    out: list[Override] = []
    video = preset.encoder is not None
    if video:
        out.append(Override("bitrate", "video bitrate, e.g. 800k or 5M (replaces crf)",
                            preset.bitrate, "8k", "200M",
                            shown=f"none (crf {preset.crf})" if preset.crf is not None else ""))
        if preset.encoder in CRF_MAX:
            out.append(Override("crf", "constant quality, lower is better (replaces bitrate)",
                                preset.crf, 0, CRF_MAX[preset.encoder],
                                shown=f"none (bitrate {preset.bitrate})" if preset.bitrate
                                else ""))
        if preset.encoder in PRESETS_BY_ENCODER:
            out.append(Override("preset", "encoder speed/quality trade-off", preset.preset,
                                choices=PRESETS_BY_ENCODER[preset.encoder]))
        out.append(Override("fps", "output frame rate", preset.fps, 1, 120,
                            shown="the input's"))
    if preset.audio_encoder is not None:
        out.append(Override("audio_bitrate", "audio bitrate, e.g. 96k", preset.audio_bitrate,
                            "8k", "200M"))
    out.append(Override("duration", "seconds of output: cut the input there",
                        None, 0.04, 86_400, shown="the whole input"))
    return out


def describe(preset: Preset) -> str:
    """One line from the preset's own fields: '1920x1080 30 fps H.264 5M, AAC 128k, MP4'."""
    parts = []
    if preset.encoder is not None:
        video = []
        if preset.width is not None:
            video.append(f"{preset.width}x{preset.height}")
        if preset.fps is not None:
            video.append(f"{preset.fps:g} fps")
        video.append(VIDEO_NAMES.get(preset.encoder, preset.encoder))
        if preset.bitrate is not None:
            video.append(f"at {preset.bitrate}")
        elif preset.crf is not None:
            video.append(f"crf {preset.crf}")
        if preset.preset is not None:
            video.append(f"({preset.preset})")
        parts.append(" ".join(video))
    if preset.audio_encoder is not None:
        audio = AUDIO_NAMES.get(preset.audio_encoder, preset.audio_encoder)
        parts.append(f"{audio} {preset.audio_bitrate}" if preset.audio_bitrate else audio)
        if preset.encoder is None:
            parts[-1] = "audio only: " + parts[-1]
    parts.append(f"{CONTAINER_NAMES.get(preset.container, preset.container)} "
                 f"(.{preset.extension})")
    return ", ".join(parts)


def catalogue(toml_path: str | None) -> dict[str, dict[str, Any]]:
    """Every scenario and workload a master started with `--scenarios toml_path` accepts,
    by name, as the JSON objects `scenarios list --json` prints (workloads first)."""
    from bus.scenarios import BUILTIN
    from master.scenarios import load_presets
    from master.spec import WORKLOADS

    out: dict[str, dict[str, Any]] = {}
    for name, bounds in WORKLOADS.items():
        params = [Override(key, *WORKLOAD_PARAMS.get((name, key), ("", None)), lo, hi).to_json()
                  for key, (lo, hi) in bounds.items()]
        out[name] = {"name": name, "kind": WORKLOAD, "container": None, "extension": None,
                     "encoder": None, "audio_encoder": None, "requires": f"workload:{name}",
                     "description": WORKLOAD_TEXT.get(name, "a synthetic workload"),
                     "source": "built-in", "takes_input": False, "overrides": params,
                     "example": WORKLOAD_EXAMPLE.get(name, f"ffrtmp submit {name} --wait"),
                     "preset": None}
    presets = load_presets(toml_path)
    for name, preset in presets.items():
        source = "built-in" if BUILTIN.get(name) == preset else str(toml_path)
        example = (f"ffrtmp submit {name} --input testsrc:duration=10 "
                   f"--output clips/{{id}}.{preset.extension} --wait")
        out[name] = {"name": name, "kind": FFMPEG, "container": preset.container,
                     "extension": preset.extension, "encoder": preset.encoder,
                     "audio_encoder": preset.audio_encoder, "requires": preset.requires,
                     "description": describe(preset), "source": source, "takes_input": True,
                     "overrides": [o.to_json() for o in overrides(preset)],
                     "example": example, "preset": preset.to_wire()}
    return out


def _number(value: Any) -> str:
    """1048576.0 -> '1048576', 0.04 -> '0.04' (never an exponent for a bound)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _bounds(o: dict[str, Any]) -> str:
    if o["choices"]:
        return "one of " + ", ".join(o["choices"])
    if o["min"] is not None:
        return f"{_number(o['min'])}..{_number(o['max'])}"
    return ""


def _default(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return _number(value)


def cmd_scenarios(args: argparse.Namespace) -> int:
    """scenarios list|show."""
    from bus.scenarios import CONTAINERS, ScenarioError

    try:
        entries = catalogue(args.scenarios)
    except ScenarioError as e:
        print(f"ffrtmp scenarios: {e}", file=sys.stderr)
        return 2
    if args.scenarios_cmd == "list":
        if args.json:
            json.dump(list(entries.values()), sys.stdout, indent=2)
            sys.stdout.write("\n")
            return 0
        width = max(len(n) for n in entries)
        print(f"{'NAME':<{width}}  {'KIND':<8}  {'CONTAINER':<9}  {'ENCODER':<12}  DESCRIPTION")
        for row in entries.values():
            encoder = row["encoder"] or row["audio_encoder"] or "-"
            print(f"{row['name']:<{width}}  {row['kind']:<8}  {row['container'] or '-':<9}  "
                  f"{encoder:<12}  {row['description']}")
        return 0
    entry = entries.get(args.name)
    if entry is None:
        print(f"ffrtmp scenarios: unknown scenario {args.name!r} (known: "
              f"{', '.join(sorted(entries))})", file=sys.stderr)
        return 2
    if args.json:
        json.dump(entry, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{entry['name']} ({entry['kind']}, {entry['source']}): {entry['description']}")
    if entry["kind"] == FFMPEG:
        preset = entry["preset"]
        print(f"  container: {preset['container']} (.{preset['extension']})   "
              f"agents need: {entry['requires']}")
        shown = {k: v for k, v in preset.items()
                 if k not in ("name", "container", "extension") and v not in (None, [])}
        print("  preset:    " + "  ".join(f"{k}={_default(v)}" for k, v in shown.items()))
        print("  input:     testsrc:duration=S[,size=WxH,rate=FPS], a path under the agent's "
              "--input-root, or an http/https/rtmp URL")
        rtmp = " or an rtmp:// URL" if preset["encoder"] == "libx264" else ""
        ends = " or ".join(f".{x}" for x in CONTAINERS.get(preset["container"],
                                                          (preset["extension"],)))
        print(f"  output:    a path under the agent's --output-root ending {ends}{rtmp} "
              f"(default job-ID.{preset['extension']}; templates {{id}}, {{n}})")
    else:
        print(f"  agents need: {entry['requires']}; takes no --input or --output")
    if entry["overrides"]:
        print("  overrides (--set KEY=VALUE):")
        width = max(len(o["name"]) for o in entry["overrides"])
        for o in entry["overrides"]:
            print(f"    {o['name']:<{width}}  {o['text']}; {_bounds(o)}; "
                  f"default {o['default_text']}")
    else:
        print("  overrides: none")
    print(f"  example:   {entry['example']}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `scenarios list|show` (local: no master needed)."""
    p = sub.add_parser("scenarios", help="what each scenario and workload does (no master "
                                         "needed)",
                       description="The scenarios and synthetic workloads a job may name, from "
                                   "the presets the master validates with (docs/SCENARIOS.md).")
    ssub = p.add_subparsers(dest="scenarios_cmd", required=True)
    for name, text in (("list", "one line per scenario: name, kind, container, encoder"),
                       ("show", "what one scenario does, its overrides and their bounds")):
        sp = ssub.add_parser(name, help=text, description=text)
        if name == "show":
            sp.add_argument("name", help="a scenario or workload name (see `scenarios list`)")
        sp.add_argument("--scenarios", metavar="FILE", default=None,
                        help="also an operator's TOML file, as `ffrtmp master --scenarios FILE` "
                             "loads it (docs/SCENARIOS.md)")
        sp.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_scenarios)

