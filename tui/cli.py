"""`ffrtmp dash`: register the subcommand; Textual is imported only when it runs."""

from __future__ import annotations

import argparse

from bus.client import Client
from bus.sockets import DEFAULT_EVENTS


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the dash subcommand."""
    p = sub.add_parser("dash", help="live dashboard of queue, agents and jobs")
    p.set_defaults(func=run, client=True, events=DEFAULT_EVENTS)


def run(args: argparse.Namespace, client: Client) -> int:
    """Run the dashboard against the master."""
    from tui.app import run as run_app

    return run_app(client, args.events)
