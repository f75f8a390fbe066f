"""Saved messages in SQLite (the stdlib driver, run in a worker thread).

One connection, one statement at a time (a ``CapacityLimiter(1)``).  The
primary key on ``run_id`` is the schema's half of "saved exactly once": a
second save of the same run raises :class:`AlreadySaved` instead of writing a
second row.  The code path is the other half (:mod:`trio_stream.runs` saves
from exactly one ``finally``).

Cancellation: :meth:`Store.save` is abandoned on cancel (``abandon_on_cancel``)
so a deadline around it is honoured; the statement itself still completes in
its thread, and the limiter is held until it does, so the next statement
cannot interleave with it.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from typing import Any

import orjson
import trio

from .errors import TrioStreamError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
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
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (tenant, session_id, created);
"""


class AlreadySaved(TrioStreamError):
    """A second save of one run: the bug "saved twice", refused by the schema."""


@dataclass(frozen=True, slots=True)
class Message:
    run_id: str
    tenant: str
    session_id: str | None
    content: str
    tool_calls: list[dict[str, Any]] | None
    status: str
    reason: str | None
    events: int
    detached: bool
    created: float

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "content": self.content,
            "status": self.status,
            "reason": self.reason,
            "created": self.created,
        }
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


class Store:
    """``threaded=False`` runs each statement inline on the trio thread (still a
    checkpoint).  Tests under ``autojump_clock`` need it: the autojump clock
    counts a task waiting on a worker thread as idle and jumps time forward.
    """

    def __init__(self, path: str, *, threaded: bool = True) -> None:
        self.path = path
        self.threaded = threaded
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._limiter = trio.CapacityLimiter(1)
        self._lock = threading.Lock()

    async def _run(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        def work() -> list[tuple[Any, ...]]:
            with self._lock:
                return self._db.execute(sql, args).fetchall()

        if not self.threaded:
            await trio.lowlevel.checkpoint()
            return work()
        return await trio.to_thread.run_sync(work, limiter=self._limiter, abandon_on_cancel=True)

    async def save(self, m: Message) -> None:
        """Insert one row.  Raises :class:`AlreadySaved` if the run has one.

        A checkpoint; on ``Cancelled`` the insert may still land (see module doc).
        """
        calls = orjson.dumps(m.tool_calls).decode() if m.tool_calls else None
        try:
            await self._run(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (m.run_id, m.tenant, m.session_id, m.content, calls, m.status, m.reason,
                 m.events, int(m.detached), m.created),
            )  # fmt: skip
        except sqlite3.IntegrityError as exc:
            raise AlreadySaved(m.run_id) from exc

    async def session_messages(self, tenant: str, session_id: str) -> list[Message]:
        rows = await self._run(
            "SELECT * FROM messages WHERE tenant = ? AND session_id = ? ORDER BY created, rowid",
            (tenant, session_id),
        )
        return [_message(r) for r in rows]

    async def get(self, tenant: str, run_id: str) -> Message | None:
        rows = await self._run(
            "SELECT * FROM messages WHERE tenant = ? AND run_id = ?", (tenant, run_id)
        )
        return _message(rows[0]) if rows else None

    async def count(self, run_id: str) -> int:
        rows = await self._run("SELECT COUNT(*) FROM messages WHERE run_id = ?", (run_id,))
        return int(rows[0][0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _message(r: tuple[Any, ...]) -> Message:
    calls = orjson.loads(r[4]) if r[4] else None
    return Message(r[0], r[1], r[2], r[3], calls, r[5], r[6], r[7], bool(r[8]), r[9])
