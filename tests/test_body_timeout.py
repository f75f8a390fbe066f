"""Slow clients at the edge: ``--body-timeout``, and the request head's bound.

A client that sends a complete request head and then dribbles its body, or
never finishes it, would hold a connection and two tasks for ever: hypercorn
has no deadline on a request body (measured before the fix: 50 such
connections all still open after 75 s).  With ``--body-timeout`` the whole
body must arrive within that many seconds of the request's start; otherwise
the answer is 408 with the OpenAI error body (code ``body_timeout``) and, on
HTTP/1.x, ``Connection: close``, after which the connection is closed.
A client that stops *inside the head* is closed by hypercorn's idle timer,
``keep_alive_timeout`` (5 s, set in ``server.hypercorn_config``).

The timing tests run in memory with ``autojump_clock`` (exact virtual times);
the load tests use real sockets against a real in-process server.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import orjson
import pytest
import trio
import trio.testing
from quart import request

from tests.conftest import RawClient, memory_app, running_server, tasks_living
from tests.memasgi import MemoryClient
from trio_stream import Settings, TrioStreamApp
from trio_stream.errors import ApiError
from trio_stream.http.common import read_request
from trio_stream.load.h2 import H2Connection, H2Stream, open_h2_connection
from trio_stream.server.serve import hypercorn_config
from trio_stream.wire.sse import SSEDecoder

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "slow body"}]
#: docs/api.md section 3.9: an idle (or half-headed) connection closes after 5 s.
HEADER_BOUND = 5.0
SLOW_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"


def chat_body(stream: bool = False, max_tokens: int = 5) -> bytes:
    return orjson.dumps({"messages": MESSAGES, "stream": stream, "max_tokens": max_tokens})


def assert_body_timeout(body: bytes | bytearray) -> None:
    """``body`` is the OpenAI error body of a 408 for a late request body."""
    error = orjson.loads(bytes(body))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "body_timeout")
    assert "did not arrive within" in error["message"]


# -- read_request: one deadline for the whole body ---------------------------------


class Body:
    """The ``receive`` side of a request whose body the test sends piece by piece."""

    def __init__(self) -> None:
        self._send, self.receive_channel = trio.open_memory_channel[dict[str, Any]](math.inf)
        self.sent = 0

    async def receive(self) -> dict[str, Any]:
        return await self.receive_channel.receive()

    def chunk(self, data: bytes, more: bool = True) -> None:
        self.sent += len(data)
        self._send.send_nowait({"type": "http.request", "body": data, "more_body": more})

    async def dribble(self, every: float) -> None:
        """One byte every ``every`` seconds, for ever."""
        while True:
            await trio.sleep(every)
            self.chunk(b" ")


def scope(http_version: str = "1.1", method: str = "POST", path: str = CHAT) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": http_version,
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8000), "extensions": {},
        "headers": [(b"host", b"x"), (b"content-type", b"application/json")],
    }  # fmt: skip


async def test_body_that_never_ends_gets_408_at_exactly_body_timeout(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """A body whose first chunk came at once and whose end never comes is
    refused with the 408 body_timeout error exactly ``--body-timeout``
    seconds after the read began; the error says to close the connection."""
    body = Body()
    body.chunk(b'{"messages"')
    start = trio.current_time()
    with pytest.raises(ApiError) as caught:
        await read_request(settings, scope(), body.receive)
    assert trio.current_time() - start == settings.body_timeout == 30.0
    error = caught.value
    assert (error.status, error.code, error.closes) == (408, "body_timeout", True)
    assert_body_timeout(error.body())


async def test_body_that_ends_in_time_is_read_whole(
    settings: Settings, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A body sent in three pieces, the last just before the deadline, is read
    whole and unchanged: the deadline costs a client in time nothing."""
    body = Body()
    data = chat_body()
    start = trio.current_time()

    async def send_slowly() -> None:
        body.chunk(data[:10])
        await trio.sleep(10)
        body.chunk(data[10:20])
        await trio.sleep(settings.body_timeout - 10 - 0.001)
        body.chunk(data[20:], more=False)

    nursery.start_soon(send_slowly)
    assert await read_request(settings, scope(), body.receive) == data
    assert trio.current_time() - start == pytest.approx(settings.body_timeout - 0.001)


async def test_dribbler_is_cut_by_the_whole_body_deadline(
    settings: Settings, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A client that sends one byte every second for ever never lets a
    per-chunk timer fire; the deadline is for the whole body, so it is cut
    at exactly ``--body-timeout`` all the same."""
    body = Body()
    nursery.start_soon(body.dribble, 1.0)
    start = trio.current_time()
    with pytest.raises(ApiError) as caught:
        await read_request(settings, scope(), body.receive)
    assert trio.current_time() - start == settings.body_timeout
    assert caught.value.status == 408
    assert body.sent >= settings.body_timeout - 1  # it kept sending up to the end
    nursery.cancel_scope.cancel()


# -- through the app, in memory ------------------------------------------------------


@dataclass
class SlowRequest:
    """One request to the app in memory whose body arrives when the test says."""

    client: MemoryClient
    body: Body = field(default_factory=Body)
    started: float = 0.0


def start_slow(
    nursery: trio.Nursery, app: TrioStreamApp, *, http_version: str = "1.1",
    method: str = "POST", path: str = CHAT,
) -> SlowRequest:  # fmt: skip
    """Start a request with no body yet; its body is sent with ``.body.chunk()``."""
    slow = SlowRequest(MemoryClient(), started=trio.current_time())
    slow.client._to_app = slow.body._send
    request_scope = scope(http_version, method, path)

    async def run() -> None:
        try:
            await app(request_scope, slow.body.receive, slow.client._send)
        finally:
            slow.client.finished.set()
            slow.client._notify()

    nursery.start_soon(run)
    return slow


@pytest.mark.parametrize("http_version", ["1.0", "1.1", "2"])
async def test_chat_completion_with_a_late_body_gets_408(
    http_version: str, settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """``POST /v1/chat/completions`` whose body never ends: 408 with the OpenAI
    body, at exactly ``--body-timeout``, with ``Connection: close`` on
    HTTP/1.x (so hypercorn closes the connection) and without it on HTTP/2
    (the header is forbidden there; the answer ends the stream).  No run is
    started."""
    async with memory_app(settings) as (service, app), trio.open_nursery() as nursery:
        slow = start_slow(nursery, app, http_version=http_version)
        slow.body.chunk(b"{")
        await slow.client.finished.wait()
        assert trio.current_time() - slow.started == settings.body_timeout
    assert slow.client.status == 408
    assert_body_timeout(slow.client.body)
    assert slow.client.complete
    expected = None if http_version == "2" else "close"
    assert slow.client.headers.get("connection") == expected
    assert not app.logs.events("stream_start")
    assert service.runs.live == 0


async def test_chat_completion_whose_body_ends_in_time_is_answered(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """A body that takes most of ``--body-timeout`` but ends within it is
    answered normally (a ``stream: false`` completion, 200)."""
    data = chat_body()
    async with memory_app(settings) as (_, app), trio.open_nursery() as nursery:
        slow = start_slow(nursery, app)
        slow.body.chunk(data[:5])
        await trio.sleep(settings.body_timeout - 1)
        slow.body.chunk(data[5:], more=False)
        await slow.client.finished.wait()
    assert slow.client.status == 200, slow.client.body
    assert slow.client.json()["object"] == "chat.completion"


async def test_quart_route_with_a_late_body_gets_the_same_408(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """Quart's own body deadline (``BODY_TIMEOUT``) is ``--body-timeout``, and
    its timeout (werkzeug's ``RequestTimeout``) is answered with the same 408
    OpenAI body and ``Connection: close``.  No route of ours reads a body
    through Quart today, so the test adds one that does."""
    async with memory_app(settings) as (_, app), trio.open_nursery() as nursery:
        assert app.config["BODY_TIMEOUT"] == settings.body_timeout

        async def echo() -> bytes:
            data = await request.get_data()
            assert isinstance(data, bytes)
            return data

        app.add_url_rule("/test-echo", view_func=echo, methods=["POST"])
        slow = start_slow(nursery, app, path="/test-echo")
        slow.body.chunk(b"{")
        await slow.client.finished.wait()
        assert trio.current_time() - slow.started == settings.body_timeout
        on_time = start_slow(nursery, app, path="/test-echo")
        on_time.body.chunk(b"hello", more=False)
        await on_time.client.finished.wait()
    assert slow.client.status == 408
    assert slow.client.headers["connection"] == "close"
    assert_body_timeout(slow.client.body)
    assert (on_time.client.status, bytes(on_time.client.body)) == (200, b"hello")


# -- real sockets: many slow bodies ---------------------------------------------------


SLOW_BODY_TIMEOUT = 2.0  # small, and still far above the time 300 connects take
#: How late after ``--body-timeout`` a 408 may come with hundreds due at once.
CUT_SLACK = 2.0


def fd_budget(wanted: int) -> int:
    """How many client connections this process can afford (each costs two
    descriptors here, the client's and the server's), at most ``wanted``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    affordable = (soft - 256) // 2
    assert affordable >= 100, f"ulimit -n is {soft}: too low for this test"
    return min(wanted, affordable)


@dataclass
class SlowClient:
    """A raw socket that sent a complete head (``content-length: 100``) and one
    byte of body, then only reads."""

    stream: trio.SocketStream
    sent_at: float
    received: bytearray = field(default_factory=bytearray)
    first_byte_at: float | None = None
    eof_at: float | None = None

    @classmethod
    async def open(cls, port: int) -> SlowClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{"
        )
        await stream.send_all(head)
        return cls(stream, trio.current_time())

    async def read_to_eof(self) -> None:
        async with self.stream:
            while data := await self.stream.receive_some(65536):
                if self.first_byte_at is None:
                    self.first_byte_at = trio.current_time()
                self.received += data
            self.eof_at = trio.current_time()

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body of what was received (parsed by h11)."""
        h = h11.Connection(h11.CLIENT)
        h.send(h11.Request(method="POST", target=CHAT, headers=[("host", "x")]))
        h.receive_data(bytes(self.received))
        h.receive_data(b"")
        status, headers, body = 0, {}, b""
        while not isinstance(event := h.next_event(), h11.EndOfMessage):
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
        return status, headers, body


async def healthz(port: int) -> int:
    """``GET /healthz`` on its own connection (closed after); the status."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


async def stream_completion(port: int) -> str:
    """A normal streamed completion on a raw socket; its last event's data."""
    client = await RawClient.post(
        port, CHAT, orjson.loads(chat_body(stream=True)), (("connection", "close"),)
    )
    try:
        assert await client.start() == 200
        events = await client.read_all()
    finally:
        await client.aclose()
    return events[-1].data


async def test_300_slow_bodies_get_408_and_eof_while_the_server_serves_others(
    tmp_path: Path,
) -> None:
    """300 connections that each sent a complete head and 1 of 100 body bytes:
    while they are pending (each holding its connection and two tasks), a
    streamed completion and ``/healthz`` are served normally; then every one
    gets 408 with the OpenAI body and ``Connection: close``, at
    ``--body-timeout`` after it sent (within CUT_SLACK), followed by EOF; and
    the server's task count is back at its baseline exactly."""
    n = fd_budget(300)
    settings = Settings(
        port=0, db=str(tmp_path / "slow.db"), mock_delay_ms=1, body_timeout=SLOW_BODY_TIMEOUT
    )
    async with running_server(settings) as server:
        baseline = await tasks_living()
        clients = [await SlowClient.open(server.port) for _ in range(n)]
        opened = trio.current_time() - clients[0].sent_at
        with trio.fail_after(SLOW_BODY_TIMEOUT + CUT_SLACK + 10):
            async with trio.open_nursery() as readers:
                for client in clients:
                    readers.start_soon(client.read_to_eof)
                # Loopback delivers at send time, so once every task is blocked
                # the server has read all 300 heads and is waiting on the bodies.
                held = await tasks_living() - baseline - n  # minus our readers
                last_data = await stream_completion(server.port)
                health = await healthz(server.port)
                served_at = trio.current_time()
                pending = sum(c.first_byte_at is None for c in clients)
        cut = [c.first_byte_at - c.sent_at for c in clients if c.first_byte_at is not None]
        assert await tasks_living() == baseline
    print(
        f"\n{n} slow bodies: opened in {opened:.2f} s, {held / n:.1f} server tasks each; "
        f"served others {served_at - clients[-1].sent_at:.3f} s after the last; "
        f"cut {min(cut):.3f}-{max(cut):.3f} s after each sent (timeout {SLOW_BODY_TIMEOUT} s)"
    )
    assert held >= 2 * n
    assert (last_data, health, pending) == ("[DONE]", 200, n)
    assert len(cut) == n
    assert SLOW_BODY_TIMEOUT <= min(cut) <= max(cut) < SLOW_BODY_TIMEOUT + CUT_SLACK
    for client in clients:
        status, headers, body = client.response()
        assert (status, headers["connection"]) == (408, "close")
        assert_body_timeout(body)
        assert client.eof_at is not None


# -- real sockets: a head that never completes ------------------------------------------


@dataclass
class HalfHead:
    """A raw socket that sent part of a request head (and maybe dribbles more)."""

    stream: trio.SocketStream
    opened_at: float
    received: bytes = b""
    closed_at: float | None = None

    async def wait_closed(self, dribble: float | None) -> None:
        """Read until the server closes; meanwhile send one more head byte
        every ``dribble`` seconds (a head that grows for ever), if given."""
        async with self.stream, trio.open_nursery() as nursery:
            if dribble is not None:
                nursery.start_soon(self._dribble, dribble)
            try:
                while data := await self.stream.receive_some(65536):
                    self.received += data
            except trio.BrokenResourceError:
                pass  # a reset is a close too (a dribbled byte may cross the FIN)
            self.closed_at = trio.current_time()
            nursery.cancel_scope.cancel()

    async def _dribble(self, every: float) -> None:
        try:
            while True:
                await trio.sleep(every)
                await self.stream.send_all(b"x")
        except trio.BrokenResourceError:
            pass


async def test_heads_that_never_complete_are_closed_by_the_idle_timer(
    settings: Settings,
) -> None:
    """Connections that stop mid-head (``POST ... HTTP/1.1\\r\\nHost: x\\r\\n``
    and nothing more), and connections that keep adding a head byte every
    0.5 s, are all closed by the server ``keep_alive_timeout`` (5 s, docs/api.md
    section 3.9) after they opened: the idle timer is not re-armed by bytes,
    only stopped by a complete head.  They get no answer, only the close."""
    assert hypercorn_config(settings).keep_alive_timeout == HEADER_BOUND
    async with running_server(settings) as server:
        heads = []
        for _ in range(20):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            await stream.send_all(SLOW_HEAD)
            heads.append(HalfHead(stream, trio.current_time()))
        with trio.fail_after(HEADER_BOUND + 5):
            async with trio.open_nursery() as nursery:
                for i, head in enumerate(heads):
                    nursery.start_soon(head.wait_closed, 0.5 if i % 4 == 0 else None)
    lifetimes = [h.closed_at - h.opened_at for h in heads if h.closed_at is not None]
    print(f"\nhalf heads closed {min(lifetimes):.2f}-{max(lifetimes):.2f} s after opening")
    assert len(lifetimes) == len(heads)
    assert HEADER_BOUND - 0.1 <= min(lifetimes) <= max(lifetimes) < HEADER_BOUND + 1.0
    assert all(h.received == b"" for h in heads)


# -- HTTP/2 ---------------------------------------------------------------------------


def open_slow_h2_stream(conn: H2Connection, first: bytes, length: int = 100) -> H2Stream:
    """Open a ``POST /v1/chat/completions`` stream announcing ``length`` body
    bytes and send ``first`` of them, without ending the stream.  (The load
    generator's client always sends whole bodies, so this drives its ``h2``
    state machine directly.)"""
    h2conn = conn._h2
    stream_id = h2conn.get_next_available_stream_id()
    stream = conn._streams[stream_id] = H2Stream(conn, stream_id)
    headers = [(":method", "POST"), (":path", CHAT), (":scheme", "http"), (":authority", "x"),
               ("content-type", "application/json"), ("content-length", str(length))]  # fmt: skip
    h2conn.send_headers(stream_id, headers)
    h2conn.send_data(stream_id, first)
    conn._pull()
    return stream


async def read_h2(stream: H2Stream) -> bytes:
    body = b""
    while (chunk := await stream.receive()) is not None:
        body += chunk
    return body


async def test_h2_late_body_gets_408_and_only_its_stream_ends(tmp_path: Path) -> None:
    """Over HTTP/2 (h2c), a stream whose body never ends gets 408 with the
    OpenAI body, no ``connection`` header, and the end of the stream; the
    connection stays up and serves a streamed completion on a sibling stream."""
    settings = Settings(port=0, db=str(tmp_path / "h2.db"), mock_delay_ms=1, body_timeout=1.0)
    async with running_server(settings) as server:
        with trio.fail_after(10):
            async with open_h2_connection("127.0.0.1", server.port) as conn:
                slow = open_slow_h2_stream(conn, b"{")
                assert await slow.response() == 408
                body = await read_h2(slow)
                sibling = await conn.request(
                    "POST", CHAT, [("content-type", "application/json")], chat_body(stream=True)
                )
                assert await sibling.response() == 200
                events = SSEDecoder().feed(await read_h2(sibling))
    assert "connection" not in slow.headers
    assert_body_timeout(body)
    assert events[-1].data == "[DONE]"


async def test_h2_body_bytes_after_the_408_are_ignored(tmp_path: Path) -> None:
    """A client that goes on sending its body after the 408 (it may not have
    read the answer yet) must not disturb the server: the bytes are dropped
    and the connection serves a sibling stream."""
    settings = Settings(port=0, db=str(tmp_path / "h2.db"), mock_delay_ms=1, body_timeout=1.0)
    async with running_server(settings) as server:
        with trio.fail_after(10):
            async with open_h2_connection("127.0.0.1", server.port) as conn:
                slow = open_slow_h2_stream(conn, b"{")
                assert await slow.response() == 408
                await read_h2(slow)
                conn._h2.send_data(slow.id, b" " * 10)
                conn._pull()
                sibling = await conn.request("GET", "/healthz")
                assert await sibling.response() == 200


async def test_h2_body_bytes_after_a_413_leave_the_server_serving(tmp_path: Path) -> None:
    """A client that sends the rest of its body, and its end, on an HTTP/2
    stream the server has already refused (413: the Content-Length is over
    ``--max-body-bytes``) stops nothing: the same connection, a new HTTP/2
    connection and a new HTTP/1.1 connection are all served after it."""
    settings = Settings(port=0, db=str(tmp_path / "h2.db"), mock_delay_ms=1, max_body_bytes=1000)
    async with running_server(settings) as server:
        with trio.fail_after(10):
            async with open_h2_connection("127.0.0.1", server.port) as conn:
                refused = open_slow_h2_stream(conn, b"{", length=2000)
                assert await refused.response() == 413
                assert orjson.loads(await read_h2(refused))["error"]["code"] == "request_too_large"
                conn._h2.send_data(refused.id, b" " * 1999, end_stream=True)
                conn._pull()
                # Sent after the bytes above, so handled after them.
                sibling = await conn.request("GET", "/healthz")
                assert await sibling.response() == 200
            async with open_h2_connection("127.0.0.1", server.port) as other:
                stream = await other.request(
                    "POST", CHAT, [("content-type", "application/json")], chat_body(stream=True)
                )
                assert await stream.response() == 200
                assert SSEDecoder().feed(await read_h2(stream))[-1].data == "[DONE]"
            assert await healthz(server.port) == 200
            assert await stream_completion(server.port) == "[DONE]"
