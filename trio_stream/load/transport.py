"""The load generator's two clients behind one interface.

``client.exchange(method, path, headers, body)`` is an async context manager
that sends a request and yields an :class:`Exchange` (``response()``,
``receive()``, ``headers``).  Leaving the block before the response ended is
a **disconnect**: HTTP/1.1 closes the socket, HTTP/2 sends ``RST_STREAM`` on
that one stream.  Leaving it after the end keeps the connection for the next
request.

Ownership::

    open_client()
    └── client nursery          (HTTP/2 only) one task per connection, holding
        └── open_h2_connection  its reader and writer until the client closes
                                or the connection is retired and drained

HTTP/1.1 connections need no task: an exchange reads its own socket.
Transport failures of either kind are translated at this seam into
:class:`TransportError`.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import h2.exceptions
import trio

from .h2 import H2Connection, StreamReset, open_h2_connection
from .http1 import ConnectionLost, H1Connection, H1Exchange, Headers, connect

#: A slow reader's receive buffer (HTTP/1.1 ``SO_RCVBUF``) and stream window
#: (HTTP/2): small, so that the server has to hold back instead of the kernel.
SLOW_WINDOW = 4096
IDLE_MAX = 1.0  # seconds an idle keep-alive connection is trusted (hypercorn: 5 s)
#: hypercorn answers the 1000th stream of a connection (keep_alive_max_requests)
#: with GOAWAY and then leaves the streams still open on it hanging; rotate first.
H2_REQUESTS_PER_CONNECTION = 900


class TransportError(Exception):
    """A request failed below HTTP: connect, reset, EOF, bad framing."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class Exchange(Protocol):
    status: int | None
    headers: dict[str, str]

    async def response(self) -> int:
        """Wait for the response head; its status.  Cancellation: a ``Cancelled`` leaves the
        exchange mid-response.
        """

    async def receive(self) -> bytes | None:
        """The next body chunk, ``None`` at the end.  Cancellation: as :meth:`response`."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where the load goes, parsed from ``--url``."""

    host: str
    port: int
    tls: bool
    base_path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"--url must be http://host[:port] or https://host[:port], not {url!r}"
            )
        tls = parts.scheme == "https"
        return cls(parts.hostname, parts.port or (443 if tls else 80), tls, parts.path.rstrip("/"))

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def ssl_context(self, *, http2: bool, insecure: bool) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context()
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"] if http2 else ["http/1.1"])
        return context


def _transport_error(exc: BaseException) -> TransportError:
    if isinstance(exc, h2.exceptions.ProtocolError):
        return TransportError("protocol_error", repr(exc))
    if isinstance(exc, StreamReset):
        return TransportError("stream_reset", str(exc))
    if isinstance(exc, ConnectionLost):
        return TransportError("connection_lost", str(exc))
    if isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError):
        return TransportError("tls_error", str(exc.__cause__ or exc))
    return TransportError("connect_failed", str(exc))


_FAILURES = (
    StreamReset, ConnectionLost, OSError, trio.BrokenResourceError, h2.exceptions.ProtocolError,
)  # fmt: skip


class H1Client:
    """HTTP/1.1: a keep-alive connection per concurrent exchange."""

    def __init__(self, target: Target, ssl_context: ssl.SSLContext | None) -> None:
        self.target = target
        self.ssl_context = ssl_context
        self._idle: list[H1Connection] = []
        self.connections_opened = 0

    async def _connect(self, slow: bool) -> H1Connection:
        t = self.target
        stream = await connect(
            t.host, t.port, self.ssl_context, rcvbuf=SLOW_WINDOW if slow else None
        )
        self.connections_opened += 1
        return H1Connection(stream, t.authority, read_size=1024 if slow else 65536)

    async def _acquire(self, slow: bool) -> H1Connection:
        now = trio.current_time()
        while self._idle and not slow:
            conn = self._idle.pop()
            if conn.idle_since is not None and now - conn.idle_since < IDLE_MAX:
                return conn
            await conn.aclose()
        return await self._connect(slow)

    @asynccontextmanager
    async def exchange(
        self, method: str, path: str, headers: Headers, body: bytes = b"", *, slow: bool = False
    ) -> AsyncIterator[Exchange]:
        """Send a request on an idle keep-alive connection (or a new one); yield its exchange.

        Leaving the block before the response ended -- also by ``Cancelled``
        -- closes the socket (bounded, shielded): that is the disconnect.
        ``slow`` uses a fresh connection with a small ``SO_RCVBUF``, closed after.
        Transport failures raise :class:`TransportError`.
        """
        try:
            conn = await self._acquire(slow)
        except _FAILURES as exc:
            raise _transport_error(exc) from exc
        ex = H1Exchange(conn)
        try:
            try:
                await conn.send_request(method, self.target.base_path + path, headers, body)
                yield ex
            except _FAILURES as exc:
                raise _transport_error(exc) from exc
        finally:
            if ex.complete and conn.reusable and not slow:
                conn.recycle()
                conn.idle_since = trio.current_time()
                self._idle.append(conn)
            else:
                await conn.aclose()  # the disconnect: a TCP close

    async def aclose(self) -> None:
        """Close every idle connection.  Cancellation: each close is shielded and bounded; a
        ``Cancelled`` between two leaves the rest to be collected.
        """
        while self._idle:
            await self._idle.pop().aclose()


class H2Client:
    """HTTP/2: streams share connections, up to ``max_streams`` each."""

    def __init__(
        self, nursery: trio.Nursery, target: Target, ssl_context: ssl.SSLContext | None,
        *, max_streams: int = 100,
    ) -> None:  # fmt: skip
        self._nursery = nursery
        self.target = target
        self.ssl_context = ssl_context
        self.max_streams = max_streams
        self._pools: dict[bool, list[_Pooled]] = {False: [], True: []}
        self._lock = trio.Lock()
        self.connections_opened = 0

    async def _hold(self, slow: bool, *, task_status: trio.TaskStatus[_Pooled]) -> None:
        t = self.target
        window = SLOW_WINDOW if slow else 65_535
        async with open_h2_connection(t.host, t.port, self.ssl_context, stream_window=window) as c:
            pooled = _Pooled(c)
            self.connections_opened += 1
            self._pools[slow].append(pooled)
            try:
                task_status.started(pooled)
                await pooled.drained.wait()
            finally:
                self._pools[slow].remove(pooled)

    async def _acquire(self, slow: bool) -> _Pooled:
        """A connection with room for one more stream (counted as ours on return)."""
        async with self._lock:
            for pooled in self._pools[slow]:
                if pooled.has_room(self.max_streams):
                    break
                pooled.retire_if_idle()
            else:
                pooled = await self._nursery.start(self._hold, slow)
                assert isinstance(pooled, _Pooled)
            pooled.streams += 1
            return pooled

    @asynccontextmanager
    async def exchange(
        self, method: str, path: str, headers: Headers, body: bytes = b"", *, slow: bool = False
    ) -> AsyncIterator[Exchange]:
        """Open a stream on a shared connection with room; yield it as the exchange.

        Leaving the block before the response ended -- also by ``Cancelled``
        -- sends ``RST_STREAM(CANCEL)`` for this stream only (the frame is
        queued before any checkpoint, so a cancelled exit still sends it).
        ``slow`` uses connections with a small stream window.  Transport
        failures raise :class:`TransportError`.
        """
        try:
            pooled = await self._acquire(slow)
        except _FAILURES as exc:
            raise _transport_error(exc) from exc
        try:
            conn = pooled.conn
            try:
                stream = await conn.request(
                    method, self.target.base_path + path, headers, body, self.target.authority
                )
            except _FAILURES as exc:
                raise _transport_error(exc) from exc
            try:
                yield stream
            except _FAILURES as exc:
                raise _transport_error(exc) from exc
            finally:
                await stream.reset()  # a no-op if it ended; else the disconnect
        finally:
            pooled.release()

    async def aclose(self) -> None:
        """Let every pooled connection's holder close it.  Cancellation: never checkpoints."""
        for pool in self._pools.values():
            for pooled in pool:
                pooled.drained.set()


class _Pooled:
    """An HTTP/2 connection in the pool, with the streams we opened on it."""

    def __init__(self, conn: H2Connection) -> None:
        self.conn = conn
        self.streams = 0
        self.drained = trio.Event()

    def has_room(self, max_streams: int) -> bool:
        c = self.conn
        return (
            c.accepting
            and self.streams < min(max_streams, c.max_streams)
            and c.requests < H2_REQUESTS_PER_CONNECTION
        )

    def release(self) -> None:
        self.streams -= 1
        self.retire_if_idle()

    def retire_if_idle(self) -> None:
        """Close a connection that takes no new streams once its last one ends."""
        c = self.conn
        retired = c.closed or c.goaway is not None or c.requests >= H2_REQUESTS_PER_CONNECTION
        if retired and self.streams == 0:
            self.drained.set()


@asynccontextmanager
async def open_client(
    target: Target, *, http2: bool, insecure: bool = False, max_streams: int = 100
) -> AsyncIterator[H1Client | H2Client]:
    """The client for ``target``; every connection is closed when the block exits.

    Cancellation: leaving the block, however, closes every connection (HTTP/2: by cancelling the
    holders' nursery).
    """
    ssl_context = target.ssl_context(http2=http2, insecure=insecure)
    if not http2:
        client = H1Client(target, ssl_context)
        try:
            yield client
        finally:
            await client.aclose()
        return
    async with trio.open_nursery() as nursery:
        h2_client = H2Client(nursery, target, ssl_context, max_streams=max_streams)
        try:
            yield h2_client
        finally:
            await h2_client.aclose()
            nursery.cancel_scope.cancel()
