"""Where finished runs are saved: one interface, SQLite and Postgres.

Owns the :class:`~.base.Store` interface and its group commit
(:mod:`.base`), the SQLite store (:mod:`.sqlite`), the Postgres store
(:mod:`.postgres`) and the factory :func:`open_store`, which imports
:mod:`.postgres` (and so psycopg) only for a ``postgresql://`` ``--db``.

May import: :mod:`trio_stream.errors` only.
"""

from __future__ import annotations

from .base import (
    COLUMNS,
    AlreadySaved,
    Message,
    RowResult,
    Store,
    StoreUnavailable,
    first_of_each,
    retry_delay,
)
from .sqlite import SQLITE_MIGRATIONS, SQLiteStore

__all__ = [
    "COLUMNS",
    "SQLITE_MIGRATIONS",
    "AlreadySaved",
    "Message",
    "RowResult",
    "SQLiteStore",
    "Store",
    "StoreUnavailable",
    "first_of_each",
    "is_postgres",
    "open_store",
    "retry_delay",
]


def is_postgres(db: str) -> bool:
    """Does ``--db`` name a Postgres database (rather than a SQLite file)?"""
    return db.startswith(("postgresql://", "postgres://"))


def open_store(db: str, *, timeout: float = 5.0, threaded: bool = True) -> Store:
    """The store ``--db`` names: a ``postgresql://`` URL, else a SQLite path.

    Blocking (connects and migrates): call it in a worker thread.
    ``timeout``: how long a Postgres statement may wait for a connection.
    """
    if is_postgres(db):
        from .postgres import PostgresStore  # only a Postgres --db imports psycopg

        return PostgresStore(db, timeout=timeout, threaded=threaded)
    return SQLiteStore(db, threaded=threaded)
