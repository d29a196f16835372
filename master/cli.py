"""`ffrtmp master`: parse options, build the config, run the loop.

Only what the parser needs is imported with this module (it is part of every `ffrtmp`
command's grammar); the master itself, its store and scenarios when it runs.
"""

from __future__ import annotations

import argparse
import logging
import os

from bus.sockets import DEFAULT_AGENTS, DEFAULT_CLIENTS, DEFAULT_EVENTS

log = logging.getLogger("ffrtmp.master")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the master subcommand."""
    p = sub.add_parser("master", help="run the master (queue, scheduler, bus endpoints)")
    p.add_argument("--db", default=None, help="database URL (default: FFRTMP_DB or SQLite in "
                                              "the user data dir)")
    p.add_argument("--agents", default=DEFAULT_AGENTS, help="endpoint agents connect to")
    p.add_argument("--clients", default=DEFAULT_CLIENTS, help="endpoint clients connect to")
    p.add_argument("--events", default=DEFAULT_EVENTS, help="PUB endpoint for events")
    p.add_argument("--advertise", default=None, metavar="HOST",
                   help="with standbys: the host agents and clients reach this master at, named "
                        "in place of a wildcard bind host (default: this host's name)")
    p.add_argument("--metrics", default="127.0.0.1:9470",
                   help="HOST:PORT for /metrics, or 'off'")
    p.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval, s")
    p.add_argument("--liveness", type=int, default=3, help="missed heartbeats before dead")
    p.add_argument("--assign-timeout", type=float, default=60.0,
                   help="requeue (not charged) an attempt its agent has neither started, "
                        "finished nor refused this long after its JOB, s")
    p.add_argument("--aging", type=float, default=60.0,
                   help="seconds of waiting that lift a job one priority level")
    p.add_argument("--recovery-grace", type=float, default=None,
                   help="after a restart, how long agents get to reclaim running jobs, s")
    p.add_argument("--retry-base", type=float, default=1.0, help="first retry backoff, s")
    p.add_argument("--scenarios", default=None,
                   help="TOML file of extra scenarios ([scenarios.NAME] tables)")
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="CURVE key directory from `ffrtmp keys generate` (encrypt and "
                        "authenticate agents and clients)")
    p.add_argument("--timeout-margin", type=float, default=20.0,
                   help="backstop: CANCEL a job this long past its timeout_s, end it as "
                        "timed_out one margin later, s")
    p.add_argument("--insecure", action="store_true",
                   help="allow binding non-loopback addresses without CURVE")
    p.add_argument("--sla-done-s", type=float, default=600.0,
                   help="SLA: a job should complete this long after its submission, s")
    p.add_argument("--sla-wait-s", type=float, default=30.0,
                   help="SLA: a job should wait in the queue at most this long, s")
    p.add_argument("--sla-target", type=float, default=0.95,
                   help="SLA: fraction of jobs that should meet it (alerted on below)")
    p.add_argument("--retention-days", type=float, default=7.0,
                   help="delete terminal jobs finished longer ago than this (0: keep all)")
    p.add_argument("--agent-retention", type=float, default=86400.0,
                   help="forget lost or left agents this long after they were last seen, s "
                        "(0: keep them)")
    p.add_argument("--retention-interval", type=float, default=60.0,
                   help="how often retention looks for old jobs, s")
    p.add_argument("--maintenance-interval", type=float, default=3600.0,
                   help="online database upkeep (optimize / ANALYZE) every this many s (0: off)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the master until SIGTERM/SIGINT."""
    from bus.scenarios import ScenarioError
    from bus.security import KeyMaterialError
    from bus.sockets import BindError
    from master.config import MasterConfig
    from master.leader import LeaderConflict
    from master.scenarios import load_presets, make_checks
    from master.server import Master
    from master.sla import SlaPolicy
    from storage import default_db_url

    cfg = MasterConfig(
        db_url=args.db or os.environ.get("FFRTMP_DB") or default_db_url(),
        agents=args.agents, clients=args.clients, events=args.events, advertise=args.advertise,
        metrics=None if args.metrics in ("off", "", "none") else args.metrics,
        insecure=args.insecure, keys_dir=args.keys, heartbeat_s=args.heartbeat,
        liveness=args.liveness, assign_timeout_s=args.assign_timeout,
        aging_s=args.aging, recovery_grace_s=args.recovery_grace, retry_base_s=args.retry_base,
        timeout_margin_s=args.timeout_margin,
        sla_done_s=args.sla_done_s, sla_wait_s=args.sla_wait_s, sla_target=args.sla_target,
        retention_days=args.retention_days, retention_interval_s=args.retention_interval,
        agent_retention_s=args.agent_retention,
        maintenance_interval_s=args.maintenance_interval,
    )
    try:
        SlaPolicy(cfg.sla_done_s, cfg.sla_wait_s, cfg.sla_target)
    except ValueError as e:
        raise SystemExit(f"ffrtmp master: {e}") from e
    if cfg.retention_days < 0 or cfg.retention_interval_s <= 0:
        raise SystemExit("ffrtmp master: --retention-days >= 0 and --retention-interval > 0")
    try:
        scenarios = make_checks(load_presets(args.scenarios))
    except ScenarioError as e:
        raise SystemExit(f"ffrtmp master: {e}") from e
    try:
        master = Master(cfg, scenarios=scenarios)
        master.bind()
    except (BindError, KeyMaterialError, LeaderConflict) as e:
        raise SystemExit(f"ffrtmp master: {e}") from e
    master.install_signals()
    master.run()
    return 0
