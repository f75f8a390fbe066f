"""A lean HTTP/1.1 client: ``h11`` over trio sockets, keep-alive, no pool magic.

It exists so that the load generator can out-run the server: per response
chunk it costs one ``h11`` event, and nothing else.  httpx would work, but it
adds several layers per chunk.

A connection carries one exchange at a time.  An exchange that was read to
its end leaves the connection reusable (keep-alive); one that was abandoned
part-way closes the socket, which is exactly what a browser tab that goes
away does -- the server sees a TCP close.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence

import h11
import trio

Headers = Sequence[tuple[str, str]]

READ_SIZE = 65536
CLOSE_TIMEOUT = 1.0  # seconds a TLS close_notify may take


class ConnectionLost(Exception):
    """The server closed the connection, or broke HTTP/1.1, mid-exchange."""


async def connect(
    host: str, port: int, ssl_context: ssl.SSLContext | None = None, *, rcvbuf: int | None = None
) -> trio.abc.Stream:
    """Open a TCP (optionally TLS, ALPN ``http/1.1``) stream to ``host:port``.

    ``rcvbuf`` sets ``SO_RCVBUF`` before connecting, so that a slow reader's
    small receive window is what the server's TCP stack sees.
    Raises ``OSError`` if the connection fails.

    Cancellation: a ``Cancelled`` closes whatever was opened (the socket, or the TLS stream
    forcefully).
    """
    stream: trio.abc.Stream
    if rcvbuf is None:
        stream = await trio.open_tcp_stream(host, port)
    else:
        family, type_, proto, _, addr = (
            await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        )[0]
        sock = trio.socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            await sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        stream = trio.SocketStream(sock)
    if ssl_context is not None:
        stream = trio.SSLStream(stream, ssl_context, server_hostname=host)
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return stream


class H1Connection:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, stream: trio.abc.Stream, authority: str, read_size: int = READ_SIZE):
        self._stream = stream
        self._h11 = h11.Connection(h11.CLIENT)
        self.authority = authority
        self.read_size = read_size
        self.idle_since: float | None = None
        self.closed = False

    @property
    def reusable(self) -> bool:
        """Both sides finished the last exchange and nobody asked to close."""
        return (
            not self.closed
            and self._h11.our_state is h11.DONE
            and self._h11.their_state is h11.DONE
        )

    def recycle(self) -> None:
        """Prepare a :attr:`reusable` connection for its next exchange."""
        self._h11.start_next_cycle()

    async def send_request(self, method: str, target: str, headers: Headers, body: bytes) -> None:
        """Send one whole request.  Raises :class:`ConnectionLost`.

        If cancelled part-way the connection is unusable: close it.

        Cancellation: see above: a ``Cancelled`` part-way leaves the connection unusable.
        """
        all_headers = [("host", self.authority), *headers]
        if body or method in ("POST", "PUT", "PATCH"):
            all_headers.append(("content-length", str(len(body))))
        try:
            data = self._h11.send(h11.Request(method=method, target=target, headers=all_headers))
            if body:
                data += self._h11.send(h11.Data(data=body))
            data += self._h11.send(h11.EndOfMessage())
            await self._stream.send_all(data)
        except (h11.LocalProtocolError, trio.BrokenResourceError, OSError) as exc:
            raise ConnectionLost(f"sending failed: {exc!r}") from exc

    async def next_event(self) -> h11.Event:
        """The next response event, reading from the socket only when needed.

        A checkpoint.  Raises :class:`ConnectionLost` on EOF or garbage.

        Cancellation: see above: a ``Cancelled`` loses no event.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        scheduled = False
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise ConnectionLost(f"bad response: {exc}") from exc
            if event is h11.NEED_DATA:
                try:
                    data = await self._stream.receive_some(self.read_size)
                except (trio.BrokenResourceError, OSError) as exc:
                    raise ConnectionLost(f"receiving failed: {exc!r}") from exc
                scheduled = True
                self._h11.receive_data(data if isinstance(data, bytes) else bytes(data))
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                raise ConnectionLost("the server closed the connection")
            if not scheduled:
                await trio.lowlevel.cancel_shielded_checkpoint()  # a schedule point, always
            assert isinstance(event, h11.Event)
            return event

    async def aclose(self) -> None:
        """Close the socket (bounded, even when cancelled).

        Cancellation: shielded and bounded by ``CLOSE_TIMEOUT``.
        """
        if self.closed:
            return
        self.closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await self._stream.aclose()


class H1Exchange:
    """One request's response, read through its :class:`H1Connection`.

    The same reading interface as :class:`~trio_stream.load.h2.H2Stream`.
    """

    def __init__(self, conn: H1Connection) -> None:
        self.conn = conn
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.complete = False

    async def response(self) -> int:
        """Wait for the response head; returns the status.  Raises ConnectionLost.

        Cancellation: a checkpoint per event read; a ``Cancelled`` leaves the connection mid-
        response (close it).
        """
        while self.status is None:
            event = await self.conn.next_event()
            if isinstance(event, h11.Response):
                self.status = event.status_code
                self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
        return self.status

    async def receive(self) -> bytes | None:
        """The next body chunk, ``None`` at the end.  Raises ConnectionLost.

        Cancellation: as :meth:`response`.
        """
        if self.complete:
            await trio.lowlevel.checkpoint()
            return None
        await self.response()
        while True:
            event = await self.conn.next_event()
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                self.complete = True
                return None
