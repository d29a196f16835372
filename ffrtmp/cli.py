"""The `ffrtmp` entry point: parse, dispatch to the package that owns the subcommand.

Every subcommand's module is imported to build the grammar, so each keeps its heavy imports
(the master, the store, the agent, Textual, the bench) inside the function that runs it: a
client command such as `ffrtmp jobs list` loads only the bus client (tests/test_cli_start.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import zmq

from agent import cli as agent_cli
from bench import cli as bench_cli
from bus.client import Client
from bus.errors import ClientError
from bus.security import KeyMaterialError, load_peer
from bus.sockets import DEFAULT_CLIENTS, EndpointError, endpoint
from ffrtmp import client_cli, demo, keys, logs, scenarios_cli
from master import cli as master_cli
from storage import cli as db_cli
from storage.errors import StorageError
from tui import cli as tui_cli

ENVIRONMENT = """\
environment:
  FFRTMP_MASTER       client endpoint(s) of the master(s), comma-separated (--master)
  FFRTMP_EVENTS       events endpoint(s), comma-separated (--events-ep); default: the one the
                      master announces
  FFRTMP_CLIENT_KEY   CURVE secret key file of this client (--client-key)
  FFRTMP_MASTER_KEY   the master's public key file (--master-key)
  FFRTMP_DB           database URL (master, db)
  FFRTMP_LOG          log level (--log-level); FFRTMP_LOG_FORMAT: text or json (--log-format)

Endpoints are tcp://HOST:PORT or HOST:PORT. Client options go before the subcommand:
  ffrtmp --master master-host:5556 jobs list
Several masters on one PostgreSQL database (one leader, standbys): list them all; the client
follows the leader, and resends a request that is safe to repeat when one does not answer:
  ffrtmp --master host-a:5556,host-b:5556 submit noop --wait
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless the help already says it or there is
    none worth saying (None, False: an unset option or flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default in (None, False, argparse.SUPPRESS) or "default" in text.lower()
                or not action.option_strings or isinstance(default, list | dict)):
            return text
        return f"{text} (default: %(default)s)"


def _formatted(parser: argparse.ArgumentParser) -> None:
    """Give every parser of the tree the HelpFormatter (other packages build their own)."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _formatted(child)


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar."""
    parser = argparse.ArgumentParser(prog="ffrtmp", description="distributed FFmpeg jobs",
                                     epilog=ENVIRONMENT)
    parser.add_argument("--master", dest="master_ep", default=None, metavar="ENDPOINT[,...]",
                        help="client endpoint of the master; several masters (a leader and "
                             "standbys) comma-separated: requests follow the leader (default: "
                             f"FFRTMP_MASTER or {DEFAULT_CLIENTS})")
    parser.add_argument("--events-ep", default=None, metavar="ENDPOINT[,...]",
                        help="events endpoint, or several comma-separated, all subscribed "
                             "(default: FFRTMP_EVENTS, else the one the master announces, on "
                             "the host of --master)")
    parser.add_argument("--timeout", dest="request_timeout", type=float, default=10.0,
                        metavar="S", help="seconds to wait for each reply from the master")
    parser.add_argument("--client-key", default=os.environ.get("FFRTMP_CLIENT_KEY"),
                        metavar="FILE", help="CURVE secret key of this client "
                                             "(FFRTMP_CLIENT_KEY)")
    parser.add_argument("--master-key", dest="master_public_key", metavar="FILE",
                        default=os.environ.get("FFRTMP_MASTER_KEY"),
                        help="the master's public key file (FFRTMP_MASTER_KEY)")
    parser.add_argument("--log-level", default=os.environ.get("FFRTMP_LOG", "info"),
                        metavar="LEVEL",
                        help="debug, info, warning or error (FFRTMP_LOG)")
    parser.add_argument("--log-format", choices=logs.FORMATS,
                        default=os.environ.get("FFRTMP_LOG_FORMAT", "text"),
                        help="text, or json: one object per line (FFRTMP_LOG_FORMAT)")
    parser.add_argument("--log-file", default=None, metavar="PATH",
                        help="append logs here instead of stderr (reopened after logrotate)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    master_cli.add_parser(sub)
    agent_cli.add_parser(sub)
    client_cli.add_parsers(sub)
    scenarios_cli.add_parser(sub)
    demo.add_parser(sub)
    bench_cli.add_parser(sub)
    keys.add_parser(sub)
    db_cli.add_parser(sub)
    tui_cli.add_parser(sub)
    _formatted(parser)
    return parser


def endpoints(text: str, flag: str) -> list[str]:
    """The endpoints of a comma-separated list, each checked as `endpoint` checks one (the
    error names `flag`), each once, in order."""
    return list(dict.fromkeys(endpoint(item, flag) for item in text.split(",")))


def _run_client(args: argparse.Namespace) -> Any:
    target = endpoints(args.master_ep or os.environ.get("FFRTMP_MASTER") or DEFAULT_CLIENTS,
                       "FFRTMP_MASTER" if not args.master_ep and os.environ.get("FFRTMP_MASTER")
                       else "--master")
    events = args.events_ep or os.environ.get("FFRTMP_EVENTS")
    if events:  # several: one comma-separated str (bus.client.Subscriber connects to each)
        args.events = ",".join(endpoints(events, "--events-ep" if args.events_ep
                                         else "FFRTMP_EVENTS"))
    peer = None
    if args.client_key or args.master_public_key:
        if not (args.client_key and args.master_public_key):
            raise SystemExit("ffrtmp: --client-key and --master-key go together")
        peer = load_peer(args.client_key, args.master_public_key)
    with Client(target, timeout=args.request_timeout, keys=peer) as client:
        return args.func(args, client)


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
            return int(_run_client(args))
        return int(args.func(args))
    except ClientError as e:
        print(f"ffrtmp: {e.code}: {e.text}", file=sys.stderr)
        return 2
    except (EndpointError, client_cli.UsageError) as e:
        print(f"ffrtmp: {e}" if isinstance(e, EndpointError) else str(e), file=sys.stderr)
        return 2
    except zmq.ZMQError as e:  # a client's socket refused what it was given: one line
        if not getattr(args, "client", False):
            raise
        print(f"ffrtmp: zmq: {e}", file=sys.stderr)
        return 2
    except KeyMaterialError as e:
        print(f"ffrtmp: keys: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        print(f"ffrtmp: database: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ffrtmp jobs list | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
