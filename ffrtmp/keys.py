"""`ffrtmp keys generate DIR`: CURVE keys for the master, its agents and its clients."""

from __future__ import annotations

import argparse
from pathlib import Path

from bus.security import generate


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the keys subcommand."""
    p = sub.add_parser("keys", help="generate CURVE keys")
    ksub = p.add_subparsers(dest="keys_cmd", required=True)
    g = ksub.add_parser("generate", help="master keypair plus agent and client keypairs")
    g.add_argument("dir", type=Path)
    g.add_argument("--agent", action="append", default=None, metavar="NAME",
                   help="an agent keypair to make (repeatable; default: one named 'agent')")
    g.add_argument("--client", action="append", default=None, metavar="NAME",
                   help="a client keypair to make (repeatable; default: one named 'client')")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate the keys and say where each one goes."""
    made = generate(args.dir, args.agent or ["agent"], args.client or ["client"])
    for path in made:
        print(path)
    print(f"master: ffrtmp master --keys {args.dir}\n"
          f"agents: ffrtmp agent --key {args.dir}/private/<name>.key_secret "
          f"--master-key {args.dir}/master.key\n"
          f"clients: ffrtmp --client-key {args.dir}/private/<name>.key_secret "
          f"--master-key {args.dir}/master.key jobs list")
    return 0
