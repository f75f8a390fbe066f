"""The direct body path of HTTP/1.1 streams (``transport.DirectBody``).

Once a response's head and first chunk went out through hypercorn, the
writer frames later chunks itself and writes them to the socket under
hypercorn's send lock.  These tests hold it to hypercorn's own guarantees:
valid chunked framing that leaves the connection reusable, never a write
interleaved with one of hypercorn's, whole chunks or a closed connection
(also when cancelled), a stalled or aborted peer cut and reported as broken.

The unit tests run :class:`DirectBody` over a real connected socket pair.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import h11
import orjson
import pytest
import trio
import trio.testing

from tests.conftest import running_server
from trio_stream import Settings
from trio_stream.http import transport as transport_mod
from trio_stream.http.transport import (
    LINK,
    DirectBody,
    GuardedStream,
    Link,
    TransportGuard,
    direct_body,
)
from trio_stream.upstream import mocktext
from trio_stream.wire import sse

PROMPT = [{"role": "user", "content": "direct body"}]


class Pair:
    """A guarded server side and a raw client side of one socket pair."""

    def __init__(self, stall_timeout: float = 5.0, sndbuf: int | None = None) -> None:
        a, b = trio.socket.socketpair()
        if sndbuf is not None:
            a.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, sndbuf)
            b.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, sndbuf)
        self.guard = TransportGuard(stall_timeout)
        self.server = self.guard.track(GuardedStream(trio.SocketStream(a), self.guard))
        self.client = trio.SocketStream(b)
        self.lock = trio.Lock()
        self.broken_calls = 0
        self.body = DirectBody(Link(self.server, self.lock, self._broken))

    async def _broken(self) -> None:
        self.broken_calls += 1

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.socket.close()
        self.client.socket.close()

    async def read_exactly(self, n: int) -> bytes:
        data = bytearray()
        with trio.fail_after(5):  # a wrong frame must fail, not hang
            while len(data) < n:
                chunk = await self.client.receive_some(n - len(data))
                assert chunk, "the connection closed early"
                data += chunk
        return bytes(data)


async def test_direct_body_only_for_http11_on_a_linked_connection() -> None:
    """The direct path exists only for HTTP/1.1 (chunked) on a connection that
    published a Link: never for HTTP/1.0 (close-delimited), HTTP/2 (hypercorn's
    framing and flow control), or an app served by anything else."""
    a, b = trio.socket.socketpair()
    try:
        link = Link(GuardedStream(trio.SocketStream(a), TransportGuard(1.0)), trio.Lock(), _noop)
        assert direct_body({"http_version": "1.1"}) is None  # no Link in this context
        token = LINK.set(link)
        try:
            assert isinstance(direct_body({"http_version": "1.1"}), DirectBody)
            assert direct_body({"http_version": "1.0"}) is None
            assert direct_body({"http_version": "2"}) is None
        finally:
            LINK.reset(token)
    finally:
        a.close()
        b.close()


async def _noop() -> None:
    pass


async def test_chunk_is_framed_and_empty_chunk_is_never_written(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A chunk goes out as ``<hex size> CRLF data CRLF``; an empty one writes
    nothing (it would be the body's terminator).  "Nothing more" is checked
    once every task is blocked (the virtual clock then fires the deadline)."""
    with Pair() as pair:
        assert await pair.body.send(b"") is True
        assert await pair.body.send(b"data: x\n\n") is True
        assert await pair.read_exactly(14) == b"9\r\ndata: x\n\n\r\n"
        with trio.move_on_after(1):  # nothing more was written
            extra = await pair.client.receive_some(100)
            pytest.fail(f"unexpected bytes {extra!r}")


async def test_busy_lock_falls_back_without_writing() -> None:
    """While hypercorn holds the connection's send lock, the direct path writes
    nothing and says so (False): its bytes can never land inside hypercorn's."""
    with Pair() as pair:
        holding = trio.Event()
        release = trio.Event()

        async def hypercorn_writing() -> None:
            async with pair.lock:
                holding.set()
                await release.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hypercorn_writing)
            await holding.wait()
            assert await pair.body.send(b"abc") is False
            release.set()
        assert await pair.body.send(b"abc") is True
        assert await pair.read_exactly(8) == b"3\r\nabc\r\n"
        assert not pair.lock.locked()


async def test_cancelled_mid_chunk_still_writes_the_whole_chunk() -> None:
    """A chunk larger than the socket buffer is finished in a shielded scope:
    cancelling the writer while it waits never leaves half a chunk on the wire
    (the next bytes would corrupt the framing); the cancellation is delivered
    once the chunk is out, and the send lock is released."""
    with Pair(sndbuf=4096) as pair:
        data = b"x" * 200_000
        frame = b"%x\r\n" % len(data) + data + b"\r\n"
        received: list[bytes] = []
        scope = trio.CancelScope()

        async def cancel_when_blocked_then_read() -> None:
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()  # the writer is blocked mid-chunk now
            received.append(await pair.read_exactly(len(frame)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_blocked_then_read)
            with scope:
                await pair.body.send(data)
                pytest.fail("the cancellation was not delivered")  # pragma: no cover
            await pair.server.aclose()  # the reader sees what was written, then EOF
        assert scope.cancelled_caught
        assert received == [frame]
        assert not pair.lock.locked()
        assert pair.broken_calls == 0


async def test_stalled_peer_is_cut_and_reported(autojump_clock: trio.abc.Clock) -> None:
    """A peer that stops reading is cut at the stall deadline: the socket is
    closed, hypercorn is told the connection broke (once), and later chunks
    are dropped without error, as hypercorn drops sends to a closed stream."""
    with Pair(stall_timeout=3.0, sndbuf=4096) as pair:
        start = trio.current_time()
        assert await pair.body.send(b"y" * 500_000) is True
        assert trio.current_time() - start == pytest.approx(3.0)
        assert pair.broken_calls == 1
        assert pair.server.socket.fileno() == -1
        assert await pair.body.send(b"more") is True
        assert pair.broken_calls == 1
        assert not pair.lock.locked()


async def test_aborting_guard_cuts_the_connection() -> None:
    """At shutdown (``TransportGuard.abort_all``) a direct write fails at once:
    the socket is closed and reported broken, nothing is written."""
    with Pair() as pair:
        pair.guard.abort_all()
        assert await pair.body.send(b"late") is True
        assert pair.broken_calls == 1
        assert pair.server.socket.fileno() == -1
        assert await pair.client.receive_some(100) == b""


async def _request(stream: trio.SocketStream, conn: h11.Connection, body: Any) -> bytes:
    """One streaming request on an open keep-alive connection: the whole body."""
    data = orjson.dumps(body)
    head = h11.Request(
        method="POST", target="/v1/chat/completions",
        headers=[("host", "127.0.0.1"), ("content-type", "application/json"),
                 ("content-length", str(len(data)))],
    )  # fmt: skip
    await stream.send_all(
        conn.send(head) + conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage())
    )
    out = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            with trio.fail_after(10):  # a malformed body must fail, not hang
                conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Response):
            assert event.status_code == 200
            assert (b"transfer-encoding", b"chunked") in event.headers
        elif isinstance(event, h11.Data):
            out += event.data
        elif isinstance(event, h11.EndOfMessage):
            conn.start_next_cycle()
            return bytes(out)
        else:  # pragma: no cover
            pytest.fail(f"unexpected {event!r}")


async def test_streams_on_one_keepalive_connection(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real server, real socket: bodies whose chunks went out on the direct
    path parse as valid chunked HTTP/1.1 (checked by h11 as a client), carry
    every token in order, and hypercorn still ends each response and serves
    the next request on the same connection."""
    direct_chunks = 0
    original = transport_mod.DirectBody.send

    async def counting(self: DirectBody, data: bytes) -> bool:
        nonlocal direct_chunks
        sent = await original(self, data)
        direct_chunks += sent
        return sent

    monkeypatch.setattr(transport_mod.DirectBody, "send", counting)
    settings = dataclasses.replace(settings, mock_delay_ms=2)  # one token per event
    async with running_server(settings) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        conn = h11.Connection(h11.CLIENT)
        for max_tokens in (8, 12):
            body = await _request(
                stream, conn, {"model": "m", "messages": PROMPT, "stream": True,
                               "max_tokens": max_tokens},
            )  # fmt: skip
            events = sse.SSEDecoder().feed(body)
            assert events[-1].data == "[DONE]"
            text = ""
            for event in events[:-1]:
                for choice in orjson.loads(event.data)["choices"]:
                    text += choice["delta"].get("content") or ""
            assert text == mocktext.expected_text(PROMPT, max_tokens)
        await stream.aclose()
    assert direct_chunks >= 10
