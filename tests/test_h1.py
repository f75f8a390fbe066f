"""The upstream's own HTTP/1.1 client (trio_stream/upstream/h1.py) against real servers.

Two kinds of server on 127.0.0.1: :class:`~tools.fakes.FakeUpstream` (OpenAI
SSE, chunked, notices a client close at once) and :class:`RawServer` below,
whose answers are raw bytes written by each test, so that it can send
``Content-Length`` or read-to-EOF bodies, close a kept-alive connection when
the next request arrives, or cut a body short.  Events are ordered with trio
primitives (the servers' events and the pool's own awaits), never sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import h11
import pytest
import trio

from tests.protocols import client_context, server_context
from tools.fakes import FakeUpstream, Plan, Step, openai_chunk, token_plan
from trio_stream.errors import UpstreamError, UpstreamReported
from trio_stream.upstream.h1 import MAX_IDLE, Pool, Response
from trio_stream.upstream.wire import ERROR_BODY_LIMIT, ERROR_SNIPPET
from trio_stream.wire.sse import SSEDataDecoder

BODY = b'{"model":"m","messages":[],"stream":true}'
SSE_BODY = (
    openai_chunk("Hel") + openai_chunk("lo") + openai_chunk(finish="stop") + b"data: [DONE]\n\n"
)


@dataclass
class Seen:
    """One request as the server parsed it."""

    conn: int
    target: bytes
    headers: dict[bytes, bytes]
    body: bytes


Answer = Callable[[trio.abc.Stream, int, int], Awaitable[bool]]


@dataclass
class RawServer:
    """An HTTP/1.1 server whose answers are raw bytes.

    ``answer(stream, conn_index, request_index_on_conn)`` writes the response
    and returns whether the connection stays open for another request.
    Requests are parsed with h11; ``closed[i]`` is set when connection ``i``
    ended (the client closed it, or the answer did).
    """

    answer: Answer
    seen: list[Seen] = field(default_factory=list)
    closed: list[trio.Event] = field(default_factory=list)
    first_close: trio.Event = field(default_factory=trio.Event)
    port: int = 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        index = len(self.closed)
        self.closed.append(trio.Event())
        data = b""
        try:
            for n in range(1_000):
                h = h11.Connection(h11.SERVER)
                if data:  # what came after the last request (b"" would mean EOF)
                    h.receive_data(data)
                request, body = None, b""
                while True:
                    event = h.next_event()
                    if event is h11.NEED_DATA:
                        h.receive_data(bytes(await stream.receive_some(65536)))
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:  # ConnectionClosed: the client went away
                        return
                assert request is not None
                data = bytes(h.trailing_data[0])
                self.seen.append(Seen(index, request.target, dict(request.headers), body))
                if not await self.answer(stream, index, n):
                    return
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            self.closed[index].set()
            self.first_close.set()


@asynccontextmanager
async def raw_server(answer: Answer) -> AsyncIterator[RawServer]:
    server = RawServer(answer)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


def sse_chunked(body: bytes = SSE_BODY) -> bytes:
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    return head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def sse_sized(body: bytes = SSE_BODY) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
    return head % len(body) + body


async def always(stream: trio.abc.Stream, conn: int, n: int) -> bool:
    await stream.send_all(sse_chunked())
    return True


def pool_for(
    port: int, *, headers: list[tuple[str, str]] | None = None, max_idle: int = MAX_IDLE
) -> Pool:
    url = f"http://127.0.0.1:{port}/v1"
    return Pool(url, connect_timeout=5, headers=headers, max_idle=max_idle)


async def read_body(response: Response) -> bytes:
    body = b""
    while data := await response.read():
        body += data
    return body


async def post_all(pool: Pool, body: bytes = BODY) -> bytes:
    async with pool.post("/chat/completions", body) as response:
        assert response.status == 200
        return await read_body(response)


def sse_data(body: bytes) -> list[bytes | bytearray]:
    return SSEDataDecoder().feed(body)


# -- the request ----------------------------------------------------------------


async def test_request_line_headers_and_body() -> None:
    """The POST goes to the base URL's path plus the endpoint, with Host,
    Authorization, Content-Type application/json, Content-Length and exactly
    the body given."""
    async with raw_server(always) as server:
        pool = pool_for(server.port, headers=[("authorization", "Bearer k-1")])
        await post_all(pool)
        await pool.aclose()
    (seen,) = server.seen
    assert seen.target == b"/v1/chat/completions"
    assert seen.headers[b"host"] == f"127.0.0.1:{server.port}".encode()
    assert seen.headers[b"authorization"] == b"Bearer k-1"
    assert seen.headers[b"content-type"] == b"application/json"
    assert seen.headers[b"content-length"] == str(len(BODY)).encode()
    assert seen.body == BODY


# -- bodies -----------------------------------------------------------------------


@pytest.mark.parametrize("framing", [sse_chunked, sse_sized], ids=["chunked", "content-length"])
async def test_chunked_and_sized_bodies_read_whole_and_pool(
    framing: Callable[[bytes], bytes],
) -> None:
    """A chunked and a Content-Length body both come out byte for byte, and
    either leaves its connection reusable: two requests, one connection."""

    async def answer(stream: trio.abc.Stream, conn: int, n: int) -> bool:
        await stream.send_all(framing(SSE_BODY))
        return True

    async with raw_server(answer) as server:
        pool = pool_for(server.port)
        assert await post_all(pool) == SSE_BODY
        assert pool.idle == 1
        assert await post_all(pool) == SSE_BODY
        await pool.aclose()
    assert [s.conn for s in server.seen] == [0, 0]


async def test_body_to_eof_is_read_and_the_connection_not_pooled() -> None:
    """A body without framing (neither chunked nor Content-Length) ends at
    EOF: it is read whole, and the connection is not pooled."""

    async def answer(stream: trio.abc.Stream, conn: int, n: int) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
        await stream.send_all(SSE_BODY)
        return False

    async with raw_server(answer) as server:
        pool = pool_for(server.port)
        assert await post_all(pool) == SSE_BODY
        assert pool.idle == 0
        await pool.aclose()


async def test_connection_close_response_is_not_pooled() -> None:
    """A response that asks to close its connection (``Connection: close``),
    even with a complete Content-Length body, is read whole and its
    connection is not pooled: the next request opens a new one."""

    async def answer(stream: trio.abc.Stream, conn: int, n: int) -> bool:
        head = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
        await stream.send_all(head % len(SSE_BODY) + SSE_BODY)
        return False

    async with raw_server(answer) as server:
        pool = pool_for(server.port)
        assert await post_all(pool) == SSE_BODY
        assert pool.idle == 0
        assert await post_all(pool) == SSE_BODY
        await pool.aclose()
    assert [s.conn for s in server.seen] == [0, 1]


async def test_informational_response_before_the_answer_is_skipped() -> None:
    """A ``100 Continue`` before the real response is not the response: the
    status, headers and body are the 200's, and the connection stays reusable."""

    async def answer(stream: trio.abc.Stream, conn: int, n: int) -> bool:
        await stream.send_all(b"HTTP/1.1 100 Continue\r\nx-early: 1\r\n\r\n" + sse_chunked())
        return True

    async with raw_server(answer) as server:
        pool = pool_for(server.port)
        async with pool.post("/chat/completions", BODY) as response:
            assert response.status == 200
            assert (b"x-early", b"1") not in response.headers
            assert (b"transfer-encoding", b"chunked") in response.headers
            assert await read_body(response) == SSE_BODY
        assert pool.idle == 1
        await pool.aclose()


async def test_body_comes_as_delivered_and_events_are_reassembled() -> None:
    """``read()`` returns the body as the socket delivered it (here several
    events in one read, then an event cut in two chunks): nothing is lost or
    duplicated and the SSE decoder gets every event whole."""
    split = trio.Event()

    async def answer(stream: trio.abc.Stream, conn: int, n: int) -> bool:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (len(SSE_BODY), SSE_BODY)
        )
        await split.wait()
        part = openai_chunk("late")
        await stream.send_all(b"%x\r\n%s\r\n" % (5, part[:5]))
        await stream.send_all(b"%x\r\n%s\r\n0\r\n\r\n" % (len(part) - 5, part[5:]))
        return True

    async with raw_server(answer) as server:
        pool = pool_for(server.port)
        async with pool.post("/chat/completions", BODY) as response:
            first = await response.read()
            assert sse_data(first)[-1] == b"[DONE]"
            split.set()
            rest = await read_body(response)
        assert sse_data(rest) == sse_data(openai_chunk("late"))
        await pool.aclose()


# -- the pool -----------------------------------------------------------------------


async def test_pooled_connection_is_reused_across_requests(nursery: trio.Nursery) -> None:
    """Responses read to their end return their connection: three requests
    in a row make one upstream connection, which stays open and idle."""
    fake = FakeUpstream("openai", lambda _: token_plan(["a", "b"]))
    await nursery.start(fake.serve)
    pool = pool_for(fake.port)
    for _ in range(3):
        async with pool.post("/chat/completions", BODY) as response:
            assert sse_data(await read_body(response))[-1] == b"[DONE]"
        assert response.conn.looks_alive()
    assert len(fake.connections) == 1
    assert len(fake.requests) == 3
    assert pool.idle == 1
    await pool.aclose()
    await fake.wait_for(lambda: fake.open_connections == 0)


async def test_dead_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    """A pooled connection that the upstream closes when the next request
    arrives (EOF before any response byte) is not an error: the request is
    sent again on a new connection, and answered there."""

    async def answer(stream: trio.abc.Stream, conn: int, n: int) -> bool:
        if conn == 0 and n == 1:
            return False  # closes without a byte of response
        await stream.send_all(sse_chunked())
        return True

    async with raw_server(answer) as server:
        pool = pool_for(server.port)
        assert await post_all(pool) == SSE_BODY
        assert pool.idle == 1
        assert await post_all(pool) == SSE_BODY
        await pool.aclose()
    assert [s.conn for s in server.seen] == [0, 0, 1]
    assert [s.body for s in server.seen] == [BODY] * 3


async def test_fresh_connection_is_not_retried() -> None:
    """A new connection closed before any response byte is an upstream
    error, not a retry: the request was sent once."""

    async def answer(stream: trio.abc.Stream, conn: int, n: int) -> bool:
        return False

    async with raw_server(answer) as server:
        pool = pool_for(server.port)
        with pytest.raises(UpstreamError) as info:
            await post_all(pool)
        await pool.aclose()
    assert "failed" in info.value.message
    assert info.value.status == 502
    assert len(server.seen) == 1


async def test_idle_connection_closed_by_the_upstream_is_not_reused() -> None:
    """An idle connection that the upstream closed meanwhile is dropped at
    checkout: the next request goes out on a new connection, without error."""

    async def answer(stream: trio.abc.Stream, conn: int, n: int) -> bool:
        await stream.send_all(sse_sized())
        return False  # then closes, without saying so in the response

    async with raw_server(answer) as server:
        pool = pool_for(server.port)
        async with pool.post("/chat/completions", BODY) as response:
            assert await read_body(response) == SSE_BODY
        assert pool.idle == 1
        await server.closed[0].wait()
        assert not response.conn.looks_alive()
        assert await post_all(pool) == SSE_BODY
        await pool.aclose()
    assert [s.conn for s in server.seen] == [0, 1]


async def test_idle_connections_are_bounded() -> None:
    """At most ``max_idle`` connections stay pooled; the ones beyond are closed
    when their response ends."""
    both_sent = trio.Event()
    sent = 0

    async def answer(stream: trio.abc.Stream, conn: int, n: int) -> bool:
        nonlocal sent
        sent += 1
        if sent == 2:
            both_sent.set()
        await both_sent.wait()  # two requests are in flight at once
        await stream.send_all(sse_chunked())
        return True

    async with raw_server(answer) as server:
        pool = pool_for(server.port, max_idle=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(post_all, pool)
            nursery.start_soon(post_all, pool)
        assert pool.idle == 1
        await server.first_close.wait()
        assert sum(e.is_set() for e in server.closed) == 1
        await pool.aclose()
        await server.closed[0].wait()
        await server.closed[1].wait()


async def test_aclose_closes_idle_connections(nursery: trio.Nursery) -> None:
    """Closing the pool closes its idle connections (the upstream sees it)."""
    fake = FakeUpstream("openai", lambda _: token_plan(["a"]))
    await nursery.start(fake.serve)
    pool = pool_for(fake.port)
    await post_all(pool)
    assert fake.open_connections == 1
    await pool.aclose()
    await fake.wait_for(lambda: fake.open_connections == 0)


# -- cancellation and errors --------------------------------------------------------


async def test_cancelled_mid_stream_closes_the_connection(nursery: trio.Nursery) -> None:
    """Cancelled while waiting for the next token, the response's connection
    is closed before the block exits -- the upstream sees the disconnect --
    and nothing goes back to the pool."""
    fake = FakeUpstream("openai", lambda _: token_plan(["a", "b", "c"], hang_after=1))
    await nursery.start(fake.serve)
    pool = pool_for(fake.port)
    with trio.CancelScope() as scope:
        async with pool.post("/chat/completions", BODY) as response:
            assert sse_data(await response.read())  # the first token
            scope.cancel()
            await response.read()  # would hang: the upstream sends nothing more
    assert scope.cancelled_caught
    assert pool.idle == 0
    await fake.wait_for(lambda: fake.open_connections == 0)
    assert fake.exchanges[0].ended is not None
    await pool.aclose()


async def test_body_left_unread_closes_the_connection(nursery: trio.Nursery) -> None:
    """A block left before the body's end (no exception) closes the
    connection instead of pooling it."""
    fake = FakeUpstream("openai", lambda _: token_plan(["a", "b"], hang_after=1))
    await nursery.start(fake.serve)
    pool = pool_for(fake.port)
    async with pool.post("/chat/completions", BODY) as response:
        await response.read()
    assert pool.idle == 0
    await fake.wait_for(lambda: fake.open_connections == 0)


@pytest.mark.parametrize("status", [500, 503])
async def test_http_5xx_is_an_upstream_error(nursery: trio.Nursery, status: int) -> None:
    """An HTTP 5xx answer is trio-stream's UpstreamError (502) with code
    ``upstream_http_NNN`` quoting the upstream's error message, and its
    connection is closed."""
    fake = FakeUpstream("openai", lambda _: Plan(status=status, steps=[Step(b'{"error":"no"}')]))
    await nursery.start(fake.serve)
    pool = pool_for(fake.port)
    with pytest.raises(UpstreamError) as info:
        await post_all(pool)
    err = info.value
    assert not isinstance(err, UpstreamReported)
    assert (err.status, err.code) == (502, f"upstream_http_{status}")
    assert err.message == f"The upstream answered HTTP {status}: no"
    await fake.wait_for(lambda: fake.open_connections == 0)
    assert pool.idle == 0


@pytest.mark.parametrize("status", [400, 404, 429])
async def test_http_4xx_keeps_its_status_and_error(nursery: trio.Nursery, status: int) -> None:
    """An HTTP 4xx answer with an error object is UpstreamReported: the
    upstream's status and error object (issue 20 item 5); the connection is
    closed."""
    fake = FakeUpstream("openai", lambda _: Plan(status=status, steps=[Step(b'{"error":"no"}')]))
    await nursery.start(fake.serve)
    pool = pool_for(fake.port)
    with pytest.raises(UpstreamReported) as info:
        await post_all(pool)
    err = info.value
    assert (err.status, err.upstream_status) == (status, status)
    assert err.error == {
        "message": "no",
        "type": None,
        "param": None,
        "code": None,
        "source": "upstream",
    }
    await fake.wait_for(lambda: fake.open_connections == 0)
    assert pool.idle == 0


async def test_http_error_reads_only_the_start_of_a_long_body() -> None:
    """An error body is read up to ERROR_BODY_LIMIT bytes and quoted up to
    ERROR_SNIPPET bytes; the rest is not waited for (the upstream never sends
    it) and the connection is closed."""

    async def answer(stream: trio.abc.Stream, conn: int, n: int) -> bool:
        head = b"HTTP/1.1 500 Oops\r\ncontent-length: 200000\r\n\r\n"
        await stream.send_all(head + b"x" * (ERROR_BODY_LIMIT + 10))
        while await stream.receive_some(65536):  # the rest never comes: the client closes
            pass
        return False

    async with raw_server(answer) as server:
        pool = pool_for(server.port)
        with pytest.raises(UpstreamError) as info:
            await post_all(pool)
        await server.closed[0].wait()
    assert info.value.message == "The upstream answered HTTP 500: " + "x" * ERROR_SNIPPET


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_premature_eof_mid_body_is_an_upstream_error(framing: str) -> None:
    """The upstream closing inside a chunked or Content-Length body is an
    UpstreamError after the data that did arrive, not a normal end."""
    first = openai_chunk("Hel")

    async def answer(stream: trio.abc.Stream, conn: int, n: int) -> bool:
        if framing == "chunked":
            head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            await stream.send_all(head + b"%x\r\n%s\r\n" % (len(first), first))
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + first)
        return False

    async with raw_server(answer) as server:
        pool = pool_for(server.port)
        async with pool.post("/chat/completions", BODY) as response:
            assert await response.read() == first
            with pytest.raises(UpstreamError) as info:
                await response.read()
        assert pool.idle == 0
        await server.closed[0].wait()
    assert info.value.status == 502
    assert "peer closed connection" in info.value.message


async def test_refused_connection_is_an_upstream_error() -> None:
    """Nothing listening: an UpstreamError (502) saying the request failed."""
    sock = trio.socket.socket()
    with sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = pool_for(port)
    with pytest.raises(UpstreamError) as info:
        await post_all(pool)
    assert info.value.status == 502
    assert "The upstream request failed" in info.value.message


async def test_request_write_past_connect_timeout_is_a_timeout() -> None:
    """Writing the request is bounded by the connect timeout: an upstream
    that accepts but never reads is a timeout UpstreamError (504), and the
    connection is closed."""

    async def mute(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, mute, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        pool = Pool(f"http://127.0.0.1:{port}", connect_timeout=0.2)
        with pytest.raises(UpstreamError) as info:
            await post_all(pool, b"x" * (64 << 20))
        nursery.cancel_scope.cancel()
    assert info.value.status == 504
    assert "timed out" in info.value.message


# -- TLS ----------------------------------------------------------------------------


async def test_https_upstream_with_reuse() -> None:
    """An https URL speaks TLS (certificate checked for the host) and pools
    its connections like plain HTTP."""
    server_ctx, client_ctx = server_context(), client_context("http/1.1")
    server = RawServer(always)
    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_ssl_over_tcp, server.handle, 0, server_ctx, host="127.0.0.1")
        listeners = await nursery.start(serve)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        pool = Pool(f"https://127.0.0.1:{port}/v1", connect_timeout=5, ssl_context=client_ctx)
        assert await post_all(pool) == SSE_BODY
        assert await post_all(pool) == SSE_BODY
        await pool.aclose()
        await server.closed[0].wait()
        nursery.cancel_scope.cancel()
    assert [s.conn for s in server.seen] == [0, 0]
    assert server.seen[0].headers[b"host"] == f"127.0.0.1:{port}".encode()
