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

import weakref

import trio


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

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send, or close the socket and raise ``BrokenResourceError`` when the
        peer refused data for ``stall_timeout`` (or the guard aborts)."""
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
        await self._inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


class GuardedListener(trio.abc.Listener[GuardedStream]):
    def __init__(self, inner: trio.SocketListener, guard: TransportGuard) -> None:
        self._inner = inner
        self._guard = guard
        self.socket = inner.socket

    async def accept(self) -> GuardedStream:
        return self._guard.track(GuardedStream(await self._inner.accept(), self._guard))

    async def aclose(self) -> None:
        await self._inner.aclose()
