"""One client for the three ways a client reaches the server, and the TLS files.

The guarantees of docs/api.md -- a client that leaves cancels only its run, a
stalled client is cut, a graceful shutdown ends every stream -- are tested
over each protocol the server speaks (:data:`PROTOCOLS`):

* ``h1``: HTTP/1.1 on plain TCP; each request on a connection of its own
  (:class:`~tests.conftest.RawClient`), so "leaving a stream" is a TCP close.
* ``h2c``: HTTP/2 by prior knowledge on plain TCP; every request of a
  :class:`Client` is a stream of one connection (:mod:`trio_stream.load.h2`,
  whose flow control is honest: a stream nobody reads runs out of window),
  and leaving a stream is ``RST_STREAM(CANCEL)``, its siblings untouched.
* ``h2tls``: the same over TLS, ``h2`` chosen by ALPN.

Leaving the :func:`open_client` block closes every connection of the client
(a TCP close; over TLS after ``close_notify``), which the server sees as all
its streams going away at once.

The TLS helpers issue certificates for 127.0.0.1 from one throwaway CA
(:data:`TLS_CA`) that every client context here trusts.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import trio
import trustme

from tests.conftest import RawClient
from trio_stream import Settings
from trio_stream.load.h2 import H2Connection, H2Stream, open_h2_connection
from trio_stream.wire.sse import SSEDecoder, SSEEvent

PROTOCOLS = ("h1", "h2c", "h2tls")
TLS_CA = trustme.CA()


def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 issued by :data:`TLS_CA`, and its key, as files."""
    cert = TLS_CA.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(keyfile))
    return certfile, keyfile


def with_tls(settings: Settings, tmp_path: Path) -> Settings:
    """``settings`` serving TLS (``--certfile``/``--keyfile``) with a :data:`TLS_CA` certificate."""
    certfile, keyfile = tls_files(tmp_path)
    return settings.replace(certfile=str(certfile), keyfile=str(keyfile))


def serving(settings: Settings, proto: str, tmp_path: Path) -> Settings:
    """``settings`` as the server must be configured for ``proto`` (TLS for ``h2tls``)."""
    return with_tls(settings, tmp_path) if proto == "h2tls" else settings


def client_context(*alpn: str) -> ssl.SSLContext:
    """A client context trusting :data:`TLS_CA`, offering ``alpn`` (default ``h2``)."""
    ctx = ssl.create_default_context()
    TLS_CA.configure_trust(ctx)
    ctx.set_alpn_protocols(list(alpn or ("h2",)))
    return ctx


def h2_context(proto: str) -> ssl.SSLContext | None:
    """The client context an HTTP/2 connection over ``proto`` needs: ALPN ``h2`` for
    ``h2tls``, none for ``h2c``."""
    return client_context() if proto == "h2tls" else None


def server_context() -> ssl.SSLContext:
    """A server context with a :data:`TLS_CA` certificate for 127.0.0.1."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    TLS_CA.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


class Exchange:
    """One request and its response, over whichever protocol.

    ``status`` and ``headers`` are set by :meth:`start`; :meth:`next_event`
    gives the body's SSE events one by one (``None`` at its end), and
    :attr:`events` keeps every one it gave.
    """

    def __init__(self, h1: RawClient | None = None, h2: H2Stream | None = None) -> None:
        self._h1 = h1
        self._h2 = h2
        self._decoder = SSEDecoder()
        self._events: deque[SSEEvent] = deque()
        self._ended = False
        self.body = bytearray()
        self.events: list[SSEEvent] = []
        self.status: int | None = None
        self.headers: dict[str, str] = {}

    async def start(self) -> int:
        """Wait for the response head; returns the status."""
        if self._h1 is not None:
            self.status = await self._h1.start()
            self.headers = self._h1.headers
        else:
            assert self._h2 is not None
            self.status = await self._h2.response()
            self.headers = self._h2.headers
        return self.status

    async def next_event(self) -> SSEEvent | None:
        """The next SSE event of the body; ``None`` once the body has ended."""
        event = await self._next_event()
        if event is not None:
            self.events.append(event)
        return event

    async def _next_event(self) -> SSEEvent | None:
        await self.start()
        if self._h1 is not None:
            event = await self._h1.next_event()
            self.body = self._h1.body
            return event
        assert self._h2 is not None
        while not self._events and not self._ended:
            chunk = await self._h2.receive()
            if chunk is None:
                self._ended = True
            else:
                self.body += chunk
                self._events.extend(self._decoder.feed(chunk))
        return self._events.popleft() if self._events else None

    async def read_all(self) -> list[SSEEvent]:
        """Every remaining event, up to the end of the body."""
        events = []
        while (event := await self.next_event()) is not None:
            events.append(event)
        return events

    async def leave(self) -> None:
        """The client goes away from this exchange: over HTTP/1.1 a TCP close
        of its connection, over HTTP/2 ``RST_STREAM(CANCEL)`` of its stream."""
        if self._h1 is not None:
            await self._h1.aclose()
        else:
            assert self._h2 is not None
            await self._h2.reset()


class Client:
    """Requests over one protocol: see :func:`open_client`."""

    def __init__(
        self, port: int, proto: str, conn: H2Connection | None, rcvbuf: int | None
    ) -> None:
        self.port = port
        self.proto = proto
        self.conn = conn
        self.rcvbuf = rcvbuf
        self._h1: list[RawClient] = []

    async def post(
        self, path: str, body: Any, headers: tuple[tuple[str, str], ...] = ()
    ) -> Exchange:
        """Send one JSON POST (its response is not awaited)."""
        if self.conn is None:
            client = await RawClient.post(self.port, path, body, headers, rcvbuf=self.rcvbuf)
            self._h1.append(client)
            return Exchange(h1=client)
        head = [("content-type", "application/json"), *headers]
        return Exchange(h2=await self.conn.request("POST", path, head, orjson.dumps(body)))

    async def wait_closed(self) -> None:
        """Wait until the server has closed every connection of this client
        (HTTP/1.1: EOF after the responses read so far; a byte is an error)."""
        if self.conn is not None:
            await self.conn.wait_closed()
            return
        for client in self._h1:
            try:
                data = await client.stream.receive_some(65536)
            except trio.BrokenResourceError:  # reset by the server: closed too
                continue
            assert data == b"", f"{len(data)} bytes after the response"

    async def _close_h1(self) -> None:
        for client in self._h1:
            await client.aclose()


@asynccontextmanager
async def open_client(port: int, proto: str, *, rcvbuf: int | None = None) -> AsyncIterator[Client]:
    """A client of 127.0.0.1:``port`` over ``proto`` (one of :data:`PROTOCOLS`).

    ``rcvbuf`` (HTTP/1.1 only) shrinks each socket's receive buffer, so that a
    request nobody reads blocks the server's send early; an HTTP/2 stream
    nobody reads blocks once its 65,535-byte window is spent.  Leaving the
    block closes every connection the client opened.
    """
    if proto == "h1":
        client = Client(port, proto, None, rcvbuf)
        try:
            yield client
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await client._close_h1()
        return
    assert proto in PROTOCOLS, proto
    async with open_h2_connection("127.0.0.1", port, h2_context(proto)) as conn:
        yield Client(port, proto, conn, None)
