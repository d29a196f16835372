"""What this host is, discovered once in `main` and passed in (never probed by the core or loop).

`discover()` finds ffmpeg and its encoders, picks the cgroup backend and reads the CPUs and
memory admission may use. Tests build a `Host` by hand.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import psutil

from agent.cgroups import CgroupBackend, NoCgroups, detect
from agent.config import AgentConfig
from agent.ffmpeg.discovery import NoFFmpeg, find_ffmpeg, list_encoders

log = logging.getLogger("ffrtmp.agent")


@dataclass
class Host:
    """The agent's host: ffmpeg, encoders, cgroups and capacity."""

    cpus: float
    memory_mb: float
    ffmpeg: str | None = None
    encoders: list[str] = field(default_factory=list)
    cgroups: CgroupBackend = field(default_factory=lambda: NoCgroups("not configured"))


def discover(cfg: AgentConfig) -> Host:
    """Probe this host once; NoFFmpeg for a bad --ffmpeg, CgroupError for a bad --cgroup."""
    ffmpeg: str | None = None
    encoders: list[str] = []
    try:
        ffmpeg = find_ffmpeg(cfg.ffmpeg)
        encoders = list_encoders(ffmpeg)
    except NoFFmpeg as e:
        if cfg.ffmpeg:
            raise
        log.warning("%s: this agent runs synthetic workloads only", e)
    cgroups = detect(cfg.cgroup, cfg.name, cfg.cgroup_parent)
    return Host(cpus=float(len(os.sched_getaffinity(0))),
                memory_mb=psutil.virtual_memory().total / 2**20,
                ffmpeg=ffmpeg, encoders=encoders, cgroups=cgroups)
