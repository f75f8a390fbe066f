"""The direct DATA path of HTTP/2 streams: body chunks as DATA frames, one write per batch.

hypercorn 0.18.0 sends an HTTP/2 body chunk through the ASGI message, the
stream's ``StreamBuffer`` (two events set), the priority tree (``unblock``,
then ``next()`` over every stream of the connection -- O(streams)), the
connection's send task (a wake-up of its own), ``h2``'s ``send_data``, the
send lock and a shielded ``send_all``: with 100 streams on a connection
about twice the CPU of an HTTP/1.1 token (docs/design.md section 15).

:class:`DirectData` does what that path does for a chunk that can go out at
once, in the request task, without waiting: ``h2`` encodes it as one DATA
frame -- so ``h2`` counts it against the flow-control windows and checks the
stream's state -- into its outgoing buffer, and the connection's
:class:`Flusher` is woken.  The flusher runs after every task of the current
scheduler batch has run, so the frames of all the connection's streams that
had data in that batch leave in one write (one TLS record run, over TLS),
taken under hypercorn's send lock.  A chunk is encoded only while that lock
is free: hypercorn's ``_flush`` takes ``h2``'s buffer *before* it waits for
the lock, so a frame encoded while a write is under way could overtake
bytes another task holds (measured: 1,000 streams lost and reordered
events).  The lock is free most of the time only because
``connection.LightTCPServer.protocol_send`` writes an HTTP/2 connection's
bytes with :func:`~trio_stream.http.transport.send_whole`, holding the lock
across no schedule point when the kernel takes them at once; hypercorn's
own ``protocol_send`` held it across two (the lock's and ``send_all``'s),
so under load -- its send task busy with the streams' first chunks --
nearly every chunk found the lock held and took hypercorn's path (1,000
streams on 10 connections, h2c, one run: 57,340 of 57,394 chunks declined
for it), which kept the send task busy.  Whoever takes the send lock takes all of
``h2``'s outgoing buffer, in ``h2``'s order, and writes it before releasing
the lock, so frames never leave out of order, whoever writes them.

:meth:`DirectData.send` declines (returns False, having encoded nothing)
whenever hypercorn's path must decide instead, and the caller then sends the
chunk through ASGI:

* the send lock is held (a write is under way, or waits: a client that
  stops reading makes its streams wait in hypercorn's path, where the
  caller's stall deadline applies), or :data:`PENDING_LIMIT` bytes wait for
  the flusher;
* the stream or the connection is closed, reset or unknown to hypercorn;
* the chunk does not fit the flow-control window (stream's and
  connection's, as ``h2`` computes them) or one frame: hypercorn's path then
  waits for credit -- cancellably, so the caller's stall deadline applies --
  and splits frames.  A stream whose window is 0 waits there; its siblings
  keep writing directly, and a WINDOW_UPDATE resumes it through hypercorn.

A chunk that took hypercorn's path leaves its bytes in the stream's
``StreamBuffer`` until hypercorn's send task gets to them.  The next chunk
that can go directly takes them along, in front of its own bytes in the same
frame (when both fit the windows and one frame; else it too goes to
hypercorn's buffer, behind them), so order is kept and a stream returns to
the direct path at its next chunk.  Without that, under load -- the send
task walking 100 streams a frame at a time, behind by more than the 50 ms
between tokens -- a stream that fell back once found its buffer non-empty at
every later chunk and stayed on hypercorn's path to its end
(docs/design.md section 15).

Same guarantees as :class:`~trio_stream.http.transport.DirectBody` on
HTTP/1.1: a write goes out whole or the connection is closed (a write that
has to wait finishes in a shielded scope, bounded by the guarded stream's
stall deadline -- over TLS the raw socket under ``trio.SSLStream`` is the
guarded stream); a broken connection is reported to hypercorn, which
delivers ``http.disconnect`` to every stream of it.

The body's first chunk goes this way too (hypercorn wrote the HEADERS frame
when the head was sent), and so does its last, with ``END_STREAM`` on its
own DATA frame (:meth:`DirectData.end`); the caller then sends an empty last
ASGI body message, so that hypercorn ends the response as usual, and
:func:`finish_ended` completes hypercorn's ``EndBody`` for it without its
send task.  Through hypercorn's path the first chunk, the last one and the
``END_STREAM`` each cost the send task a wake-up, a walk of the priority
tree and a write of their own.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import h2.connection
import h2.exceptions
import trio
from h2.connection import ConnectionInputs
from h2.stream import StreamInputs, StreamState
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.http_stream import HTTPStream
from priority import priority

from ..http.transport import Link, send_whole

#: Encoded bytes waiting for the flusher beyond which a chunk takes hypercorn's path.
PENDING_LIMIT = 256 * 1024


class Flusher:
    """One HTTP/2 connection's writer of the frames :class:`DirectData` encoded.

    Its task is spawned into the connection's task group on the first direct
    chunk and waits, parked, for the next; it ends when :meth:`close` is
    called (the connection's read loop ended) or the connection's task group
    is cancelled.  A wake-up costs one task step per batch of chunks, however
    many streams they belong to.
    """

    __slots__ = ("_closed", "_link", "_protocol", "_task", "_waiting", "pending")

    def __init__(self, link: Link, protocol: H2Protocol) -> None:
        self._link = link
        self._protocol = protocol
        self._task: trio.lowlevel.Task | None = None
        self._waiting = False  # parked, waiting for frames
        self._closed = False
        self.pending = 0  # bytes encoded since the last flush (approximately)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy(self) -> bool:
        """Is a write of this connection under way, or waiting (its send lock held)?"""
        return self._link.lock.locked()

    def wake(self) -> None:
        """Frames are waiting in ``h2``: write them after this scheduler batch."""
        if self._task is None:
            self._task = _SPAWNING
            self._protocol.task_group.spawn(self._run)
        elif self._waiting:
            self._waiting = False
            trio.lowlevel.reschedule(self._task)

    def close(self) -> None:
        """The connection ended: the task ends (what is pending was hypercorn's to flush)."""
        self._closed = True
        if self._waiting and isinstance(self._task, trio.lowlevel.Task):
            self._waiting = False
            trio.lowlevel.reschedule(self._task)

    async def _run(self) -> None:
        """Write what ``h2`` holds, then wait to be woken; until closed.

        Cancellation: a ``Cancelled`` while it waits ends it; a write is shielded (bounded by the
        stall deadline).
        """
        self._task = trio.lowlevel.current_task()
        lock = self._link.lock
        connection = self._protocol.connection
        while not self._closed:
            self.pending = 0
            try:
                lock.acquire_nowait()
            except trio.WouldBlock:
                await lock.acquire()  # a write of hypercorn's, which may take ours too
            try:
                frames = connection.data_to_send()
                if frames:
                    await _write(self._link, frames)
            finally:
                lock.release()
            if self.pending or self._closed:
                continue  # encoded while we wrote
            self._waiting = True
            try:
                await trio.lowlevel.wait_task_rescheduled(self._abort)
            finally:
                self._waiting = False

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        return trio.lowlevel.Abort.SUCCEEDED


#: Stands for the flusher's task between its spawn and its first step.
_SPAWNING: Any = object()


class DirectData:
    """Encodes the chunks of one HTTP/2 response body as DATA frames (module docstring)."""

    __slots__ = ("_flusher", "_protocol", "_stream_id")

    #: The first chunk may go directly too: hypercorn wrote the HEADERS frame
    #: when the app sent ``http.response.start``.
    eager = True

    def __init__(self, flusher: Flusher, protocol: H2Protocol, stream_id: int) -> None:
        self._flusher = flusher
        self._protocol = protocol
        self._stream_id = stream_id

    async def send(self, data: bytes) -> bool:
        """Encode ``data`` as one DATA frame for the connection's flusher; False (nothing
        encoded) if hypercorn's path must send it (module docstring).

        Cancellation: not a checkpoint (it never waits).
        """
        if not data:
            return True  # nothing to frame (hypercorn drops an empty chunk too)
        return await self._encode(data, False)

    async def end(self, data: bytes) -> bool:
        """Encode ``data`` (may be empty) as the stream's last DATA frame, with
        ``END_STREAM``, for the connection's flusher; False (nothing encoded) if
        hypercorn's path must send it and end the stream.  The caller then sends
        the empty last ASGI body message, which :func:`finish_ended` completes
        without hypercorn's send task.

        Cancellation: not a checkpoint (it never waits).
        """
        return await self._encode(data, True)

    async def _encode(self, data: bytes, end: bool) -> bool:
        protocol, sid, flusher = self._protocol, self._stream_id, self._flusher
        buffer = protocol.stream_buffers.get(sid)
        if (
            buffer is None
            or protocol.closed
            or flusher.closed
            or flusher.pending > PENDING_LIMIT
            or flusher.busy
        ):
            return False
        held = len(buffer.buffer)
        # Bytes of an earlier chunk that took hypercorn's path and its send
        # task has not sent yet go first, in the same frame: else the stream
        # would stay on hypercorn's path for as long as that task is behind.
        payload = bytes(buffer.buffer) + data if held else data
        try:
            if not encode_data(protocol.connection, sid, payload, end):
                return False
        except h2.exceptions.ProtocolError:
            return False  # hypercorn's path drops it (the stream or connection is closing)
        if held:
            # hypercorn's own pop: empties the buffer and sets its events
            # (a later drain() returns).  Its bytes are in h2 already, so
            # even a pop that waited could not reorder them.
            await buffer.pop(held)
        flusher.pending += len(payload) + FRAME_HEADER
        flusher.wake()
        return True


def finish_ended(protocol: H2Protocol, stream_id: int) -> bool:
    """The end of a response body (hypercorn's ``EndBody``) whose ``END_STREAM``
    went out directly (:meth:`DirectData.end`): do what hypercorn's send task
    would do for it -- drop the stream's buffer, take the stream out of the
    priority tree -- without waking that task or waiting for it (``drain``).

    False, with nothing changed, unless hypercorn's path has nothing left to do
    for the stream but that: its buffer is empty, ``h2`` has its sending half
    closed (or has forgotten it, closed), and the send task is parked waiting
    for work -- so it is not inside ``_send_data`` for this stream, where a
    buffer taken from under it would raise ``KeyError`` out of its task.  The
    caller then lets hypercorn's ``stream_send`` handle the event.
    """
    buffer = protocol.stream_buffers.get(stream_id)
    if buffer is None or buffer.buffer:
        return False
    stream = protocol.connection.streams.get(stream_id)
    if stream is not None and stream.state_machine.state not in _ENDED:
        return False
    waiting_for = getattr(protocol.has_data, "_event", None)  # hypercorn's trio EventWrapper
    if not isinstance(waiting_for, trio.Event) or not waiting_for.statistics().tasks_waiting:
        return False  # the send task is running, or about to: it cleans up itself
    buffer.set_complete()
    del protocol.stream_buffers[stream_id]
    with contextlib.suppress(priority.MissingStreamError):
        protocol.priority.remove_stream(stream_id)
    return True


#: ``h2``'s states of a stream whose sending half is closed.
_ENDED = frozenset({StreamState.HALF_CLOSED_LOCAL, StreamState.CLOSED})


#: The length of an HTTP/2 frame header (RFC 9113 section 4.1).
FRAME_HEADER = 9


def encode_data(
    connection: h2.connection.H2Connection, stream_id: int, data: bytes, end_stream: bool = False
) -> bool:
    """What ``connection.send_data(stream_id, data, end_stream)`` does, for a chunk that fits:
    the same state transitions, window accounting and bytes, without hyperframe's frame object.

    False, with nothing changed, when the stream is unknown or closed, or the chunk does not
    fit its flow-control window (stream's and connection's) or one frame.  A state machine
    that refuses the chunk (the connection sent GOAWAY; the stream's sending half is closed)
    raises ``h2.exceptions.ProtocolError`` as ``send_data`` would, with the same effect (the
    stream's state becomes closed).  ``h2.connection.H2Connection.send_data`` of h2
    4.x does exactly these steps (``tests/test_h2_direct.py`` compares the two).
    """
    stream = connection.streams.get(stream_id)
    if stream is None or stream.closed:
        return False
    size = len(data)
    window = min(connection.outbound_flow_control_window, stream.outbound_flow_control_window)
    if size > window or size > connection.max_outbound_frame_size:
        return False
    connection.state_machine.process_input(ConnectionInputs.SEND_DATA)
    stream.state_machine.process_input(StreamInputs.SEND_DATA)
    if end_stream:
        stream.state_machine.process_input(StreamInputs.SEND_END_STREAM)
    stream.outbound_flow_control_window -= size
    connection.outbound_flow_control_window -= size
    # length (24 bits), type 0 (DATA), flags (END_STREAM = 1), stream id (31 bits), payload
    flags = b"\x00\x01" if end_stream else b"\x00\x00"
    connection._data_to_send += _LENGTH.pack(size)[1:] + flags + _ID.pack(stream_id)
    connection._data_to_send += data
    return True


_LENGTH = _ID = struct.Struct(">I")


async def _write(link: Link, frames: bytes) -> None:
    """Write ``frames`` whole (the caller holds the send lock); report a broken connection.

    Cancellation: as :func:`~trio_stream.http.transport.send_whole`.
    """
    try:
        await send_whole(link.stream, frames)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await link.broken()


#: The attribute of hypercorn's ``H2Protocol`` that holds its :class:`Flusher`.
FLUSHER = "_trio_stream_flusher"


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
    flusher = getattr(protocol, FLUSHER, None)
    if flusher is None:
        flusher = Flusher(link, protocol)
        setattr(protocol, FLUSHER, flusher)
    return DirectData(flusher, protocol, stream.stream_id)


def close_flusher(protocol: object) -> None:
    """The connection of ``protocol`` (hypercorn's, any version) ended: end its flusher."""
    flusher = getattr(protocol, FLUSHER, None)
    if isinstance(flusher, Flusher):
        flusher.close()
