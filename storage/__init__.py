"""Durable storage for ffrtmp: peewee models, migrations and the batched job repository."""

from storage.batch import WriteBatch
from storage.db import default_db_url, open_database
from storage.errors import StorageError
from storage.models import TERMINAL_STATES
from storage.repository import Store

__all__ = [
    "TERMINAL_STATES",
    "Store",
    "StorageError",
    "WriteBatch",
    "default_db_url",
    "open_database",
]
