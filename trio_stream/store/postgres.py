"""Saved messages in Postgres: psycopg 3 (sync API) and a psycopg-pool pool.

The same guarantees as :class:`~trio_stream.store.sqlite.SQLiteStore` (see
:mod:`trio_stream.store.base`), for several hosts sharing one history.  psycopg's
async mode needs asyncio, so -- like SQLite -- every statement runs in a worker
thread (at most ``POOL_SIZE`` at once, one pooled connection each), and the
event loop never waits on the network.

* A batch of saves is one ``INSERT ... ON CONFLICT (run_id) DO NOTHING
  RETURNING run_id``: the ids it returns are the rows that were new; the rest
  were saved already.  If the statement fails for a reason other than the
  connection (say, a NUL byte in one content), each row is retried under its
  own savepoint so that only the bad one fails.
* A dropped connection (a restarted server, a network cut) raises
  :class:`~trio_stream.store.base.StoreUnavailable`; the pool replaces the broken
  connection, and the caller may retry: a retried insert that had landed
  finds its row and reports it as already saved.
* A read whose pooled connection turns out dead (the server restarted, or
  an administrator ended the backend) is done once more, on a connection
  that works: the first failure has swept the pool's idle connections.  A
  read that cannot get a connection at all (the server is down) is not
  retried: it raises :class:`~trio_stream.store.StoreUnavailable` after
  :data:`CONNECT_WAIT`.
* Migrations run in one transaction under ``pg_advisory_xact_lock``, so nodes
  that start together apply each version once, one after the other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import ConfigError
from .base import COLUMNS, Message, RowResult, Store, StoreUnavailable, first_of_each

#: Connections (and so worker threads) one store uses at most.
POOL_SIZE = 4
#: Seconds a statement waits for a pooled connection before it gives up
#: (``StoreUnavailable``); only (re)connecting takes that long.
CONNECT_WAIT = 1.0
#: The key of the advisory lock that serialises migrations ("trio-str").
MIGRATION_LOCK = 0x7472696F2D737472

MIGRATIONS: tuple[tuple[str, ...], ...] = (
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
            detached    BOOLEAN NOT NULL,
            created     DOUBLE PRECISION NOT NULL,
            seq         BIGINT GENERATED ALWAYS AS IDENTITY
        )""",
        "CREATE INDEX IF NOT EXISTS messages_by_session ON messages (tenant, session_id, created)",
    ),
    # 2: token usage of each saved run (NULL in rows saved before it)
    ("ALTER TABLE messages ADD COLUMN IF NOT EXISTS usage TEXT",),
    # 3: what else the answer carried (issue 20): reasoning, refusal, logprobs presence
    (
        "ALTER TABLE messages ADD COLUMN IF NOT EXISTS reasoning TEXT",
        "ALTER TABLE messages ADD COLUMN IF NOT EXISTS refusal TEXT",
        "ALTER TABLE messages ADD COLUMN IF NOT EXISTS logprobs BOOLEAN NOT NULL DEFAULT FALSE",
    ),
    # 4: how a run that did not complete ended: its message, the upstream's error (JSON)
    (
        "ALTER TABLE messages ADD COLUMN IF NOT EXISTS outcome_message TEXT",
        "ALTER TABLE messages ADD COLUMN IF NOT EXISTS error TEXT",
    ),
    # 5: the upstream member that served the run (docs/api.md section 1.3)
    ("ALTER TABLE messages ADD COLUMN IF NOT EXISTS served_by TEXT",),
)

_ROW = f"({', '.join(['%s'] * len(COLUMNS))})"
_INSERT = f"INSERT INTO messages ({', '.join(COLUMNS)}) VALUES "
_ON_CONFLICT = " ON CONFLICT (run_id) DO NOTHING RETURNING run_id"


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Bring the schema to ``len(MIGRATIONS)``; return the version found.

    One transaction, under an advisory lock taken first: a node that starts
    meanwhile waits, then finds the work done.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY)")
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
        found = int(row[0]) if row else 0
        for version, statements in enumerate(MIGRATIONS[found:], start=found + 1):
            for sql in statements:
                conn.execute(sql)
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    return found


class PostgresStore(Store):
    """Saved messages in the Postgres database ``url`` names.

    ``timeout``: how long opening may take.  Opening connects and migrates:
    it blocks, so call it in a worker thread.

    Reconnecting is paced by the caller's retries, not by the pool: the pool
    gives up a failed reconnect at once (``reconnect_timeout=0``; its own
    backoff would wait 1 s, 2 s, 4 s ... after the database is back), and a
    statement waits at most :data:`CONNECT_WAIT` for a connection, so each
    retry of a save asks for a fresh one.

    Connections are not tested on checkout (psycopg-pool's ``check=``): it
    costs a round trip per statement, and psycopg-pool 3.3 sleeps about 1 s
    after the second failed check, so with two or more dead idle connections
    (a restarted server) a checkout waits out :data:`CONNECT_WAIT` and fails.
    A read retries once instead (:meth:`_select`), after the failure has
    swept the idle connections; a save is retried by its caller.
    """

    PARAM = "%s"
    ARRIVAL = "seq"

    def __init__(self, url: str, *, timeout: float = 5.0, threaded: bool = True) -> None:
        super().__init__(threaded=threaded, connections=POOL_SIZE)
        self.url = url
        self._pool = ConnectionPool(
            url, min_size=1, max_size=POOL_SIZE, open=False, name="trio-stream",
            timeout=min(timeout, CONNECT_WAIT), reconnect_timeout=0.0,
            kwargs={"autocommit": True, "connect_timeout": max(1, round(timeout))},
        )  # fmt: skip
        try:
            self._pool.open(wait=True, timeout=timeout)
            with self._connection() as conn:
                migrate(conn)
        except (StoreUnavailable, psycopg.OperationalError) as exc:
            self._pool.close()
            raise ConfigError(f"--db: cannot reach Postgres: {exc}") from exc
        except BaseException:
            self._pool.close()
            raise

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; a connection-level failure is StoreUnavailable.

        psycopg-pool discards a connection that is broken when it comes back;
        after such a failure the idle ones are checked too, since a restarted
        server has broken them all.
        """
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as exc:  # includes the pool's PoolTimeout
            self._pool.check()
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def _insert(self, messages: Sequence[Message]) -> list[RowResult]:
        with self._connection() as conn:
            try:
                with conn.transaction():
                    sql = _INSERT + ", ".join([_ROW] * len(messages)) + _ON_CONFLICT
                    args = [v for m in messages for v in m.row()]
                    new = {r[0] for r in conn.execute(sql, args).fetchall()}
                return first_of_each([m.run_id for m in messages], new)
            except psycopg.OperationalError:
                raise
            except psycopg.Error:
                if len(messages) == 1:
                    raise
            return self._insert_each(conn, messages)  # find the one that failed

    def _insert_each(
        self, conn: psycopg.Connection[Any], messages: Sequence[Message]
    ) -> list[RowResult]:
        """One transaction, each row under its own savepoint."""
        out: list[RowResult] = []
        with conn.transaction():
            for m in messages:
                try:
                    with conn.transaction():
                        cur = conn.execute(_INSERT + _ROW + _ON_CONFLICT, m.row())
                        out.append(cur.fetchone() is not None)
                except psycopg.OperationalError:
                    raise
                except psycopg.Error as exc:
                    out.append(exc)
        return out

    def _select(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run a read; once more if its connection broke (a read is idempotent).

        The failed attempt has swept the pool's idle connections
        (:meth:`_connection`), so the second gets a live one or a new one.  A
        read that got no connection at all (``PoolTimeout``: the server is
        down) has waited :data:`CONNECT_WAIT` already and is not retried.
        """
        try:
            return self._select_once(sql, args)
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, PoolTimeout):
                raise
        return self._select_once(sql, args)

    def _select_once(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._connection() as conn:
            return conn.execute(sql, args).fetchall()

    def close(self) -> None:
        self._pool.close(timeout=1.0)
