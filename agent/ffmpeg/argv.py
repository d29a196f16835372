"""Job spec + resolved preset -> the ffmpeg argv (a list, never a shell string)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bus.scenarios import TESTSRC, Preset, ScenarioError, check_input, check_output, parse_testsrc

URL_WHITELIST = "http,https,tcp,tls,crypto,rtmp,rtmps"
DURATION = re.compile(rb"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")


class InvalidInput(Exception):
    """The job's input or output cannot be used on this agent (reason `invalid_input`)."""


@dataclass(frozen=True)
class Plan:
    """What to run and where the result goes."""

    argv: list[str]
    duration_s: float | None  # expected output duration, for percent; None if unknown
    tmp_output: Path | None  # where ffmpeg writes a file output (inside the work dir)
    final_output: Path | None  # where a completed file output is moved (atomically)
    live: bool  # rtmp push


def _inside(root: Path, rel: str) -> Path:
    """root/rel, resolved (symlinks too) and still inside root."""
    root = root.resolve()
    path = (root / rel).resolve()
    if path != root and root not in path.parents:
        raise InvalidInput(f"{rel!r} resolves outside the agent's root {root}")
    return path


def probe_duration(ffmpeg: str, path: Path, timeout: float = 20.0) -> float | None:
    """The container duration ffmpeg reports for a local file, if any."""
    try:
        err = subprocess.run([ffmpeg, "-hide_banner", "-nostdin", "-protocol_whitelist", "file",
                              "-i", str(path)], capture_output=True, timeout=timeout,
                             check=False).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = DURATION.search(err)
    if not m:
        return None
    h, mi, s = m.groups()
    return int(h) * 3600 + int(mi) * 60 + float(s)


def build_plan(spec: dict[str, Any], ffmpeg: str, input_root: Path, output_root: Path,
               workdir: Path, job_id: int) -> Plan:
    """The argv and output paths for one ffmpeg job; raises InvalidInput for unusable specs."""
    try:
        raw = dict(spec["preset"])
        raw["extra_args"] = tuple(raw.get("extra_args") or ())
        preset = Preset(**raw)
        check_input(spec.get("input"))
        check_output(spec.get("output"), preset)
    except (KeyError, TypeError, ScenarioError) as e:
        raise InvalidInput(f"bad spec: {e}") from e
    params = spec.get("params") or {}
    source: str = spec["input"]
    output: str | None = spec.get("output")
    live = bool(output and output.startswith(("rtmp://", "rtmps://")))
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error",
            "-progress", "pipe:1", "-y"]
    duration: float | None
    if source.startswith(TESTSRC):
        src = parse_testsrc(source)
        duration = src["duration"]
        if live:
            argv.append("-re")
        argv += ["-f", "lavfi", "-i",
                 f"testsrc2=size={src['width']}x{src['height']}:rate={src['rate']}"
                 f":duration={duration}",
                 "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={duration}"]
        vmap, amap = "0:v", "1:a"
    elif "://" in source:
        duration = None
        argv += ["-protocol_whitelist", URL_WHITELIST] + (["-re"] if live else []) + ["-i", source]
        vmap, amap = "0:v:0?", "0:a:0?"
    else:
        path = _inside(input_root, source)
        if not path.is_file():
            raise InvalidInput(f"input {source!r} not found under {input_root}")
        duration = probe_duration(ffmpeg, path)
        argv += ["-protocol_whitelist", "file"] + (["-re"] if live else []) + ["-i", str(path)]
        vmap, amap = "0:v:0?", "0:a:0?"
    if preset.encoder is not None:
        argv += ["-map", vmap]
    if preset.audio_encoder is not None:
        argv += ["-map", amap]
    if "duration" in params:
        try:
            cut = float(params["duration"])
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"params.duration: not a number: {params['duration']!r}") from e
        if not 0 < cut < float("inf"):
            raise InvalidInput(f"params.duration: must be positive, got {cut!r}")
        argv += ["-t", f"{cut:g}"]
        duration = min(duration, cut) if duration else cut
    argv += _video_args(preset) + _audio_args(preset) + list(preset.extra_args)
    if live:
        return Plan(argv + ["-f", "flv", output or ""], duration, None, None, True)
    final = _inside(output_root, output or f"job-{job_id}.{preset.extension}")
    tmp = workdir / f"output.{preset.extension}"
    return Plan(argv + ["-f", preset.container, str(tmp)], duration, tmp, final, False)


def _video_args(p: Preset) -> list[str]:
    if p.encoder is None:
        return ["-vn"]
    args = ["-c:v", p.encoder, "-pix_fmt", "yuv420p"]
    if p.width and p.height:
        args += ["-vf", f"scale={p.width}:{p.height}"]
    if p.fps:
        args += ["-r", f"{p.fps:g}"]
    if p.bitrate:
        args += ["-b:v", p.bitrate]
    elif p.crf is not None:
        args += ["-crf", str(p.crf)]
        if p.encoder in ("libvpx-vp9", "libaom-av1"):
            args += ["-b:v", "0"]
    if p.preset:
        args += ["-preset", p.preset]
    return args


def _audio_args(p: Preset) -> list[str]:
    if p.audio_encoder is None:
        return ["-an"]
    args = ["-c:a", p.audio_encoder]
    if p.audio_bitrate:
        args += ["-b:a", p.audio_bitrate]
    return args
