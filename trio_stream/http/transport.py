"""A transport whose writes have a deadline that hypercorn's shield cannot hide.

hypercorn's trio worker writes every byte with::

    with trio.CancelScope(shield=True):
        await self.stream.send_all(data)

so on HTTP/1.1 a client that stops reading blocks the app's ``send()`` for
ever: no cancel scope of the app can reach it, and graceful shutdown hangs on
it (measured with hypercorn 0.18.0 and no guard: behind a client that never
read, a worker with a 3 s graceful timeout took 12.8 s to exit;
``tests/test_stall.py`` checks the guarded path).

The fix is to put a cancel scope *inside* the shield.  :class:`GuardedStream`
wraps each accepted socket; its ``send_all`` runs under its own deadline of
``--stall-timeout``.  When the deadline passes -- or :meth:`TransportGuard.abort_all`
cancels it at shutdown -- the socket is closed and ``BrokenResourceError`` is
raised, which hypercorn already treats as "the client went away": it delivers
``http.disconnect`` to the app, whose watcher cancels the run.

TLS wraps *around* this stream (``SSLListener(GuardedListener(...))``), so the
deadline bounds the raw socket writes of HTTP/1.1 and HTTP/2 alike.
"""

from __future__ import annotations

import os
import socket
import ssl
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Protocol, cast

import trio
from trio._ssl import _State as _SSLState

_SSL_OK = _SSLState.OK
_SSL_BROKEN = _SSLState.BROKEN


class TransportGuard:
    """Tracks live guarded streams so that shutdown can cut their writes."""

    def __init__(self, stall_timeout: float) -> None:
        self.stall_timeout = stall_timeout
        self.aborting = False
        self._streams: weakref.WeakSet[GuardedStream] = weakref.WeakSet()

    def track(self, stream: GuardedStream) -> GuardedStream:
        self._streams.add(stream)
        return stream

    def abort_all(self) -> None:
        """Cut every blocked write now, and make later writes fail at once."""
        self.aborting = True
        for stream in list(self._streams):
            stream.abort()

    def __len__(self) -> int:
        return len(self._streams)


class GuardedStream(trio.abc.HalfCloseableStream):
    """A :class:`trio.SocketStream` with a deadline on every ``send_all``."""

    def __init__(self, inner: trio.SocketStream, guard: TransportGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._send_scope: trio.CancelScope | None = None
        self.socket = inner.socket  # hypercorn reads peer/sock names from it

    @property
    def aborting(self) -> bool:
        return self._guard.aborting

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Write what the kernel takes at once, without waiting or checkpointing:
        the number of bytes written (0 if the socket buffer is full, or the guard
        is aborting: then :meth:`send_all` is the way to fail).

        The socket's file descriptor is looked up on every call, never kept: a
        closed trio socket reports -1 (``ClosedResourceError`` here), so a write
        can never reach a descriptor number reused by another connection.
        """
        if self._guard.aborting:
            return 0
        fd = self.socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the connection is closed")
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:  # EPIPE, ECONNRESET: the peer is gone
            raise trio.BrokenResourceError(f"the peer is gone: {exc!r}") from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send, or close the socket and raise ``BrokenResourceError`` when the
        peer refused data for ``stall_timeout`` (or the guard aborts).

        A write the kernel takes whole at once costs no cancel scope and no
        deadline: only one that has to wait arms the stall deadline.

        Cancellation: a checkpoint (a write the kernel takes at once still makes one, shielded).
        A write that waits is cut by the stall deadline or :meth:`TransportGuard.abort_all` (the
        socket is closed, ``BrokenResourceError``); hypercorn shields the call, so the app's own
        cancel scopes do not reach it.
        """
        view = memoryview(data)
        sent = self.send_nowait(view)
        if sent == len(view):
            await trio.lowlevel.cancel_shielded_checkpoint()  # send_all is a checkpoint
            return
        await self._send_guarded(view[sent:])

    async def _send_guarded(self, data: memoryview) -> None:
        with trio.CancelScope(deadline=trio.current_time() + self._guard.stall_timeout) as scope:
            self._send_scope = scope
            if self._guard.aborting:
                scope.cancel()
            try:
                await self._inner.send_all(data)
            finally:
                self._send_scope = None
        if scope.cancelled_caught:
            await self._inner.aclose()
            raise trio.BrokenResourceError("the peer stopped reading")

    def abort(self) -> None:
        if self._send_scope is not None:
            self._send_scope.cancel()

    async def wait_send_all_might_not_block(self) -> None:
        """The inner stream's.  Cancellation: a checkpoint; cancellable while it waits."""
        await self._inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """The inner stream's.  Cancellation: a checkpoint; a ``Cancelled`` may leave the FIN
        unsent.
        """
        await self._inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """The inner stream's, with no deadline of ours.  Cancellation: a checkpoint; a
        ``Cancelled`` loses no data (nothing was received).
        """
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        """The inner stream's.  Cancellation: closes the socket even when cancelled (trio's
        ``aclose`` contract).
        """
        await self._inner.aclose()


def _tls_encrypt_nowait(stream: trio.SSLStream[Any], data: bytes) -> bytes | None:
    """``data`` as TLS records, ready for the raw socket -- or None (nothing done)
    when only ``trio.SSLStream.send_all`` may write now.

    ``SSLStream.send_all`` encrypts, then sends under the stream's inner send
    lock, with a schedule point even when the socket takes everything.  The
    records must reach the wire in the order the ``SSLObject`` made them, so
    this encrypts only when nobody holds records made earlier: the stream is
    usable, its handshake done, its delayed TLS 1.3 session tickets already
    sent (trio sends them before the first write), its inner send lock free
    and its outgoing buffer empty.  (Reads the private state of trio 0.35's
    ``SSLStream``; ``tests/test_h2_direct.py`` pins it.)
    """
    if (
        stream._state is not _SSL_OK
        or not stream._handshook.done
        or stream._delayed_outgoing is not None
        or stream._inner_send_lock.locked()
        or stream._outgoing.pending
    ):
        return None
    try:
        stream._ssl_object.write(data)
    except ssl.SSLWantReadError:
        return None  # a renegotiation: send_all's loop sorts it out (no record was made)
    except (ssl.SSLError, ssl.CertificateError) as exc:
        stream._state = _SSL_BROKEN
        raise trio.BrokenResourceError from exc
    return stream._outgoing.read()


async def send_whole(stream: GuardedStream | trio.SSLStream[Any], data: bytes) -> None:
    """Write ``data`` whole to a guarded socket or the TLS stream around one.

    The caller holds hypercorn's send lock.  Cancellation: not a checkpoint when the kernel
    takes it at once; otherwise the rest is written in a shielded scope (bounded by the
    guarded socket's stall deadline, which closes the socket when it passes), then a
    checkpoint.  Raises ``BrokenResourceError`` / ``ClosedResourceError`` as ``send_all``.
    """
    if isinstance(stream, GuardedStream):
        sent = stream.send_nowait(data)
        if sent == len(data):
            return
        with trio.CancelScope(shield=True):  # whole frames only
            await stream.send_all(memoryview(data)[sent:])
        await trio.lowlevel.checkpoint_if_cancelled()  # it waited: a checkpoint
        return
    raw = _tls_encrypt_nowait(stream, data)
    if raw is None:
        with trio.CancelScope(shield=True):
            await stream.send_all(data)
        await trio.lowlevel.checkpoint_if_cancelled()
        return
    inner = stream.transport_stream
    assert isinstance(inner, GuardedStream)  # SSLListener(GuardedListener(...))
    sent = inner.send_nowait(raw)
    if sent == len(raw):
        return
    # As SSLStream._retry: the rest under its inner send lock (free: checked
    # above, and nothing yielded since), so that a TLS record made by a
    # concurrent receive goes out after these.
    with trio.CancelScope(shield=True):
        async with stream._inner_send_lock:
            try:
                await inner.send_all(memoryview(raw)[sent:])
            except BaseException:
                stream._state = _SSL_BROKEN  # some of a record went out: the stream is doomed
                raise
    await trio.lowlevel.checkpoint_if_cancelled()


#: Connections :meth:`GuardedListener.accept` takes from the kernel's backlog
#: per wake-up of the accepting task (the first one included).
ACCEPT_BATCH = 64


class GuardedListener(trio.abc.Listener[GuardedStream]):
    """The accepted sockets as :class:`GuardedStream`\\ s, tracked by the guard,
    taken from the kernel's backlog in batches.

    ``trio.SocketListener.accept`` returns one connection per wake-up of the
    accepting task (trio's ``accept`` ends with a schedule point), so under a
    burst of new connections ``trio.serve_listeners`` took one per scheduler
    batch -- a batch that also runs every other ready task: at 1,000 streams
    the last of a burst waited about a thousand batches before its request
    was even read (docs/design.md section 15).  Here, once a connection came
    through the inner listener, up to ``ACCEPT_BATCH - 1`` more that are
    already waiting are accepted at once, without blocking, and handed out
    by the next calls without a checkpoint; the serving loop then starts
    them all in the same step.  With ``--workers`` every worker does this on
    the shared socket; a busy worker is woken later than an idle one, so the
    idle one takes more of a burst.
    """

    def __init__(self, inner: trio.SocketListener, guard: TransportGuard) -> None:
        self._inner = inner
        self._guard = guard
        self.socket = inner.socket
        # The listening socket again (a duplicate descriptor of the same
        # non-blocking socket), for the accepts that must not wait.
        self._raw: socket.socket | None = socket.fromfd(
            inner.socket.fileno(), inner.socket.family, inner.socket.type
        )
        self._raw.setblocking(False)
        self._ready: deque[GuardedStream] = deque()

    async def accept(self) -> GuardedStream:
        """Accept one connection, wrapped and tracked.  Cancellation: a checkpoint, except when
        a connection accepted by an earlier call is waiting (then it is returned at once); a
        ``Cancelled`` accepts nothing.
        """
        if self._ready:
            return self._ready.popleft()
        stream = self._guard.track(GuardedStream(await self._inner.accept(), self._guard))
        raw = self._raw
        while raw is not None and len(self._ready) < ACCEPT_BATCH - 1:
            try:
                sock, _ = raw.accept()
            except OSError:  # EAGAIN: none left; any other error: the next accept() meets it
                break
            trio_sock = trio.socket.from_stdlib_socket(sock)
            self._ready.append(
                self._guard.track(GuardedStream(trio.SocketStream(trio_sock), self._guard))
            )
        return stream

    async def aclose(self) -> None:
        """The inner listener's, and the connections accepted but not handed out yet.
        Cancellation: closes them all even when cancelled.
        """
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        try:
            while self._ready:
                trio_sock = self._ready.popleft().socket
                trio_sock.close()
        finally:
            await self._inner.aclose()


class Link:
    """What a response needs to write its body itself: the connection's stream
    (the guarded socket, or the ``trio.SSLStream`` around it), hypercorn's
    send lock, and how to tell hypercorn that the connection broke.  Set by
    ``server.serve.Connection`` for each connection, in :data:`LINK`, which
    every request task of the connection inherits (hypercorn spawns them from
    the connection's task, and trio copies the spawner's context)."""

    __slots__ = ("broken", "lock", "stream")

    def __init__(
        self,
        stream: GuardedStream | trio.SSLStream[Any],
        lock: trio.Lock,
        broken: Callable[[], Awaitable[None]],
    ) -> None:
        self.stream = stream
        self.lock = lock
        self.broken = broken


LINK: ContextVar[Link] = ContextVar("trio_stream_link")


class BodyWriter(Protocol):
    """Writes the chunks of one response body after its first straight to the
    connection, or declines one chunk (False: nothing written; the caller
    sends it through ASGI).  :class:`DirectBody` (HTTP/1.1) and
    ``server.h2direct.DirectData`` (HTTP/2)."""

    #: May the body's first chunk go this way too, once the head was sent
    #: through ASGI?  (HTTP/1.1: no, hypercorn holds the head until the first
    #: chunk; HTTP/2: yes, hypercorn writes the HEADERS frame at once.)
    eager: bool

    async def send(self, data: bytes) -> bool:
        """Write ``data`` as the body's next chunk, or decline it (False: nothing written).

        Cancellation: not a checkpoint when the chunk goes out (or is taken) at once; a write
        that has to wait is finished whole, shielded, and a ``Cancelled`` comes right after.
        """
        ...

    async def end(self, data: bytes) -> bool:
        """Write ``data`` (may be empty) as the body's last chunk *and* the body's end, or
        decline (False: nothing written; the caller sends both through ASGI).  After True the
        caller still sends an empty last ``http.response.body`` through ASGI, so that the
        server learns the response is over; it writes nothing more.

        Cancellation: as :meth:`send`.
        """
        ...


#: The HTTP/2 request stream's :class:`BodyWriter`, set by the server for the
#: request task it spawns (``server.connection.LightTaskGroup.spawn_app``).
DIRECT: ContextVar[BodyWriter] = ContextVar("trio_stream_direct")


def direct_body(scope: Any) -> BodyWriter | None:
    """The direct body writer for this request, if it can have one: HTTP/1.1
    (chunked: the response to an HTTP/1.0 request is close-delimited) on a
    plain connection served by ``server.serve.Connection``, or an HTTP/2
    stream the server gave one (:data:`DIRECT`)."""
    version = scope.get("http_version")
    if version == "2":
        return DIRECT.get(None)
    if version != "1.1":
        return None
    link = LINK.get(None)
    if link is None or not isinstance(link.stream, GuardedStream):
        return None  # TLS: hypercorn's path (HTTP/1.1 over TLS is not direct)
    return DirectBody(link)


class DirectBody:
    """Writes the chunks of one HTTP/1.1 chunked response body straight to the socket.

    hypercorn sends a body chunk through its ASGI message, the response's
    state machine, an h11 ``Data`` event, the connection's send lock (a
    schedule point) and a shielded ``send_all`` (another one) -- about a
    third of a streamed token's CPU (docs/design.md section 15).  Once the
    response head is out (the caller sends the head and its first chunk
    through ASGI), the rest of a chunked body is only bytes: ``<size hex>
    CRLF <data> CRLF`` per chunk.  :meth:`send` frames the chunk and writes
    it under hypercorn's own send lock, taken without waiting, so it never
    interleaves with a write of hypercorn's.  The end of the body (the
    terminator, and keep-alive) stays with hypercorn: the caller sends the
    last chunk through ASGI, and h11 -- which keeps no count of chunked
    bytes -- writes ``0 CRLF CRLF`` as usual.

    Same guarantees as hypercorn's path: a chunk goes out whole or the
    connection is closed (a write that has to wait finishes in a shielded
    scope, bounded by the guarded stream's stall deadline, which closes the
    socket when it passes); a broken connection is reported to hypercorn,
    which delivers ``http.disconnect`` to the app.  A chunk the kernel takes
    at once costs no checkpoint and no cancel scope.
    """

    __slots__ = ("_broken", "_link")

    eager = False  # hypercorn writes the head with the first chunk

    def __init__(self, link: Link) -> None:
        self._link = link
        self._broken = False

    async def end(self, data: bytes) -> bool:
        """Always False: the end of the body (h11's terminator, keep-alive) is hypercorn's.

        Cancellation: not a checkpoint.
        """
        return False

    async def send(self, data: bytes) -> bool:
        """Write ``data`` as one chunk.  False if hypercorn is writing on this
        connection right now: then nothing was written, and the caller sends
        the chunk through ASGI (which waits for the lock).

        Cancellation: a chunk the kernel takes at once costs no checkpoint; one that has to wait
        is written whole in a shielded scope bounded by the stall deadline, and a ``Cancelled``
        is delivered right after it (so a chunk is never half written).
        """
        if not data:
            return True  # an empty chunk would be the body's terminator
        link = self._link
        try:
            link.lock.acquire_nowait()
        except trio.WouldBlock:
            return False
        try:
            if self._broken:
                return True  # the client is gone; hypercorn drops sends the same way
            frame = b"%x\r\n%b\r\n" % (len(data), data)
            stream = cast(GuardedStream, link.stream)  # direct_body's choice: plain TCP
            try:
                sent = stream.send_nowait(frame)
                if sent < len(frame):
                    with trio.CancelScope(shield=True):  # whole chunks only
                        await stream.send_all(memoryview(frame)[sent:])
                    await trio.lowlevel.checkpoint_if_cancelled()  # it waited: a checkpoint
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._broken = True
                await link.broken()
        finally:
            link.lock.release()
        return True
