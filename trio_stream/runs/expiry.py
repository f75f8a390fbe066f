"""Forgetting finished detached runs ``--run-ttl`` after they end -- trio layer.

A detached run stays readable (``GET /v1/runs/{id}``, its events) for
``--run-ttl`` after its cleanup; then only its saved row answers.  An
attached run is forgotten at once by its cleanup and never comes here.
"""

from __future__ import annotations

from collections import deque

import trio

from .run import Run


class Expiry:
    """The runs to forget, in the order they expire (one ``--run-ttl`` for all)."""

    def __init__(self, runs: dict[str, Run], ttl: float) -> None:
        self._runs = runs
        self._ttl = ttl
        self._queue: deque[tuple[float, str]] = deque()
        self._added = trio.Event()

    def add(self, run_id: str) -> None:
        """Forget ``run_id`` ``--run-ttl`` from now.  Not a checkpoint."""
        self._queue.append((trio.current_time() + self._ttl, run_id))
        self._added.set()

    async def forget_expired(self) -> None:
        """Forget each run when its time comes, until cancelled.

        Cancellation: waits (a checkpoint) between expiries; a ``Cancelled``
        leaves the runs not yet due in memory, and nothing half done.
        """
        while True:
            now = trio.current_time()
            while self._queue and self._queue[0][0] <= now:
                self._runs.pop(self._queue.popleft()[1], None)
            if self._queue:
                await trio.sleep_until(self._queue[0][0])
            else:
                self._added = trio.Event()
                await self._added.wait()
