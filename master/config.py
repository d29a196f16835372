"""The master's configuration, built once in main and passed down (never read from env here)."""

from __future__ import annotations

from dataclasses import dataclass

from bus.sockets import DEFAULT_AGENTS, DEFAULT_CLIENTS, DEFAULT_EVENTS


@dataclass(frozen=True)
class MasterConfig:
    """Everything the master needs; times in seconds."""

    db_url: str
    agents: str = DEFAULT_AGENTS
    clients: str = DEFAULT_CLIENTS
    events: str = DEFAULT_EVENTS
    metrics: str | None = "127.0.0.1:9470"  # HOST:PORT, or None for no HTTP endpoint
    # The host others reach this master at, in place of a wildcard bind host (*, 0.0.0.0, ::)
    # in the endpoints standbys name in not_leader; None: this host's name.
    advertise: str | None = None
    insecure: bool = False
    keys_dir: str | None = None  # CURVE key directory (bus/security.py); None: no encryption
    heartbeat_s: float = 1.0
    liveness: int = 3
    aging_s: float = 60.0
    recovery_grace_s: float | None = None  # default: 2 x heartbeat x liveness
    timeout_margin_s: float = 20.0  # backstop: CANCEL a job this long past its timeout_s
    assign_timeout_s: float = 60.0  # an assignment neither started, finished nor refused by then
    retry_base_s: float = 1.0
    retry_cap_s: float = 60.0
    progress_flush_s: float = 1.0
    stats_interval_s: float = 1.0
    max_messages_per_turn: int = 5000  # agent messages read per loop turn at most
    # Fairness and bounded cost per client (docs/protocol.md "Limits and backpressure").
    client_turn_messages: int = 256  # client requests served per turn at most, all clients
    client_turn_s: float = 0.02  # and at most this much time per turn on them
    client_messages_per_turn: int = 64  # one client's share of a turn; beyond: ERROR busy
    client_reply_hwm: int = 64  # replies queued for one client; beyond: dropped and counted
    events_hwm: int = 2000  # events queued for one subscriber; beyond: dropped by ZeroMQ
    agent_retention_s: float = 86400.0  # lost/left agent records are forgotten after this
    sla_done_s: float = 600.0  # SLA: submission to completion
    sla_wait_s: float = 30.0  # SLA: submission to first assignment
    sla_target: float = 0.95  # SLA: fraction of judged jobs that should meet it
    retention_days: float = 7.0  # terminal jobs older than this are deleted; 0 keeps them
    retention_interval_s: float = 60.0
    retention_batch: int = 1000  # deletions per turn at most
    maintenance_interval_s: float = 3600.0  # online database upkeep; 0 never

    @property
    def dead_after_s(self) -> float:
        """Silence after which a peer is dead."""
        return self.heartbeat_s * self.liveness

    @property
    def grace_s(self) -> float:
        """How long after a restart the master waits for agents to reclaim their jobs."""
        if self.recovery_grace_s is not None:
            return self.recovery_grace_s
        return 2 * self.dead_after_s
