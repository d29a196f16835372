"""Find an ffmpeg binary and the encoders it has."""

from __future__ import annotations

import shutil
import subprocess


class NoFFmpeg(Exception):
    """No usable ffmpeg binary."""


def find_ffmpeg(explicit: str | None = None) -> str:
    """--ffmpeg PATH, else `ffmpeg` on PATH, else the binary shipped in the imageio-ffmpeg wheel."""
    if explicit:
        path = shutil.which(explicit)
        if path is None:
            raise NoFFmpeg(f"--ffmpeg {explicit}: not an executable")
        return path
    path = shutil.which("ffmpeg")
    if path:
        return path
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except Exception as e:  # ImportError, or RuntimeError when the wheel has no binary
        raise NoFFmpeg(f"no ffmpeg on PATH and imageio-ffmpeg has none: {e}") from e


def list_encoders(ffmpeg: str, timeout: float = 20.0) -> list[str]:
    """The encoder names `ffmpeg -encoders` lists (empty if it cannot be run)."""
    try:
        out = subprocess.run([ffmpeg, "-hide_banner", "-encoders"], capture_output=True,
                             timeout=timeout, check=False).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.TimeoutExpired):
        return []
    names = []
    started = False
    for line in out.splitlines():
        if line.strip().startswith("------"):
            started = True
            continue
        parts = line.split()
        if started and len(parts) >= 2 and len(parts[0]) == 6:
            names.append(parts[1])
    return sorted(set(names))
