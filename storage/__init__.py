"""Durable storage for ffrtmp: peewee models, migrations and the batched job repository."""

# The names below load on first use (PEP 562), not with the package: `ffrtmp`'s grammar imports
# storage.cli (`ffrtmp db`), and a client command must not pay for peewee and psycopg2.
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.backends import BACKENDS, Backend, backend_for, open_database
    from storage.batch import WriteBatch
    from storage.db import default_db_url
    from storage.errors import Fenced, StorageError
    from storage.models import TERMINAL_STATES  # = bus.vocab.TERMINAL, kept for old importers
    from storage.repository import Store

_LAZY = {
    "BACKENDS": "storage.backends", "Backend": "storage.backends",
    "backend_for": "storage.backends", "open_database": "storage.backends",
    "WriteBatch": "storage.batch", "default_db_url": "storage.db", "Fenced": "storage.errors",
    "StorageError": "storage.errors", "TERMINAL_STATES": "storage.models",
    "Store": "storage.repository",
}

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


def __getattr__(name: str) -> Any:
    """A name of __all__, imported on first use (submodules import as in any package)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
