"""The direct DATA path of HTTP/2 streams: a body chunk as one DATA frame, written at once.

hypercorn 0.18.0 sends an HTTP/2 body chunk through the ASGI message, the
stream's ``StreamBuffer`` (two events set), the priority tree (``unblock``,
then ``next()`` over every stream of the connection -- O(streams)), the
connection's send task (a wake-up of its own), ``h2``'s ``send_data``, the
send lock and a shielded ``send_all``: with 100 streams on a connection
about twice the CPU of an HTTP/1.1 token (docs/design.md section 15).

:class:`DirectData` does what that path does for a chunk that can go out at
once, in the request task, without waiting: it writes the chunk as one DATA
frame -- encoded by ``h2``, so ``h2`` counts it against the flow-control
windows and checks the stream's state -- under the connection's send lock,
taken without waiting.  It declines (returns False, having written nothing)
whenever hypercorn's path must decide instead, and the caller then sends the
chunk through ASGI:

* the send lock is held (a write of hypercorn's is under way or queued:
  frames leave in the order ``h2`` encoded them);
* hypercorn holds unsent bytes of this stream (its ``StreamBuffer`` is not
  empty: the chunk must go out after them), or the stream or the connection
  is closed, reset or unknown to hypercorn;
* the chunk does not fit the flow-control window (stream's and
  connection's, as ``h2`` computes them) or one frame: hypercorn's path then
  waits for credit -- cancellably, so the caller's stall deadline applies --
  and splits frames.  A stream whose window is 0 waits there; its siblings
  keep writing directly, and a WINDOW_UPDATE resumes it through hypercorn.

Whoever takes the send lock after ``h2`` encoded frames holds it before
any other task runs: hypercorn's ``_flush`` takes the lock right after
``data_to_send()``, without a schedule point between (and trio's lock is
handed to the next waiter on release), and so does :meth:`DirectData.send`.
So no frame is ever written out of ``h2``'s order.

Same guarantees as :class:`~trio_stream.http.transport.DirectBody` on
HTTP/1.1: a frame goes out whole or the connection is closed (a write that
has to wait finishes in a shielded scope, bounded by the guarded stream's
stall deadline -- over TLS the raw socket under ``trio.SSLStream`` is the
guarded stream); a broken connection is reported to hypercorn, which
delivers ``http.disconnect`` to every stream of it.  The end of the body
(``END_STREAM``) stays with hypercorn: the caller sends the last chunk
through ASGI.
"""

from __future__ import annotations

from typing import Any

import h2.exceptions
import trio
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.http_stream import HTTPStream

from ..http.transport import Link, send_whole


class DirectData:
    """Writes the chunks of one HTTP/2 response body as DATA frames (module docstring)."""

    __slots__ = ("_link", "_protocol", "_stream_id")

    def __init__(self, link: Link, protocol: H2Protocol, stream_id: int) -> None:
        self._link = link
        self._protocol = protocol
        self._stream_id = stream_id

    async def send(self, data: bytes) -> bool:
        """Write ``data`` as one DATA frame; False (nothing written) if hypercorn's
        path must send it (module docstring).

        Cancellation: a frame the kernel takes at once costs no checkpoint; one that has to wait
        is written whole in a shielded scope bounded by the stall deadline, and a ``Cancelled``
        is delivered right after it (so a frame is never half written).
        """
        if not data:
            return True  # nothing to frame (hypercorn drops an empty chunk too)
        protocol, sid = self._protocol, self._stream_id
        buffer = protocol.stream_buffers.get(sid)
        if buffer is None or buffer.buffer or protocol.closed:
            return False
        connection = protocol.connection
        try:
            window = connection.local_flow_control_window(sid)
        except (h2.exceptions.ProtocolError, KeyError):
            return False  # closed or reset: hypercorn's path drops the chunk
        if len(data) > window or len(data) > connection.max_outbound_frame_size:
            return False
        lock = self._link.lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            return False
        try:
            try:
                connection.send_data(sid, data)
            except h2.exceptions.ProtocolError:
                return False
            await _write(self._link, connection.data_to_send())
        finally:
            lock.release()
        return True


async def _write(link: Link, frames: bytes) -> None:
    """Write ``frames`` whole (the caller holds the send lock); report a broken connection.

    Cancellation: as :func:`~trio_stream.http.transport.send_whole`.
    """
    try:
        await send_whole(link.stream, frames)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await link.broken()


def direct_data(link: Link | None, send: Any) -> DirectData | None:
    """The direct writer for the request whose ASGI ``send`` is ``send``, if it can have one:
    an HTTP request stream (not a WebSocket) of an HTTP/2 connection that published ``link``."""
    if link is None:
        return None
    stream = getattr(send, "__self__", None)
    if not isinstance(stream, HTTPStream):
        return None
    protocol = getattr(stream.send, "__self__", None)
    if not isinstance(protocol, H2Protocol):
        return None
    return DirectData(link, protocol, stream.stream_id)
