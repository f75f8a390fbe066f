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
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import h2.connection
import h2.events
from hypercorn.protocol import h2 as _h2

from ..logs import EventLogger

#: The hypercorn release whose code these fixes replace.
FIXED_VERSION = "0.18.0"

#: hypercorn's own ``StreamBuffer.pop``, as imported (before any patch).
original_pop = _h2.StreamBuffer.pop

#: hypercorn's own ``H2Protocol._handle_events``, as imported (before any patch).
original_handle_events = _h2.H2Protocol._handle_events

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


#: Every fix: its name (as logged), the class it patches, the method, the fixed method.
FIXES: tuple[tuple[str, type, str, Any], ...] = (
    ("StreamBuffer.pop", _h2.StreamBuffer, "pop", _pop),
    ("H2Protocol._handle_events", _h2.H2Protocol, "_handle_events", _handle_events),
)


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
