"""A run's upstream stream over several members: failover and hedging (the trio
half of :mod:`trio_stream.core.router`, whose rules decide everything here).

:meth:`Routes.stream` replaces ``upstream.stream(request)`` in the reader
(:meth:`~trio_stream.runs.manager.RunManager.drive`): it yields the items of
the member that produced the run's first entry (or its finish), and nothing
reaches the run's log before that, so whatever happens before the first token
can be retried on another member and the client sees one response.

Two shapes, by the model's group:

* **No hedging** (the default, and the one-upstream shorthand): one attempt
  at a time, in the reader's own task -- no task, nursery or channel more
  than with one upstream.  An attempt that fails before its first token
  (F1: a connect failure, a timeout, a 5xx, a 429) is recorded on its member
  (H2/H3) and the next member is tried (B4), until the request's first-token
  deadline (``run.scope``'s, set by the reader) or the members run out; then
  the run fails with the last attempt's error.

* **Hedging** (``hedge_after_ms``): a nursery inside the reader, the
  *race*::

      drive(run)                              the reader (runs/manager.py)
      └── run.scope
          └── race nursery                    Routes._hedged
              ├── attempt(first member)       its own cancel scope; owns its connection
              ├── attempt(hedge member)       started after hedge_after_ms without a token
              └── (body) the controller, then the reader's pump of the winner's items

  Each attempt opens its member's stream and reads to its first entry; the
  first to get there wins (:meth:`_Race.win`): every other attempt's scope is
  cancelled at once, which closes its connection in
  :class:`~trio_stream.upstream.h1.Pool`'s shielded close -- the path a
  client's disconnect takes.  The winner's task keeps its connection open
  (its ``async with`` holds it) while the reader pumps its items, and
  leaves it when the reader is done.  Exactly one attempt ever appends to
  the run: one run, one saved message, one usage.  Cancelling the run
  (supersede, stop, disconnect, shutdown) cancels ``run.scope`` and with it
  every attempt.

An attempt's own first-token deadline is its member's ``first_token_timeout``
(F2); a member's failures after the first token count as ``BROKEN`` (H2) but
are never retried.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from types import TracebackType
from typing import cast

import trio

from ..config import Settings
from ..core.router import Failure, Lease, Member, Refusal, Router, classify, fails_over
from ..core.router import retry_after_seconds as parse_retry_after
from ..errors import UpstreamError, UpstreamsUnavailable
from ..logs import EventLogger
from ..metrics import Metrics
from ..shared import SharedState, SharedUnavailable
from ..tracing import NO_SPAN, NO_TRACING, Span, Tracing
from ..upstream import Item, ResponseModel, Upstream, UpstreamItem
from ..wire.request import ChatRequest
from ..wire.usage import Usage
from .run import Run
from .spans import end_attempt_span


class _Prepend:
    """The items an attempt read up to its first entry, then the rest of its
    stream: the rest is the member's own iterator, called directly (no
    generator frame more per token).  ``first`` holds no
    :class:`ResponseModel` (:func:`_response_model` took it out), and the
    rest has none (an adapter says it only before its first entry)."""

    __slots__ = ("_first", "_items")

    def __init__(self, first: list[Item], items: AsyncIterator[UpstreamItem]) -> None:
        self._first = first
        self._items = cast(AsyncIterator[Item], items)

    def __aiter__(self) -> _Prepend:
        return self

    def __anext__(self) -> Awaitable[Item]:
        if self._first:
            return _ready(self._first.pop(0))
        return self._items.__anext__()


async def _ready(item: Item) -> Item:
    return item


async def _first_items(items: AsyncIterator[UpstreamItem]) -> list[UpstreamItem]:
    """Read to the first entry or ``Finish`` (inclusive).  Raises
    :class:`UpstreamError` if the stream ends first.  Cancellation: a
    checkpoint; a ``Cancelled`` loses what was read (the attempt is over)."""
    read: list[UpstreamItem] = []
    while True:
        item = await anext(items, None)
        if item is None:
            raise UpstreamError("The upstream ended the stream without finishing.")
        read.append(item)
        if not isinstance(item, Usage | ResponseModel):
            return read


def _response_model(first: list[UpstreamItem]) -> tuple[list[Item], str | None]:
    """What an attempt read up to its first entry, without the upstream's
    :class:`ResponseModel`; and that model's name (None if it named none)."""
    model = None
    items: list[Item] = []
    for item in first:
        if isinstance(item, ResponseModel):
            model = item.name
        else:
            items.append(item)
    return items, model


def _retry_after(exc: UpstreamError) -> float | None:
    for name, value in exc.headers:
        if name == b"retry-after":
            return parse_retry_after(value.decode("latin-1"), time.time())
    return None


def _cooling(member: Member) -> Callable[[], float]:
    """The scrape-time value of ``trio_stream_upstream_cooling`` for ``member``."""
    return lambda: float(member.cooling(trio.current_time()))


def as_routes(
    upstream: Routes | Upstream, settings: Settings, metrics: Metrics, logger: EventLogger,
    tracing: Tracing = NO_TRACING,
) -> Routes:  # fmt: skip
    """``upstream`` if it is :class:`Routes`; else the client of the settings'
    only member (an embedder's or a test's one upstream)."""
    if isinstance(upstream, Routes):
        return upstream
    (only,) = settings.members().members
    router = Router(settings.members())
    return Routes(settings, router, {only.name: upstream}, metrics, logger, tracing)


class Routes:
    """The router, one client per member, and opening a run's stream on them."""

    def __init__(
        self, settings: Settings, router: Router, clients: Mapping[str, Upstream],
        metrics: Metrics, logger: EventLogger, tracing: Tracing = NO_TRACING,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.tracing = tracing
        self.router = router
        self.clients = dict(clients)
        self.metrics = metrics
        self.logger = logger
        for name, member in router.members.items():
            metrics.upstream_in_flight.labels(name).set(0)
            metrics.upstream_cooling.labels(name).set_function(_cooling(member))
        #: Cooldowns this node started, not yet told to the others (cluster mode).
        self._to_share: dict[str, float] = {}
        self._started_cooling = trio.lowlevel.ParkingLot()

    async def share_cooldowns(
        self, shared: SharedState, interval: float,
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:  # fmt: skip
        """Cluster mode (H6): tell the other nodes each cooldown this node
        starts, at once, and learn theirs every ``interval`` (the heartbeat),
        until cancelled.  The shared state out of reach skips a round (it is
        degraded and says so).  Runs in the service's nursery.

        Cancellation: runs until cancelled; a ``Cancelled`` may leave a
        cooldown untold (the others then learn of the member's failures by
        their own requests).
        """
        task_status.started()
        names = list(self.router.members)
        while True:
            with trio.move_on_after(interval):
                await self._started_cooling.park()
            told, self._to_share = self._to_share, {}
            try:
                if told:
                    await shared.share_cooldowns(told)
                left = await shared.cooldowns(names)
            except SharedUnavailable:
                continue
            now = trio.current_time()
            learnt = [self.router.cool(name, now + seconds) for name, seconds in left.items()]
            if any(learnt):  # the probe (runs/probe.py) waits for cooldowns
                self._started_cooling.unpark_all()

    async def wait_for_cooldown(self, until: float) -> None:
        """Until a cooldown starts (here, or learnt from another node) or
        ``until``, whichever comes first.  Cancellation: a checkpoint."""
        with trio.move_on_at(until):
            await self._started_cooling.park()

    def stream(self, run: Run) -> AbstractAsyncContextManager[AsyncIterator[Item]]:
        """Open ``run``'s upstream stream on a member (see the module docstring).

        Raises :class:`UpstreamsUnavailable` when no member can take it (B3),
        an attempt's :class:`UpstreamError` when no failover is left, and
        ``Cancelled`` from ``run.scope``.  Cancellation: a checkpoint;
        leaving the block by any exit closes every connection still open,
        releases every member's stream and lets nothing else run.
        """
        hedge_after = self.router.hedge_after(run.request.model)
        if hedge_after is None:
            return _Sequential(self, run)
        return self._hedged(run, hedge_after)

    def token_timeout(self, run: Run) -> float:
        """The silence allowed between two tokens of the member serving ``run``."""
        member = self.router.members.get(run.served_by or "")
        own = None if member is None else member.spec.token_timeout
        return self.settings.token_timeout if own is None else own

    # -- choosing and recording ----------------------------------------------------
    def _acquire(
        self, run: Run, tried: list[str], last: UpstreamError | None = None,
        failed: Lease | None = None,
    ) -> Lease:  # fmt: skip
        """The next member (B2); B3's refusal on the first choice, else the
        last attempt's error (B4).  ``failed``: the member the request moves
        on from (a failover, counted once it has somewhere to go)."""
        got = self.router.acquire(run.request.model, trio.current_time(), tried)
        if isinstance(got, Refusal):
            if last is not None:
                raise last
            raise UpstreamsUnavailable(got.status, got.retry_after)
        if failed is not None:
            self.metrics.upstream_failovers.labels(failed.member.name).inc()
        tried.append(got.member.name)
        self.metrics.upstream_in_flight.labels(got.member.name).inc()
        return got

    def _release(self, lease: Lease) -> None:
        if not lease.released:
            self.router.release(lease)
            self.metrics.upstream_in_flight.labels(lease.member.name).dec()

    def _request(self, run: Run, lease: Lease, span: Span = NO_SPAN) -> ChatRequest:
        """R2: the run's request as the member knows the model; with the
        attempt's ``traceparent`` when it is traced."""
        request = run.request
        if traceparent := span.traceparent:
            request = replace(request, trace_headers=(("traceparent", traceparent),))
        if lease.model == request.model:
            return request
        return replace(request, model=lease.model, body={**request.body, "model": lease.model})

    def _span(self, run: Run, lease: Lease) -> Span:
        """An attempt's client span (a child of the run's), or the no-op."""
        if not self.tracing.enabled:
            return NO_SPAN
        name = lease.member.name
        system = getattr(self.clients[name], "name", "") or "unknown"
        return self.tracing.attempt(run.span, {
            "gen_ai.operation.name": "chat", "gen_ai.system": system,
            "gen_ai.provider.name": system, "gen_ai.request.model": lease.model,
            "trio_stream.upstream.member": name, "trio_stream.run.id": run.id,
        })  # fmt: skip

    def _won(
        self, run: Run, lease: Lease, started: float, span: Span, first: list[UpstreamItem]
    ) -> list[Item]:
        """The attempt produced the run's first entry: H4, and the run is its
        member's.  The upstream's model (``first``'s :class:`ResponseModel`)
        goes on the attempt's and the run's spans (``gen_ai.response.model``);
        returns ``first`` without it, the items the reader gets first."""
        name = lease.member.name
        self.router.succeeded(lease)
        run.served_by = name
        run.span.event("first_token", {"trio_stream.upstream.member": name})
        entries, model = _response_model(first)
        if model is not None:
            said = {"gen_ai.response.model": model}
            span.set(said)
            run.span.set(said)
        self.metrics.upstream_attempts.labels(name, "first_token").inc()
        self.metrics.upstream_ttft.labels(name).observe(trio.current_time() - started)
        return entries

    def _failed(self, run: Run, lease: Lease, exc: UpstreamError, *, started: bool) -> Failure:
        """Record an attempt's failure on its member (H1-H3); its class."""
        failure = classify(exc.upstream_status, timeout=exc.status == 504, started=started)
        retry_after = _retry_after(exc) if failure is Failure.RATE_LIMITED else None
        name = lease.member.name
        cooldown = self.router.failed(lease, failure, trio.current_time(), retry_after)
        if cooldown is not None:
            self._to_share[name] = max(cooldown, self._to_share.get(name, 0.0))
            self._started_cooling.unpark_all()
        self.metrics.upstream_attempts.labels(name, failure.value).inc()
        self.logger.event(
            "upstream_failed", trace=run.id, member=name, failure=failure.value,
            error=exc.message, cooldown_s=cooldown,
        )  # fmt: skip
        return failure

    def _timed_out(self, run: Run, lease: Lease, exc: BaseException, *, started: bool) -> bool:
        """``exc`` is the request's own deadline (``run.scope``'s: the first
        token's, then the next token's) cancelling an attempt: a timeout of
        its member (H1/H2; ``BROKEN`` once started).  Any other cancel (the
        run ended for a reason, shutdown) says nothing of the member."""
        if (
            isinstance(exc, trio.Cancelled)
            and run.log.outcome is None
            and trio.current_time() >= run.scope.deadline
        ):
            which = "next" if started else "first"
            error = UpstreamError(f"The upstream sent no {which} token in time.", timeout=True)
            self._failed(run, lease, error, started=started)
            return True
        return False

    def _fails_over(self, run: Run, failure: Failure) -> bool:
        """F1: move on, or end with this error?"""
        return fails_over(failure, trio.current_time(), run.scope.deadline)

    def _within(self, run: Run, lease: Lease) -> trio.CancelScope | None:
        """F2: the attempt's own deadline, as a cancel scope only if it comes
        before the request's (``run.scope``'s): most attempts enter none."""
        default = self.settings.first_token_timeout
        now = trio.current_time()
        deadline = self.router.attempt_deadline(lease, now, run.scope.deadline, default)
        return trio.CancelScope(deadline=deadline) if deadline < run.scope.deadline else None

    # -- the race ------------------------------------------------------------------------
    @asynccontextmanager
    async def _hedged(self, run: Run, hedge_after: float) -> AsyncIterator[AsyncIterator[Item]]:
        race = _Race()
        caught: Exception | None = None
        async with trio.open_nursery() as nursery:
            try:
                try:
                    items = await self._race(run, race, nursery, hedge_after)
                    yield items
                finally:
                    race.close()
            except UpstreamError as exc:
                if race.winner is not None:  # after the first token: H2's BROKEN
                    self._failed(run, race.winner, exc, started=True)
                caught = exc
            except Exception as exc:  # re-raised below, outside the nursery's group
                caught = exc
        if caught is not None:
            raise caught

    async def _race(
        self, run: Run, race: _Race, nursery: trio.Nursery, hedge_after: float
    ) -> AsyncIterator[Item]:
        """Start attempts until one wins: the first, a hedge after
        ``hedge_after`` without a token, the next member after each failure
        (F1).  The winner's items."""
        tried: list[str] = []
        self._start(run, race, nursery, self._acquire(run, tried))
        hedge_at = trio.current_time() + hedge_after
        while race.items is None:
            if not race.running:  # every attempt failed before its first token
                lease, exc, failure = race.failures[-1]
                if not self._fails_over(run, failure):
                    raise exc
                self._start(run, race, nursery, self._acquire(run, tried, exc, lease))
                continue
            with trio.move_on_at(hedge_at):
                await race.changed.park()
            if race.items is None and trio.current_time() >= hedge_at and race.hedge is None:
                hedge_at = math.inf
                got = self.router.acquire(run.request.model, trio.current_time(), tried)
                if isinstance(got, Lease):
                    tried.append(got.member.name)
                    self.metrics.upstream_in_flight.labels(got.member.name).inc()
                    self.metrics.upstream_hedges.labels(got.member.name, "started").inc()
                    race.hedge = got
                    self.logger.event("upstream_hedge", trace=run.id, member=got.member.name)
                    self._start(run, race, nursery, got)
        return race.items

    def _start(self, run: Run, race: _Race, nursery: trio.Nursery, lease: Lease) -> None:
        scope = trio.CancelScope()
        race.running[lease.member.name] = scope
        nursery.start_soon(self._attempt, run, race, lease, scope)

    async def _attempt(self, run: Run, race: _Race, lease: Lease, scope: trio.CancelScope) -> None:
        """One member's attempt in the race: read to the first entry, win or
        fail; a winner holds its connection until the race closes.

        Cancellation: a loser's ``scope`` is cancelled by the winner, which
        closes its connection (shielded, bounded) before this returns.
        """
        name = lease.member.name
        began = trio.current_time()
        won = False
        own = self._within(run, lease)
        span = self._span(run, lease)
        outcome = "cancelled"
        try:
            with scope:
                with own or contextlib.nullcontext():
                    request = self._request(run, lease, span)
                    async with self.clients[name].stream(request) as items:
                        first = await _first_items(items)
                        if race.items is not None or race.closed:
                            outcome = "hedge_lost"
                            return  # lost by a hair: leaving closes the connection
                        won = True
                        entries = self._won(run, lease, began, span, first)
                        if race.hedge is lease:
                            self.metrics.upstream_hedges.labels(name, "won").inc()
                        race.win(lease, _Prepend(entries, items))
                        await race.done.wait()  # the reader pumps this connection's items
                if own is not None and own.cancelled_caught:
                    raise _no_first_token(lease)
            if won:
                outcome = "served"
            if scope.cancelled_caught and not won and race.items is not None:
                outcome = "hedge_lost"
                self.metrics.upstream_attempts.labels(name, "hedge_lost").inc()
        except UpstreamError as exc:
            if won:  # a connection error on the way out, after the run was served
                outcome = "served"
                return
            failure = self._failed(run, lease, exc, started=False)
            outcome = failure.value
            race.failed(lease, exc, failure)
        except trio.Cancelled as exc:
            if not won and self._timed_out(run, lease, exc, started=False):
                outcome = "timeout"
            raise
        finally:
            race.running.pop(name, None)
            race.changed.unpark_all()
            self._release(lease)
            end_attempt_span(span, run, outcome, won=won)


def _no_first_token(lease: Lease) -> UpstreamError:
    return UpstreamError(
        f"The upstream sent no first token within {lease.member.name}'s first_token_timeout.",
        timeout=True,
    )


class _Sequential:
    """:meth:`Routes.stream` without hedging: one attempt at a time, in the
    reader's task.  A class, not a generator: the reader waits for its first
    token holding one frame more than with one upstream (``__aenter__``), and
    none once the tokens flow (the member's own iterator is read directly)."""

    __slots__ = ("_lease", "_opened", "_routes", "_run", "_span")

    def __init__(self, routes: Routes, run: Run) -> None:
        self._routes, self._run = routes, run
        self._span: Span = NO_SPAN
        self._lease: Lease | None = None
        self._opened: AbstractAsyncContextManager[AsyncIterator[UpstreamItem]] | None = None

    async def __aenter__(self) -> AsyncIterator[Item]:
        """Attempts until one produces a first entry (F1/B4).  Cancellation: a
        ``Cancelled`` closes the attempt under way and releases its member."""
        routes, run = self._routes, self._run
        tried: list[str] = []
        last: UpstreamError | None = None
        failed: Lease | None = None
        while True:
            lease = self._lease = routes._acquire(run, tried, last, failed)
            began = trio.current_time()
            span = self._span = routes._span(run, lease)
            opened = routes.clients[lease.member.name].stream(routes._request(run, lease, span))
            own = routes._within(run, lease)
            entered = False
            try:
                with own or contextlib.nullcontext():
                    items = await opened.__aenter__()
                    entered = True
                    first: list[UpstreamItem] = []  # _first_items, inline: a frame less idle
                    while not first or isinstance(first[-1], Usage | ResponseModel):
                        item = await anext(items, None)
                        if item is None:
                            raise UpstreamError("The upstream ended the stream without finishing.")
                        first.append(item)
                if own is not None and own.cancelled_caught:
                    raise _no_first_token(lease)
            except BaseException as exc:
                try:
                    if entered:
                        await opened.__aexit__(type(exc), exc, exc.__traceback__)
                finally:
                    routes._release(lease)
                    timed_out = routes._timed_out(run, lease, exc, started=False)
                    if not isinstance(exc, UpstreamError):
                        outcome = "timeout" if timed_out else "cancelled"
                        end_attempt_span(span, run, outcome, won=False)
                if not isinstance(exc, UpstreamError):
                    raise
                failure = routes._failed(run, lease, exc, started=False)
                end_attempt_span(span, run, failure.value, won=False)
                if not routes._fails_over(run, failure):
                    raise
                last, failed = exc, lease
                continue
            self._opened = opened
            return _Prepend(routes._won(run, lease, began, span, first), items)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the member's stream (to the pool if read to its end) and
        release the member; an :class:`UpstreamError` counts as H2's ``BROKEN``.
        Cancellation: the close is the adapter's (shielded, bounded)."""
        assert self._opened is not None
        assert self._lease is not None
        outcome = "served"
        try:
            if isinstance(exc, UpstreamError):
                outcome = self._routes._failed(self._run, self._lease, exc, started=True).value
            elif exc is not None:
                timed_out = self._routes._timed_out(self._run, self._lease, exc, started=True)
                outcome = "timeout" if timed_out else "cancelled"
            await self._opened.__aexit__(kind, exc, tb)
        finally:
            self._routes._release(self._lease)
            end_attempt_span(self._span, self._run, outcome, won=True)


class _Race:
    """The state of one hedged run's attempts (see :meth:`Routes._hedged`)."""

    def __init__(self) -> None:
        self.running: dict[str, trio.CancelScope] = {}
        self.failures: list[tuple[Lease, UpstreamError, Failure]] = []
        self.items: AsyncIterator[Item] | None = None
        self.winner: Lease | None = None
        self.hedge: Lease | None = None
        self.closed = False
        self.changed = trio.lowlevel.ParkingLot()
        self.done = trio.Event()

    def win(self, lease: Lease, items: AsyncIterator[Item]) -> None:
        """``lease``'s attempt has the first entry: every other attempt is cancelled now."""
        self.winner, self.items = lease, items
        for name, scope in self.running.items():
            if name != lease.member.name:
                scope.cancel()
        self.changed.unpark_all()

    def failed(self, lease: Lease, exc: UpstreamError, failure: Failure) -> None:
        self.failures.append((lease, exc, failure))

    def close(self) -> None:
        """The reader is done (or never started): release the winner, cancel the rest."""
        self.closed = True
        self.done.set()
        for name, scope in self.running.items():
            if self.winner is None or name != self.winner.member.name:
                scope.cancel()
