"""Runs and the manager that owns them: the trio half of the run lifecycle.

Ownership (see docs/design.md for the whole tree):

* An **attached** run is driven by :meth:`RunManager.drive` inside the request's
  own nursery, beside that request's writer and disconnect watcher.
* A **detached** run is driven inside the manager's long-lived nursery
  (:meth:`RunManager.run`), so a subscriber that leaves cancels nothing.

Every run has one :class:`trio.CancelScope` (``Run.scope``) around its upstream
work.  Cancelling a run -- for any reason -- goes through
:meth:`RunManager.cancel`, which first fixes the outcome in the pure log
(rule 2 of :mod:`trio_stream.core.log`: nothing more is appended) and then
cancels the scope.  ``drive`` ends in exactly one ``finally`` that saves the
run (shielded, with ``--save-timeout``), releases the session entry by its own
id, and sets ``Run.done``.  That single ``finally`` is the code-path half of
"saved exactly once"; the schema's primary key is the other half.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import trio

from ..config import Settings
from ..core.lifecycle import ending
from ..core.log import Chunk, Outcome, RunStatus, with_text
from ..core.sessions import SessionTable
from ..errors import INTERNAL_MESSAGE, InternalError, UpstreamError
from ..limits.base import CALL_TIMEOUT as LIMITS_TIMEOUT
from ..limits.meter import NO_METER
from ..logs import EventLogger
from ..metrics import Metrics
from ..shared import LocalState, RunRecord, SharedState
from ..store import Store
from ..tracing import NO_TRACING, Tracing
from ..upstream import Finish, Upstream
from ..wire.request import ChatRequest
from ..wire.responses import ResponseMeta
from ..wire.usage import Usage
from .cluster import Cluster
from .expiry import Expiry
from .routes import Routes, as_routes
from .run import Run, new_run_id
from .saving import save_run
from .spans import traced
from .supersede import await_predecessors, claim, release, shared_step

CANCEL_MESSAGES = {
    "superseded": "A newer request of this session superseded this run.",
    "interrupted": "The session was interrupted.",
    "stopped": "The run was stopped.",
    "shutdown": "The server is shutting down.",
    "client_disconnect": "The client disconnected.",
    "client_stalled": "The client stopped reading.",
}


#: After ``finish_reason``, how long to read the rest of the upstream body
#: (``[DONE]``, the chunked terminator) so its connection can be reused.
DRAIN_TIMEOUT = 0.5


async def _settle_and_release(run: Run, shared: SharedState, logger: EventLogger) -> bool:
    """After the save: charge a ``[[key]]``'s run in full (its meter;
    shielded, bounded by the limiter's deadline) before it is FINISHED, so the
    key's next request sees its tokens; then release its session (returns
    whether it had been fenced: :func:`~.supersede.release`)."""
    if run.meter is not NO_METER:
        with trio.CancelScope(shield=True) as cs:
            cs.deadline = trio.current_time() + LIMITS_TIMEOUT + 0.5
            await run.meter.settle(run.final_usage())
    return await release(run, shared, logger)


async def _read_to_end(
    items: AsyncIterator[object], shape: Chunk | None
) -> tuple[Usage | None, list[Chunk]]:
    """Read an upstream stream to its end within a bound: the last
    :class:`Usage` it reports and the chunks it sends after its finish chunk
    (an OpenAI upstream's usage chunk, :attr:`~trio_stream.core.log.RunLog.tail`).

    The run has already completed: an error or a timeout here only means the
    connection is closed instead of returned to the pool (and what came
    until then is kept).  Its subscribers write the run's ending only after
    its cleanup, so they see this usage and these chunks.

    Cancellation: a checkpoint; bounded by :data:`DRAIN_TIMEOUT`; a ``Cancelled``
    from outside propagates and leaves nothing behind.
    """
    usage = None
    tail: list[Chunk] = []
    with trio.move_on_after(DRAIN_TIMEOUT), contextlib.suppress(UpstreamError):
        async for item in items:
            if isinstance(item, Usage):
                usage = item
            elif isinstance(item, Chunk):
                tail.append(item)
            elif isinstance(item, str):
                tail.append(Chunk(with_text(shape, item)))
    return usage, tail


class RunManager:
    """Creates, drives, cancels, finds and expires runs.

    Owns the long-lived nursery of detached runs (:meth:`run`).  What other
    processes must see -- sessions, the run registry, cancel signals, detached
    logs -- goes through ``shared`` (:class:`~trio_stream.shared.SharedState`);
    ``runs`` holds only the runs this process drives.
    """

    def __init__(
        self, settings: Settings, upstream: Routes | Upstream, store: Store, metrics: Metrics,
        logger: EventLogger, shared: SharedState | None = None, tracing: Tracing = NO_TRACING,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.routes = as_routes(upstream, settings, metrics, logger, tracing)
        self.store = store
        self.metrics = metrics
        self.logger = logger
        self.shared = shared if shared is not None else LocalState()
        self.shared.attach(self)
        #: Runs other nodes own: lookups, mirrors, lost nodes (cluster mode).
        self.cluster = Cluster(self.shared, store, metrics, logger, settings.coalesce, tracing)
        self.runs: dict[str, Run] = {}
        self.live = 0
        self.expiry = Expiry(self.runs, settings.run_ttl)
        self._idle = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None
        self.cleanup_timeout = settings.save_timeout
        self._cleanups: set[trio.CancelScope] = set()
        # Does the backend do anything when a run has finished?  The base
        # method (the in-process backend's) does nothing: then the cleanup
        # skips the step and its shielded, deadlined cancel scope.
        self._announces_finish = type(self.shared).finished is not SharedState.finished

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own detached runs and expiry until cancelled.

        Cancellation: a ``Cancelled`` cancels every detached run, and each still
        saves in its shielded cleanup before this returns.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.expiry.forget_expired)
            task_status.started()
            await trio.sleep_forever()

    @property
    def sessions(self) -> SessionTable:
        """The in-process session table (embedded mode only: checks and tests)."""
        assert isinstance(self.shared, LocalState)
        return self.shared.sessions

    # -- creating ---------------------------------------------------------
    async def create(
        self, tenant: str, session_id: str | None, request: ChatRequest,
        response: ResponseMeta | None = None,
    ) -> Run:  # fmt: skip
        """Register a run and, if it has a session, supersede the session's runs.

        The claim is atomic in the shared state (G1): from then on the new run
        is the session's current run, wherever its predecessors run.  Raises
        ``SharedUnavailable`` when the shared state is unreachable (the HTTP
        layer answers 503); then nothing of the run remains.

        Cancellation: in-process no checkpoint; in cluster mode a ``Cancelled``
        in the claim may leave the run registered and claimed with nothing
        driving it (the record expires; the session's next claim supersedes it).
        """
        run = Run(
            new_run_id("run_" if response is None else "resp_"), tenant, session_id, request,
            detached=request.detach, coalesce=self.settings.coalesce,
        )  # fmt: skip
        run.response = response
        await claim(run, self.shared, self.routes.tracing)  # opens the run's span (drive ends it)
        self.runs[run.id] = run
        self.live += 1
        self.metrics.active_runs.inc()
        self.logger.event("stream_start", trace=run.id, session=session_id, detached=run.detached)
        for prev in run.predecessors:
            await self.shared.cancel(prev, "superseded")
        return run

    def start_detached(self, run: Run) -> None:
        assert self._nursery is not None, "RunManager.run() is not running"
        self._nursery.start_soon(self.drive, run)
        if self.shared.ships_logs:
            self._nursery.start_soon(self.shared.ship, run)

    # -- driving ----------------------------------------------------------
    async def drive(self, run: Run) -> None:
        """The upstream reader: run ``run`` to its end, then clean up.

        Returns when the run is saved and released.  Raises only ``Cancelled``
        from an enclosing scope (after cleaning up); its own cancellation is
        absorbed by ``run.scope``.

        ``run.scope`` also carries the upstream's deadlines (first token, next
        token: see :meth:`_pump`), so a reader has one cancel scope, not two.
        Every cancellation of a run fixes its outcome before it cancels the
        scope (:meth:`cancel`), so a scope that caught a cancellation while the
        outcome is still open was cancelled by its deadline: the upstream was
        too slow.
        """
        with traced(run):  # the run's span: current in this task, ended after the cleanup
            try:
                with run.scope:
                    grace = self.settings.supersede_timeout
                    await await_predecessors(run, self.shared, self.runs, self.logger, grace)
                    await self._pump(run)
                if run.scope.cancelled_caught and run.log.outcome is None:
                    which = "first token" if run.first_token_at is None else "next token"
                    raise UpstreamError(f"The upstream sent no {which} in time.", timeout=True)
            except UpstreamError as exc:
                run.error = exc
                self._fail(run, exc.message, error=exc.error)  # the upstream's own, if it said
            except Exception as exc:  # a bug: keep the server up, and say so
                self.logger.event("run_crashed", trace=run.id, error=repr(exc))
                run.error = InternalError()
                self._fail(run, INTERNAL_MESSAGE, "internal_error")
            finally:
                await self._cleanup(run)

    async def _pump(self, run: Run) -> None:
        """Upstream items -> the run's log, until ``finish_reason`` or an error.

        Per-token work is kept small: the inter-token deadline (the serving
        member's ``token_timeout``) is re-armed (a heap push) at most once per
        1/64 of it -- so the upstream may stay silent for at least 63/64 of it
        and never more than all of it -- and the token counter is bumped then.
        """
        s = self.settings
        armed = -math.inf
        counted = 0
        guard = run.scope  # its deadline is the upstream's (see drive)
        guard.deadline = trio.current_time() + s.first_token_timeout
        try:
            async with self.routes.stream(run) as items:
                while True:
                    item = await anext(items, None)
                    if item is None:
                        raise UpstreamError("The upstream ended the stream without finishing.")
                    if isinstance(item, Usage):
                        run.usage = item
                        continue
                    if isinstance(item, Finish):
                        run.end(Outcome(RunStatus.COMPLETED, item.reason))
                        usage, tail = await _read_to_end(items, run.log.shape)
                        run.usage = usage or run.usage
                        run.log.set_tail(tuple(tail))
                        return
                    if not run.append(item):
                        return  # ended meanwhile; run.scope's cancel lands on exit
                    if run.first_token_at is None:
                        run.first_token_at = trio.current_time()
                        self.metrics.ttft.observe(run.first_token_at - run.started)
                        rearm = (token_timeout := self.routes.token_timeout(run)) / 64  # member's
                    if run.must_wait_for_room():
                        guard.deadline = math.inf  # a slow client is not a slow upstream
                        await run.wait_for_room()
                        armed = -math.inf
                    now = trio.current_time()
                    if now - armed >= rearm:
                        guard.deadline, armed = now + token_timeout, now
                        self.metrics.tokens.inc(run.log.last_seq - counted)
                        counted = run.log.last_seq
        finally:
            self.metrics.tokens.inc(run.log.last_seq - counted)

    # -- ending -----------------------------------------------------------
    def cancel(self, run: Run, reason: str, message: str | None = None) -> bool:
        """Cancel ``run`` with ``reason``.  Idempotent: False if it had ended.

        Not a checkpoint.  The run's cleanup happens in its own task.
        """
        outcome = Outcome(RunStatus.CANCELLED, reason, message or CANCEL_MESSAGES.get(reason, ""))
        if not run.end(outcome):
            return False
        run.cancelled_at = trio.current_time()
        run.scope.cancel()
        self.metrics.cancellations.labels(reason).inc()
        self.logger.event("stream_cancelled", trace=run.id, reason=reason)
        return True

    async def cancel_id(self, run_id: str, reason: str) -> bool:
        """Cancel a run wherever it runs (G4).  True if it was running.

        Cancellation: a local run is cancelled without a checkpoint; for a
        remote one (:meth:`Cluster.cancel_remote`) a ``Cancelled`` leaves the
        request sent or not.
        """
        if (run := self.runs.get(run_id)) is not None:
            return self.cancel(run, reason)
        return await self.cluster.cancel_remote(run_id, reason)

    def _fail(
        self, run: Run, message: str, reason: str = "upstream_error", error: Any = None
    ) -> None:
        """End ``run`` as failed (``upstream_error``; ``internal_error``: a bug), unless ended."""
        if run.end(Outcome(RunStatus.FAILED, reason, message, error)):
            self.metrics.cancellations.labels(reason).inc()
            self.logger.event("stream_cancelled", trace=run.id, reason=reason)

    async def _cleanup(self, run: Run) -> None:
        """Save, release, wake: the one place a run ends.  Shielded, bounded.

        The save gets ``cleanup_timeout``; each shared-state step after it gets
        :data:`SHARED_TIMEOUT` of its own, so a slow save never costs the
        session its release.  What to do is decided by :func:`lifecycle.ending`.

        A bug in the save or the release (an unexpected exception) is logged
        ``run_crashed`` and skips the rest of that step, never the run's end:
        it is still counted, woken and dropped or kept, and nothing is raised,
        so that a detached run's crash cannot reach the manager's nursery (and
        end the process).  ``Cancelled`` is never caught.
        """
        fenced = run.log.fenced
        try:
            with trio.CancelScope(shield=True) as cs:
                cs.deadline = trio.current_time() + self.cleanup_timeout
                self._cleanups.add(cs)
                try:
                    if run.log.status is RunStatus.RUNNING:  # cancelled from outside
                        self.cancel(run, "shutdown")
                    await self._save(run)
                finally:
                    self._cleanups.discard(cs)
            if cs.cancelled_caught:
                self.logger.event("save_timeout", trace=run.id)
            fenced = await _settle_and_release(run, self.shared, self.logger)
        except Exception as exc:  # a bug: the run still ends, the server goes on
            self.logger.event("run_crashed", trace=run.id, error=repr(exc))
            if run.log.outcome is None:
                run.error = InternalError()
                self._fail(run, INTERNAL_MESSAGE, "internal_error")
            fenced = fenced or run.log.fenced
        outcome = run.log.outcome
        assert outcome is not None
        end = ending(outcome, events=run.log.last_seq, detached=run.detached, fenced=fenced)
        if run.session_key is not None and end.clean_supersede:
            self.logger.event("prev_stream_finished_cleanly", session=run.session_id, trace=run.id)
        self.live -= 1
        self.metrics.active_runs.dec()
        self.metrics.runs.labels(end.outcome).inc()
        if run.cancelled_at is not None:
            self.metrics.cancel_seconds.observe(trio.current_time() - run.cancelled_at)
        run.finished()
        if self._announces_finish:
            await shared_step(run.id, self.shared.finished(run), self.logger)
        if end.log_end:
            self.logger.event("stream_end", **run.end_fields())
        if end.keep:
            self.expiry.add(run.id)
        else:
            del self.runs[run.id]  # its only client has it; GET falls back to the store
        self._idle.unpark_all()

    async def _save(self, run: Run) -> None:
        await save_run(run, self.store, self.metrics, self.logger)

    # -- the owner side of the shared state ---------------------------------
    def cancel_local(self, run_id: str, reason: str) -> bool:
        run = self.runs.get(run_id)
        return run is not None and self.cancel(run, reason)

    def local_run(self, run_id: str) -> Run | None:
        return self.runs.get(run_id)

    async def adopt_lost(self, node: str, records: list[RunRecord]) -> None:
        """End the runs of a lost node (:meth:`Cluster.adopt_lost`), each save
        within the cleanups' current deadline.

        Cancellation: as :meth:`Cluster.adopt_lost`.
        """
        await self.cluster.adopt_lost(node, records, self.cleanup_timeout)

    # -- finding ----------------------------------------------------------
    def get(self, tenant: str, run_id: str) -> Run | None:
        """The run, if it is in this process's memory and belongs to ``tenant``."""
        run = self.runs.get(run_id)
        return run if run is not None and run.tenant == tenant else None

    # -- shutdown -----------------------------------------------------------
    def shorten_cleanups(self, timeout: float) -> None:
        """From now on every save -- those under way too -- ends within ``timeout``
        (shutdown, after the grace period)."""
        self.cleanup_timeout = timeout
        deadline = trio.current_time() + timeout
        for scope in self._cleanups:
            scope.deadline = min(scope.deadline, deadline)

    async def wait_idle(self) -> None:
        """Block until no run is live.  Cancellable."""
        while self.live:
            await self._idle.park()

    def cancel_all(self, reason: str) -> None:
        """Cancel every live run (then :meth:`wait_idle` for their cleanup)."""
        for run in list(self.runs.values()):
            if not run.done.is_set():
                self.cancel(run, reason)
