"""Peewee models, built per Database instance, plus the column facts the bulk writers use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import peewee

from bus.vocab import NODE_LEFT, NODE_LOST, TERMINAL

# Kept for importers of the old name; the vocabulary itself lives in bus.vocab.
TERMINAL_STATES = TERMINAL
# Agent record states that may expire (Store.expired_agents, WriteBatch.forget_agent).
AGENT_GONE: tuple[str, ...] = (NODE_LOST, NODE_LEFT)

# jobs columns in table order, with their PostgreSQL types (for casts in VALUES lists).
JOB_PG_TYPES: dict[str, str] = {
    "id": "bigint",
    "scenario": "text",
    "spec": "text",
    "state": "text",
    "priority": "smallint",
    "attempt": "integer",
    "max_attempts": "integer",
    "rejects": "integer",
    "agent": "text",
    "progress": "double precision",
    "bytes_in": "bigint",
    "bytes_out": "bigint",
    "exit_code": "integer",
    "reason": "text",
    "created_at": "double precision",
    "started_at": "double precision",
    "finished_at": "double precision",
    "not_before": "double precision",
    "timeout_s": "double precision",
    "output": "text",
    "idem_key": "text",
    "updated_at": "double precision",
    "extra": "text",
}
JOB_COLUMNS: tuple[str, ...] = tuple(JOB_PG_TYPES)
JOB_REQUIRED = frozenset({"id", "scenario", "spec", "state", "priority", "created_at"})
# Every other column: its default when an insert omits it.
JOB_DEFAULTS: dict[str, Any] = {
    c: 0 for c in ("attempt", "rejects", "progress", "bytes_in", "bytes_out")
} | {"max_attempts": 3}
JOB_JSON = frozenset({"spec", "extra"})

# `id` is the event's sequence number (docs/protocol.md "Events"), allocated by the master (the
# single writer) in commit order, so it is given explicitly, never by the database.
EVENT_COLUMNS: tuple[str, ...] = (
    "id", "job_id", "at", "from_state", "to_state", "reason", "agent", "attempt",
)
EVENT_REQUIRED = frozenset({"id", "job_id", "at", "to_state"})
EVENT_DEFAULTS: dict[str, Any] = {"attempt": 0}

AGENT_COLUMNS: tuple[str, ...] = ("name", "state", "slots", "info", "first_seen", "last_seen")
AGENT_REQUIRED = frozenset({"state", "slots", "last_seen"})
AGENT_JSON = frozenset({"info"})


def _default(value: int | float) -> list[peewee.Node]:
    """DDL default too, so rows written by hand (psql, sqlite3) get the same values."""
    return [peewee.SQL(f"DEFAULT {value}")]


@dataclass(frozen=True)
class Models:
    """The model classes bound to one Database."""

    # Any: the classes are built at runtime, so their fields are unknown to a type checker.
    db: peewee.Database
    Job: Any
    JobEvent: Any
    Agent: Any
    Meta: Any
    Leader: Any
    Lease: Any

    @property
    def all(self) -> list[Any]:
        """All models, in creation order."""
        return [self.Meta, self.Job, self.JobEvent, self.Agent, self.Leader, self.Lease]


def make_models(db: peewee.Database, strict: bool = False) -> Models:
    """Build fresh Job, JobEvent, Agent, Meta and Leader model classes bound to db; strict asks for
    STRICT tables (storage.backends says which backends have them)."""

    class Base(peewee.Model):
        class Meta:
            database = db
            legacy_table_names = False
            strict_tables = strict

    class Job(Base):
        # The master allocates ids (single writer), so the database never assigns one.
        id = peewee.BigIntegerField(primary_key=True)
        scenario = peewee.TextField()
        spec = peewee.TextField()
        state = peewee.TextField()
        priority = peewee.SmallIntegerField()
        attempt = peewee.IntegerField(default=0, constraints=_default(0))
        max_attempts = peewee.IntegerField(default=3, constraints=_default(3))
        rejects = peewee.IntegerField(default=0, constraints=_default(0))
        agent = peewee.TextField(null=True)
        # DOUBLE, not PostgreSQL's 4-byte REAL, so a stored progress reads back unchanged.
        progress = peewee.DoubleField(default=0, constraints=_default(0))
        bytes_in = peewee.BigIntegerField(default=0, constraints=_default(0))
        bytes_out = peewee.BigIntegerField(default=0, constraints=_default(0))
        exit_code = peewee.IntegerField(null=True)
        reason = peewee.TextField(null=True)
        created_at = peewee.DoubleField()
        started_at = peewee.DoubleField(null=True)
        finished_at = peewee.DoubleField(null=True)
        not_before = peewee.DoubleField(null=True)
        timeout_s = peewee.DoubleField(null=True)
        output = peewee.TextField(null=True)
        idem_key = peewee.TextField(null=True, index=True)
        updated_at = peewee.DoubleField(null=True)
        extra = peewee.TextField(null=True)

        class Meta:
            table_name = "jobs"
            indexes = ((("state", "priority", "id"), False), (("finished_at",), False))

    class JobEvent(Base):
        id = peewee.BigAutoField()  # the event's sequence number: the master gives it
        # No foreign key: retention deletes events and jobs in two cheap set-based statements.
        job_id = peewee.BigIntegerField(index=True)
        at = peewee.DoubleField()
        from_state = peewee.TextField(null=True)
        to_state = peewee.TextField()
        reason = peewee.TextField(null=True)
        agent = peewee.TextField(null=True)
        attempt = peewee.IntegerField(default=0, constraints=_default(0))

        class Meta:
            table_name = "job_events"

    class Agent(Base):
        name = peewee.TextField(primary_key=True)
        state = peewee.TextField()
        slots = peewee.IntegerField()
        info = peewee.TextField()
        first_seen = peewee.DoubleField()
        last_seen = peewee.DoubleField()

        class Meta:
            table_name = "agents"
            indexes = ((("last_seen",), False),)  # the expiry scan (Store.expired_agents)

    class MetaKV(Base):
        key = peewee.TextField(primary_key=True)
        value = peewee.TextField()

        class Meta:
            table_name = "meta"

    class Leader(Base):
        # One row (id 1): the leading master and its epoch, the fencing token every group
        # commit checks (master/leader.py). Written only by the master that holds leadership.
        id = peewee.IntegerField(primary_key=True)
        epoch = peewee.BigIntegerField(default=0, constraints=_default(0))
        instance = peewee.TextField(default="")
        agents = peewee.TextField(default="")
        clients = peewee.TextField(default="")
        events = peewee.TextField(default="")
        since = peewee.DoubleField(default=0, constraints=_default(0))

        class Meta:
            table_name = "leader"

    class Lease(Base):
        # One row (id 1): the leader's lease, renewed every 0.5 s. Its own table: group commits
        # lock the leader row (FOR SHARE), and a renewal must never wait behind them.
        id = peewee.IntegerField(primary_key=True)
        epoch = peewee.BigIntegerField(default=0, constraints=_default(0))
        renewed = peewee.DoubleField(default=0, constraints=_default(0))  # the server's clock
        lease_s = peewee.DoubleField(default=0, constraints=_default(0))  # the leader's length

        class Meta:
            table_name = "leader_lease"

    return Models(db=db, Job=Job, JobEvent=JobEvent, Agent=Agent, Meta=MetaKV, Leader=Leader,
                  Lease=Lease)
