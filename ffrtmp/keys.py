"""`ffrtmp keys generate DIR`: CURVE keys for the master, its agents, clients and operators."""

from __future__ import annotations

import argparse
from pathlib import Path

from bus.security import generate
from bus.vocab import ROLE_COMMANDS, ROLE_OPERATE, ROLE_SUBMIT


def _commands(role: str) -> str:
    return ", ".join(sorted(ROLE_COMMANDS[role]))


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the keys subcommand."""
    p = sub.add_parser("keys", help="generate CURVE keys")
    ksub = p.add_subparsers(dest="keys_cmd", required=True)
    g = ksub.add_parser(
        "generate", help="master keypair (kept if present) plus agent, client and operator keys",
        description="Names must be unique across kinds. With no names at all on a new DIR: one "
                    "agent named 'agent' and one client named 'client'.")
    g.add_argument("dir", type=Path, help="the key directory (made if missing)")
    # Dests are plural on purpose: `args.client` is how `ffrtmp` spots a bus-client command.
    g.add_argument("--agent", dest="agents", action="append", default=None, metavar="NAME",
                   help="an agent keypair (repeatable); the agent must run as --name NAME")
    g.add_argument("--client", dest="clients", action="append", default=None, metavar="NAME",
                   help=f"a client keypair with role {ROLE_SUBMIT!r} (repeatable): "
                        f"{_commands(ROLE_SUBMIT)} and events")
    g.add_argument("--operator", dest="operators", action="append", default=None,
                   metavar="NAME", help=f"a client keypair with role {ROLE_OPERATE!r} "
                                        f"(repeatable): {_commands(ROLE_OPERATE)} and events")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate the keys and say where each one goes."""
    agents, clients, operators = args.agents or [], args.clients or [], args.operators or []
    if not (agents or clients or operators) and not (args.dir / "master.key_secret").exists():
        agents, clients = ["agent"], ["client"]
    made = generate(args.dir, agents, clients, operators=operators)
    for path in made:
        print(path)
    print(f"master: ffrtmp master --keys {args.dir}\n"
          f"agents: ffrtmp agent --name <name> --key {args.dir}/private/<name>.key_secret "
          f"--master-key {args.dir}/master.key\n"
          f"clients and operators: ffrtmp --client-key {args.dir}/private/<name>.key_secret "
          f"--master-key {args.dir}/master.key jobs list")
    return 0
