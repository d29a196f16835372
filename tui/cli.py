"""`ffrtmp dash`: register the subcommand; Textual (and textual-serve) are imported only when it
runs."""

from __future__ import annotations

import argparse
import sys

from bus.client import Client

# The dashboard's requests time out sooner than the CLI's: it must notice a master that is down
# (within 2 s on screen) and it asks again every second anyway.
FEED_TIMEOUT_S = 1.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the dash subcommand."""
    p = sub.add_parser(
        "dash", help="live dashboard of queue, agents and jobs (in the terminal or a browser)",
        epilog="--serve runs a web server: every browser tab that opens the page gets its own\n"
               "dashboard process, keys included (cancel, retry, drain). The page has no\n"
               "authentication: CURVE keys protect the bus, not this page. Keep it on loopback\n"
               "and put an authenticating reverse proxy in front to share it (docs/OPERATIONS.md).")
    p.add_argument("--serve", metavar="HOST:PORT", default=None,
                   help="serve the dashboard as a web page on HOST:PORT instead of drawing it "
                        "here (textual-serve); loopback unless --insecure")
    p.add_argument("--insecure", action="store_true",
                   help="with --serve: allow a non-loopback HOST (the page is unauthenticated)")
    p.add_argument("--public-url", default=None, metavar="URL",
                   help="with --serve: the URL browsers reach the page at, when it is not "
                        "http://HOST:PORT (behind a reverse proxy: the proxy's URL)")
    p.set_defaults(func=run, client=True, events=None)


def run(args: argparse.Namespace, client: Client) -> int:
    """Run the dashboard against the master, or serve it with --serve."""
    if args.serve is not None:
        from tui.serve import serve

        return serve(args)
    if args.insecure or args.public_url:
        print("ffrtmp dash: --insecure and --public-url go with --serve", file=sys.stderr)
        return 2
    from tui.app import run as run_app

    def make_client() -> Client:  # one per thread: ZeroMQ sockets are not shared
        return Client(client.endpoints, timeout=min(client.timeout, FEED_TIMEOUT_S),
                      keys=client.keys)

    return run_app(make_client, args.events, ",".join(client.endpoints))
