"""The `ffrtmp` entry point: parse, dispatch to the package that owns the subcommand."""

from __future__ import annotations

import argparse
import os
import sys

from agent import cli as agent_cli
from bench import cli as bench_cli
from bus.client import Client
from bus.errors import ClientError
from bus.security import KeyMaterialError, load_peer
from bus.sockets import DEFAULT_CLIENTS, DEFAULT_EVENTS, EndpointError, endpoint
from ffrtmp import client_cli, demo, keys, logs
from master import cli as master_cli
from storage import StorageError
from storage import cli as db_cli
from tui import cli as tui_cli


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar."""
    parser = argparse.ArgumentParser(prog="ffrtmp", description="distributed FFmpeg jobs")
    parser.add_argument("--master", dest="master_ep", default=None,
                        help="client endpoint of the master (default: FFRTMP_MASTER or "
                             f"{DEFAULT_CLIENTS})")
    parser.add_argument("--events-ep", default=None, help=f"events endpoint ({DEFAULT_EVENTS})")
    parser.add_argument("--timeout", dest="request_timeout", type=float, default=10.0,
                        help="seconds to wait for each reply from the master")
    parser.add_argument("--client-key", default=os.environ.get("FFRTMP_CLIENT_KEY"),
                        metavar="FILE", help="CURVE secret key of this client "
                                             "(FFRTMP_CLIENT_KEY)")
    parser.add_argument("--master-key", dest="master_public_key", metavar="FILE",
                        default=os.environ.get("FFRTMP_MASTER_KEY"),
                        help="the master's public key file (FFRTMP_MASTER_KEY)")
    parser.add_argument("--log-level", default=os.environ.get("FFRTMP_LOG", "info"))
    parser.add_argument("--log-format", choices=logs.FORMATS,
                        default=os.environ.get("FFRTMP_LOG_FORMAT", "text"),
                        help="text, or json: one object per line (FFRTMP_LOG_FORMAT)")
    parser.add_argument("--log-file", default=None, metavar="PATH",
                        help="append logs here instead of stderr (reopened after logrotate)")
    sub = parser.add_subparsers(dest="command", required=True)
    master_cli.add_parser(sub)
    agent_cli.add_parser(sub)
    client_cli.add_parsers(sub)
    demo.add_parser(sub)
    bench_cli.add_parser(sub)
    keys.add_parser(sub)
    db_cli.add_parser(sub)
    tui_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a one-line error on stderr and a non-zero status on failure."""
    args = build_parser().parse_args(argv)
    try:
        logs.setup(args.log_level, args.log_format, args.log_file)
    except (ValueError, OSError) as e:
        print(f"ffrtmp: logging: {e}", file=sys.stderr)
        return 2
    try:
        if getattr(args, "client", False):
            target = endpoint(args.master_ep or os.environ.get("FFRTMP_MASTER")
                              or DEFAULT_CLIENTS, "--master")
            if args.events_ep:
                args.events = endpoint(args.events_ep, "--events-ep")
            peer = None
            if args.client_key or args.master_public_key:
                if not (args.client_key and args.master_public_key):
                    raise SystemExit("ffrtmp: --client-key and --master-key go together")
                peer = load_peer(args.client_key, args.master_public_key)
            with Client(target, timeout=args.request_timeout, keys=peer) as client:
                return int(args.func(args, client))
        return int(args.func(args))
    except ClientError as e:
        print(f"ffrtmp: {e.code}: {e.text}", file=sys.stderr)
        return 2
    except EndpointError as e:
        print(f"ffrtmp: {e}", file=sys.stderr)
        return 2
    except KeyMaterialError as e:
        print(f"ffrtmp: keys: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        print(f"ffrtmp: database: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
