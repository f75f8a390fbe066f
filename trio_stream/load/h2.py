"""A minimal HTTP/2 client on trio and ``h2``: many streams, real resets.

httpx's HTTP/2 does not send ``RST_STREAM`` when a response is closed early
(httpcore issue #943), so the load generator and the tests drive ``h2``
directly.

Ownership: each connection has two tasks, a **reader** (socket -> ``h2`` ->
streams) and a **writer** (``h2``'s outgoing bytes -> socket).  Callers only
change the ``h2`` state machine and wake the writer, so a caller that is
cancelled can never leave half a frame on the wire: the writer, not the
caller, owns every ``send_all``, and frames leave in the order ``h2`` encoded
them (HPACK needs that).

Flow control is honest per stream: a stream's data is credited back only when
its consumer takes it (:meth:`H2Stream.receive`), so a consumer that stops
reading makes the server's window for that stream run out -- which is how a
stalled HTTP/2 client looks.  The connection window is large and credited on
receipt, so one stalled stream never starves its siblings.
"""

from __future__ import annotations

import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio

from .http1 import Headers

DEFAULT_STREAM_WINDOW = 65_535  # the protocol's initial per-stream window
CONNECTION_WINDOW = 16 * 1024 * 1024
CANCEL = 0x8  # RST_STREAM error code
CLOSE_TIMEOUT = 1.0  # seconds a TLS close_notify may take
REFUSED = -2  # our marker: the server's GOAWAY came before it processed the stream
LOST = -1  # our marker: the connection ended under the stream
_H2_STATE_ERRORS = (h2.exceptions.ProtocolError, KeyError)


class StreamReset(Exception):
    """The server reset the stream, or the connection ended under it."""


class H2Stream:
    """One request/response exchange on an :class:`H2Connection`."""

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._unacked = 0
        self._ended = False
        self._reset: int | None = None
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def ended(self) -> bool:
        """The server ended the stream or it was reset: no more data will come."""
        return self._ended or self._reset is not None

    def _notify(self) -> None:
        self._lot.unpark_all()

    async def response(self) -> int:
        """Wait for the response headers; returns the status.

        A checkpoint.  Raises :class:`StreamReset` if the stream ends first.
        Cancelling it changes nothing: call again, or :meth:`reset`.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while self.status is None:
            if self._reset is not None or self._ended:
                raise StreamReset(f"stream {self.id} ended before headers")
            await self._lot.park()
        return self.status

    async def receive(self) -> bytes | None:
        """The next data chunk, ``None`` at the end of the stream.

        A checkpoint.  Raises :class:`StreamReset` once the buffered data is
        used up on a reset stream.  Taking a chunk credits its bytes back to
        the server's window for this stream.  Cancellation loses no data.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._chunks:
            await trio.lowlevel.cancel_shielded_checkpoint()  # a schedule point, always
        while not self._chunks:
            if self._reset is not None:
                raise StreamReset(f"stream {self.id} reset ({self._reset})")
            if self._ended:
                return None
            await self._lot.park()
        chunk, flow_length = self._chunks.popleft()
        self.conn._consumed(self, flow_length)
        return chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:  # pragma: no cover - convenience
        while (chunk := await self.receive()) is not None:
            yield chunk

    async def reset(self) -> None:
        """Send ``RST_STREAM(CANCEL)``: the client went away from this stream.

        Idempotent; a no-op on a stream that already ended.  The frame is
        queued before the first checkpoint, so it goes out even if this call is
        cancelled while waiting for the writer.

        Cancellation: see above: the frame is queued even if the wait is cancelled.
        """
        if self.ended:
            await trio.lowlevel.checkpoint()
            return
        self._reset = CANCEL
        await self.conn._reset(self)


class H2Connection:
    """Client side of one HTTP/2 connection (see :func:`open_h2_connection`)."""

    def __init__(
        self, stream: trio.abc.Stream, *, scheme: str = "http",
        stream_window: int = DEFAULT_STREAM_WINDOW,
    ) -> None:  # fmt: skip
        self._stream = stream
        self.scheme = scheme
        self.stream_window = stream_window
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self._h2 = h2.connection.H2Connection(config)
        self._streams: dict[int, H2Stream] = {}
        self._outbox = bytearray()
        self._queued = 0  # ticket of the last bytes put into the outbox
        self._sent = 0  # ticket of the last bytes the writer handed to the socket
        self._dirty = trio.Event()
        self._sent_lot = trio.lowlevel.ParkingLot()
        self._credit_lot = trio.lowlevel.ParkingLot()
        self._conn_unacked = 0
        self.closed = False
        self._closed = trio.Event()
        self.goaway: int | None = None  # last stream id the server will process
        self.requests = 0  # streams opened so far

    @property
    def active(self) -> int:
        """Streams still open on this connection."""
        return len(self._streams)

    @property
    def max_streams(self) -> int:
        """The server's ``SETTINGS_MAX_CONCURRENT_STREAMS``."""
        return int(self._h2.remote_settings.max_concurrent_streams)

    @property
    def accepting(self) -> bool:
        """Can this connection take another stream?"""
        return not self.closed and self.goaway is None and self.active < self.max_streams

    async def wait_closed(self) -> None:
        """Wait until the connection is gone (the server closed it, or it broke).

        Cancellation: a checkpoint; cancelling the wait changes nothing.
        """
        await self._closed.wait()

    # -- the writer ---------------------------------------------------------
    def _pull(self) -> int:
        """Move ``h2``'s pending bytes to the outbox and wake the writer."""
        data = self._h2.data_to_send()
        if data:
            self._outbox += data
            self._queued += 1
            self._dirty.set()
        return self._queued

    async def _flushed(self, ticket: int) -> None:
        while self._sent < ticket and not self.closed:
            await self._sent_lot.park()

    async def _write_loop(self) -> None:
        try:
            while True:
                if not self._outbox:
                    self._dirty = trio.Event()
                    await self._dirty.wait()
                    continue
                data, ticket = bytes(self._outbox), self._queued
                self._outbox.clear()
                await self._stream.send_all(data)
                self._sent = ticket
                self._sent_lot.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._lost()

    def _start(self) -> None:
        self._h2.initiate_connection()
        self._h2.update_settings(
            {
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.stream_window,
            }
        )
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_STREAM_WINDOW)
        self._pull()

    # -- requests -----------------------------------------------------------
    async def request(
        self, method: str, path: str, headers: Headers = (), body: bytes = b"",
        authority: str = "localhost",
    ) -> H2Stream:  # fmt: skip
        """Open a stream and send the whole request (body within flow control).

        Returns once the request is on the wire.  Raises :class:`StreamReset`
        if the connection is closed or going away.  If cancelled, the stream
        may be half sent: :meth:`H2Stream.reset` it.

        Cancellation: see above.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.closed or self.goaway is not None:
            raise StreamReset("the connection is closed")
        stream_id = self._h2.get_next_available_stream_id()
        stream = self._streams[stream_id] = H2Stream(self, stream_id)
        pseudo = [(":method", method), (":path", path), (":scheme", self.scheme),
                  (":authority", authority)]  # fmt: skip
        extra = [("content-length", str(len(body)))] if body else []
        self._h2.send_headers(stream_id, [*pseudo, *headers, *extra], end_stream=not body)
        self.requests += 1
        ticket = self._pull()
        if body:
            ticket = await self._send_body(stream, body)
        await self._flushed(ticket)
        if self.closed and self._sent < ticket:
            raise StreamReset("the connection closed while sending")
        return stream

    async def _send_body(self, stream: H2Stream, body: bytes) -> int:
        view, pos = memoryview(body), 0
        while pos < len(body):
            if stream.ended or self.closed:
                break  # the server answered (413?) or went away; the response tells
            size = min(
                self._h2.local_flow_control_window(stream.id),
                self._h2.max_outbound_frame_size,
                len(body) - pos,
            )  # fmt: skip
            if size <= 0:
                await self._credit_lot.park()
                continue
            try:
                self._h2.send_data(stream.id, bytes(view[pos : pos + size]),
                                   end_stream=pos + size == len(body))  # fmt: skip
            except h2.exceptions.StreamClosedError:
                break
            pos += size
            self._pull()
        return self._queued

    def _consumed(self, stream: H2Stream, size: int) -> None:
        """Credit ``size`` bytes back to ``stream`` once half its window is used."""
        stream._unacked += size
        if stream._unacked < self.stream_window // 2 or self.closed or stream.ended:
            return
        increment, stream._unacked = stream._unacked, 0
        with contextlib.suppress(*_H2_STATE_ERRORS):
            self._h2.increment_flow_control_window(increment, stream.id)
            self._pull()

    async def _reset(self, stream: H2Stream) -> None:
        self._forget(stream)
        stream._notify()
        if self.closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            self._h2.reset_stream(stream.id, error_code=CANCEL)
        except _H2_STATE_ERRORS:
            await trio.lowlevel.checkpoint()
            return
        await self._flushed(self._pull())

    def _forget(self, stream: H2Stream) -> None:
        self._streams.pop(stream.id, None)

    # -- the reader ---------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._stream.receive_some(65536)
                if not data:
                    break
                for event in self._h2.receive_data(data):
                    self._dispatch(event)
                self._pull()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError):
            pass
        finally:
            self._lost()

    def _lost(self) -> None:
        """The connection is gone: every open stream ends with :data:`LOST`."""
        self.closed = True
        self._closed.set()
        for stream in list(self._streams.values()):
            if stream._reset is None and not stream._ended:
                stream._reset = LOST
            stream._notify()
        self._streams.clear()
        self._sent_lot.unpark_all()
        self._credit_lot.unpark_all()
        self._dirty.set()

    def _dispatch(self, event: h2.events.Event) -> None:
        stream = self._streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.DataReceived):
            self._received(stream, event)
        elif isinstance(event, h2.events.ResponseReceived) and stream:
            headers = {_text(k): _text(v) for k, v in event.headers or ()}
            stream.status = int(headers.pop(":status"))
            stream.headers = headers
            stream._notify()
        elif isinstance(event, h2.events.StreamEnded) and stream:
            stream._ended = True
            self._forget(stream)
            stream._notify()
        elif isinstance(event, h2.events.StreamReset) and stream:
            stream._reset = event.error_code or 0
            self._forget(stream)
            stream._notify()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._goaway(event.last_stream_id or 0)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._credit_lot.unpark_all()

    def _received(self, stream: H2Stream | None, event: h2.events.DataReceived) -> None:
        size = event.flow_controlled_length or 0
        self._conn_unacked += size  # the connection window is credited on receipt
        if self._conn_unacked >= CONNECTION_WINDOW // 4:
            with contextlib.suppress(*_H2_STATE_ERRORS):
                self._h2.increment_flow_control_window(self._conn_unacked)
            self._conn_unacked = 0
        if stream is None:
            return
        if event.data:
            stream._chunks.append((event.data, size))
            stream._notify()
        elif size:  # padding only: nothing for the consumer to take
            self._consumed(stream, size)

    def _goaway(self, last_stream_id: int) -> None:
        """GOAWAY: streams the server never processed are refused; the rest go on."""
        self.goaway = last_stream_id
        for stream in list(self._streams.values()):
            if stream.id > last_stream_id:
                stream._reset = REFUSED
                self._forget(stream)
                stream._notify()


@asynccontextmanager
async def open_h2_connection(
    host: str, port: int, ssl_context: ssl.SSLContext | None = None, *,
    stream_window: int = DEFAULT_STREAM_WINDOW,
) -> AsyncIterator[H2Connection]:  # fmt: skip
    """Connect (h2c prior knowledge, or TLS with ALPN ``h2``) and run reader and writer.

    ``ssl_context`` must offer ALPN ``h2`` (``set_alpn_protocols(["h2"])``);
    a server that does not choose it raises :class:`StreamReset`.
    ``stream_window`` is the per-stream receive window we announce
    (``SETTINGS_INITIAL_WINDOW_SIZE``).  Leaving the block cancels both tasks
    and closes the socket, which the server sees as every open stream going
    away at once.

    Cancellation: a ``Cancelled`` while connecting closes the stream; inside the block it ends
    both tasks and the socket is closed, shielded and bounded.
    """
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    try:
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_hostname=host)
            await stream.do_handshake()
            if stream.selected_alpn_protocol() != "h2":
                raise StreamReset(f"{host}:{port} did not agree to HTTP/2 by ALPN")
        conn = H2Connection(
            stream, scheme="https" if ssl_context else "http", stream_window=stream_window
        )
        conn._start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn._read_loop)
            nursery.start_soon(conn._write_loop)
            try:
                yield conn
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await stream.aclose()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
