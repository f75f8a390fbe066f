"""Runs and the manager that owns them: the trio half of the run lifecycle.

Ownership (see docs/design.md for the whole tree):

* An **attached** run is driven by :meth:`RunManager.drive` inside the request's
  own nursery, beside that request's writer and disconnect watcher.
* A **detached** run is driven inside the manager's long-lived nursery
  (:meth:`RunManager.run`), so a subscriber that leaves cancels nothing.

Every run has one :class:`trio.CancelScope` (``Run.scope``) around its upstream
work.  Cancelling a run -- for any reason -- goes through
:meth:`RunManager.cancel`, which first fixes the outcome in the pure log
(rule 2 of :mod:`trio_stream.runlog`: nothing more is appended) and then
cancels the scope.  ``drive`` ends in exactly one ``finally`` that saves the
run (shielded, with ``--save-timeout``), releases the session entry by its own
id, and sets ``Run.done``.  That single ``finally`` is the code-path half of
"saved exactly once"; the schema's primary key is the other half.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Coroutine
from typing import Any, TypeVar

import trio

from .chunks import ChunkEncoder
from .config import Settings
from .errors import INTERNAL_MESSAGE, ApiError, InternalError, UpstreamError, unavailable
from .lifecycle import ending
from .logs import EventLogger
from .metrics import Metrics
from .protocol import ChatRequest
from .responses_wire import ResponseMeta
from .runlog import Entry, LogClosed, Outcome, RunLog, RunStatus
from .sessions import SessionKey, SessionTable
from .shared import LocalState, LogPage, RunRecord, SharedState, SharedUnavailable
from .store import AlreadySaved, Message, Store, StoreUnavailable, retry_delay
from .upstream import Finish, Upstream
from .usage import Usage, settle

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
#: The deadline of each shared-state step of a run's cleanup (release, the
#: "finished" notice): a store that is down must not hold a run's cleanup.
SHARED_TIMEOUT = 1.0


async def _drain(items: AsyncIterator[object]) -> Usage | None:
    """Read an upstream stream to its end within a bound; the last
    :class:`Usage` it reports (an OpenAI upstream's comes after the finish).

    The run has already completed: an error or a timeout here only means the
    connection is closed instead of returned to the pool.  Its subscribers
    write the run's ending only after its cleanup, so they see this usage.
    """
    usage = None
    with trio.move_on_after(DRAIN_TIMEOUT), contextlib.suppress(UpstreamError):
        async for item in items:
            if isinstance(item, Usage):
                usage = item
    return usage


T = TypeVar("T")


def follow_page(mirror: Run, page: LogPage) -> None:
    """Append a page of a shared log to a mirror run, and its end if there."""
    for entry in page.entries:
        mirror.append(entry)
    if page.outcome is not None:
        mirror.end(page.outcome)


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
        if self._flag:
            await trio.lowlevel.checkpoint()
            return
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        await self._lot.park()


class Run:
    """One upstream completion: its log, its cancel scope, its wake-ups.

    Every open stream holds one, so it is kept small: ``__slots__``, and the
    two parking lots that only some runs use (``_room``: an attached run's
    reader blocked on a full ``--window``; ``_held``: writers holding events
    for ``--event-interval-ms``) are created on their first wait.  A run
    nobody waits on never has them, and waking it skips them.
    """

    __slots__ = (
        "_changed", "_held", "_room", "cancelled_at", "created", "detached", "done", "encoder",
        "epoch", "error", "first_token_at", "id", "log", "predecessors", "request", "response",
        "scope", "session_id", "started", "tenant", "usage", "window", "writer_cursor",
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
        self.error: ApiError | None = None
        self.usage: Usage | None = None  # as the upstream reported it, if it did
        # Set for a run the Responses API created: how to render it (chat: None).
        self.response: ResponseMeta | None = None
        self.predecessors: tuple[str, ...] = ()
        self.epoch = 0  # the session's claim counter when this run claimed it
        self.first_token_at: float | None = None
        self.cancelled_at: float | None = None
        # Backpressure: an attached streaming run may run at most ``window``
        # entries ahead of its writer's cursor.  ``None``: no writer to wait for.
        self.window: int | None = None
        self.writer_cursor = 0
        self._changed = trio.lowlevel.ParkingLot()
        # Created by the first wait (see the class docstring); ``None`` until then.
        self._room: trio.lowlevel.ParkingLot | None = None
        # Writers holding events back for ``--event-interval-ms``: woken by
        # the end, a fence, the cleanup, or a full window -- never per token.
        self._held: trio.lowlevel.ParkingLot | None = None

    def final_usage(self) -> Usage:
        """The usage of what this run received (docs/api.md section 2.10)."""
        complete = self.log.status is RunStatus.COMPLETED
        return settle(self.usage, self.request.messages, self.log.last_seq, complete=complete)

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
        """
        window = self.window
        if window is None:
            return
        while self.log.last_seq - self.writer_cursor >= window and not self.log.fenced:
            if self._held:  # the writer's interval must not throttle the upstream
                self._held.unpark_all()
            if self._room is None:
                self._room = trio.lowlevel.ParkingLot()
            await self._room.park()

    def end(self, outcome: Outcome) -> bool:
        """Fix the outcome (once) and wake everyone waiting on this run."""
        if self.log.status is not RunStatus.RUNNING:
            return False
        self.log.finish(outcome)
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
    # These two hand back the parking lot's own wait (``await run.wait_changed()``):
    # not ``async def``, so a waiting writer holds no frame of theirs.
    def wait_changed(self) -> Coroutine[Any, Any, None]:
        """Block until an append, the end, a fence or the cleanup.  Cancellable."""
        return self._changed.park()

    def wait_held(self) -> Coroutine[Any, Any, None]:
        """Block until the end, a fence, the cleanup, or the attached run
        waiting on a full window (not on appends).  Cancellable."""
        if self._held is None:
            self._held = trio.lowlevel.ParkingLot()
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


class RunManager:
    """Creates, drives, cancels, finds and expires runs.

    Owns the long-lived nursery of detached runs (:meth:`run`).  What other
    processes must see -- sessions, the run registry, cancel signals, detached
    logs -- goes through ``shared`` (:class:`~trio_stream.shared.SharedState`);
    ``runs`` holds only the runs this process drives.
    """

    def __init__(
        self,
        settings: Settings,
        upstream: Upstream,
        store: Store,
        metrics: Metrics,
        logger: EventLogger,
        shared: SharedState | None = None,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.store = store
        self.metrics = metrics
        self.logger = logger
        self.shared = shared if shared is not None else LocalState()
        self.shared.attach(self)
        self.runs: dict[str, Run] = {}
        self.live = 0
        self._expiry: deque[tuple[float, str]] = deque()
        self._expiry_added = trio.Event()
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

        Cancelling this task cancels every detached run; each still saves in
        its shielded cleanup before this returns.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._reap)
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
        is the session's current run, wherever its predecessors run.  In-process
        this does not checkpoint.  Raises the 503 :class:`ApiError` when the
        shared state is unreachable; then nothing of the run remains.
        """
        run = Run(
            new_run_id("run_" if response is None else "resp_"), tenant, session_id, request,
            detached=request.detach, coalesce=self.settings.coalesce,
        )  # fmt: skip
        run.response = response
        try:
            await self._claim(run)
        except SharedUnavailable as exc:
            raise unavailable(str(exc)) from exc
        self.runs[run.id] = run
        self.live += 1
        self.metrics.active_runs.inc()
        self.logger.event("stream_start", trace=run.id, session=session_id, detached=run.detached)
        for prev in run.predecessors:
            await self.shared.cancel(prev, "superseded")
        return run

    async def _claim(self, run: Run) -> None:
        if not self.shared.healthy:  # known down: answer 503 now, not at a deadline
            raise SharedUnavailable("unreachable")
        await self.shared.register(run)
        if run.session_key is not None:
            claim = await self.shared.claim(run.session_key, run.id)
            run.epoch, run.predecessors = claim.epoch, claim.predecessors

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
        try:
            with run.scope:
                await self._await_predecessors(run)
                await self._pump(run)
            if run.scope.cancelled_caught and run.log.outcome is None:
                which = "first token" if run.first_token_at is None else "next token"
                raise UpstreamError(f"The upstream sent no {which} in time.", timeout=True)
        except UpstreamError as exc:
            run.error = exc
            self._fail(run, exc.message)
        except Exception as exc:  # a bug: keep the server up, and say so
            self.logger.event("run_crashed", trace=run.id, error=repr(exc))
            run.error = InternalError()
            self._fail(run, INTERNAL_MESSAGE, "internal_error")
        finally:
            await self._cleanup(run)

    async def _await_predecessors(self, run: Run) -> None:
        """Wait (up to --supersede-timeout) for superseded runs to clean up."""
        if not run.predecessors:
            return
        key = run.session_key
        assert key is not None
        timeout = self.settings.supersede_timeout
        for prev in await self.shared.wait_finished(run.predecessors, timeout):
            # G3: the straggler may neither emit, nor touch the session
            # entry, nor save over this run.
            with contextlib.suppress(SharedUnavailable):
                await self.shared.fence(key, prev)
            if (local := self.runs.get(prev)) is not None:
                local.fence()  # on this node it stops emitting now, whatever the backend
            self.logger.event("prev_stream_timeout_on_cancel", session=run.session_id, trace=prev)

    async def _pump(self, run: Run) -> None:
        """Upstream items -> the run's log, until ``finish_reason`` or an error.

        Per-token work is kept small: the inter-token deadline is re-armed (a
        heap push) at most once per 1/64 of ``--token-timeout`` -- so the
        upstream may stay silent for at least 63/64 of it and never more than
        all of it -- and the token counter is bumped at those same moments.
        """
        s = self.settings
        rearm = s.token_timeout / 64
        armed = -math.inf
        counted = 0
        guard = run.scope  # its deadline is the upstream's (see drive)
        guard.deadline = trio.current_time() + s.first_token_timeout
        try:
            async with self.upstream.stream(run.request) as items:
                while True:
                    item = await anext(items, None)
                    if item is None:
                        raise UpstreamError("The upstream ended the stream without finishing.")
                    if isinstance(item, Usage):
                        run.usage = item
                        continue
                    if isinstance(item, Finish):
                        run.end(Outcome(RunStatus.COMPLETED, item.reason))
                        run.usage = await _drain(items) or run.usage
                        return
                    if not run.append(item):
                        return  # ended meanwhile; run.scope's cancel lands on exit
                    if run.first_token_at is None:
                        run.first_token_at = trio.current_time()
                        self.metrics.ttft.observe(run.first_token_at - run.started)
                    if run.must_wait_for_room():
                        guard.deadline = math.inf  # a slow client is not a slow upstream
                        await run.wait_for_room()
                        armed = -math.inf
                    now = trio.current_time()
                    if now - armed >= rearm:
                        guard.deadline, armed = now + s.token_timeout, now
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
        """Cancel a run wherever it runs (G4).  True if it was running."""
        run = self.runs.get(run_id)
        if run is not None:
            return self.cancel(run, reason)
        try:
            record = await self.shared.lookup(run_id)
            if record is None or record.status != "running":
                return False
            await self.shared.cancel(run_id, reason)
        except SharedUnavailable as exc:
            raise unavailable(str(exc)) from exc
        return True

    def _fail(self, run: Run, message: str, reason: str = "upstream_error") -> None:
        """End ``run`` as failed: ``upstream_error``, or ``internal_error`` (it
        crashed).  A run that had already ended keeps its outcome."""
        if run.end(Outcome(RunStatus.FAILED, reason, message)):
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
            fenced = await self._release(run)
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
            await self._shared_step(run, self.shared.finished(run))
        if end.log_end:
            self.logger.event("stream_end", **self.end_fields(run))
        if end.keep:
            self._expiry.append((trio.current_time() + self.settings.run_ttl, run.id))
            self._expiry_added.set()
        else:
            del self.runs[run.id]  # its only client has it; GET falls back to the store
        self._idle.unpark_all()

    async def _release(self, run: Run) -> bool:
        """Leave the session by this run's own id (G2); True if it was fenced."""
        key = run.session_key
        if key is None:
            return run.log.fenced
        released = self.shared.release(key, run.id)
        fenced = await self._shared_step(run, released)
        return bool(fenced) or run.log.fenced

    async def _shared_step(self, run: Run, step: Awaitable[T]) -> T | None:
        """Await one shared-state step of a cleanup: shielded, bounded, and a
        store that is down is logged, not raised (the run still ends); so is
        a bug in it (``run_crashed``)."""
        with trio.CancelScope(shield=True) as cs:
            cs.deadline = trio.current_time() + SHARED_TIMEOUT
            try:
                return await step
            except SharedUnavailable as exc:
                self.logger.event("redis_unavailable", trace=run.id, error=str(exc))
            except Exception as exc:  # a bug: the run still ends, the server goes on
                self.logger.event("run_crashed", trace=run.id, error=repr(exc))
        if cs.cancelled_caught:
            self.logger.event("redis_unavailable", trace=run.id, error="timeout")
        return None

    async def _save(self, run: Run) -> None:
        """Save the run's message once; retry while the database cannot be
        reached, until the enclosing deadline (the cleanup's ``--save-timeout``).

        A retried insert whose first attempt had landed finds its row
        (``AlreadySaved`` after a retry): that is this run's own row, saved
        once.  A save that does not land -- an error, or the deadline -- logs
        ``save_failed`` and counts in ``trio_stream_save_failures_total``.
        """
        outcome = run.log.outcome
        assert outcome is not None
        status = ending(outcome, events=run.log.last_seq, detached=run.detached, fenced=False)
        if status.save_status is None:
            return  # nothing produced, nothing to save
        if run.response is not None and not run.response.store:
            return  # a response created with "store": false
        usage = {**run.final_usage().record(), "model": run.request.model}
        message = Message(
            run.id, run.tenant, run.session_id, run.log.content, run.log.tool_calls or None,
            status.save_status, outcome.reason, run.log.last_seq, run.detached, run.created,
            usage,
        )  # fmt: skip
        settled = False
        error = "no answer within --save-timeout"
        attempt = 0
        try:
            while True:
                try:
                    await self.store.save(message)
                except StoreUnavailable as exc:
                    attempt += 1
                    error = str(exc)
                    self.logger.event("save_retry", trace=run.id, attempt=attempt, error=error)
                    await trio.sleep(retry_delay(attempt))
                    continue
                except AlreadySaved:
                    if not attempt:
                        self.logger.event("save_duplicate_refused", trace=run.id)
                except Exception as exc:  # database trouble must not take the server down
                    error = repr(exc)
                    break
                settled = True
                break
        finally:  # also when the deadline cancels a wait
            if not settled:
                self.metrics.save_failures.inc()
                self.logger.event("save_failed", trace=run.id, error=error)

    def end_fields(self, run: Run) -> dict[str, Any]:
        """The keys of a ``stream_end`` line."""
        return {
            "trace": run.id,
            "status": run.log.status.value,
            "tokens": run.log.last_seq,
            "duration_ms": round((trio.current_time() - run.started) * 1000, 3),
        }

    # -- the owner side of the shared state ---------------------------------
    def cancel_local(self, run_id: str, reason: str) -> bool:
        run = self.runs.get(run_id)
        return run is not None and self.cancel(run, reason)

    def local_run(self, run_id: str) -> Run | None:
        return self.runs.get(run_id)

    # -- finding ----------------------------------------------------------
    def get(self, tenant: str, run_id: str) -> Run | None:
        """The run, if it is in this process's memory and belongs to ``tenant``."""
        run = self.runs.get(run_id)
        return run if run is not None and run.tenant == tenant else None

    async def remote(self, tenant: str, run_id: str) -> RunRecord | None:
        """A run another process owns, if it belongs to ``tenant`` (G6)."""
        try:
            record = await self.shared.lookup(run_id)
        except SharedUnavailable as exc:
            raise unavailable(str(exc)) from exc
        return record if record is not None and record.tenant == tenant else None

    async def remote_public(self, record: RunRecord) -> dict[str, Any]:
        """The ``GET /v1/runs/{id}`` object of a run another process owns."""
        try:
            page = await self.shared.read_log(record.id, 0, wait=False)
        except SharedUnavailable as exc:
            raise unavailable(str(exc)) from exc
        mirror = self.mirror(record)
        follow_page(mirror, page)
        public = mirror.public()
        if page.outcome is None:  # attached elsewhere: only its record is shared
            public["status"], public["reason"] = record.status, record.reason
        return public

    def mirror(self, record: RunRecord) -> Run:
        """A local, read-only copy of a remote detached run, fed by :meth:`feed`."""
        body = {"model": record.model, "messages": [], "stream": True}
        request = ChatRequest(body, record.model, [], True, None, record.detached)
        run = Run(
            record.id, record.tenant, record.session_id, request,
            detached=record.detached, coalesce=self.settings.coalesce,
        )  # fmt: skip
        run.created = record.created
        run.encoder.created = int(record.created)
        return run

    async def feed(self, mirror: Run, cursor: int) -> None:
        """Follow a remote run's shared log into ``mirror`` until its end (G7).

        Runs beside the mirror's subscriber and dies with it.  If Redis goes
        away mid-follow the mirror ends ``failed`` (reason
        ``shared_state_unavailable``), so the follower is told, never hung.
        """
        try:
            while mirror.log.outcome is None:
                follow_page(mirror, await self.shared.read_log(mirror.id, cursor, wait=True))
                cursor = mirror.log.last_seq
        except SharedUnavailable as exc:
            mirror.end(Outcome(RunStatus.FAILED, "shared_state_unavailable", str(exc)))
        mirror.finished()

    async def adopt_lost(self, node: str, records: list[RunRecord]) -> None:
        """End the runs of a node whose lease expired: save each detached
        run's partial once from its shared log, end its log and record, and
        free its session (the backend's ``end_lost``)."""
        self.logger.event("node_lost", node=node, runs=len(records))
        for record in records:
            page = await self.shared.read_log(record.id, 0, wait=False)
            mirror = self.mirror(record)
            follow_page(mirror, page)
            outcome = Outcome(RunStatus.FAILED, "node_lost", "The node running this run was lost.")
            mirror.end(outcome)
            with trio.CancelScope(shield=True) as cs:
                cs.deadline = trio.current_time() + self.cleanup_timeout
                await self._save(mirror)
            await self.shared.end_lost(record, mirror.log.last_seq)
            self.metrics.runs.labels("failed").inc()
            self.logger.event("stream_cancelled", trace=record.id, reason="node_lost")

    async def current(self, tenant: str, session_id: str) -> str | None:
        """The id of the session's current run, wherever it runs."""
        try:
            return await self.shared.current((tenant, session_id))
        except SharedUnavailable as exc:
            raise unavailable(str(exc)) from exc

    async def session_known(self, tenant: str, session_id: str) -> bool:
        """Has the session a live run anywhere?"""
        try:
            return bool(await self.shared.live((tenant, session_id)))
        except SharedUnavailable as exc:
            raise unavailable(str(exc)) from exc

    # -- expiry and shutdown ----------------------------------------------
    async def _reap(self) -> None:
        """Forget finished detached runs ``--run-ttl`` after they end."""
        while True:
            now = trio.current_time()
            while self._expiry and self._expiry[0][0] <= now:
                self.runs.pop(self._expiry.popleft()[1], None)
            if self._expiry:
                await trio.sleep_until(self._expiry[0][0])
            else:
                self._expiry_added = trio.Event()
                await self._expiry_added.wait()

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
