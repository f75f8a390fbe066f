"""Saved messages in SQLite: the stdlib driver, one connection, one statement at a time.

The guarantees are :class:`~trio_stream.store.base.Store`'s (see
:mod:`trio_stream.store.base`); a file path, or ``:memory:``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from typing import Any

from .base import COLUMNS, Message, RowResult, Store

#: Each migration is the statements that move the schema one version up;
#: version ``n`` is ``MIGRATIONS[:n]`` applied.  Append only.
SQLITE_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS messages (
            run_id      TEXT PRIMARY KEY,
            tenant      TEXT NOT NULL,
            session_id  TEXT,
            content     TEXT NOT NULL,
            tool_calls  TEXT,
            status      TEXT NOT NULL CHECK (status IN ('complete', 'partial', 'failed')),
            reason      TEXT,
            events      INTEGER NOT NULL,
            detached    INTEGER NOT NULL,
            created     REAL NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS messages_by_session ON messages (tenant, session_id, created)",
    ),
    # 2: token usage of each saved run (NULL in rows saved before it)
    ("ALTER TABLE messages ADD COLUMN usage TEXT",),
    # 3: what else the answer carried (issue 20): reasoning, refusal, logprobs presence
    (
        "ALTER TABLE messages ADD COLUMN reasoning TEXT",
        "ALTER TABLE messages ADD COLUMN refusal TEXT",
        "ALTER TABLE messages ADD COLUMN logprobs INTEGER NOT NULL DEFAULT 0",
    ),
    # 4: how a run that did not complete ended: its message, the upstream's error (JSON)
    (
        "ALTER TABLE messages ADD COLUMN outcome_message TEXT",
        "ALTER TABLE messages ADD COLUMN error TEXT",
    ),
    # 5: the upstream member that served the run (docs/api.md section 1.3)
    ("ALTER TABLE messages ADD COLUMN served_by TEXT",),
)


#: How long opening a SQLite file may wait for another process's lock.
SQLITE_OPEN_TIMEOUT = 5.0


def _use_wal(db: sqlite3.Connection) -> None:
    """Switch the file to WAL (it stays so: later openers find it done).

    The switch takes an exclusive lock and, unlike statements, does not wait
    on the busy timeout: two workers opening one new file at once get
    "database is locked".  So it is retried, with backoff, for
    :data:`SQLITE_OPEN_TIMEOUT`.  Runs at open, in a worker thread.
    """
    deadline = time.monotonic() + SQLITE_OPEN_TIMEOUT
    pause = 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def _migrate_sqlite(db: sqlite3.Connection) -> None:
    """Apply the migrations this file lacks, in one write transaction."""
    db.execute("BEGIN IMMEDIATE")  # the write lock first: concurrent openers wait here
    try:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        for statements in SQLITE_MIGRATIONS[version:]:
            for sql in statements:
                db.execute(sql)
        if version < len(SQLITE_MIGRATIONS):
            db.execute(f"PRAGMA user_version = {len(SQLITE_MIGRATIONS)}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


_SQLITE_INSERT = (
    f"INSERT INTO messages ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
    "ON CONFLICT (run_id) DO NOTHING"
)


class SQLiteStore(Store):
    """One SQLite connection; one statement (or batch) at a time.

    ``threaded=False`` runs each statement inline on the trio thread (still a
    checkpoint).  Tests under ``autojump_clock`` need it: the autojump clock
    counts a task waiting on a worker thread as idle and jumps time forward.
    """

    def __init__(self, path: str, *, threaded: bool = True) -> None:
        super().__init__(threaded=threaded, connections=1)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        _use_wal(self._db)
        self._db.execute("PRAGMA synchronous=NORMAL")
        _migrate_sqlite(self._db)
        self._lock = threading.Lock()

    def _insert(self, messages: Sequence[Message]) -> list[RowResult]:
        out: list[RowResult] = []
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            try:
                for m in messages:
                    try:  # a failed statement is undone alone; the transaction goes on
                        out.append(db.execute(_SQLITE_INSERT, m.row()).rowcount == 1)
                    except sqlite3.IntegrityError as exc:
                        out.append(exc)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return out

    def _select(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()
