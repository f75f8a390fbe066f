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
    """A heap entry of :class:`Ticker`: the task to wake at ``due``, or
    ``None`` once its sleep was cancelled (the stale entry is popped later,
    harmlessly).  Ordered by ``due``, then by arrival."""

    __slots__ = ("count", "due", "task")

    def __init__(self, due: float, count: int, task: trio.lowlevel.Task) -> None:
        self.due, self.count = due, count
        self.task: trio.lowlevel.Task | None = task

    def __lt__(self, other: _Sleeper) -> bool:
        return (self.due, self.count) < (other.due, other.count)

    def abort(self, _: object) -> trio.lowlevel.Abort:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class Ticker:
    """One timer for many sleepers: ``await ticker.sleep(d)`` wakes after at
    least ``d`` (rounded up to the next ``TICK``).  Cancellable.

    A sleeper is one small heap entry and its task, parked directly (no
    parking lot of its own): an idle mock stream sleeps here for its first
    token, so this is part of every idle stream's memory.
    """

    def __init__(self) -> None:
        self._heap: list[_Sleeper] = []
        self._count = 0
        self._added = trio.lowlevel.ParkingLot()

    async def sleep(self, delay: float) -> None:
        """Sleep until the first tick at or after ``delay`` from now.  Cancellation: a checkpoint;
        a ``Cancelled`` removes this sleeper (its heap entry is skipped).
        """
        # Round up to the tick, without float noise turning an exact tick late.
        due = math.ceil((trio.current_time() + delay) / TICK - 1e-6) * TICK
        self._count += 1
        sleeper = _Sleeper(due, self._count, trio.lowlevel.current_task())
        heapq.heappush(self._heap, sleeper)
        self._added.unpark_all()
        await trio.lowlevel.wait_task_rescheduled(sleeper.abort)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Release due sleepers until cancelled.

        Cancellation: runs until cancelled; a ``Cancelled`` leaves the sleepers asleep (each
        one's own cancel scope still wakes it).
        """
        task_status.started()
        heap = self._heap
        while True:
            if not heap:
                await self._added.park()
                continue
            due = heap[0].due
            if due > trio.current_time():
                await trio.sleep_until(due)
            now = trio.current_time()
            while heap and heap[0].due <= now:
                task = heapq.heappop(heap).task
                if task is not None:
                    trio.lowlevel.reschedule(task)


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
