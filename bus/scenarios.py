"""FFmpeg scenarios: presets, operator additions from TOML, and validation of a job's use of them.

The master resolves a job's scenario at submit and stores the resolved preset in the spec
(`spec["preset"]`), so an agent builds its argv from the job alone and can never disagree with
the master about what a scenario means.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


class ScenarioError(ValueError):
    """An invalid scenario definition or use; the message names the field."""


@dataclass(frozen=True)
class Preset:
    """What a scenario encodes to."""

    name: str
    container: str  # ffmpeg muxer: mp4, webm, matroska, ipod (m4a), flv
    extension: str
    encoder: str | None = None  # video encoder; None for audio-only
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    bitrate: str | None = None
    crf: int | None = None
    preset: str | None = None
    audio_encoder: str | None = "aac"
    audio_bitrate: str | None = "128k"
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def requires(self) -> str:
        """The capability an agent must advertise to run this scenario."""
        return f"encoder:{self.encoder or self.audio_encoder}"

    def to_wire(self) -> dict[str, Any]:
        """The preset as a msgpack-able map (stored in the spec)."""
        d = asdict(self)
        d["extra_args"] = list(self.extra_args)
        return d


BUILTIN: dict[str, Preset] = {p.name: p for p in (
    Preset("720p-h264", "mp4", "mp4", "libx264", 1280, 720, 30, "3M", None, "veryfast"),
    Preset("1080p-h264", "mp4", "mp4", "libx264", 1920, 1080, 30, "5M", None, "veryfast"),
    Preset("1080p-h265", "mp4", "mp4", "libx265", 1920, 1080, 30, None, 28, "ultrafast",
           extra_args=("-tag:v", "hvc1", "-x265-params", "log-level=error")),
    Preset("1080p-vp9", "webm", "webm", "libvpx-vp9", 1920, 1080, 30, "4M", None, None,
           audio_encoder="libopus", audio_bitrate="128k",
           extra_args=("-deadline", "realtime", "-cpu-used", "8", "-row-mt", "1")),
    Preset("480p-av1", "mp4", "mp4", "libaom-av1", 854, 480, 30, None, 35, None,
           extra_args=("-cpu-used", "8", "-row-mt", "1", "-usage", "realtime")),
    Preset("audio-aac", "ipod", "m4a", None, None, None, None, None, None, None,
           audio_encoder="aac", audio_bitrate="128k"),
)}

PRESETS_BY_ENCODER = {
    "libx264": ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"),
    "libx265": ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"),
}
CRF_MAX = {"libx264": 51, "libx265": 51, "libvpx-vp9": 63, "libaom-av1": 63, "libsvtav1": 63}
BITRATE = re.compile(r"^(\d+(?:\.\d+)?)([kKmM]?)$")
INPUT_SCHEMES = ("http", "https", "rtmp")
TESTSRC = "testsrc:"
MAX_DIM = (7680, 4320)


def parse_bitrate(name: str, text: Any) -> int:
    """'5M', '800k', '128000' -> bits/s; between 8 kbit/s and 200 Mbit/s."""
    m = BITRATE.match(str(text))
    if not m:
        raise ScenarioError(f"{name}: a bitrate such as 800k or 5M, got {text!r}")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
    if not 8e3 <= value <= 2e8:
        raise ScenarioError(f"{name}: must be between 8k and 200M, got {text!r}")
    return int(value)


def _num(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ScenarioError(f"{name}: must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise ScenarioError(f"{name}: must be between {lo:g} and {hi:g}, got {value!r}")
    return float(value)


def parse_testsrc(text: str) -> dict[str, Any]:
    """'testsrc:duration=10,size=1280x720,rate=30' -> {duration, width, height, rate}."""
    out: dict[str, Any] = {"duration": None, "width": 1280, "height": 720, "rate": 30.0}
    for item in filter(None, text[len(TESTSRC):].split(",")):
        key, sep, value = item.partition("=")
        try:
            if key == "duration" and sep:
                out["duration"] = _num("input.duration", float(value), 0.04, 86_400)
            elif key == "size" and sep:
                w, _, h = value.partition("x")
                out["width"], out["height"] = int(w), int(h)
                if not (16 <= out["width"] <= MAX_DIM[0] and 16 <= out["height"] <= MAX_DIM[1]):
                    raise ScenarioError(f"input.size: 16x16 to 7680x4320, got {value!r}")
            elif key == "rate" and sep:
                out["rate"] = _num("input.rate", float(value), 1, 240)
            else:
                raise ScenarioError(f"input: unknown testsrc option {item!r} "
                                    "(duration=S, size=WxH, rate=FPS)")
        except ValueError as e:
            if isinstance(e, ScenarioError):
                raise
            raise ScenarioError(f"input: bad testsrc option {item!r}") from e
    if out["duration"] is None:
        raise ScenarioError("input: testsrc needs duration=SECONDS")
    return out


def check_relative(name: str, path: str) -> None:
    """A path under an agent root: relative, no '..', no empty or control characters."""
    p = PurePosixPath(path)
    if not path or path.startswith("/") or p.is_absolute():
        raise ScenarioError(f"{name}: must be a relative path under the agent's root, "
                            f"got {path!r}")
    if ".." in p.parts or any(ord(c) < 32 for c in path) or path.startswith("~"):
        raise ScenarioError(f"{name}: must not escape the agent's root ('..'), got {path!r}")


def check_input(value: Any) -> None:
    """Validate a job's input: testsrc, a relative file path, or a URL with an allowed scheme."""
    if not isinstance(value, str) or not value:
        raise ScenarioError("input: required for ffmpeg scenarios (testsrc:duration=S, a "
                            "path under the agent's input root, or an http/https/rtmp URL)")
    if value.startswith(TESTSRC):
        parse_testsrc(value)
        return
    if "://" in value or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", value):
        scheme = urlsplit(value).scheme.lower()
        if scheme not in INPUT_SCHEMES:
            raise ScenarioError(f"input: scheme {scheme!r} not allowed "
                                f"(allowed: {', '.join(INPUT_SCHEMES)})")
        if not urlsplit(value).hostname:
            raise ScenarioError(f"input: URL has no host: {value!r}")
        return
    check_relative("input", value)


def check_output(value: Any, preset: Preset) -> None:
    """Validate a job's output: a relative path, or an rtmp:// URL for an h264 scenario."""
    if value is None:
        return
    if not isinstance(value, str):
        raise ScenarioError("output: must be a string")
    if value.startswith(("rtmp://", "rtmps://")):
        if preset.encoder != "libx264" or not urlsplit(value).hostname:
            raise ScenarioError("output: rtmp:// needs an h264 scenario and a host")
        return
    if "://" in value:
        raise ScenarioError(f"output: only relative paths or rtmp:// URLs, got {value!r}")
    check_relative("output", value)


def apply_overrides(preset: Preset, params: dict[str, Any]) -> Preset:
    """The preset with a job's overrides applied; raises ScenarioError naming the parameter."""
    changes: dict[str, Any] = {}
    for key, value in params.items():
        name = f"params.{key}"
        if key == "bitrate":
            parse_bitrate(name, value)
            changes["bitrate"], changes["crf"] = str(value), None
        elif key == "audio_bitrate":
            parse_bitrate(name, value)
            changes["audio_bitrate"] = str(value)
        elif key == "crf":
            hi = CRF_MAX.get(preset.encoder or "", -1)
            if hi < 0:
                raise ScenarioError(f"{name}: {preset.name} has no crf")
            changes["crf"], changes["bitrate"] = int(_num(name, value, 0, hi)), None
        elif key == "preset":
            allowed = PRESETS_BY_ENCODER.get(preset.encoder or "", ())
            if value not in allowed:
                raise ScenarioError(f"{name}: must be one of {', '.join(allowed) or 'none'} "
                                    f"for {preset.name}")
            changes["preset"] = value
        elif key == "fps":
            if preset.encoder is None:
                raise ScenarioError(f"{name}: {preset.name} has no video")
            changes["fps"] = _num(name, value, 1, 120)
        elif key == "duration":
            _num(name, value, 0.04, 86_400)
        else:
            raise ScenarioError(f"{name}: unknown override (bitrate, audio_bitrate, crf, "
                                "preset, fps, duration)")
    return replace(preset, **changes)


def load_toml(path: str) -> dict[str, Preset]:
    """Operator scenarios from a TOML file: [scenarios.NAME] tables of Preset fields."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ScenarioError(f"{path}: {e}") from e
    out: dict[str, Preset] = {}
    fields = set(Preset.__dataclass_fields__) - {"name"}
    for name, table in (data.get("scenarios") or {}).items():
        if not isinstance(table, dict):
            raise ScenarioError(f"{path}: scenarios.{name} must be a table")
        unknown = set(table) - fields
        if unknown:
            raise ScenarioError(f"{path}: scenarios.{name}.{sorted(unknown)[0]}: unknown field")
        try:
            preset = Preset(name=name, **{**table,
                                          "extra_args": tuple(table.get("extra_args", ()))})
        except TypeError as e:
            raise ScenarioError(f"{path}: scenarios.{name}: {e}") from e
        if preset.bitrate is not None:
            parse_bitrate(f"scenarios.{name}.bitrate", preset.bitrate)
        out[name] = preset
    return out
