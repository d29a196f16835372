"""Durable storage for ffrtmp: peewee models, migrations and the batched job repository."""

from storage.backends import BACKENDS, Backend, backend_for, open_database
from storage.batch import WriteBatch
from storage.db import default_db_url
from storage.errors import Fenced, StorageError
from storage.models import TERMINAL_STATES  # = bus.vocab.TERMINAL, kept for old importers
from storage.repository import Store

__all__ = [
    "BACKENDS",
    "Fenced",
    "TERMINAL_STATES",
    "Backend",
    "Store",
    "StorageError",
    "WriteBatch",
    "backend_for",
    "default_db_url",
    "open_database",
]
