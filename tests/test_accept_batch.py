"""``GuardedListener`` takes a burst of waiting connections in one wake-up.

trio's own ``SocketListener.accept`` ends with a schedule point, so the
serving loop took one connection per scheduler batch; under a burst of
connections (bench.py's 1,000 streams, 300 proxied streams) the last one
waited behind a thousand batches of other work before its request was read.
These tests run the listener over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
import trio.testing

from trio_stream.http.transport import ACCEPT_BATCH, GuardedListener, TransportGuard


async def _listener(guard: TransportGuard) -> tuple[GuardedListener, int]:
    (inner,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    assert isinstance(inner, trio.SocketListener)
    listener = GuardedListener(inner, guard)
    return listener, int(listener.socket.getsockname()[1])


@dataclass
class Backlog:
    """A listener with clients waiting in its backlog, and what a test accepted."""

    guard: TransportGuard
    listener: GuardedListener
    clients: list[socket.socket]
    accepted: list[trio.abc.Stream] = field(default_factory=list)


@asynccontextmanager
async def _backlog(count: int) -> AsyncIterator[Backlog]:
    """``count`` clients connected to a new listener; everything closed at the end."""
    guard = TransportGuard(5.0)
    listener, port = await _listener(guard)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    backlog = Backlog(guard, listener, clients)
    try:
        yield backlog
    finally:
        for stream in backlog.accepted:
            await stream.aclose()
        await listener.aclose()
        for client in clients:
            client.close()


def _peer(stream: trio.abc.Stream) -> tuple[str, int]:
    sock = stream.socket  # type: ignore[attr-defined]
    name = sock.getpeername()
    return str(name[0]), int(name[1])


async def test_waiting_connections_come_in_one_step() -> None:
    """Connections already in the backlog are accepted together: after the
    first ``accept`` (a checkpoint, as before), the next ones are returned
    without a checkpoint, each a distinct tracked connection (removing the
    batch makes every ``accept`` a schedule point, and this fails)."""
    async with _backlog(10) as b:
        b.accepted.append(await b.listener.accept())
        with trio.testing.assert_no_checkpoints():
            for _ in range(9):
                b.accepted.append(await b.listener.accept())
        assert {_peer(s) for s in b.accepted} == {c.getsockname() for c in b.clients}
        assert len(b.guard) == 10


async def test_a_batch_is_bounded() -> None:
    """One wake-up takes at most ``ACCEPT_BATCH`` connections: the one after
    them goes through the inner listener again (a checkpoint), so a flood of
    connections cannot keep the serving loop from yielding."""
    async with _backlog(ACCEPT_BATCH + 1) as b:
        b.accepted.append(await b.listener.accept())
        with trio.testing.assert_no_checkpoints():
            for _ in range(ACCEPT_BATCH - 1):
                b.accepted.append(await b.listener.accept())
        task = trio.lowlevel.current_task()
        before = task._schedule_points
        b.accepted.append(await b.listener.accept())
        assert task._schedule_points == before + 1


async def test_close_ends_connections_not_handed_out() -> None:
    """Closing the listener closes the connections it accepted but did not
    hand out yet (the clients see end-of-file), and leaves the one handed
    out open: nothing accepted is leaked."""
    guard = TransportGuard(5.0)
    listener, port = await _listener(guard)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        handed = await listener.accept()
        await listener.aclose()
        peer = _peer(handed)
        for client in clients:
            if client.getsockname() == peer:
                client.setblocking(False)
                try:
                    client.recv(1)
                    raise AssertionError("the connection handed out was closed")
                except BlockingIOError:
                    pass
            else:
                client.settimeout(5)
                assert client.recv(1) == b""
        await handed.aclose()
    finally:
        for client in clients:
            client.close()
