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
OUTPUT_SCHEMES = ("rtmp", "rtmps")
TESTSRC = "testsrc:"
MAX_DIM = (7680, 4320)

# Bounds on what a job may name (UTF-8 bytes), checked at submit and again on the agent: far
# below the kernel's PATH_MAX (4096) / NAME_MAX (255) once joined to an agent's root.
MAX_PATH_BYTES = 1024
MAX_NAME_BYTES = 255
MAX_URL_BYTES = 2048
URL_HOST = re.compile(r"^[a-z0-9._-]+$|^[0-9a-f:.]+(%[a-z0-9._-]+)?$")  # a name or an IPv6 literal

# ---- the preset schema (check_preset): what an agent will put on an ffmpeg command line ------
# Muxer -> the file extensions it may be given.
CONTAINERS: dict[str, tuple[str, ...]] = {
    "mp4": ("mp4", "m4v"), "mov": ("mov",), "ipod": ("m4a",), "webm": ("webm",),
    "matroska": ("mkv", "mka"), "flv": ("flv",), "mpegts": ("ts",), "ogg": ("ogg", "oga", "opus"),
    "adts": ("aac",), "mp3": ("mp3",), "wav": ("wav",), "flac": ("flac",),
}
VIDEO_ENCODERS = frozenset({
    "libx264", "libx265", "libvpx", "libvpx-vp9", "libaom-av1", "libsvtav1", "librav1e",
    "libopenh264", "mpeg4", "h264_nvenc", "hevc_nvenc", "av1_nvenc",
})
AUDIO_ENCODERS = frozenset({
    "aac", "libfdk_aac", "libopus", "libvorbis", "libmp3lame", "flac", "alac", "ac3", "eac3",
    "pcm_s16le",
})
# Encoder/muxer tuning options a preset's extra_args may use, each followed by one value.
EXTRA_OPTIONS = frozenset({
    "-tag:v", "-tag:a", "-x264-params", "-x265-params", "-svtav1-params", "-deadline",
    "-cpu-used", "-row-mt", "-usage", "-tiles", "-tile-columns", "-tile-rows",
    "-frame-parallel", "-lag-in-frames", "-aq-mode", "-speed", "-g", "-keyint_min",
    "-sc_threshold", "-profile:v", "-level", "-level:v", "-tune", "-bf", "-refs", "-maxrate",
    "-bufsize", "-movflags", "-threads", "-ac", "-ar",
})
# A value: letters, digits and + _ . : = , - (not first); never '/', never an option.
EXTRA_VALUE = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.:=,-]{0,127}$")
MAX_EXTRA_ARGS = 32


def parse_bitrate(name: str, text: Any) -> int:
    """'5M', '800k', '128000' -> bits/s; between 8 kbit/s and 200 Mbit/s."""
    m = BITRATE.match(str(text))
    if not m:
        raise ScenarioError(f"{name}: a bitrate such as 800k or 5M, got {text!r}")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
    if not 8e3 <= value <= 2e8:
        raise ScenarioError(f"{name}: must be between 8k and 200M, got {text!r}")
    return int(value)


def fmt_number(x: float) -> str:
    """A bound as people write it: 86400, not 86400.0 or 8.64e+04; 0.04 stays 0.04."""
    if isinstance(x, int) or (math.isfinite(x) and float(x).is_integer()):
        return str(int(x))
    return repr(x)


def _num(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ScenarioError(f"{name}: must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise ScenarioError(f"{name}: must be between {fmt_number(lo)} and {fmt_number(hi)}, "
                            f"got {value!r}")
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


def _utf8(name: str, text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ScenarioError(f"{name}: not valid UTF-8 text") from e


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def check_relative(name: str, path: str) -> None:
    """A path under an agent root: relative, no '..', no empty or control characters, bounded
    (MAX_PATH_BYTES in all, MAX_NAME_BYTES per component, in UTF-8)."""
    if not isinstance(path, str):
        raise ScenarioError(f"{name}: must be a string")
    size = len(_utf8(name, path))
    if size > MAX_PATH_BYTES:
        raise ScenarioError(f"{name}: path too long ({size} bytes in UTF-8; at most "
                            f"{MAX_PATH_BYTES})")
    p = PurePosixPath(path)
    if not path or path.startswith("/") or p.is_absolute():
        raise ScenarioError(f"{name}: must be a relative path under the agent's root, "
                            f"got {_short(path)}")
    if ".." in p.parts or any(ord(c) < 32 or ord(c) == 127 for c in path) \
            or path.startswith("~"):
        raise ScenarioError(f"{name}: must not escape the agent's root ('..'), "
                            f"got {_short(path)}")
    for part in path.split("/"):
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise ScenarioError(f"{name}: path component too long "
                                f"({len(part.encode('utf-8'))} bytes in UTF-8; at most "
                                f"{MAX_NAME_BYTES}): {_short(part, 40)}")


def check_url(name: str, value: str, schemes: tuple[str, ...]) -> str:
    """A URL with one of `schemes`, a host and a valid port, ASCII without spaces or control
    characters, at most MAX_URL_BYTES; returns its scheme."""
    size = len(_utf8(name, value))
    if size > MAX_URL_BYTES:
        raise ScenarioError(f"{name}: URL too long ({size} bytes; at most {MAX_URL_BYTES})")
    if not value.isascii() or any(ord(c) <= 32 or ord(c) == 127 for c in value):
        raise ScenarioError(f"{name}: URL must be ASCII without spaces or control characters "
                            "(percent-encode the path, use the punycode of the host)")
    try:
        parts = urlsplit(value)
        scheme, host, _port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError as e:
        raise ScenarioError(f"{name}: malformed URL ({e}): {_short(value)}") from e
    if scheme not in schemes:
        raise ScenarioError(f"{name}: scheme {scheme!r} not allowed "
                            f"(allowed: {', '.join(schemes)})")
    if not host:
        raise ScenarioError(f"{name}: URL has no host: {_short(value)}")
    if not URL_HOST.match(host):
        raise ScenarioError(f"{name}: bad host in URL: {_short(host)}")
    return scheme


def check_input(value: Any) -> None:
    """Validate a job's input: testsrc, a relative file path, or a URL with an allowed scheme."""
    if not isinstance(value, str) or not value:
        raise ScenarioError("input: required for ffmpeg scenarios (testsrc:duration=S, a "
                            "path under the agent's input root, or an http/https/rtmp URL)")
    if value.startswith(TESTSRC):
        if len(value) > MAX_URL_BYTES:
            raise ScenarioError(f"input: too long ({len(value)} characters)")
        parse_testsrc(value)
        return
    if "://" in value or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", value):
        check_url("input", value, INPUT_SCHEMES)
        return
    check_relative("input", value)


def check_output(value: Any, preset: Preset) -> None:
    """Validate a job's output: a relative path, or an rtmp:// URL for an h264 scenario."""
    if value is None:
        return
    if not isinstance(value, str):
        raise ScenarioError("output: must be a string")
    if value.startswith(("rtmp://", "rtmps://")):
        if preset.encoder != "libx264":
            raise ScenarioError("output: rtmp:// needs an h264 scenario and a host")
        check_url("output", value, OUTPUT_SCHEMES)
        return
    if "://" in value:
        raise ScenarioError(f"output: only relative paths or rtmp:// URLs, got {_short(value)}")
    check_relative("output", value)


def output_extension(value: str | None, preset: Preset) -> str | None:
    """A file output whose extension goes with the preset's container: the preset's extension
    added to a name without one (`clip` -> `clip.mp4`); ScenarioError for a mismatch
    (`.mp4 does not go with webm (use .webm)`). None and rtmp(s):// URLs are returned as is."""
    if value is None or value.startswith(("rtmp://", "rtmps://")):
        return value
    name = value.rsplit("/", 1)[-1]
    if not name:
        raise ScenarioError(f"output: names a directory, not a file: {_short(value)}")
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem.strip("."):  # 'clip', '.hidden': no extension
        return f"{value}.{preset.extension}"
    allowed = CONTAINERS.get(preset.container, (preset.extension,))
    if ext.lower() not in allowed:
        use = " or ".join(f".{e}" for e in allowed)
        shown = "." + (ext if len(ext) <= 20 else ext[:20] + "…")
        raise ScenarioError(f"output: {shown} does not go with {preset.container} (use {use})")
    return value


def _int_field(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(f"{name}: must be a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise ScenarioError(f"{name}: must be between {lo} and {hi}, got {value!r}")
    return value


def _bitrate_field(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ScenarioError(f"{name}: a bitrate such as 800k or 5M, got {value!r}")
    parse_bitrate(name, value)
    return str(value)


def _check_extra_args(name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ScenarioError(f"{name}: must be a list of strings")
    if len(value) > MAX_EXTRA_ARGS:
        raise ScenarioError(f"{name}: at most {MAX_EXTRA_ARGS} items, got {len(value)}")
    if len(value) % 2:
        raise ScenarioError(f"{name}: must be option/value pairs, got an odd count "
                            f"({len(value)})")
    for i in range(0, len(value), 2):
        option, arg = value[i], value[i + 1]
        if option not in EXTRA_OPTIONS:
            raise ScenarioError(f"{name}[{i}]: option {_short(option, 40)} not allowed "
                                f"(allowed: {', '.join(sorted(EXTRA_OPTIONS))})")
        if not EXTRA_VALUE.match(arg):
            raise ScenarioError(f"{name}[{i + 1}]: bad value {_short(arg, 40)} for {option} "
                                "(letters, digits and + _ . : = , -; no '/', not starting "
                                "with '-'; at most 128 characters)")
    return tuple(value)


def check_preset(raw: Any, where: str = "preset") -> Preset:
    """The one schema of a preset, used by the master (operator scenarios, every stored preset)
    and by the agent (a JOB's `spec.preset`): every field typed and bounded, encoders and
    muxers from allowlists, extra_args only allowlisted (option, value) pairs.

    Raises ScenarioError naming the field (`{where}.{field}: …`)."""
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: must be a map, got {type(raw).__name__}")
    fields = Preset.__dataclass_fields__
    for key in raw:
        if key not in fields:
            raise ScenarioError(f"{where}.{key}: unknown field")
    for key in ("name", "container", "extension"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ScenarioError(f"{where}.{key}: required, a string")
    name = raw["name"]
    if len(name) > 64 or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ScenarioError(f"{where}.name: at most 64 characters, no control characters")
    container, extension = raw["container"], raw["extension"]
    if container not in CONTAINERS:
        raise ScenarioError(f"{where}.container: {_short(container, 40)} not allowed "
                            f"(allowed: {', '.join(sorted(CONTAINERS))})")
    if extension not in CONTAINERS[container]:
        raise ScenarioError(f"{where}.extension: {_short(extension, 40)} does not go with "
                            f"{container} (allowed: {', '.join(CONTAINERS[container])})")
    encoder = raw.get("encoder")
    if encoder is not None and encoder not in VIDEO_ENCODERS:
        raise ScenarioError(f"{where}.encoder: {_short(str(encoder), 40)} not allowed "
                            f"(allowed: {', '.join(sorted(VIDEO_ENCODERS))})")
    audio = raw.get("audio_encoder", fields["audio_encoder"].default)
    if audio is not None and audio not in AUDIO_ENCODERS:
        raise ScenarioError(f"{where}.audio_encoder: {_short(str(audio), 40)} not allowed "
                            f"(allowed: {', '.join(sorted(AUDIO_ENCODERS))})")
    if encoder is None and audio is None:
        raise ScenarioError(f"{where}.encoder: a video or an audio encoder is required")
    width, height = raw.get("width"), raw.get("height")
    if (width is None) != (height is None):
        raise ScenarioError(f"{where}.{'height' if height is None else 'width'}: width and "
                            "height go together")
    video_only = ("width", "height", "fps", "bitrate", "crf", "preset")
    if encoder is None:
        for key in video_only:
            if raw.get(key) is not None:
                raise ScenarioError(f"{where}.{key}: only for a video encoder")
    if width is not None:
        _int_field(f"{where}.width", width, 16, MAX_DIM[0])
        _int_field(f"{where}.height", height, 16, MAX_DIM[1])
    fps = raw.get("fps")
    if fps is not None:
        fps = _num(f"{where}.fps", fps, 1, 240)
    crf = raw.get("crf")
    if crf is not None:
        hi = CRF_MAX.get(encoder or "", -1)
        if hi < 0:
            raise ScenarioError(f"{where}.crf: {encoder} has no crf")
        crf = _int_field(f"{where}.crf", crf, 0, hi)
    preset = raw.get("preset")
    if preset is not None:
        allowed = PRESETS_BY_ENCODER.get(encoder or "", ())
        if preset not in allowed:
            raise ScenarioError(f"{where}.preset: must be one of {', '.join(allowed) or 'none'}"
                                f" for {encoder}")
    return Preset(
        name=name, container=container, extension=extension, encoder=encoder,
        width=width, height=height, fps=fps,
        bitrate=_bitrate_field(f"{where}.bitrate", raw.get("bitrate")), crf=crf,
        preset=preset, audio_encoder=audio,
        audio_bitrate=_bitrate_field(f"{where}.audio_bitrate",
                                     raw.get("audio_bitrate", fields["audio_bitrate"].default)),
        extra_args=_check_extra_args(f"{where}.extra_args", raw.get("extra_args")),
    )


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
    for name, table in (data.get("scenarios") or {}).items():
        if not isinstance(table, dict):
            raise ScenarioError(f"{path}: scenarios.{name} must be a table")
        if "name" in table:
            raise ScenarioError(f"{path}: scenarios.{name}.name: unknown field (the table's "
                                "name is the scenario's)")
        out[name] = check_preset({**table, "name": name}, where=f"{path}: scenarios.{name}")
    return out
