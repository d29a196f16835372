"""Job spec + resolved preset -> the ffmpeg argv (a list, never a shell string).

Everything a JOB carries is validated again here, as if the master were hostile: the preset
through the one schema (`bus.scenarios.check_preset`), inputs and outputs confined to the
agent's roots (every bad path is `InvalidInput`, never an OSError), URL destinations through the
network policy (`agent.ffmpeg.netpolicy`), and ffmpeg itself restricted to a fixed allowlist of
media demuxers and of protocols. See docs/INPUTS.md.

`build_plan` never runs ffmpeg (the duration probe runs in the hook, as a child); it may resolve
host names (bounded), so the agent calls it off its event loop.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.ffmpeg.netpolicy import DEFAULT_POLICY, Destination, DestinationRefused, NetPolicy
from agent.ffmpeg.publish import OutputExists, owner_of
from bus.scenarios import (
    MAX_NAME_BYTES,
    TESTSRC,
    Preset,
    ScenarioError,
    check_input,
    check_output,
    check_preset,
    parse_testsrc,
)

DURATION = re.compile(rb"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
PATH_MAX = 4096  # Linux, bytes including the NUL

# The only demuxers ffmpeg may use on a job's input (`-format_whitelist`): self-contained media
# containers. Not hls/dash/concat/playlists (they open other files or URLs), not tty and the
# subtitle/text demuxers (they would render a text file into the video), not image2 and the
# image demuxers (sequences, patterns), not lavfi/devices.
MEDIA_DEMUXERS = ("mov", "matroska", "mpegts", "flv", "live_flv", "avi", "wav", "mp3", "aac",
                  "flac", "ogg")
FORMAT_WHITELIST = ",".join(MEDIA_DEMUXERS)
# Local inputs refused before ffmpeg runs, by extension: playlists, text, subtitles.
TEXT_EXTENSIONS = frozenset({
    "m3u8", "m3u", "pls", "xspf", "asx", "mpd", "ism", "ffconcat", "concat", "sdp", "txt",
    "ans", "asc", "diz", "nfo", "ice", "srt", "ass", "ssa", "vtt", "sub", "smi", "sami", "lrc",
    "stl", "scc", "ttml", "dfxp", "xml", "json", "html", "htm", "ffmeta", "cue",
})
SNIFF_BYTES = 4096


class InvalidInput(Exception):
    """The job's input or output cannot be used on this agent (reason `invalid_input`)."""


@dataclass(frozen=True)
class Plan:
    """What to run and where the result goes."""

    argv: list[str]
    duration_s: float | None  # expected output duration known now (testsrc, -t); else None
    tmp_output: Path | None  # where ffmpeg writes a file output (inside the work dir)
    final_output: Path | None  # where a completed file output is moved (atomically)
    live: bool  # rtmp push
    probe_argv: list[str] | None = None  # run by the hook as a child: the input's duration
    overwrite: bool = False  # the spec's: may the move replace a file that is not the job's
    job_id: int | None = None  # recorded on the published file (agent.ffmpeg.publish)
    local_input: str | None = None  # a local input's path as given to ffmpeg (else None)


def parse_duration(stderr: bytes) -> float | None:
    """The container duration in `ffmpeg -i`'s report, if any."""
    m = DURATION.search(stderr)
    if not m:
        return None
    h, mi, s = m.groups()
    return int(h) * 3600 + int(mi) * 60 + float(s)


# ---- paths ------------------------------------------------------------------------------------

def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _os_reason(e: BaseException) -> str:
    """A precise, short reason for an OS error on a path."""
    code = getattr(e, "errno", None)
    reasons = {
        errno.ENAMETOOLONG: "name too long",
        errno.ELOOP: "symlink loop (too many levels of symbolic links)",
        errno.ENOENT: "does not exist",
        errno.ENOTDIR: "a component of the path is not a directory",
        errno.EACCES: "permission denied (not accessible to the agent)",
        errno.EPERM: "permission denied (not accessible to the agent)",
    }
    if code in reasons:
        return reasons[code]
    if isinstance(e, RuntimeError) and "loop" in str(e).lower():
        return "symlink loop"
    if isinstance(e, UnicodeError):
        return "not valid UTF-8"
    return f"cannot use it ({type(e).__name__}: {getattr(e, 'strerror', None) or e})"


def _check_lengths(what: str, rel: str, path: Path) -> None:
    for part in rel.split("/"):
        size = len(part.encode("utf-8", "surrogateescape"))
        if size > MAX_NAME_BYTES:
            raise InvalidInput(f"{what} {_short(rel)}: name too long (a component is {size} "
                               f"bytes; at most {MAX_NAME_BYTES})")
    total = len(os.fsencode(path))
    if total >= PATH_MAX:
        raise InvalidInput(f"{what} {_short(rel)}: path too long ({total} bytes once under the "
                           f"agent's root; at most {PATH_MAX - 1})")


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
             (stat.S_ISFIFO, "a fifo"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    for test, name in kinds:
        if test(mode):
            return name
    return "not a regular file"


def _real_root(root: Path) -> Path:
    return Path(os.path.realpath(os.fspath(root)))


def _inside(base: Path, path: Path) -> bool:
    return path != base and base in path.parents


def _looks_like_text(data: bytes) -> bool:
    """True for bytes no media container starts with: text (UTF-8, no control bytes but
    whitespace and ESC) - playlists, concat lists, subtitles, ANSI art."""
    if b"\x00" in data:
        return False
    if any(b < 32 and b not in b"\t\n\r\f\v\x1b" or b == 127 for b in data):
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(data) - 3  # only a character cut at the end of the sample
    return True


def input_path(root: Path, rel: str) -> Path:
    """The resolved path of a job's local input: a readable regular media file inside root.

    Raises InvalidInput (never anything else) saying precisely what is wrong.
    """
    try:
        return _input_path(root, rel)
    except InvalidInput:
        raise
    except Exception as e:  # anything the OS or pathlib can throw at us
        raise InvalidInput(f"input {_short(rel)}: {_os_reason(e)}") from e


def _input_path(root: Path, rel: str) -> Path:
    what = "input"
    try:
        base = _real_root(root)
        st = os.stat(base)
    except OSError as e:
        raise InvalidInput(f"the agent's input root {root}: {_os_reason(e)}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidInput(f"the agent's input root {root} is not a directory")
    _check_lengths(what, rel, base / rel)
    path = Path(os.path.realpath(os.fspath(base / rel)))
    if not _inside(base, path):
        raise InvalidInput(f"{what} {_short(rel)} resolves outside the agent's input root "
                           f"{base}")
    try:
        st = os.stat(path)
    except OSError as e:
        raise InvalidInput(f"{what} {_short(rel)}: {_os_reason(e)}") from e
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput(f"{what} {_short(rel)} is {_kind(st.st_mode)}, not a regular file")
    suffix = path.suffix.lower().lstrip(".")
    if suffix in TEXT_EXTENSIONS:
        raise InvalidInput(f"{what} {_short(rel)}: .{suffix} files (playlists, text, subtitles) "
                           "are not media inputs")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InvalidInput(f"{what} {_short(rel)}: cannot be read: {_os_reason(e)}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the stat
            raise InvalidInput(f"{what} {_short(rel)} is not a regular file")
        head = os.read(fd, SNIFF_BYTES)
    except OSError as e:
        raise InvalidInput(f"{what} {_short(rel)}: cannot be read: {_os_reason(e)}") from e
    finally:
        os.close(fd)
    if not head:
        raise InvalidInput(f"{what} {_short(rel)} is empty")
    if _looks_like_text(head):
        raise InvalidInput(f"{what} {_short(rel)} is text (a playlist, list or subtitle?), "
                           "not a media file")
    return path


def output_path(root: Path, rel: str) -> Path:
    """The resolved path a job's file output is published at: inside root, its directory
    existing or creatable. Raises InvalidInput (never anything else)."""
    try:
        return _output_path(root, rel)
    except InvalidInput:
        raise
    except Exception as e:
        raise InvalidInput(f"output {_short(rel)}: {_os_reason(e)}") from e


def _output_path(root: Path, rel: str) -> Path:
    what = "output"
    base = _real_root(root)
    _check_lengths(what, rel, base / rel)
    path = Path(os.path.realpath(os.fspath(base / rel)))
    if not _inside(base, path):
        raise InvalidInput(f"{what} {_short(rel)} resolves outside the agent's output root "
                           f"{base}")
    _check_lengths(what, rel, path)
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        if e.errno != errno.ENOTDIR:
            raise InvalidInput(f"{what} {_short(rel)}: {_os_reason(e)}") from e
        st = None  # reported below, for the directory
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise InvalidInput(f"{what} {_short(rel)} exists and is {_kind(st.st_mode)}")
    # The deepest existing ancestor must be a writable directory: the rest is created.
    parent = path.parent
    while True:
        try:
            pst = os.stat(parent)
            break
        except FileNotFoundError:
            if parent == parent.parent:
                raise InvalidInput(f"{what} {_short(rel)}: no existing directory") from None
            parent = parent.parent
        except OSError as e:
            raise InvalidInput(f"{what} {_short(rel)}: cannot create its directory: "
                               f"{_os_reason(e)}") from e
    if not stat.S_ISDIR(pst.st_mode):
        raise InvalidInput(f"{what} {_short(rel)}: cannot create its directory: {parent} is "
                           f"{_kind(pst.st_mode)}")
    if not os.access(parent, os.W_OK | os.X_OK,
                     effective_ids=os.access in os.supports_effective_ids):
        raise InvalidInput(f"{what} {_short(rel)}: cannot create it: {parent} is not writable "
                           "by the agent")
    return path


# ---- the plan ---------------------------------------------------------------------------------

def build_plan(spec: dict[str, Any], ffmpeg: str, input_root: Path, output_root: Path,
               workdir: Path, job_id: int, *, allow_url: NetPolicy | None = None) -> Plan:
    """The argv and output paths for one ffmpeg job; raises InvalidInput (and nothing else)
    for an unusable spec. `allow_url`: where URL inputs and rtmp outputs may connect (default:
    public addresses only)."""
    try:
        return _build_plan(spec, ffmpeg, input_root, output_root, workdir, job_id,
                           allow_url or DEFAULT_POLICY)
    except (InvalidInput, OutputExists):
        raise
    except Exception as e:  # a spec shape nobody foresaw: refused, never an agent crash
        raise InvalidInput(f"bad spec: {type(e).__name__}: {e}") from e


def _destination(policy: NetPolicy, url: str, what: str) -> Destination:
    try:
        return policy.check_url(url, what)
    except DestinationRefused as e:
        raise InvalidInput(str(e)) from e


def _build_plan(spec: dict[str, Any], ffmpeg: str, input_root: Path, output_root: Path,
                workdir: Path, job_id: int, policy: NetPolicy) -> Plan:
    if not isinstance(spec, dict):
        raise InvalidInput("bad spec: not a map")
    try:
        preset = check_preset(spec.get("preset"))
        check_input(spec.get("input"))
        check_output(spec.get("output"), preset)
    except ScenarioError as e:
        raise InvalidInput(f"bad spec: {e}") from e
    params = spec.get("params") or {}
    if not isinstance(params, dict):
        raise InvalidInput("bad spec: params: must be a map")
    overwrite = spec.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise InvalidInput("bad spec: overwrite: must be true or false")
    source: str = spec["input"]
    output: str | None = spec.get("output")
    live = bool(output and output.startswith(("rtmp://", "rtmps://")))
    out_dest = _destination(policy, output, "output") if live and output else None
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error",
            "-progress", "pipe:1", "-y"]
    duration: float | None
    probe: list[str] | None = None
    local: str | None = None
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
        dest = _destination(policy, source, "input")
        argv += ["-protocol_whitelist", dest.protocols, "-format_whitelist", FORMAT_WHITELIST,
                 *dest.args] + (["-re"] if live else []) + ["-i", dest.url]
        vmap, amap = "0:v:0?", "0:a:0?"
    else:
        path = input_path(input_root, source)
        duration = None
        local = str(path)
        whitelists = ["-protocol_whitelist", "file", "-format_whitelist", FORMAT_WHITELIST]
        probe = [ffmpeg, "-hide_banner", "-nostdin", *whitelists, "-i", local]
        argv += whitelists + (["-re"] if live else []) + ["-i", local]
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
    if out_dest is not None:
        return Plan(argv + [*out_dest.args, "-f", "flv", out_dest.url], duration, None, None,
                    True, probe, overwrite, job_id, local)
    rel = output or f"job-{job_id}.{preset.extension}"
    final = output_path(output_root, rel)
    if not overwrite:
        refuse_existing(final, rel, job_id)
    tmp = workdir / f"output.{preset.extension}"
    return Plan(argv + ["-f", preset.container, str(tmp)], duration, tmp, final, False, probe,
                overwrite, job_id, local)


def refuse_existing(final: Path, rel: str, job_id: int) -> None:
    """OutputExists if a file is at the output path and an earlier attempt of this job did not
    write it (`overwrite: false`: checked before ffmpeg runs, and again when moving)."""
    try:
        exists = os.path.lexists(final)
    except OSError as e:  # pragma: no cover - lexists does not raise on Linux
        raise InvalidInput(f"output {_short(rel)}: {_os_reason(e)}") from e
    if not exists:
        return
    owner = owner_of(final)
    if owner == job_id:
        return  # an earlier attempt of this job published it: it may be replaced
    by = f" (written by job {owner})" if owner is not None else ""
    raise OutputExists(f"output {_short(rel)} exists{by}: not replaced, the spec has "
                       "overwrite: false (set overwrite: true to replace it)")


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
