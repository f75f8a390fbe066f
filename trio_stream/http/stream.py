"""One client stream: the writer and the disconnect watcher.

A :class:`Subscriber` follows one run's log from a cursor and writes it to one
client as SSE (or, for ``stream: false``, as one JSON object at the end).

Its two tasks are siblings in the request's nursery, with the run's upstream
reader for an attached run (see :mod:`trio_stream.http.chat`):

* the **writer** (:meth:`Subscriber.write_sse` / :meth:`write_json`) sends
  what the log holds, waits for more, sends ``: ping`` after
  ``--ping-interval`` of silence, and ends with the run's terminal frame;
* the **watcher** (:func:`watch_disconnect`) blocks on ASGI ``receive()``,
  the only place hypercorn reports a disconnect (TCP close or HTTP/2
  ``RST_STREAM``).

Every send has a deadline of ``--stall-timeout``.  On HTTP/2 the wait for
flow-control credit is cancellable and the deadline fires.  On HTTP/1.1
hypercorn writes inside a shielded scope, so the app cannot interrupt it;
there the guarded transport of :mod:`trio_stream.http.transport` cuts the
connection at the same deadline, the send returns, and we detect the stall by
the time it took.  Either way :class:`ClientStalled` is raised.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import trio

from ..core.log import Entry, Outcome, RunStatus
from ..errors import error_body
from ..runs import Run
from ..wire import sse
from .asgi import JSON, Receive, Send, send_bytes, send_error, start
from .transport import BodyWriter

SSE_HEADERS = ((b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"))
BATCH = 512  # entries rendered into one send


class ClientStalled(Exception):
    """The client refused data for ``--stall-timeout``."""


class Pinger:
    """Wakes subscribers that have sent nothing for ``--ping-interval``.

    One task for every stream, instead of a timeout around every wait: a
    cancel scope per wake-up costs a deadline-heap push per token, which at
    1,000 streams is most of the scheduler's work.  Subscribers are kept in an
    ``OrderedDict`` in order of their last send (``touch`` moves one to the
    end: O(1)), so the task only ever looks at the first one and sleeps until
    it is due.  A poked subscriber sends ``: ping`` when it next wakes.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._subs: OrderedDict[Subscriber, None] = OrderedDict()
        self._added = trio.Event()

    def touch(self, sub: Subscriber, now: float | None = None) -> None:
        """``sub`` sent something at ``now`` (default: now), or starts: its next
        ping is due later."""
        sub.last_sent = trio.current_time() if now is None else now
        self._subs[sub] = None
        self._subs.move_to_end(sub)
        self._added.set()

    def discard(self, sub: Subscriber) -> None:
        self._subs.pop(sub, None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poke due subscribers until cancelled.

        Cancellation: waits (a checkpoint) between pokes and runs until cancelled; a
        ``Cancelled`` leaves the registered subscribers registered and un-poked.
        """
        task_status.started()
        while True:
            if not self._subs:
                self._added = trio.Event()
                await self._added.wait()
                continue
            sub = next(iter(self._subs))
            due = sub.last_sent + self.interval
            if trio.current_time() < due:
                await trio.sleep_until(due)
                continue
            sub.ping_due = True
            self.touch(sub)  # next poke one interval later, even if it is stuck
            sub.run.poke()


class BurstWatch:
    """Tells writers that a burst of appends is over: one task for every stream.

    A writer that finds more than one entry queued lets the burst run on and
    sends once the backlog has stopped growing (:meth:`Subscriber._backlog`).
    Checking that by yielding to the scheduler costs the writer one task step
    per scheduling batch -- on a fast stream, one per token: half the server's
    task steps on long, fast answers.  Instead the writer parks on its run's
    held lot (appends never touch it; the run's end, a fence, a due ping and
    a reader blocked on a full ``--window`` wake it) and this task looks at
    every parked writer's log once per batch, waking each whose backlog did
    not grow for three of its yields in a row (the first may fall in the
    writer's own batch; trio randomly reverses each batch, so a runnable
    producer runs 0, 1 or 2 times between two yields, never 0 twice) or
    reached ``BATCH``.  One task step per batch for all bursting streams.
    """

    def __init__(self) -> None:
        # writer -> [last_seq at the last look, quiet looks since]
        self._waiting: dict[Subscriber, list[int]] = {}
        self._added = trio.lowlevel.ParkingLot()

    async def settle(self, sub: Subscriber) -> None:
        """Return when ``sub``'s backlog stopped growing (see the class), or
        its run ended, was fenced, waits for room or owes a ping.

        Cancellation: a checkpoint; a ``Cancelled`` unregisters ``sub``.
        """
        self._waiting[sub] = [sub.run.log.last_seq, -1]
        if self._added:
            self._added.unpark_all()
        try:
            await sub.run.wait_held()
        finally:
            self._waiting.pop(sub, None)
        # Woken by the run's end and cancelled in the same instant (a
        # disconnect does both): the cancellation wins, nothing more is sent.
        await trio.lowlevel.checkpoint_if_cancelled()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wake settled writers until cancelled.

        Cancellation: a checkpoint per batch; a ``Cancelled`` leaves parked
        writers parked (their own cancellation or their run's end wakes them).
        """
        task_status.started()
        waiting = self._waiting
        while True:
            if not waiting:
                await self._added.park()
                continue
            await trio.lowlevel.checkpoint()
            for sub, seen in list(waiting.items()):
                last = sub.run.log.last_seq
                if last != seen[0]:
                    seen[0], seen[1] = last, 0
                    if last - sub.cursor < BATCH:
                        continue
                else:
                    seen[1] += 1
                    if seen[1] < 2:
                        continue
                del waiting[sub]
                sub.run.wake_held()


class Subscriber:
    # Every open stream holds one: no per-instance dict (docs/design.md section 16).
    __slots__ = (
        "_body_started", "_burst", "_bursts", "_direct", "_send", "cursor",
        "drives_backpressure", "event_interval", "flow_controlled", "headers", "last_sent",
        "ping_due", "pinger", "run", "sending_since", "stall_timeout", "started",
    )  # fmt: skip

    def __init__(
        self,
        run: Run,
        send: Send,
        *,
        cursor: int,
        stall_timeout: float,
        pinger: Pinger,
        headers: tuple[tuple[bytes, bytes], ...],
        drives_backpressure: bool,
        flow_controlled: bool,
        event_interval: float = 0.0,
        direct: BodyWriter | None = None,
        bursts: BurstWatch | None = None,
    ) -> None:
        self.run = run
        self._send = send
        self.cursor = cursor
        self.stall_timeout = stall_timeout
        self.pinger = pinger
        self.headers = headers
        self.drives_backpressure = drives_backpressure
        # HTTP/2: the app's send waits for flow-control credit, cancellably,
        # so the stall deadline is ours to set.  HTTP/1.1: the send can block
        # only in hypercorn's shielded write, which GuardedStream bounds.
        self.flow_controlled = flow_controlled
        # ``--event-interval-ms`` in seconds: what arrives within it after an event is
        # merged into the next one (0: off).
        self.event_interval = event_interval
        # HTTP/1.1 on a plain connection, and HTTP/2: chunks after the head
        # (HTTP/1.1: after the first) go straight to the connection when they
        # can go at once (``transport.DirectBody``, ``server.h2direct``).
        self._direct = direct
        # Where the writer waits out a burst (None: it yields itself).
        self._bursts = bursts
        # Did the last read find several entries (a burst)?  Then one entry
        # that follows is waited out too: a burst that filled the window goes on.
        self._burst = False
        self._body_started = False
        self.started = False
        self.sending_since: float | None = None
        self.last_sent = 0.0
        self.ping_due = False

    def stalled(self) -> bool:
        """Is a send blocked for ``--stall-timeout`` already (used by the watcher)?"""
        since = self.sending_since
        return since is not None and trio.current_time() - since >= self.stall_timeout

    async def _send_body(self, body: bytes, more: bool = True) -> None:
        """Send one body chunk within the stall deadline.  Raises ClientStalled."""
        self.sending_since = since = trio.current_time()
        cut = False
        direct = self._direct
        if direct is not None and not (self._body_started or (direct.eager and self.started)):
            direct = None  # the head (HTTP/1.1: with the first chunk) goes through ASGI
        if direct is not None and more and await direct.send(body):
            pass  # written (or dropped: the connection is gone, which the watcher hears)
        elif direct is not None and not more and await direct.end(body):
            # HTTP/2: chunk and END_STREAM went directly; this ends the response
            with trio.move_on_after(self.stall_timeout) as cs:
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})
            cut = cs.cancelled_caught
        elif self.flow_controlled:
            message = {"type": "http.response.body", "body": body, "more_body": more}
            with trio.move_on_after(self.stall_timeout) as cs:
                await self._send(message)
            cut = cs.cancelled_caught
            self._body_started = True
        else:
            await self._send({"type": "http.response.body", "body": body, "more_body": more})
            self._body_started = True
        self.sending_since = None
        now = trio.current_time()
        if cut or now - since >= self.stall_timeout:
            raise ClientStalled
        self.pinger.touch(self, now)

    async def _start(self, status: int = 200, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        if not self.started:
            self.started = True
            headers = (*SSE_HEADERS, *self.headers, *extra)
            if not self.flow_controlled:
                # HTTP/1.1: hypercorn only stores the head until the first body
                # chunk, whose write GuardedStream bounds.  No deadline here,
                # so no exited scope lingers in trio's deadline heap.
                await start(self._send, status, b"text/event-stream", headers)
                return
            with trio.move_on_after(self.stall_timeout):  # HTTP/2: the send lock may wait
                await start(self._send, status, b"text/event-stream", headers)

    def _whole_ready(self) -> bool:
        """Has the run finished -- cleaned up, so saved -- before anything was
        sent to this client (a replay of a finished run)?

        Then the answer goes out whole: headers with a ``Content-Length``,
        every event and the terminal frame in one body -- two socket writes
        instead of four (headers, events, terminal frame, chunked
        terminator).  Nothing is ever held back for it: a run still running
        or cleaning up streams as usual.
        """
        log = self.run.log
        return (
            not self.started
            and self.run.done.is_set()
            and not log.fenced
            and log.last_seq - self.cursor <= BATCH
        )

    async def write_sse(self, *, start_now: bool = False) -> None:
        """Stream the log as SSE until the run's terminal frame.

        Headers are deferred until the first event, the first ping or the end,
        so that an upstream failure before the first token can still be an
        HTTP 502/504.  Cancellable at every wait; raises ClientStalled.
        (One method, not a wrapper around the loop: an open stream's writer
        holds one frame fewer while it waits.)
        """
        self.pinger.touch(self)
        try:
            run, log = self.run, self.run.log
            if start_now and not self._whole_ready():
                await self._start()  # a replay of a finished run goes out whole instead
            if head := self.preamble():
                await self._start()
                await self._send_body(head)
            whole = False
            hold_until: float | None = None  # --event-interval-ms: the next event's earliest time
            while True:
                if not self.started and self._whole_ready():
                    whole = True
                    break
                if hold_until is not None:
                    await self._hold(hold_until)
                    hold_until = None
                entries = [] if log.fenced else await self._backlog()
                if entries:
                    if not self.started:
                        await self._start()
                    await self._send_body(self.render(entries, self.cursor + 1))
                    self.cursor += len(entries)
                    if self.drives_backpressure:
                        run.advance(self.cursor)
                    if self.event_interval and len(entries) < BATCH and log.outcome is None:
                        hold_until = trio.current_time() + self.event_interval
                    continue
                if (log.outcome is not None and run.settled) or log.fenced:
                    break
                if self.ping_due:
                    self.ping_due = False
                    await self._start()
                    await self._send_body(sse.PING)
                    continue
                await run.wait_changed()  # an append, the end, a fence, or the pinger
            if log.fenced:
                return  # sessions rule 3: a fenced run emits nothing more
            outcome = log.outcome
            assert outcome is not None
            if not self.started and run.error is not None and log.last_seq == 0:
                await send_error(self._send, run.error, self.headers)
                self.started = True
                return
            if whole:
                await self._send_whole(outcome)
                return
            await self._start()
            await self._send_body(self.terminal(outcome), more=False)
        finally:
            self.pinger.discard(self)

    async def _send_whole(self, outcome: Outcome) -> None:
        """The whole answer as one body (see :meth:`_whole_ready`)."""
        run = self.run
        entries = run.log.read(self.cursor, BATCH)
        events = self.render(entries, self.cursor + 1) if entries else b""
        body = events + self.terminal(outcome)
        self.cursor += len(entries)
        if self.drives_backpressure:
            run.advance(self.cursor)
        await self._start(extra=((b"content-length", str(len(body)).encode()),))
        await self._send_body(body, more=False)

    # -- rendering: the run's API (chat completions here; Responses API in
    # trio_stream.http.responses, which overrides these) ---------------------------
    def preamble(self) -> bytes:
        """Events due before the first delta (none for chat completions)."""
        return b""

    def render(self, entries: list[Entry], first_seq: int) -> bytes:
        """SSE bytes for ``entries``, the first numbered ``first_seq``."""
        return self.run.encoder.render(entries, first_seq, self.run.log.shape)

    def terminal(self, outcome: Outcome) -> bytes:
        """The ending frame(s); the usage chunk first if the request asked
        for it (``stream_options.include_usage``).

        The hook that withholds usage from a client that did not ask for it
        (trio-stream always asks the upstream: ``ChatRequest.upstream_body``)
        is ``run.request.client_wants_usage``, consulted here."""
        run = self.run
        usage = run.final_usage().chat() if run.request.client_wants_usage else None
        return run.encoder.terminal(outcome, usage, run.log)

    async def _hold(self, deadline: float) -> None:
        """``--event-interval-ms``: after an event, let tokens gather until
        ``deadline``, so that they go out merged in the next event.

        Ends early -- at once -- when the run ends (what is pending goes out
        with the terminal frame, never up to an interval late), is fenced, or
        is an attached run blocked on a full ``--window`` (the interval never
        throttles the upstream), or a ping falls due (pings keep their time).
        One cancel scope per event and a parking lot that appends do not
        touch: no timer and no wake-up per token.
        Cancellable, like every wait of the writer (a disconnect ends it).
        """
        run, log = self.run, self.run.log
        with trio.move_on_at(deadline):
            while not (
                log.outcome is not None or log.fenced or run.must_wait_for_room() or self.ping_due
            ):
                await run.wait_held()

    async def _backlog(self) -> list[Entry]:
        """What to send next: the entries after the cursor, after letting a
        producer that is mid-burst append more.

        One send costs far more than one append (an ASGI hand-off, h11, a
        system call), so a writer that sent each entry as soon as it appeared
        would cap the stream at the send rate.  When more than one entry is
        already queued -- a burst is under way -- yield to the scheduler while
        the backlog keeps growing; send when it has not grown for two yields
        in a row, or reaches ``BATCH``.  Two, because trio randomly reverses
        the order of each scheduling batch: between two of our yields a
        runnable producer runs 0, 1 or 2 times, but never 0 twice in a row.
        A stream whose tokens arrive one at a time pays nothing (after a
        burst, its first token waits out a few batches once).  With
        ``--coalesce`` the backlog becomes one event; without, one send.
        """
        log = self.run.log
        queued = log.last_seq - self.cursor
        if (
            (queued > 1 or (queued == 1 and self._burst))
            and queued < BATCH
            and self._bursts is not None
            and log.outcome is None
            and not (log.fenced or self.run.must_wait_for_room() or self.ping_due)
        ):
            await self._bursts.settle(self)
        elif queued > 1:
            still = 0
            while queued < BATCH and still < 2 and not log.fenced:
                await trio.lowlevel.checkpoint()
                grown = log.last_seq - self.cursor
                still = still + 1 if grown == queued else 0
                queued = grown
        entries = log.read(self.cursor, BATCH)
        if entries:
            self._burst = len(entries) > 1
        return entries

    async def write_json(self) -> None:
        """``stream: false``: wait for the end, answer one object or an error.

        Cancellation: a checkpoint while it waits for the run; a ``Cancelled`` leaves the
        response unanswered (or half sent) and the run untouched.
        """
        run = self.run
        while not run.settled:
            await run.wait_changed()
        if run.log.fenced:
            return
        outcome = run.log.outcome
        assert outcome is not None
        self.started = True
        # One answer, one deadline: an HTTP/2 client that stops reading holds
        # this send on flow control (HTTP/1.1's guarded transport cuts it too).
        with trio.move_on_after(self.stall_timeout) as cs:
            await self._answer_json(outcome)
        if cs.cancelled_caught:
            raise ClientStalled

    async def _answer_json(self, outcome: Outcome) -> None:
        run = self.run
        if outcome.status is RunStatus.COMPLETED:
            body = run.encoder.completion(run.log, run.final_usage().chat())
            await send_bytes(self._send, 200, body, JSON, self.headers)
        elif run.error is not None:  # the upstream failed (502/504), or we did (500)
            await send_error(self._send, run.error, self.headers)
        else:
            status = 503 if outcome.reason == "shutdown" else 409
            body = error_body(outcome.message, "stream_cancelled", outcome.reason)
            await send_bytes(self._send, status, body, JSON, self.headers)


async def watch_disconnect(
    receive: Receive, on_disconnect: Callable[..., None], *args: Any
) -> None:
    """Block on ``receive()`` until ``http.disconnect``, then call ``on_disconnect(*args)``.

    Must be the one task reading ``receive`` after the body is read: a
    disconnect that is already queued is seen at once (hypercorn issue #210).

    Cancellation: a checkpoint per ``receive()``; a ``Cancelled`` (the request nursery ending)
    returns nothing and calls nothing.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
    on_disconnect(*args)
