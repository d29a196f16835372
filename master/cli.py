"""`ffrtmp master`: parse options, build the config, run the loop."""

from __future__ import annotations

import argparse
import logging
import os

from bus.sockets import DEFAULT_AGENTS, DEFAULT_CLIENTS, DEFAULT_EVENTS
from master.config import MasterConfig
from bus.scenarios import ScenarioError
from bus.security import KeyMaterialError
from bus.sockets import BindError
from master.scenarios import load_presets, make_checks
from master.server import Master
from storage import default_db_url

log = logging.getLogger("ffrtmp.master")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the master subcommand."""
    p = sub.add_parser("master", help="run the master (queue, scheduler, bus endpoints)")
    p.add_argument("--db", default=None, help="database URL (default: FFRTMP_DB or SQLite in "
                                              "the user data dir)")
    p.add_argument("--agents", default=DEFAULT_AGENTS, help="endpoint agents connect to")
    p.add_argument("--clients", default=DEFAULT_CLIENTS, help="endpoint clients connect to")
    p.add_argument("--events", default=DEFAULT_EVENTS, help="PUB endpoint for events")
    p.add_argument("--metrics", default="127.0.0.1:9470",
                   help="HOST:PORT for /metrics, or 'off'")
    p.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval, s")
    p.add_argument("--liveness", type=int, default=3, help="missed heartbeats before dead")
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
    p.add_argument("--insecure", action="store_true",
                   help="allow binding non-loopback addresses without CURVE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the master until SIGTERM/SIGINT."""
    cfg = MasterConfig(
        db_url=args.db or os.environ.get("FFRTMP_DB") or default_db_url(),
        agents=args.agents, clients=args.clients, events=args.events,
        metrics=None if args.metrics in ("off", "", "none") else args.metrics,
        insecure=args.insecure, keys_dir=args.keys, heartbeat_s=args.heartbeat,
        liveness=args.liveness,
        aging_s=args.aging, recovery_grace_s=args.recovery_grace, retry_base_s=args.retry_base,
    )
    try:
        scenarios = make_checks(load_presets(args.scenarios))
    except ScenarioError as e:
        raise SystemExit(f"ffrtmp master: {e}") from e
    try:
        master = Master(cfg, scenarios=scenarios)
        master.bind()
    except (BindError, KeyMaterialError) as e:
        raise SystemExit(f"ffrtmp master: {e}") from e
    master.install_signals()
    master.run()
    return 0
