"""Fixes for hypercorn 0.18.0 bugs that break trio-stream's promises.

Applied by :func:`trio_stream.serve_service` (and idempotent), not at import:
importing trio_stream changes nothing.  They patch hypercorn for the whole
process, which is what a fix of the library itself would do -- so they are
applied only to the version they were written for (:data:`FIXED_VERSION`).
On any other version hypercorn is left alone and the event
``hypercorn_fix_skipped`` is logged: the tests named below then say whether
the new version still needs a fix.

1. ``StreamBuffer.pop`` (``hypercorn/protocol/h2.py``) resumes a paused
   writer whenever the popped chunk is small.  Once a client stops reading,
   its HTTP/2 flow-control window is 0, every pop returns 0 bytes, and so the
   app's ``send`` never blocks: the per-stream buffer grows without bound and
   the ``--stall-timeout`` deadline on HTTP/2 never fires.  Measured: 2 s into
   a never-read stream, ~2 MB had been queued for a client that had taken
   64 KiB.  The fixed ``pop`` resumes the writer only once the buffer is below
   its low-water mark.  Without it ``tests/test_stall.py`` (HTTP/2 cases)
   fails; ``tests/test_hypercorn_fixes.py`` fails once hypercorn's own ``pop``
   no longer has the bug.  (The same flaw was raised on the anycorn fork,
   PR #61.)

2. ``H2Protocol._handle_events`` looks up the stream of every DATA frame in
   ``H2Protocol.streams``.  A stream leaves that dict as soon as hypercorn has
   answered it and the app has returned -- also when the client is still
   sending its body (a 413, our 408 ``body_timeout``), which HTTP/2 allows.
   The next DATA frame of that stream raises ``KeyError``, which no one
   catches: it ends the connection's task and, through trio's nursery, the
   whole server (``serve_service``).  Any HTTP/2 client could stop the server
   so.  (hypercorn issue #329, PRs #312 and #334.)  The fixed method drops
   the body events (DATA, end of stream, trailers) of a stream hypercorn no
   longer tracks, and still acknowledges the dropped DATA to h2, so that the
   connection's flow-control window gets those bytes back.  Without it
   ``tests/test_body_timeout.py`` (HTTP/2 body bytes after the answer) fails;
   ``tests/test_hypercorn_fixes.py`` fails once hypercorn's own method no
   longer raises.

3. ``H11Protocol.__init__`` (``hypercorn/protocol/h11.py``) gives each
   HTTP/1.1 connection a plain ``h11.Connection``, which gets two things
   wrong for a server; the fixed ``__init__`` gives it a
   :class:`ServerH11Connection` instead (same arguments):

   * **the head cap.**  hypercorn documents ``h11_max_incomplete_size`` as
     the cap on a request line and headers, but h11 checks it only while an
     event is *incomplete*, and hypercorn reads 64 KiB at a time: a head
     that arrives in one read is never checked (measured: a 60 KB header
     value answered 200).  The fixed connection also refuses a complete
     head over the cap, so a head over 16 KiB is refused (431, as h11's
     own check) however it arrives.
   * **bytes after a request on a connection that closes.**  Once a request
     was the last one of its connection (HTTP/1.0, ``Connection: close`` on
     either side), h11 raises on any byte the client sends after it, and
     hypercorn takes that for a malformed request: it answers 400 *in place
     of* the app's response, or -- if the app's response has begun -- closes
     the connection halfway through it.  A client that pipelines a request
     after a ``Connection: close`` one got that 400 every time; a request
     answered ``Connection: close`` by the app (``ambiguous_framing``,
     ``body_timeout``) with more bytes behind it was cut at random.  RFC 9112
     section 9.6: the server must not process further requests on such a
     connection, and closes it after the response.  The fixed connection
     discards those bytes, and the response ends before the close.
   * **an answer that starts before the request's body has arrived.**  A
     handler may answer before it reads the body (a 401 for a missing key,
     a 404, a 405), and the body's bytes may not have arrived yet: a client
     that wrote its head and its body separately (httpx does, with
     ``TCP_NODELAY``) and was descheduled in between.  hypercorn then
     closes the connection at the response's end (``_maybe_recycle``: the
     client's side is not ``DONE``), but the response did not say so: the
     client took the connection for a kept-alive one, sent its next request
     on it and got "Server disconnected without sending a response" -- a
     test failed so, now and then, on a loaded machine.  The fixed
     connection adds ``Connection: close`` to a response that starts while
     the request's body has not been read to its end (h11's peer state
     ``SEND_BODY``: hypercorn may not have taken the rest out of its buffer
     yet, and then closes all the same), so the close is announced (RFC 9112
     section 9.6); a response to a request read to its end (``DONE``) is
     sent as before, and its connection kept.  The check is made once per
     response head (h11's ``_clean_up_response_headers_for_sending``), never
     per body chunk.

   Without it ``tests/test_http1_framing.py`` fails;
   ``tests/test_hypercorn_fixes.py`` fails once hypercorn's own connection
   no longer has either of the first two faults.

4. ``H11Protocol._send_error_response`` answers a request h11 refuses
   (malformed: 400, head over the cap: 431, an unsupported
   ``Transfer-Encoding``: 501) with an empty body.  docs/api.md section 2.2
   promises the OpenAI error body for every error answer; the fixed method
   sends it (code ``invalid_http``, ``request_header_too_large`` or
   ``unsupported_transfer_encoding``), still with ``Connection: close``.
   Tested in ``tests/test_http1_framing.py``.

5. ``H2Protocol._priority_updated`` puts the stream of every PRIORITY frame
   (and of every HEADERS frame's priority block) into its ``priority`` tree,
   inserting streams it has never seen -- never opened, or opened, answered
   and removed long ago -- and never takes those out again.  The tree refuses
   its 1,001st stream with ``priority.TooManyStreamsError``, which no one
   catches: one h2c connection sending 1,000 PRIORITY frames (or 1,000
   ordinary requests, each followed by a PRIORITY frame for its closed
   stream) ended the connection's task and, through trio's nursery, the whole
   server.  RFC 9113 section 5.3.2 deprecates the PRIORITY signal and lets a
   server ignore it, which the fixed method does: streams are sent in
   hypercorn's default order (equal weights), and the tree holds only the
   streams hypercorn itself inserts -- each open stream, removed when its
   response ends -- so at most ``h2_max_concurrent_streams`` of them.  Without
   it ``tests/test_h2_frames.py`` fails; ``tests/test_hypercorn_fixes.py``
   fails once hypercorn's own method no longer raises.

6. ``H2Protocol.initiate`` leaves the connection's idle timer stopped on an
   h2c connection by prior knowledge: the connection starts as HTTP/1.1, whose
   protocol stops the timer when it reads the HTTP/2 preface as a request
   head (``Updated(idle=False)``), and hypercorn's HTTP/2 protocol re-arms it
   only when a stream ends.  So an h2c connection that never opened a stream
   was never closed (one that did open one is re-armed when its last stream
   ends).  The fixed method says ``Updated(idle=True)`` after hypercorn's own
   ``initiate`` when the connection has no stream yet (an ``Upgrade: h2c``
   connection has stream 1, whose end re-arms it; over TLS the server arms
   the timer itself right after, which replaces this one).  Without it
   ``tests/test_h2_frames.py`` (idle h2c) fails;
   ``tests/test_hypercorn_fixes.py`` fails once hypercorn's own ``initiate``
   arms the timer.

7. ``H2Protocol.stream_send`` closes the connection (GOAWAY) when a stream
   ends while the server is terminating and no other stream is busy -- as
   soon as the app's last ``send`` returns, which is when hypercorn's send
   task has *taken* the stream's last bytes, not when it has written them
   and ``END_STREAM`` after them: it writes the bytes (a schedule point),
   then finds ``h2``'s connection closed, and the ``END_STREAM`` is never
   sent.  So at a graceful shutdown the last stream of an HTTP/2 connection
   got its ``shutdown`` error event and then GOAWAY, but never its end: the
   client saw the connection end under an open stream (about half the runs of
   ``tests/test_h2_direct.py``'s shutdown test, h2c and TLS).  The fixed
   method, for a stream that ends while terminating, ends the stream in
   ``h2`` itself (``END_STREAM``) first if hypercorn has all its bytes
   (its buffer complete) and the stream is still open; the send task's own
   ``end_stream`` then finds it ended and drops the buffer, as it does for a
   stream that closed under it.

8. ``H2Protocol._send_data`` leaves a stream the client has reset
   (``RST_STREAM``) in hypercorn's priority tree and stream buffers for good
   when the send task reaches it while ``h2`` still holds the closed stream
   (``h2`` forgets closed streams only later, when it next counts the open
   ones): the reset unblocks the stream, the send task pops its empty buffer,
   blocks it again, and no later event unblocks it -- the app was told
   ``http.disconnect`` and never completes the buffer.  Only a stream ``h2``
   had already forgotten took hypercorn's error path, which drops it.  So
   each reset could leak a buffer and a tree node, and the tree refuses its
   1,001st stream with ``priority.TooManyStreamsError``, which ends the
   connection (``connection_crashed``): a long-lived HTTP/2 connection whose
   client resets streams -- a browser tab closed, a stopped answer -- was
   cut after one to a few thousand resets (measured: after 5,610 and 7,054
   create-and-reset cycles on one h2c connection, about one reset in six
   leaking).  The fixed method drops a stream that ``h2`` has closed as
   hypercorn's error path does (its buffer closed and deleted, its tree
   node removed) before looking at its window.  Without it
   ``tests/test_hypercorn_fixes.py`` (a reset stream is dropped) fails;
   the stress suite's h2c create/cancel cycles found it.
"""

from __future__ import annotations

import contextlib
from importlib import metadata
from typing import Any

import h2.connection
import h2.events
import h2.exceptions
import h11
from hypercorn.events import Updated
from hypercorn.protocol import h2 as _h2
from hypercorn.protocol import h11 as _h11
from hypercorn.protocol.events import EndBody, StreamClosed
from priority.priority import MissingStreamError

from ..errors import error_body
from ..logs import EventLogger
from . import h2direct

#: The hypercorn release whose code these fixes replace.
FIXED_VERSION = "0.18.0"

#: hypercorn's own ``StreamBuffer.pop``, as imported (before any patch).
original_pop = _h2.StreamBuffer.pop

#: hypercorn's own ``H2Protocol._handle_events``, as imported (before any patch).
original_handle_events = _h2.H2Protocol._handle_events

#: hypercorn's own ``H2Protocol._priority_updated``, as imported (before any patch).
original_priority_updated = _h2.H2Protocol._priority_updated

#: hypercorn's own ``H2Protocol.initiate``, as imported (before any patch).
original_initiate = _h2.H2Protocol.initiate

#: hypercorn's own ``H2Protocol.stream_send``, as imported (before any patch).
original_stream_send = _h2.H2Protocol.stream_send

#: hypercorn's own ``H2Protocol._send_data``, as imported (before any patch).
original_send_data = _h2.H2Protocol._send_data

#: The h2 events that carry the rest of a request: its body, its end, its
#: trailers.  They may come after hypercorn has answered and forgotten it.
BODY_EVENTS = (h2.events.DataReceived, h2.events.StreamEnded, h2.events.TrailersReceived)


async def _pop(self: Any, max_length: int) -> bytes:
    """``StreamBuffer.pop``, resuming the writer on what is *left*."""
    length = min(len(self.buffer), max_length)
    data = bytes(self.buffer[:length])
    del self.buffer[:length]
    if len(self.buffer) < _h2.BUFFER_LOW_WATER:
        await self._paused.set()
    if not self.buffer:
        await self._is_empty.set()
    return data


async def _handle_events(self: Any, events: list[h2.events.Event]) -> None:
    """``H2Protocol._handle_events``, dropping body events of forgotten streams.

    hypercorn's own method is given one event at a time, because whether a
    stream is tracked can change while an earlier event of the same batch is
    handled: a HEADERS frame adds its stream, and an app that answers while
    the method awaits removes it.  (So hypercorn flushes after every event;
    a flush writes only when h2 has something to send.)
    """
    for event in events:
        if isinstance(event, BODY_EVENTS) and event.stream_id not in self.streams:
            _drop(self.connection, event)
        else:
            await original_handle_events(self, [event])
    await self._flush()  # the window updates for dropped DATA, if any


def _drop(connection: h2.connection.H2Connection, event: h2.events.Event) -> None:
    """Drop a body event of a stream hypercorn no longer tracks.

    DATA is acknowledged all the same: its bytes were counted against the
    connection's flow-control window, which every stream of the connection
    shares, and only an acknowledgement gives them back to the client.
    """
    if isinstance(event, h2.events.DataReceived):
        connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)


#: hypercorn's own ``H11Protocol.__init__``, as imported (before any patch).
original_h11_init = _h11.H11Protocol.__init__

#: hypercorn's own ``H11Protocol._send_error_response``, as imported (before any patch).
original_send_error_response = _h11.H11Protocol._send_error_response


class ServerH11Connection(h11.Connection):
    """h11's server connection, with the three corrections of fix 3.

    The first two are made where h11 takes the next event out of its receive
    buffer, so that h11's own error handling (the peer's state becomes
    ``ERROR``, ``RemoteProtocolError`` is raised to hypercorn) applies
    unchanged; the third where h11 completes a response's head.
    """

    def _clean_up_response_headers_for_sending(self, response: h11.Response) -> h11.Response:
        if self.their_state is h11.SEND_BODY:
            # The request's body is still arriving: hypercorn will close the
            # connection after this response (it is not reusable), so say so.
            tokens = {b"close"} | {
                token.strip() for name, value in response.headers if name == b"connection"
                for token in value.lower().split(b",")
            } - {b"keep-alive", b""}  # fmt: skip
            headers = [(n, v) for n, v in response.headers if n != b"connection"]
            headers.append((b"connection", b", ".join(sorted(tokens))))
            response = h11.Response(
                headers=headers, status_code=response.status_code,
                http_version=response.http_version, reason=response.reason,
            )  # fmt: skip
        return super()._clean_up_response_headers_for_sending(response)

    def _extract_next_receive_event(
        self,
    ) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        buffer = self._receive_buffer
        if self.their_state is h11.MUST_CLOSE and buffer:
            # Sent after the connection's last request: never read, never
            # answered (RFC 9112 section 9.6).  h11 would raise on them.
            buffer.maybe_extract_at_most(len(buffer))
            return super()._extract_next_receive_event()
        before = len(buffer)
        event = super()._extract_next_receive_event()
        if type(event) is h11.Request and before - len(buffer) > self._max_incomplete_event_size:
            raise h11.RemoteProtocolError(
                f"request head larger than {self._max_incomplete_event_size} bytes",
                error_status_hint=431,
            )
        return event


def _h11_init(self: Any, *args: Any, **kwargs: Any) -> None:
    """``H11Protocol.__init__``, with a :class:`ServerH11Connection`."""
    original_h11_init(self, *args, **kwargs)
    self.connection = ServerH11Connection(
        h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size
    )


#: What a request h11 refused is answered, by status (h11's ``error_status_hint``).
PROTOCOL_ERRORS = {
    400: ("The request is not valid HTTP/1.1.", "invalid_http"),
    431: ("The request head is larger than {limit} bytes.", "request_header_too_large"),
    501: ("The request's Transfer-Encoding is not supported.", "unsupported_transfer_encoding"),
}


async def _send_error_response(self: Any, status_code: int) -> None:
    """``H11Protocol._send_error_response``, with the OpenAI error body."""
    message, code = PROTOCOL_ERRORS.get(status_code, PROTOCOL_ERRORS[400])
    body = error_body(
        message.format(limit=self.config.h11_max_incomplete_size), "invalid_request_error", code
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
        *self.config.response_headers("h11"),
    ]
    await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


async def _priority_updated(self: Any, event: h2.events.PriorityUpdated) -> None:
    """``H2Protocol._priority_updated``, ignoring PRIORITY (RFC 9113 section 5.3.2).

    Not a checkpoint, as hypercorn's own is not: it changes nothing.
    """


async def _initiate(
    self: Any, headers: list[tuple[bytes, bytes]] | None = None, settings: bytes | None = None
) -> None:
    """``H2Protocol.initiate``, then the idle timer armed if no stream is open.

    Cancellation: as hypercorn's ``initiate``, then as the server's handling
    of ``Updated`` (a ``Cancelled`` there leaves the timer stopped).
    """
    await original_initiate(self, headers, settings)
    if not self.streams:
        await self.send(Updated(idle=True))


async def _stream_send(self: Any, event: Any) -> None:
    """``H2Protocol.stream_send``, ending a stream before a terminating connection's GOAWAY.

    Also (not a fix: the end of the direct DATA path) an ``EndBody`` whose
    stream's ``END_STREAM`` went out directly is completed by
    ``h2direct.finish_ended`` when hypercorn's send task has nothing left to
    do for it, instead of waking that task and waiting for it.

    Cancellation: as hypercorn's ``stream_send`` (the ``EndBody`` completed
    here is not a checkpoint).
    """
    if isinstance(event, EndBody) and h2direct.finish_ended(self, event.stream_id):
        return
    if isinstance(event, StreamClosed) and self.context.terminated.is_set():
        buffer = self.stream_buffers.get(event.stream_id)
        if buffer is not None and buffer.complete:
            with contextlib.suppress(h2.exceptions.ProtocolError):  # ended or reset already
                self.connection.end_stream(event.stream_id)
            await self._flush()
    await original_stream_send(self, event)


async def _send_data(self: Any, stream_id: int) -> None:
    """``H2Protocol._send_data``, dropping a stream ``h2`` has closed (the client reset it).

    What hypercorn's own error path does for a stream that closed under it:
    its buffer closed (a writer waiting in it wakes) and deleted, its tree
    node removed.  Not a checkpoint on that path (``StreamBuffer.close``
    only sets events).

    Cancellation: as hypercorn's ``_send_data``.
    """
    stream = self.connection.streams.get(stream_id)
    buffer = self.stream_buffers.get(stream_id)
    if stream is not None and stream.closed and buffer is not None:
        await buffer.close()
        del self.stream_buffers[stream_id]
        with contextlib.suppress(MissingStreamError):
            self.priority.remove_stream(stream_id)
        return
    await original_send_data(self, stream_id)


#: Every fix: its name (as logged), the class it patches, the method, the fixed method.
FIXES: tuple[tuple[str, type, str, Any], ...] = (
    ("StreamBuffer.pop", _h2.StreamBuffer, "pop", _pop),
    ("H2Protocol._handle_events", _h2.H2Protocol, "_handle_events", _handle_events),
    ("H11Protocol.__init__", _h11.H11Protocol, "__init__", _h11_init),
    ("H11Protocol._send_error_response", _h11.H11Protocol, "_send_error_response",
     _send_error_response),
    ("H2Protocol._priority_updated", _h2.H2Protocol, "_priority_updated", _priority_updated),
    ("H2Protocol.initiate", _h2.H2Protocol, "initiate", _initiate),
    ("H2Protocol.stream_send", _h2.H2Protocol, "stream_send", _stream_send),
    ("H2Protocol._send_data", _h2.H2Protocol, "_send_data", _send_data),
)  # fmt: skip


def hypercorn_version() -> str:
    """The installed hypercorn's version string."""
    return metadata.version("hypercorn")


def apply(logger: EventLogger | None = None) -> bool:
    """Install the fixes if hypercorn is :data:`FIXED_VERSION` (idempotent).

    On any other version, change nothing and log ``hypercorn_fix_skipped``,
    once per fix, through ``logger`` (a default
    :class:`~trio_stream.logs.EventLogger` on stderr if none is given).
    Returns whether the fixes are installed.
    """
    found = hypercorn_version()
    if found != FIXED_VERSION:
        log = logger or EventLogger()
        for name, *_ in FIXES:
            log.event("hypercorn_fix_skipped", fix=name, hypercorn=found, written_for=FIXED_VERSION)
        return False
    for _, owner, method, fixed in FIXES:
        setattr(owner, method, fixed)
    return True


def applied() -> bool:
    """Whether every fix is installed."""
    return all(getattr(owner, method) is fixed for _, owner, method, fixed in FIXES)
