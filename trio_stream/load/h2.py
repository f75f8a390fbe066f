"""A minimal HTTP/2 client on trio and ``h2``: many streams, real resets.

httpx's HTTP/2 does not send ``RST_STREAM`` when a response is closed early
(httpcore issue #943), so the load generator and the tests drive ``h2``
directly.  One reader task per connection dispatches frames to streams.

Flow control is honest: received data is acknowledged only when the consumer
takes it (:meth:`H2Stream.receive`), so a consumer that stops reading makes
the server's window run out -- which is how a stalled HTTP/2 client looks.
"""

from __future__ import annotations

import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio

Headers = Sequence[tuple[str, str]]


class StreamReset(Exception):
    """The server reset the stream, or the connection ended under it."""


class H2Stream:
    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self._chunks: deque[bytes] = deque()
        self._ended = False
        self._reset: int | None = None
        self._changed = trio.Event()
        self._headers_seen = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def response(self) -> int:
        """Wait for the response headers; returns the status."""
        while self.status is None:
            if self._reset is not None or self._ended:
                raise StreamReset(f"stream {self.id} ended before headers")
            await self._headers_seen.wait()
        return self.status

    async def receive(self) -> bytes | None:
        """The next data chunk, ``None`` at the end of the stream."""
        while not self._chunks:
            if self._reset is not None:
                raise StreamReset(f"stream {self.id} reset ({self._reset})")
            if self._ended:
                return None
            await self._changed.wait()
        chunk = self._chunks.popleft()
        await self.conn._ack(self.id, len(chunk))
        return chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:  # pragma: no cover - convenience
        while (chunk := await self.receive()) is not None:
            yield chunk

    async def reset(self) -> None:
        """Send ``RST_STREAM(CANCEL)``: the client went away from this stream."""
        if not self._ended and self._reset is None:
            self._reset = 0x8
            await self.conn._reset(self.id)


class H2Connection:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self._h2 = h2.connection.H2Connection(config)
        self._streams: dict[int, H2Stream] = {}
        self._send_lock = trio.Lock()
        self._window_open = trio.Event()
        self.closed = False

    async def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data:
            async with self._send_lock:
                await self._stream.send_all(data)

    async def _start(self) -> None:
        self._h2.initiate_connection()
        self._h2.update_settings({h2.settings.SettingCodes.ENABLE_PUSH: 0})
        await self._flush()

    async def request(
        self, method: str, path: str, headers: Headers = (), body: bytes = b"",
        authority: str = "localhost",
    ) -> H2Stream:  # fmt: skip
        """Open a stream and send the whole request."""
        stream_id = self._h2.get_next_available_stream_id()
        stream = self._streams[stream_id] = H2Stream(self, stream_id)
        pseudo = [(":method", method), (":path", path), (":scheme", "http"),
                  (":authority", authority)]  # fmt: skip
        extra = [("content-length", str(len(body)))] if body else []
        self._h2.send_headers(stream_id, [*pseudo, *headers, *extra], end_stream=not body)
        if body:
            self._h2.send_data(stream_id, body, end_stream=True)
        await self._flush()
        return stream

    async def _ack(self, stream_id: int, size: int) -> None:
        if self.closed:
            return
        # A closed stream's data needs no credit any more.
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.acknowledge_received_data(size, stream_id)
        await self._flush()

    async def _reset(self, stream_id: int) -> None:
        try:
            self._h2.reset_stream(stream_id, error_code=0x8)
        except h2.exceptions.StreamClosedError:
            return
        await self._flush()

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._stream.receive_some(65536)
                if not data:
                    break
                events = self._h2.receive_data(data)
                for event in events:
                    self._dispatch(event)
                await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed = True
            for stream in self._streams.values():
                if not stream._ended:
                    stream._reset = stream._reset if stream._reset is not None else -1
                stream._headers_seen.set()
                stream._notify()

    def _dispatch(self, event: h2.events.Event) -> None:
        stream = self._streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream:
            headers = {_text(k): _text(v) for k, v in event.headers or ()}
            stream.status = int(headers.pop(":status"))
            stream.headers = headers
            stream._headers_seen.set()
        elif isinstance(event, h2.events.DataReceived) and stream:
            if event.data:
                stream._chunks.append(event.data)
            elif event.flow_controlled_length:
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            stream._notify()
        elif isinstance(event, h2.events.StreamEnded) and stream:
            stream._ended = True
            stream._headers_seen.set()
            stream._notify()
        elif isinstance(event, h2.events.StreamReset) and stream:
            stream._reset = event.error_code or 0
            stream._headers_seen.set()
            stream._notify()


@asynccontextmanager
async def open_h2_connection(
    host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[H2Connection]:
    """Connect (h2c prior knowledge, or TLS with ALPN ``h2``) and run the reader.

    Leaving the block cancels the reader and closes the socket, which the
    server sees as every open stream going away at once.
    """
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if ssl_context is not None:
        stream = trio.SSLStream(stream, ssl_context, server_hostname=host)
        await stream.do_handshake()
    conn = H2Connection(stream)
    try:
        await conn._start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn._read_loop)
            try:
                yield conn
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
