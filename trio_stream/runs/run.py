"""A run in flight: its log, its cancel scope, its wake-ups (trio layer).

A :class:`Run` is one upstream completion as this process holds it: the pure
log (:mod:`trio_stream.core.log`) plus the parking lots that wake its reader
and its subscribers.  The :class:`~trio_stream.runs.manager.RunManager`
creates, drives and ends runs; the HTTP layer's subscribers read them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Coroutine
from typing import Any

import trio

from ..core.log import Entry, LogClosed, Outcome, RunLog, RunStatus
from ..core.sessions import SessionKey
from ..errors import InternalError, UpstreamError
from ..limits.meter import NO_METER, Meter
from ..shared import LogPage
from ..tracing import NO_SPAN, Span
from ..wire.chunks import ChunkEncoder
from ..wire.request import ChatRequest
from ..wire.responses import ResponseMeta
from ..wire.usage import Usage, settle


def follow_page(mirror: Run, page: LogPage) -> None:
    """Append a page of a shared log to a mirror run, and its end if there."""
    for entry in page.entries:
        mirror.append(entry)
    if page.outcome is not None:
        mirror.log.set_tail(tuple(page.tail))
        mirror.end(page.outcome)


#: The run span's event for each way a run is cancelled or fails (docs/api.md
#: section 10); any other reason is ``cancel`` or ``fail``, with the reason.
CANCEL_EVENTS = {
    "superseded": "superseded",
    "stopped": "stop",
    "interrupted": "interrupt",
    "client_disconnect": "disconnect",
    "client_stalled": "stall",
    "shutdown": "shutdown",
}


def new_run_id(prefix: str = "run_") -> str:
    """128 random bits, URL-safe: unguessable (docs/api.md asks for >= 96).

    The prefix names the API that created the run: ``run_`` (chat
    completions) or ``resp_`` (the Responses API, whose response id it is).
    """
    return prefix + secrets.token_urlsafe(16)


class Done:
    """Set once, when a run's cleanup is over (``Run.done``): the ``set``,
    ``is_set`` and ``wait`` of a :class:`trio.Event`, slotted, with its
    parking lot made by the first waiter -- most runs never have one, and
    every open stream holds a run.  ``wait`` is a checkpoint, set or not."""

    __slots__ = ("_flag", "_lot")

    def __init__(self) -> None:
        self._flag = False
        self._lot: trio.lowlevel.ParkingLot | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._flag = True
        if self._lot is not None:
            self._lot.unpark_all()

    async def wait(self) -> None:
        """Block until set.  Cancellation: always a checkpoint (set or not); a ``Cancelled`` leaves
        nothing behind.
        """
        if self._flag:
            await trio.lowlevel.checkpoint()
            return
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        await self._lot.park()


class Waiters:
    """Tasks waiting for one of a run's wake-ups: the ``park``, ``unpark_all``
    and truth of a :class:`trio.lowlevel.ParkingLot`, as one slotted object
    holding a list -- the lot holds an ``OrderedDict`` (about 0.35 KB with
    the lot), and every open stream's run has one.

    ``park`` is not ``async def``: it parks the calling task at once and
    hands back trio's own wait, for the caller to await at once (``await
    waiters.park()``); a waiting writer then holds no frame of it.  The wait
    is cancellable as the lot's: a cancelled waiter leaves the list.
    """

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: list[trio.lowlevel.Task] = []

    def __bool__(self) -> bool:
        return bool(self._tasks)

    def park(self) -> Coroutine[Any, Any, Any]:
        """Park the current task until :meth:`unpark_all`; await the result at once.
        Cancellation: as ``ParkingLot.park``."""
        task = trio.lowlevel.current_task()
        self._tasks.append(task)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._tasks.remove(task)  # still here: an unparked task is not aborted
            return trio.lowlevel.Abort.SUCCEEDED

        return trio.lowlevel.wait_task_rescheduled(abort)  # noqa: ASYNC105 (awaited by the caller)

    def unpark_all(self) -> None:
        """Wake every parked task (in the order they parked)."""
        tasks = self._tasks
        if tasks:
            self._tasks = []
            for task in tasks:
                trio.lowlevel.reschedule(task)


class Run:
    """One upstream completion: its log, its cancel scope, its wake-ups.

    Every open stream holds one, so it is kept small: ``__slots__``, and the
    two wait lists that only some runs use (``_room``: an attached run's
    reader blocked on a full ``--window``; ``_held``: writers holding events
    for ``--event-interval-ms``) are created on their first wait.  A run
    nobody waits on never has them, and waking it skips them.
    """

    __slots__ = (
        "_changed", "_held", "_room", "cancelled_at", "created", "detached", "done", "encoder",
        "epoch", "error", "first_token_at", "id", "log", "meter", "predecessors", "request",
        "response", "scope", "served_by", "session_id", "span", "started", "tenant", "usage",
        "window", "writer_cursor",
    )  # fmt: skip

    def __init__(
        self,
        run_id: str,
        tenant: str,
        session_id: str | None,
        request: ChatRequest,
        *,
        detached: bool,
        coalesce: bool,
    ) -> None:
        self.id = run_id
        self.tenant = tenant
        self.session_id = session_id
        self.request = request
        self.detached = detached
        self.created = time.time()
        self.started = trio.current_time()
        self.log = RunLog()
        self.scope = trio.CancelScope()
        self.done = Done()
        self.encoder = ChunkEncoder(
            f"chatcmpl-{run_id.removeprefix('run_')}", request.model, int(self.created),
            coalesce=coalesce,
        )  # fmt: skip
        # Why a failed run failed, when that is its HTTP answer (UpstreamError,
        # InternalError); None for every other ending.
        self.error: UpstreamError | InternalError | None = None
        self.usage: Usage | None = None  # as the upstream reported it, if it did
        # Charges the run's tokens to a limited key as they stream.
        self.meter: Meter = NO_METER
        # Set for a run the Responses API created: how to render it (chat: None).
        self.response: ResponseMeta | None = None
        self.predecessors: tuple[str, ...] = ()
        self.epoch = 0  # the session's claim counter when this run claimed it
        self.first_token_at: float | None = None
        # The upstream member whose stream the run's log holds (set at its first entry).
        self.served_by: str | None = None
        self.cancelled_at: float | None = None
        # The run's span (docs/api.md section 10); the shared no-op with tracing off.
        self.span: Span = NO_SPAN
        # Backpressure: an attached streaming run may run at most ``window``
        # entries ahead of its writer's cursor.  ``None``: no writer to wait for.
        self.window: int | None = None
        self.writer_cursor = 0
        self._changed = Waiters()
        # Created by the first wait (see the class docstring); ``None`` until then.
        self._room: Waiters | None = None
        # Writers holding events back for ``--event-interval-ms``: woken by
        # the end, a fence, the cleanup, or a full window -- never per token.
        self._held: Waiters | None = None

    def final_usage(self) -> Usage:
        """The usage of what this run received (docs/api.md section 2.10)."""
        complete = self.log.status is RunStatus.COMPLETED
        reported = self.usage or Usage.from_openai(self.log.usage)  # a mirror: the log's
        return settle(reported, self.request.messages, self.log.deltas, complete=complete)

    @property
    def traceparent(self) -> str:
        """The run span's W3C ``traceparent`` ("" with tracing off): kept in
        the run's shared record, so another node links to the same span."""
        return self.span.traceparent

    @property
    def session_key(self) -> SessionKey | None:
        return None if self.session_id is None else (self.tenant, self.session_id)

    def public(self) -> dict[str, Any]:
        """The ``GET /v1/runs/{id}`` object."""
        outcome = self.log.outcome
        return {
            "id": self.id,
            "session_id": self.session_id,
            "status": self.log.status.value,
            "reason": outcome.reason if outcome else None,
            "content": self.log.content,
            "events": self.log.last_seq,
            "detached": self.detached,
            "served_by": self.served_by,
        }

    # -- producer side ----------------------------------------------------
    def append(self, entry: Entry) -> bool:
        """Add a delta and wake followers.  False if the run already ended."""
        try:
            self.log.append(entry)
        except LogClosed:
            return False
        if self._changed:  # the hot path: skip the call when nobody waits
            self._changed.unpark_all()
        return True

    def must_wait_for_room(self) -> bool:
        window = self.window
        return window is not None and self.log.last_seq - self.writer_cursor >= window

    async def wait_for_room(self) -> None:
        """Block while the attached writer is ``window`` entries behind.

        A checkpoint only when it has to wait; cancellable.

        Cancellation: a ``Cancelled`` leaves the run as it was (the entry is already appended).
        """
        window = self.window
        if window is None:
            return
        while self.log.last_seq - self.writer_cursor >= window and not self.log.fenced:
            if self._held:  # the writer's interval must not throttle the upstream
                self._held.unpark_all()
            if self._room is None:
                self._room = Waiters()
            await self._room.park()

    def end(self, outcome: Outcome) -> bool:
        """Fix the outcome (once) and wake everyone waiting on this run."""
        if self.log.status is not RunStatus.RUNNING:
            return False
        self.log.end(outcome)
        if outcome.status is not RunStatus.COMPLETED:  # the span's status says completed
            event = "fail" if outcome.status is RunStatus.FAILED else "cancel"
            self.span.event(CANCEL_EVENTS.get(outcome.reason, event), {"reason": outcome.reason})
        self._wake()
        return True

    def fence(self) -> None:
        self.log.fence()
        self._wake()

    def poke(self) -> None:
        """Wake this run's subscribers without a change (a ping is due)."""
        self._changed.unpark_all()
        if self._held:
            self._held.unpark_all()

    def wake_held(self) -> None:
        """Wake the writers waiting in :meth:`wait_held`."""
        if self._held:
            self._held.unpark_all()

    def finished(self) -> None:
        self.done.set()
        self._wake()

    def _wake(self) -> None:
        self._changed.unpark_all()
        if self._room:
            self._room.unpark_all()
        if self._held:
            self._held.unpark_all()

    # -- subscriber side --------------------------------------------------
    # These two hand back trio's own wait (``await run.wait_changed()``), the
    # task already parked (:class:`Waiters`): not ``async def``, so a waiting
    # writer holds no frame of theirs, nor of a parking lot's ``park``.
    def wait_changed(self) -> Coroutine[Any, Any, None]:
        """Block until an append, the end, a fence or the cleanup.  Cancellable."""
        return self._changed.park()

    def wait_held(self) -> Coroutine[Any, Any, None]:
        """Block until the end, a fence, the cleanup, or the attached run
        waiting on a full window (not on appends).  Cancellable."""
        if self._held is None:
            self._held = Waiters()
        return self._held.park()

    def advance(self, cursor: int) -> None:
        """The attached writer has sent everything up to ``cursor``."""
        self.writer_cursor = cursor
        if self._room:
            self._room.unpark_all()

    @property
    def settled(self) -> bool:
        """Nothing will change any more: cleaned up, or fenced."""
        return self.done.is_set() or self.log.fenced

    def end_fields(self) -> dict[str, Any]:
        """The keys of a ``stream_end`` line."""
        return {
            "trace": self.id,
            "status": self.log.status.value,
            "tokens": self.log.last_seq,
            "duration_ms": round((trio.current_time() - self.started) * 1000, 3),
            "served_by": self.served_by,
        }
