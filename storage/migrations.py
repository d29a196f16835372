"""Schema versioning: an ordered list of migration steps, each run once, in its own transaction."""

from __future__ import annotations

from collections.abc import Callable

import peewee

from storage.errors import StorageError, one_line
from storage.models import Models

Step = Callable[[peewee.Database, Models], None]


def _v1_initial(db: peewee.Database, models: Models) -> None:
    """Create jobs, job_events, agents (and their indexes) if missing."""
    db.create_tables([models.Job, models.JobEvent, models.Agent], safe=True)


def _v2_agents_last_seen(db: peewee.Database, models: Models) -> None:
    """Index agents by last_seen, for the expiry scan (IF NOT EXISTS: new files have it)."""
    models.Agent._schema.create_indexes(safe=True)


def _v3_leader(db: peewee.Database, models: Models) -> None:
    """The leader row (the leading master and its epoch, master/leader.py; epoch 0 at first)
    and its lease row."""
    db.create_tables([models.Leader, models.Lease], safe=True)
    models.Leader.insert(id=1, epoch=0).on_conflict_ignore().execute()
    models.Lease.insert(id=1, epoch=0).on_conflict_ignore().execute()


# Append (version, step) pairs; never edit a released step. A fresh database runs every step
# after _v1_initial has created tables from today's models, so later steps must tolerate their
# change being present already (e.g. add a column only if it is missing).
STEPS: list[tuple[int, Step]] = [
    (1, _v1_initial),
    (2, _v2_agents_last_seen),
    (3, _v3_leader),
]
SCHEMA_VERSION = STEPS[-1][0]


def current_version(db: peewee.Database, models: Models) -> int:
    """Return the schema_version recorded in meta (0 for a fresh database)."""
    row = models.Meta.get_or_none(models.Meta.key == "schema_version")
    if row is None:
        return 0
    try:
        return int(row.value)
    except ValueError as e:
        raise StorageError(f"meta.schema_version is not an integer: {row.value!r}") from e


def _record(models: Models, version: int) -> None:
    meta = models.Meta
    (meta.insert(key="schema_version", value=str(version))
     .on_conflict(conflict_target=[meta.key], update={meta.value: str(version)})
     .execute())


def migrate(db: peewee.Database, models: Models) -> int:
    """Bring the schema up to SCHEMA_VERSION and return it; StorageError if the db is newer."""
    try:
        db.create_tables([models.Meta], safe=True)
        found = current_version(db, models)
        if found > SCHEMA_VERSION:
            raise StorageError(
                f"database schema version {found} is newer than this ffrtmp supports "
                f"({SCHEMA_VERSION}); upgrade ffrtmp"
            )
        for version, step in STEPS:
            if version > found:
                with db.atomic():
                    step(db, models)
                    _record(models, version)
    except peewee.PeeweeException as e:
        raise StorageError(f"schema migration failed: {one_line(e)}") from e
    return SCHEMA_VERSION
