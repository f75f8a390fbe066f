"""Saved messages: one interface, two databases, group commit.

:class:`Store` is what the run manager and the HTTP layer use: ``save``,
``session_messages``, ``get``, ``count``, ``close``.  Two implementations keep
the same guarantees (``tests/test_store_contract.py`` runs one suite against
both):

* :class:`~trio_stream.store.sqlite.SQLiteStore` (a file path, or
  ``:memory:``): the stdlib driver, one connection, one statement at a time.
* :class:`~trio_stream.store.postgres.PostgresStore` (a ``postgresql://`` URL):
  psycopg 3's sync API and a psycopg-pool pool, for several hosts sharing one
  history.

Both run their statements in worker threads (``threaded=False`` runs them
inline, for tests under ``autojump_clock``), so the event loop never waits on
the database.

Saved exactly once: the primary key on ``run_id`` is the schema's half -- a
second save of a run raises :class:`AlreadySaved` instead of writing a second
row.  The code path is the other half (:mod:`trio_stream.runs.manager` saves from
exactly one ``finally``).

Group commit: while :meth:`Store.run` is running (``open_service`` runs it),
``save`` hands its row to one committer task and waits.  The committer takes
every save queued by then, inserts them in one transaction in one thread hop,
and tells each waiter whether its row was new.  A duplicate in a batch fails
only its own waiter.  Without a running committer each save is its own
transaction.

Cancellation: a waiter that is cancelled (its run's ``--save-timeout``) stops
waiting; its row is still committed with its batch, so a batch is all or
nothing whoever gives up.  A statement abandoned on cancel still completes in
its thread, and holds the store's limiter until it does.

Unreachable: a statement that cannot reach the database raises
:class:`StoreUnavailable` -- a save is retried by its run's cleanup, a read
is answered 503 ``store_unavailable`` with ``Retry-After`` by every route.
Postgres does a read once more first if its pooled connection had died (a
restarted server).  SQLite's reads do not raise it: they read a local
file through the store's one connection (in WAL mode a reader does not wait
on a writer).

Schema versions: each store applies its ``MIGRATIONS`` it has not applied
yet, in one transaction, on open (SQLite: ``PRAGMA user_version``; Postgres:
a ``schema_version`` table under an advisory lock), so any number of nodes
may start at once.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
import trio

from ..errors import TrioStreamError

T = TypeVar("T")

#: The columns of ``messages``, in the order of :class:`Message`'s fields.
COLUMNS = (
    "run_id", "tenant", "session_id", "content", "tool_calls", "status", "reason", "events",
    "detached", "created", "usage", "reasoning", "refusal", "logprobs", "outcome_message",
    "error", "served_by",
)  # fmt: skip
SELECT = f"SELECT {', '.join(COLUMNS)} FROM messages"
#: The most saves one transaction takes (the rest wait for the next one).
MAX_BATCH = 256


class AlreadySaved(TrioStreamError):
    """A second save of one run: the bug "saved twice", refused by the schema."""


class StoreUnavailable(TrioStreamError):
    """The database could not be reached (or the connection dropped) and the
    statement's effect is unknown.  A save may be retried: if the first
    attempt landed, the retry raises :class:`AlreadySaved`.  A read raising
    it is answered 503 ``store_unavailable`` with ``Retry-After`` by every
    route (:func:`~trio_stream.errors.store_unavailable`), never 500."""


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
    #: Token usage and model (``Usage.record()`` plus ``model``); None in old rows.
    usage: dict[str, Any] | None = None
    #: The reasoning text (``reasoning_content`` or ``reasoning``), if the upstream sent one.
    reasoning: str | None = None
    #: The refusal text, if the answer was a refusal (``content`` is then usually empty).
    refusal: str | None = None
    #: Whether the upstream sent logprobs (the lists themselves are not saved).
    logprobs: bool = False
    #: How a run that did not complete ended, for people (its Outcome's ``message``).
    outcome_message: str | None = None
    #: The error the upstream reported, as the run's outcome kept it (OpenAI's
    #: shape plus ``source: upstream``; :class:`~trio_stream.errors.UpstreamReported`).
    error: dict[str, Any] | None = None
    #: The upstream member that served the run (docs/api.md section 1.3), if one did.
    served_by: str | None = None

    def public(self) -> dict[str, Any]:
        """The ``GET /v1/sessions/{id}/messages`` item: ``reason`` is the
        finish reason of a completed run; ``reasoning_content``, ``refusal``,
        ``logprobs``, ``usage`` and ``served_by`` only when there is one."""
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "content": self.content,
            "status": self.status,
            "reason": self.reason,
            "created": self.created,
        }
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        if self.refusal is not None:
            out["refusal"] = self.refusal
        if self.logprobs:
            out["logprobs"] = True
        if self.usage is not None:
            out["usage"] = self.usage
        if self.served_by is not None:
            out["served_by"] = self.served_by
        return out

    def row(self) -> tuple[Any, ...]:
        """The values of :data:`COLUMNS` (tool calls, usage and error as JSON text)."""
        calls = orjson.dumps(self.tool_calls).decode() if self.tool_calls else None
        usage = orjson.dumps(self.usage).decode() if self.usage is not None else None
        error = orjson.dumps(self.error).decode() if self.error is not None else None
        return (self.run_id, self.tenant, self.session_id, self.content, calls, self.status,
                self.reason, self.events, self.detached, self.created, usage, self.reasoning,
                self.refusal, self.logprobs, self.outcome_message, error,
                self.served_by)  # fmt: skip

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> Message:
        calls = orjson.loads(r[4]) if r[4] else None
        usage = orjson.loads(r[10]) if r[10] else None
        error = orjson.loads(r[15]) if r[15] else None
        return cls(r[0], r[1], r[2], r[3], calls, r[5], r[6], int(r[7]), bool(r[8]), float(r[9]),
                   usage, r[11], r[12], bool(r[13]), r[14], error, r[16])  # fmt: skip


#: What one row of a batch came to: new (True), already there (False), or the
#: error that refused it alone.
RowResult = bool | Exception


def retry_delay(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...) of a save that
    could not reach the database: 50 ms doubling, at most 1 s."""
    return min(0.05 * 2.0 ** (attempt - 1), 1.0)


def first_of_each(run_ids: Sequence[str], new: set[str]) -> list[RowResult]:
    """Which rows of a batch were new, given the ids the insert reported new:
    a run id listed twice in one batch is new only the first time."""
    out: list[RowResult] = []
    for run_id in run_ids:
        out.append(run_id in new)
        new.discard(run_id)
    return out


@dataclass(eq=False)
class _Pending:
    """One save waiting for the committer."""

    message: Message
    done: trio.Event = field(default_factory=trio.Event)
    result: RowResult | None = None


class Store(abc.ABC):
    """Saved messages (see the module doc for the guarantees).

    Subclasses implement the synchronous ``_insert``, ``_select`` and
    ``close``, and name their SQL dialect (:attr:`PARAM`, :attr:`ARRIVAL`);
    this class builds the queries, runs them in worker threads under one
    limiter (or inline with ``threaded=False``) and owns group commit.
    """

    #: The driver's parameter placeholder.
    PARAM = "?"
    #: The column that orders rows saved in the same instant by arrival.
    ARRIVAL = "rowid"

    def __init__(self, *, threaded: bool, connections: int) -> None:
        self.threaded = threaded
        self._limiter = trio.CapacityLimiter(connections)
        self._queue: trio.MemorySendChannel[_Pending] | None = None
        self.commits = 0  # transactions that inserted rows (for measurements)
        self.rows = 0  # rows those transactions were given

    # -- what subclasses provide (synchronous: called in a worker thread) ---
    @abc.abstractmethod
    def _insert(self, messages: Sequence[Message]) -> list[RowResult]:
        """Insert ``messages`` in one transaction; per row, what it came to.

        Raises :class:`StoreUnavailable` when the outcome of the whole batch
        is unknown (the connection dropped), any other exception when the
        whole batch failed."""

    @abc.abstractmethod
    def _select(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]: ...

    def _select_session(self, tenant: str, session_id: str) -> list[Message]:
        p = self.PARAM
        rows = self._select(
            f"{SELECT} WHERE tenant = {p} AND session_id = {p} ORDER BY created, {self.ARRIVAL}",
            (tenant, session_id),
        )
        return [Message.from_row(r) for r in rows]

    def _select_run(self, tenant: str, run_id: str) -> Message | None:
        p = self.PARAM
        rows = self._select(f"{SELECT} WHERE tenant = {p} AND run_id = {p}", (tenant, run_id))
        return Message.from_row(rows[0]) if rows else None

    def _count(self, run_id: str) -> int:
        sql = f"SELECT COUNT(*) FROM messages WHERE run_id = {self.PARAM}"
        return int(self._select(sql, (run_id,))[0][0])

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection(s).  Call after :meth:`run` has returned."""

    # -- the async API ------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if not self.threaded:
            await trio.lowlevel.checkpoint()
            return fn(*args)
        return await trio.to_thread.run_sync(
            fn, *args, limiter=self._limiter, abandon_on_cancel=True
        )

    async def save(self, m: Message) -> None:
        """Insert one row.  Raises :class:`AlreadySaved` if the run has one,
        :class:`StoreUnavailable` if the database could not be reached.

        A checkpoint; on ``Cancelled`` the insert may still land (module doc).
        """
        queue = self._queue
        if queue is None:
            [result] = await self._call(self._counted_insert, [m])
        else:
            pending = _Pending(m)
            queue.send_nowait(pending)
            await pending.done.wait()
            assert pending.result is not None
            result = pending.result
        if isinstance(result, Exception):
            raise result
        if not result:
            raise AlreadySaved(m.run_id)

    async def session_messages(self, tenant: str, session_id: str) -> list[Message]:
        """The session's saved messages, oldest first (ties: in save order).

        Reads (this, :meth:`get`, :meth:`count`) raise
        :class:`StoreUnavailable` if the database cannot be reached (Postgres
        first retries a read whose pooled connection had died, once).

        Cancellation: a checkpoint; a ``Cancelled`` abandons the query in its
        thread (it still completes there, holding the store's limiter until it does).
        """
        return await self._call(self._select_session, tenant, session_id)

    async def get(self, tenant: str, run_id: str) -> Message | None:
        """The run's saved message, if it has one and belongs to ``tenant``.

        Cancellation: as :meth:`session_messages`.
        """
        return await self._call(self._select_run, tenant, run_id)

    async def count(self, run_id: str) -> int:
        """Rows saved for ``run_id`` (0 or 1: the primary key).

        Cancellation: as :meth:`session_messages`.
        """
        return await self._call(self._count, run_id)

    # -- group commit -------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit queued saves in groups until cancelled (one committer per store).

        On exit, saves still queued are answered :class:`StoreUnavailable`.

        Cancellation: runs until cancelled; a batch being committed still completes in its
        thread, and the saves left in the queue are answered as above.
        """
        if self._queue is not None:
            raise RuntimeError("this store's committer is already running")
        send, receive = trio.open_memory_channel[_Pending](math.inf)
        self._queue = send
        batch: list[_Pending] = []
        try:
            task_status.started()
            async for first in receive:
                batch = [first]
                await trio.lowlevel.checkpoint()  # let saves of this same moment queue up
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                await self._commit(batch)
        finally:
            self._queue = None
            send.close()
            left = [p for p in batch if not p.done.is_set()]
            while True:
                try:
                    left.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            for pending in left:
                pending.result = StoreUnavailable("the store is closing")
                pending.done.set()

    async def _commit(self, batch: list[_Pending]) -> None:
        """Insert one batch and answer each of its waiters."""
        try:
            results = await self._call(self._counted_insert, [p.message for p in batch])
        except Exception as exc:  # the whole batch failed: each waiter decides
            results = [exc] * len(batch)
        for pending, result in zip(batch, results, strict=True):
            pending.result = result
            pending.done.set()

    def _counted_insert(self, messages: Sequence[Message]) -> list[RowResult]:
        results = self._insert(messages)
        self.commits += 1
        self.rows += len(messages)
        return results
