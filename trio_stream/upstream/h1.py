"""The streaming POST to an HTTP upstream: a small pooled HTTP/1.1 client (trio,
h11 for the request, httptools for the response).

Only the completion request goes through here (``POST /chat/completions``,
``POST /api/chat``): its body is read once per token, and that read is the
server's hot path (docs/design.md section 15).  httpx read a token through
httpcore and h11 with five nested async generators and a ``fail_after(inf)``
cancel scope per read, and trio's ``recv`` tried the socket before waiting, so
every token also cost a ``recvfrom`` that returned ``EAGAIN``.  Here a token
costs one wait for readability, one ``recv`` and one call into llhttp.  The rare
calls (``GET /models``, ``/api/tags``) stay on httpx (:mod:`._http`): they are
not per token, and httpx's redirects, decoding and pool are worth more there
than a few microseconds.

HTTP/1.1 only.  The request is written (and its headers validated) by
``h11``; the response is framed by ``httptools`` -- llhttp, the C parser
uvicorn uses -- (chunked, ``Content-Length`` and read-to-EOF bodies): with
h11's pure-Python state machine on the response, three ``next_event`` calls
per token were 13% of a proxied token's CPU (py-spy; 117-121 -> 102 µs per
token with llhttp, ``tools/measure_token_cost.py external``).  One connection
carries one exchange at a time:

* **Timeouts.** ``--connect-timeout`` bounds connecting, the TLS handshake and
  writing the request.  Nothing here times the response (its head included):
  :mod:`trio_stream.runs.manager` times the first token and every next one, so an
  upstream that sends its head only with the first token (Ollama loading a
  model) gets ``--first-token-timeout``, as it did with httpx.
* **Pool.** Idle connections are kept per ``(scheme, host, port)``, at most
  :data:`MAX_IDLE` in all.  A connection goes back only when its response was
  read to its end and it did not ask to close (llhttp's keep-alive); any exception or
  cancellation while it is out closes it (shielded, within
  :data:`CLOSE_TIMEOUT`; ``Cancelled`` is re-raised, never swallowed), so the
  upstream sees the close at once and stops generating.
* **Stale connections.** An idle connection that the upstream closed is
  found before reuse (a non-blocking ``MSG_PEEK``), or, if it closes just
  then, by an EOF or a reset before any byte of the response: the request is
  then sent once more on a fresh connection.  A fresh connection is never
  retried.
* **Reads.** After a read that drained the socket (fewer bytes than asked
  for) the next one waits for readability *first* and then calls ``recv``
  once, so an idle upstream costs no ``EAGAIN`` system call; after a full
  read it tries ``recv`` first.  TLS connections read through
  :class:`trio.SSLStream`.

Every transport or framing error becomes an
:class:`~trio_stream.errors.UpstreamError` here (``timeout=True`` for the
connect timeout); ``trio.Cancelled`` passes through.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from urllib.parse import urlsplit

import h11
import httptools
import trio

from ..errors import UpstreamError
from .wire import ERROR_BODY_LIMIT, http_error

#: Bytes asked for per read.
READ_SIZE = 65536
#: Idle keep-alive connections kept, over all upstream addresses.  Sized for
#: the streams a process runs at once: a pool smaller than the concurrency
#: closes a connection after almost every response and opens a new one for
#: the next (a TCP connect and close on both sides per request, measured as
#: the largest per-request cost of a 100-stream proxy with httpx's limit of 64).
#: Checkout and return are O(1), so a large pool costs nothing per request.
MAX_IDLE = 1024
#: Seconds a close may take (a TLS ``close_notify`` to a peer that reads nothing).
CLOSE_TIMEOUT = 1.0

Key = tuple[str, str, int]

_Broken = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _Stale(Exception):
    """A reused connection died before the response's first byte."""


def failed(exc: BaseException) -> UpstreamError:
    return UpstreamError(f"The upstream request failed: {exc!r}")


class UpstreamConnection:
    """One HTTP/1.1 connection: the trio stream, its socket and its ``h11`` state."""

    __slots__ = ("_drained", "eof", "exchange", "key", "received", "sock", "stream", "tls")

    def __init__(self, stream: trio.abc.Stream, sock: socket.socket, key: Key) -> None:
        self.stream = stream
        self.sock = sock  # the stdlib socket under ``stream`` (and under TLS)
        self.tls = isinstance(stream, trio.SSLStream)
        self.key = key
        self.exchange: ParsedResponse | None = None  # the response being parsed
        self.received = False  # a byte of the current response arrived
        self.eof = False  # the upstream closed its side (a body read to EOF)
        self._drained = True  # the last read emptied the socket

    async def receive(self) -> bytes:
        """The next bytes from the upstream (``b""`` at EOF).  A checkpoint.

        Raises ``trio.BrokenResourceError``, ``trio.ClosedResourceError`` or
        ``OSError`` if the connection broke.

        Cancellation: a ``Cancelled`` loses no data (nothing was read).
        """
        if self._drained and not self.tls:
            sock = self.sock
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    data = sock.recv(READ_SIZE)
                    break
                except BlockingIOError:  # a spurious wake-up: wait again
                    continue
        else:
            data = bytes(await self.stream.receive_some(READ_SIZE))
        self._drained = len(data) < READ_SIZE
        if data:
            self.received = True
        else:
            self.eof = True
        return data

    def looks_alive(self) -> bool:
        """An idle connection has nothing to read: no EOF, no reset, no stray bytes."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)  # b"" (EOF) or bytes: either way not reusable
        except BlockingIOError:
            return True
        except OSError:
            pass
        return False

    @property
    def reusable(self) -> bool:
        """The response was read to its end, it did not ask to close the
        connection, and the upstream did not close its side."""
        x = self.exchange
        return x is not None and x.complete and x.keep_alive and not self.eof

    async def aclose(self) -> None:
        """Close the connection, even when cancelled; never raises on a broken one.

        Cancellation: shielded, bounded by ``CLOSE_TIMEOUT``; past it the socket is dropped.  A
        ``Cancelled`` is delivered at the caller's next checkpoint.
        """
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            with suppress(*_Broken):
                await self.stream.aclose()
        if scope.cancelled_caught:  # the TLS close timed out: drop the socket
            self.close_now()

    def close_now(self) -> None:
        """Close the socket without a word to the peer (no TLS ``close_notify``)."""
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


class ParsedResponse:
    """httptools' callbacks for one response: its head, its body pieces, its end.

    llhttp (through httptools, the parser uvicorn uses) frames the response:
    ``Content-Length``, chunked, or -- neither -- the body runs to EOF.  It
    is C, so a token's body piece costs no Python-level state machine.
    """

    __slots__ = ("body", "complete", "head_done", "headers", "keep_alive", "parser", "to_eof")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.to_eof = False  # neither Content-Length nor chunked: the body ends at EOF

    def feed(self, data: bytes) -> None:
        """Parse ``data``.  Raises :class:`UpstreamError` on bad framing."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise failed(exc) from exc

    def eof(self) -> None:
        """The upstream closed: the end of a read-to-EOF body, else an error."""
        if not self.complete:
            if self.head_done and self.to_eof:
                self.complete = True
            else:
                raise failed(
                    RuntimeError("peer closed connection without sending complete message body")
                )

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if 100 <= self.parser.get_status_code() < 200:
            self.headers = []  # an informational response: the real one follows
            return
        self.head_done = True
        names = {name for name, _ in self.headers}
        self.to_eof = b"content-length" not in names and b"transfer-encoding" not in names

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()


class Response:
    """A response being read: its status, headers and body, with :meth:`read`."""

    __slots__ = ("conn", "exchange", "headers", "status")

    def __init__(self, conn: UpstreamConnection, exchange: ParsedResponse) -> None:
        self.conn = conn
        self.exchange = exchange
        self.status = exchange.parser.get_status_code()
        self.headers = exchange.headers

    @property
    def complete(self) -> bool:
        """The body was read to its end."""
        return self.exchange.complete

    async def read(self) -> bytes:
        """The body's next bytes, ``b""`` once it ended.  A checkpoint.

        All of the body that one socket read brought comes back at once.
        Raises :class:`UpstreamError` if the connection breaks or the framing
        is wrong (an EOF inside a chunked or ``Content-Length`` body).

        Cancellation: a ``Cancelled`` loses no data (a socket read either happened whole or
        not); the caller's stream context then closes the connection.
        """
        x = self.exchange
        if not x.body and not x.complete:
            while True:
                try:
                    data = await self.conn.receive()
                except _Broken as exc:
                    raise failed(exc) from exc
                if not data:
                    x.eof()
                    break
                x.feed(data)
                if x.body or x.complete:
                    break
        else:
            await trio.lowlevel.checkpoint()
        body = x.body
        if not body:
            return b""
        x.body = []
        return body[0] if len(body) == 1 else b"".join(body)

    async def read_snippet(self, limit: int = ERROR_BODY_LIMIT) -> bytes:
        """Up to ``limit`` bytes of the body (an error's), what arrived if it breaks.

        Cancellation: as :meth:`read`.
        """
        body = b""
        try:
            while len(body) < limit and (data := await self.read()):
                body += data
        except UpstreamError:
            pass
        return body[:limit]


class Pool:
    """Keep-alive HTTP/1.1 connections to one upstream base URL.

    :meth:`post` is the only request it makes.  ``ssl_context`` is for tests;
    ``https`` URLs get :func:`ssl.create_default_context` by default.
    """

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        headers: list[tuple[str, str]] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_idle: int = MAX_IDLE,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.scheme = url.scheme
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.base_path = url.path.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = (url.scheme, url.port) in (("http", 80), ("https", 443)) or url.port is None
        self.authority = host if default else f"{host}:{self.port}"
        self.connect_timeout = connect_timeout
        self.headers = [("user-agent", "trio-stream"), *(headers or [])]
        self.max_idle = max_idle
        self._ssl_context = ssl_context
        self._idle: dict[Key, list[UpstreamConnection]] = {}
        self._idle_count = 0
        self.closed = False

    @property
    def key(self) -> Key:
        return (self.scheme, self.host, self.port)

    @property
    def idle(self) -> int:
        """Idle connections in the pool."""
        return self._idle_count

    @asynccontextmanager
    async def post(
        self, path: str, body: bytes, headers: Sequence[tuple[str, str]] = ()
    ) -> AsyncIterator[Response]:
        """POST ``body`` (JSON) to ``base_url + path``, with ``headers`` beside
        the pool's own (a ``traceparent``); yields the response once its head
        arrived.  HTTP 4xx/5xx raise :class:`UpstreamError`, made
        from the status, the headers and the body's error object by
        :func:`~trio_stream.upstream.wire.http_error` (an upstream 4xx's own
        error is answered as such: docs/api.md section 2.2.1).

        Leaving the block returns the connection to the pool if the body was
        read to its end, and closes it otherwise (an exception, ``Cancelled``,
        or a body left unread), before the block's ``__aexit__`` returns.
        """
        response = await self._request(path, body, headers)
        conn = response.conn
        try:
            if response.status >= 400:
                raw = await response.read_snippet(ERROR_BODY_LIMIT)
                raise http_error(response.status, response.headers, raw)
            yield response
        except BaseException:
            await conn.aclose()
            raise
        await self._release(conn)

    async def aclose(self) -> None:
        """Close every idle connection; later releases close theirs.

        Cancellation: each connection's close is shielded and bounded; a ``Cancelled`` between
        two closes leaves the rest to be closed when collected.
        """
        self.closed = True
        idle = [conn for conns in self._idle.values() for conn in conns]
        self._idle.clear()
        self._idle_count = 0
        for conn in idle:
            await conn.aclose()

    # -- the exchange ------------------------------------------------------
    async def _request(self, path: str, body: bytes, extra: Sequence[tuple[str, str]]) -> Response:
        conn = self._checkout()
        if conn is not None:
            try:
                return await self._exchange(conn, path, body, extra)
            except _Stale:
                pass  # closed; once more on a fresh connection
        conn = await self._connect()
        try:
            return await self._exchange(conn, path, body, extra)
        except _Stale as exc:
            raise failed(exc.__cause__ or exc) from exc

    async def _exchange(
        self, conn: UpstreamConnection, path: str, body: bytes, extra: Sequence[tuple[str, str]]
    ) -> Response:
        """POST ``body`` on ``conn`` and read the response head.  On any error
        the connection is closed; :class:`_Stale` if it died before answering."""
        h = h11.Connection(h11.CLIENT)  # writes and validates the request only
        headers = [
            ("host", self.authority),
            *self.headers,
            *extra,
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
        ]
        try:
            try:
                request = b"".join(
                    h.send(event) or b""
                    for event in (
                        h11.Request(method="POST", target=self.base_path + path, headers=headers),
                        h11.Data(data=body),
                        h11.EndOfMessage(),
                    )
                )
            except h11.LocalProtocolError as exc:  # a header we cannot send (the API key)
                raise failed(exc) from exc
            conn.received = False
            conn.exchange = x = ParsedResponse()
            try:
                with trio.fail_after(self.connect_timeout):
                    await conn.stream.send_all(request)
            except _Broken as exc:
                raise _Stale(f"sending the request failed: {exc!r}") from exc
            while not x.head_done:
                try:
                    data = await conn.receive()
                except _Broken as exc:
                    if conn.received:
                        raise failed(exc) from exc
                    raise _Stale(f"the connection broke: {exc!r}") from exc
                if not data:
                    if not conn.received:
                        raise _Stale("the upstream closed the connection")
                    x.eof()  # raises: the head never completed
                x.feed(data)
            return Response(conn, x)
        except trio.TooSlowError as exc:
            await conn.aclose()
            raise UpstreamError(
                f"The upstream timed out: sending the request took over {self.connect_timeout} s",
                timeout=True,
            ) from exc
        except BaseException:
            await conn.aclose()
            raise

    # -- connections -------------------------------------------------------
    async def _connect(self) -> UpstreamConnection:
        """A new connection (TLS for https), within ``--connect-timeout``."""
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(self.connect_timeout):
                tcp = await trio.open_tcp_stream(self.host, self.port)
                # Keep the stdlib socket: reads wait first, then recv directly.
                sock = socket.socket(fileno=tcp.socket.detach())
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                if self.scheme == "https":
                    stream = trio.SSLStream(
                        stream, self._tls(), server_hostname=self.host, https_compatible=True
                    )
                    await stream.do_handshake()
        except trio.TooSlowError as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise UpstreamError(
                f"The upstream timed out: connecting to {self.host}:{self.port} took over "
                f"{self.connect_timeout} s",
                timeout=True,
            ) from exc
        except _Broken as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise failed(exc) from exc
        except BaseException:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise
        return UpstreamConnection(stream, sock, self.key)

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
            self._ssl_context.set_alpn_protocols(["http/1.1"])
        return self._ssl_context

    def _checkout(self) -> UpstreamConnection | None:
        """The most recently used idle connection that still looks alive."""
        conns = self._idle.get(self.key)
        while conns:
            conn = conns.pop()
            self._idle_count -= 1
            if conn.looks_alive():
                return conn
            conn.close_now()  # closed by the upstream: nothing to say to it
        return None

    async def _release(self, conn: UpstreamConnection) -> None:
        """Back to the pool if another exchange may follow, else closed."""
        if self.closed or not conn.reusable or self._idle_count >= self.max_idle:
            await conn.aclose()
            return
        conn.exchange = None
        self._idle.setdefault(conn.key, []).append(conn)
        self._idle_count += 1
