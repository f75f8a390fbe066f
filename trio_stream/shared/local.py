"""The in-process backend: today's single-process behaviour, at no extra cost.

The session table is the pure :class:`~trio_stream.core.sessions.SessionTable`;
cancel signals are direct calls into the run manager; "finished" is the run's
own ``done`` event.  No method checkpoints unless it has to wait, so the
embedded default keeps the exact scheduling it had before the seam existed:
:meth:`LocalState.claim` and the cancels that follow it happen in one step.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from ..core.sessions import SessionTable
from .base import Claim, SessionKey, SharedState


class LocalState(SharedState):
    def __init__(self, node: str = "local") -> None:
        self.node = node
        self.sessions = SessionTable()
        self._epochs: dict[SessionKey, int] = {}

    async def claim(self, key: SessionKey, run_id: str) -> Claim:
        """Cancellation: never checkpoints (the in-process state never waits), so it cannot be
        cancelled part-way: the table is changed entirely or not at all.
        """
        predecessors = self.sessions.claim(key, run_id)
        # The epoch only has to grow while the session is known: a forgotten
        # session (rule 4 of the table) has no run left to be fenced against.
        epoch = self._epochs.get(key, 0) + 1
        self._epochs[key] = epoch
        return Claim(epoch, predecessors)

    async def fence(self, key: SessionKey, run_id: str) -> None:
        """Cancellation: never checkpoints (the in-process state never waits), so it cannot be
        cancelled part-way: the table is changed entirely or not at all.
        """
        if self.sessions.fence(key, run_id):
            run = self.owner.local_run(run_id)
            if run is not None:
                run.fence()

    async def release(self, key: SessionKey, run_id: str) -> bool:
        """Cancellation: never checkpoints (the in-process state never waits), so it cannot be
        cancelled part-way: the table is changed entirely or not at all.
        """
        fenced = self.sessions.is_fenced(key, run_id)
        self.sessions.release(key, run_id)
        if not self.sessions.live(key):
            self._epochs.pop(key, None)
        return fenced

    async def current(self, key: SessionKey) -> str | None:
        """Cancellation: never checkpoints (the in-process state never waits)."""
        return self.sessions.current(key)

    async def live(self, key: SessionKey) -> dict[str, bool]:
        """Cancellation: never checkpoints (the in-process state never waits)."""
        return self.sessions.live(key)

    async def cancel(self, run_id: str, reason: str) -> None:
        """Cancellation: never checkpoints (the in-process state never waits): the run is cancelled
        (a direct call into the run manager) or was not running.
        """
        self.owner.cancel_local(run_id, reason)

    async def wait_finished(self, run_ids: Sequence[str], grace: float) -> tuple[str, ...]:
        """The one method that waits: it checkpoints for each run given that
        this node holds (``Run.done.wait`` always does), and not at all when it
        holds none.  Cancellation: a ``Cancelled`` leaves nothing behind.
        """
        runs = [r for r in map(self.owner.local_run, run_ids) if r is not None]
        with trio.move_on_after(grace):
            for run in runs:
                await run.done.wait()
        return tuple(run.id for run in runs if not run.done.is_set())
