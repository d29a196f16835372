"""The agent's configuration, built once in main and passed down."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from bus.security import PeerKeys
from bus.sockets import DEFAULT_AGENTS


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs; times in seconds."""

    work_dir: Path
    master: str = DEFAULT_AGENTS
    name: str = socket.gethostname()
    slots: int = 4
    metrics: str | None = "127.0.0.1:9471"
    heartbeat_s: float = 1.0  # until the master's WELCOME says otherwise
    liveness: int = 3
    default_timeout_s: float | None = None
    progress_interval_s: float = 0.5
    reconnect_max_s: float = 5.0
    ffmpeg: str | None = None  # explicit binary; else PATH, else the imageio-ffmpeg wheel's
    input_root: Path = Path(".")
    output_root: Path = Path(".")
    stall_s: float = 300.0
    keys: PeerKeys | None = None  # CURVE keys (bus/security.py); None: plain TCP
