"""One client stream: the writer and the disconnect watcher.

A :class:`Subscriber` follows one run's log from a cursor and writes it to one
client as SSE (or, for ``stream: false``, as one JSON object at the end).

Its two tasks are siblings in the request's nursery, with the run's upstream
reader for an attached run (see :mod:`trio_stream.endpoints`):

* the **writer** (:meth:`Subscriber.write_sse` / :meth:`write_json`) sends
  what the log holds, waits for more, sends ``: ping`` after
  ``--ping-interval`` of silence, and ends with the run's terminal frame;
* the **watcher** (:func:`watch_disconnect`) blocks on ASGI ``receive()``,
  the only place hypercorn reports a disconnect (TCP close or HTTP/2
  ``RST_STREAM``).

Every send has a deadline of ``--stall-timeout``.  On HTTP/2 the wait for
flow-control credit is cancellable and the deadline fires.  On HTTP/1.1
hypercorn writes inside a shielded scope, so the app cannot interrupt it;
there the guarded transport of :mod:`trio_stream.transport` cuts the
connection at the same deadline, the send returns, and we detect the stall by
the time it took.  Either way :class:`ClientStalled` is raised.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from . import sse
from .asgi import JSON, Receive, Send, send_bytes, send_error, start
from .errors import UpstreamError, error_body
from .runlog import Entry, RunStatus
from .runs import Run

SSE_HEADERS = ((b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"))
BATCH = 512  # entries rendered into one send


class ClientStalled(Exception):
    """The client refused data for ``--stall-timeout``."""


class Subscriber:
    def __init__(
        self,
        run: Run,
        send: Send,
        *,
        cursor: int,
        stall_timeout: float,
        ping_interval: float,
        headers: tuple[tuple[bytes, bytes], ...],
        drives_backpressure: bool,
    ) -> None:
        self.run = run
        self._send = send
        self.cursor = cursor
        self.stall_timeout = stall_timeout
        self.ping_interval = ping_interval
        self.headers = headers
        self.drives_backpressure = drives_backpressure
        self.started = False
        self.sending_since: float | None = None

    def stalled(self) -> bool:
        """Is a send blocked for ``--stall-timeout`` already (used by the watcher)?"""
        since = self.sending_since
        return since is not None and trio.current_time() - since >= self.stall_timeout

    async def _send_body(self, body: bytes, more: bool = True) -> None:
        """Send one body chunk within the stall deadline.  Raises ClientStalled."""
        self.sending_since = since = trio.current_time()
        with trio.move_on_after(self.stall_timeout) as cs:
            await self._send({"type": "http.response.body", "body": body, "more_body": more})
        self.sending_since = None
        if cs.cancelled_caught or trio.current_time() - since >= self.stall_timeout:
            raise ClientStalled

    async def _start(self, status: int = 200) -> None:
        if not self.started:
            self.started = True
            with trio.move_on_after(self.stall_timeout):
                await start(self._send, status, b"text/event-stream", (*SSE_HEADERS, *self.headers))

    async def write_sse(self, *, start_now: bool = False) -> None:
        """Stream the log as SSE until the run's terminal frame.

        Headers are deferred until the first event, the first ping or the end,
        so that an upstream failure before the first token can still be an
        HTTP 502/504.  Cancellable at every wait; raises ClientStalled.
        """
        run, log = self.run, self.run.log
        if start_now:
            await self._start()
        while True:
            entries = [] if log.fenced else await self._backlog()
            if entries:
                await self._start()
                await self._send_body(run.encoder.render(entries, self.cursor + 1))
                self.cursor += len(entries)
                if self.drives_backpressure:
                    run.advance(self.cursor)
                continue
            if (log.outcome is not None and run.settled) or log.fenced:
                break
            with trio.move_on_after(self.ping_interval) as cs:
                await run.wait_changed()
            if cs.cancelled_caught:
                await self._start()
                await self._send_body(sse.PING)
        if log.fenced:
            return  # sessions rule 3: a fenced run emits nothing more
        outcome = log.outcome
        assert outcome is not None
        if not self.started and isinstance(run.error, UpstreamError) and log.last_seq == 0:
            await send_error(self._send, run.error, self.headers)
            self.started = True
            return
        await self._start()
        await self._send_body(run.encoder.terminal(outcome), more=False)

    async def _backlog(self) -> list[Entry]:
        """What to send next: the entries after the cursor, after letting a
        producer that is mid-burst append more.

        One send costs far more than one append (an ASGI hand-off, h11, a
        system call), so a writer that sent each entry as soon as it appeared
        would cap the stream at the send rate.  Instead, yield to the scheduler
        while the backlog keeps growing; send when it has not grown for two
        yields in a row, or reaches ``BATCH``.  Two, because trio randomly
        reverses the order of each scheduling batch: between two of our
        yields a runnable producer runs 0, 1 or 2 times, but never 0 twice in
        a row.  An idle upstream costs two checkpoints per wake-up.  With
        ``--coalesce`` the backlog becomes one event; without, one send.
        """
        log = self.run.log
        queued = log.last_seq - self.cursor
        still = 0
        while 0 < queued < BATCH and still < 2 and not log.fenced:
            await trio.lowlevel.checkpoint()
            grown = log.last_seq - self.cursor
            still = still + 1 if grown == queued else 0
            queued = grown
        return log.read(self.cursor, BATCH)

    async def write_json(self) -> None:
        """``stream: false``: wait for the end, answer one object or an error."""
        run = self.run
        while not run.settled:
            await run.wait_changed()
        if run.log.fenced:
            return
        outcome = run.log.outcome
        assert outcome is not None
        self.started = True
        if outcome.status is RunStatus.COMPLETED:
            await send_bytes(self._send, 200, run.encoder.completion(run.log), JSON, self.headers)
        elif isinstance(run.error, UpstreamError):
            await send_error(self._send, run.error, self.headers)
        else:
            status = 503 if outcome.reason == "shutdown" else 409
            body = error_body(outcome.message, "stream_cancelled", outcome.reason)
            await send_bytes(self._send, status, body, JSON, self.headers)


async def watch_disconnect(receive: Receive, on_disconnect: Callable[[], None]) -> None:
    """Block on ``receive()`` until ``http.disconnect``, then call ``on_disconnect``.

    Must be the one task reading ``receive`` after the body is read: a
    disconnect that is already queued is seen at once (hypercorn issue #210).
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
    on_disconnect()
