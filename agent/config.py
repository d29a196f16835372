"""The agent's configuration, built once in main and passed down."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.admission import Reservation
from bus.security import PeerKeys
from bus.sockets import DEFAULT_AGENTS


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs; times in seconds."""

    work_dir: Path
    master: str = DEFAULT_AGENTS  # the first of `masters` (set from it when that is given)
    masters: tuple[str, ...] = ()  # every master endpoint, in order (failover); default (master,)
    name: str = socket.gethostname()
    slots: int = 4
    metrics: str | None = "127.0.0.1:9471"
    metrics_tries: int = 1  # the default port: try this many ports upward while taken
    heartbeat_s: float = 1.0  # until the master's WELCOME says otherwise
    liveness: int = 3
    default_timeout_s: float | None = None
    progress_interval_s: float = 0.5
    reconnect_max_s: float = 5.0
    ffmpeg: str | None = None  # explicit binary; else PATH, else the imageio-ffmpeg wheel's
    input_root: Path = Path(".")
    output_root: Path = Path(".")
    stall_s: float = 300.0
    # Resource enforcement (docs/RESOURCE_LIMITS.md).
    cgroup: str = "auto"  # auto | v2 | v1 | none
    cgroup_parent: str | None = None  # default: ffrtmp-<name> under the agent's own cgroup
    limits: str = "required"  # required | best-effort
    kill_grace_s: float = 5.0  # SIGTERM -> SIGKILL for timeouts and disk/stall stops
    disk_floor_mb: float = 1024.0  # no work while the work dir's free space is under this
    pids_max: int | None = 4096  # per job cgroup (threads count); None: unlimited
    default_reservation: Reservation = Reservation(10.0, 64.0, 0.0)  # a job without limits
    typical_reservation: Reservation | None = None  # must fit to grant a credit (default: above)
    keys: PeerKeys | None = None  # CURVE keys (bus/security.py); None: plain TCP
    bandwidth_mbps: float | None = None  # link capacity for utilisation metrics; None: NIC speed
    allow_url: Any = None  # NetPolicy: URL destinations allowed beyond public ones (INPUTS.md)
    insecure: bool = False  # allow a keyless connection to a non-loopback master
    job_nice: int = 10  # workloads run this much nicer than the agent (its heartbeat comes first)
    stop_grace_s: float = 30.0  # SIGTERM: running jobs may finish this long, then are handed back
    ack_wait_s: float = 2.0  # at stop: how long to wait for the master to acknowledge results

    def __post_init__(self) -> None:
        # One truth for callers of either field: `masters` wins, `master` is its first.
        if self.masters:
            object.__setattr__(self, "masters", tuple(self.masters))
            object.__setattr__(self, "master", self.masters[0])
        else:
            object.__setattr__(self, "masters", (self.master,))

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Every master endpoint this agent may connect to, in order (never empty)."""
        return self.masters
