"""The built-in mock upstream: no network, a deterministic reply (docs/api.md section 5).

The text is :func:`trio_stream.upstream.mocktext.tokens`; the gap before each token is
``--mock-delay-ms``.  With a delay of 0 it still checkpoints once per token so
that a cancel lands between any two tokens.

Pacing: a ``trio.sleep`` per token is a cancel scope that expires, which
measured 54 µs of CPU per wake-up with 1,000 sleeping streams (15 µs with a
shared timer).  So every mock stream waits on one :class:`Ticker`: a heap of
due times, served by one task that wakes at most once per millisecond
(``TICK``) and releases every stream that is due.  The mock is the upstream
simulator, so its cost is not the server's; this keeps it from dominating
the server's profile under load.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Any

import trio

from ..wire.request import ChatRequest
from . import mocktext
from .base import Finish, Item

TICK = 0.001


class _Sleeper:
    """A sleeper of :class:`Ticker`: the task to wake, or ``None`` once its
    sleep was cancelled (the stale entry is dropped when its tick comes)."""

    __slots__ = ("task",)

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task: trio.lowlevel.Task | None = task

    def abort(self, _: object) -> trio.lowlevel.Abort:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class Ticker:
    """One timer for many sleepers: ``await ticker.sleep(d)`` wakes after at
    least ``d`` (rounded up to the next ``TICK``).  Cancellable.

    Sleepers are kept in buckets, one list per tick number (a dict), and a
    heap holds the tick numbers that have a bucket (plain ints, compared in
    C): a sleep is a dict look-up and a list append, and only the first
    sleeper of a tick pushes onto the heap.  (A heap of sleepers ordered by a
    Python ``__lt__`` cost about 20 such calls per token at 1,000 streams,
    and every sleep woke the ticker's parking lot: docs/design.md section
    15.)  Within a tick, sleepers wake in the order they went to sleep.

    A sleeper is one small object and its task, parked directly (no parking
    lot of its own): an idle mock stream sleeps here for its first token, so
    this is part of every idle stream's memory.
    """

    def __init__(self) -> None:
        self._buckets: dict[int, list[_Sleeper]] = {}
        self._ticks: list[int] = []  # a heap of the keys of _buckets
        # The ticker waits here for a first tick, or for the earliest one to
        # come; a sleep that makes a new earliest tick wakes it.
        self._added = trio.lowlevel.ParkingLot()

    async def sleep(self, delay: float) -> None:
        """Sleep until the first tick at or after ``delay`` from now.  Cancellation: a checkpoint;
        a ``Cancelled`` removes this sleeper (its entry is skipped).
        """
        # Round up to the tick, without float noise turning an exact tick late.
        tick = math.ceil((trio.current_time() + delay) / TICK - 1e-6)
        sleeper = _Sleeper(trio.lowlevel.current_task())
        bucket = self._buckets.get(tick)
        if bucket is None:
            self._buckets[tick] = [sleeper]
            ticks = self._ticks
            heapq.heappush(ticks, tick)
            if ticks[0] == tick and self._added:
                self._added.unpark_all()
        else:
            bucket.append(sleeper)
        await trio.lowlevel.wait_task_rescheduled(sleeper.abort)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Release due sleepers until cancelled.

        Cancellation: runs until cancelled; a ``Cancelled`` leaves the sleepers asleep (each
        one's own cancel scope still wakes it).
        """
        task_status.started()
        ticks, buckets = self._ticks, self._buckets
        reschedule = trio.lowlevel.reschedule
        while True:
            if not ticks:
                await self._added.park()
                continue
            due = ticks[0] * TICK
            if due > trio.current_time():
                with trio.move_on_at(due):  # or a sleep for an earlier tick comes
                    await self._added.park()
                continue
            now = trio.current_time()
            while ticks and ticks[0] * TICK <= now:
                for sleeper in buckets.pop(heapq.heappop(ticks)):
                    if sleeper.task is not None:
                        reschedule(sleeper.task)


class MockUpstream:
    name = "mock"

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.ticker = Ticker()

    def stream(self, request: ChatRequest) -> AbstractAsyncContextManager[AsyncIterator[Item]]:
        return aclosing(self._items(request))

    async def _items(self, request: ChatRequest) -> AsyncGenerator[Item, None]:
        for token in mocktext.tokens(request.messages, request.max_tokens):
            if self.delay:
                await self.ticker.sleep(self.delay)
            else:
                await trio.lowlevel.checkpoint()
            yield token
        yield Finish(mocktext.reply_length(request.max_tokens)[1])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The ticker.  Cancellation: as :meth:`Ticker.run`."""
        await self.ticker.run(task_status=task_status)

    async def models(self) -> list[dict[str, Any]]:
        """Cancellation: never checkpoints."""
        return [{"id": "mock", "object": "model", "created": 0, "owned_by": "trio-stream"}]

    async def aclose(self) -> None:
        """Nothing to close.  Cancellation: never checkpoints."""
        pass
