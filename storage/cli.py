"""`ffrtmp db migrate|cleanup|vacuum`: database upkeep by hand (parse, call storage, print)."""

from __future__ import annotations

import argparse
import os

from storage.db import default_db_url

# peewee (storage.repository and the rest) is imported by the actions, not with the grammar.


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the db subcommand and its actions."""
    p = sub.add_parser("db", help="database upkeep: migrate, cleanup, vacuum")
    actions = p.add_subparsers(dest="db_command", required=True)

    def action(name: str, text: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=text, description=text)
        a.add_argument("--db", default=None,
                       help="database URL (default: FFRTMP_DB or SQLite in the user data dir)")
        return a

    action("migrate", "bring the schema up to date (the master also does this at start)") \
        .set_defaults(func=cmd_migrate)
    c = action("cleanup", "delete terminal jobs (and their events) older than N days")
    c.add_argument("--older-than", type=float, default=7.0, metavar="DAYS",
                   help="age of finished jobs to delete, days (default 7)")
    c.add_argument("--batch", type=int, default=1000, help="jobs per transaction")
    c.add_argument("--dry-run", action="store_true", help="only count what would go")
    c.set_defaults(func=cmd_cleanup)
    action("vacuum", "reclaim space: SQLite VACUUM (blocks writers while it runs; switches the "
                     "file to incremental auto-vacuum), PostgreSQL VACUUM (ANALYZE)") \
        .set_defaults(func=cmd_vacuum)


def _url(args: argparse.Namespace) -> str:
    return args.db or os.environ.get("FFRTMP_DB") or default_db_url()


def cmd_migrate(args: argparse.Namespace) -> int:
    """Open (and so migrate) the database; print its schema version."""
    from storage.migrations import SCHEMA_VERSION
    from storage.repository import Store

    with Store(_url(args)) as store:
        print(f"{store.url}: schema version {SCHEMA_VERSION}")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Delete old terminal jobs in batches; print how many."""
    from storage.maintenance import cleanup
    from storage.repository import Store

    if args.older_than < 0 or args.batch < 1:
        raise SystemExit("ffrtmp db cleanup: --older-than >= 0 and --batch >= 1")
    with Store(_url(args)) as store:
        res = cleanup(store, args.older_than, args.batch, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {res.deleted} terminal jobs finished over {args.older_than:g} days ago")
    return 0


def cmd_vacuum(args: argparse.Namespace) -> int:
    """Full vacuum; print the size before and after."""
    from storage.maintenance import auto_vacuum, size_bytes, vacuum
    from storage.repository import Store

    with Store(_url(args)) as store:
        before = size_bytes(store)
        vacuum(store)
        after = size_bytes(store)
        mode = auto_vacuum(store)
    note = f", auto_vacuum {mode}" if mode is not None else ""
    print(f"vacuumed {store.url}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB{note}")
    return 0
