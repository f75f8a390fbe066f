"""A crash in one connection's handling ends that connection, never the process.

hypercorn runs each connection in a task of ``serve_service``'s connections
nursery, and the connection's own tasks (its request tasks, HTTP/2 send
task, idle timer) in a task group inside it: an exception out of any of them
that no one catches used to end the nursery, and so the server (issue 18,
item 1, the general guard).  Here an exception is injected into a real
server's handling of one connection -- its HTTP/2 protocol, its HTTP/1.1
protocol, and a request task outside the app -- and the server must keep
serving a stream on a sibling connection, log ``connection_crashed``, close
the failing connection (GOAWAY(INTERNAL_ERROR) first on HTTP/2) and leave no
task behind.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h2.errors
import h2.events
import orjson
import pytest
import trio
from hypercorn.events import Event, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import HTTPStream

from tests.conftest import RawClient, Server, running_server, tasks_living
from tests.test_h2_frames import Peer
from trio_stream import Settings, hypercorn_fixes, mocktext
from trio_stream.load.h2 import open_h2_connection
from trio_stream.sse import SSEDecoder

CHAT = "/v1/chat/completions"
BOUND = 10.0  # seconds for one whole exchange (real time)
SIBLING_TOKENS = 100  # at 10 ms: alive while the other connection crashes
VICTIM_TOKENS = 10_000  # only the crash ends it in time
CRASH = b"crash!!!"  # the PING payload that trips the injected fault


class Injected(Exception):
    """The fault the tests inject."""


def chat(content: str, max_tokens: int) -> bytes:
    messages = [{"role": "user", "content": content}]
    return orjson.dumps({"model": "m", "messages": messages, "stream": True,
                         "max_tokens": max_tokens})  # fmt: skip


def expected(content: str, max_tokens: int) -> str:
    return mocktext.expected_text([{"role": "user", "content": content}], max_tokens)


def sse_text(data: bytes) -> str:
    """The delta text of a whole SSE body."""
    chunks = [orjson.loads(e.data) for e in SSEDecoder().feed(data) if e.data.startswith('{"id"')]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


async def victim_stream(peer: Peer) -> None:
    """Open a long streaming run on stream 1 of ``peer``; return once it streams."""
    body = chat("the victim", VICTIM_TOKENS)
    peer.h2.send_headers(1, [
        (":method", "POST"), (":path", CHAT), (":scheme", "http"), (":authority", "x"),
        ("content-type", "application/json"), ("content-length", str(len(body))),
    ])  # fmt: skip
    peer.h2.send_data(1, body, end_stream=True)
    await peer.flush()
    await peer.until(lambda: any(isinstance(e, h2.events.DataReceived) for e in peer.events))
    assert peer.status(1) == 200


async def crash_one_connection_beside_a_sibling(
    server: Server, crash: Callable[[Server], Awaitable[Peer]]
) -> Peer:
    """Start a sibling h2c stream, run ``crash(server)`` (which crashes an
    HTTP/2 connection and returns its client end), then read the sibling to
    its end and check it, and the ``connection_crashed`` record."""
    async with open_h2_connection("127.0.0.1", server.port) as sibling:
        stream = await sibling.request(
            "POST", CHAT, [("content-type", "application/json")],
            chat("the sibling", SIBLING_TOKENS),
        )  # fmt: skip
        assert await stream.response() == 200
        victim = await crash(server)
        body = b""
        while (chunk := await stream.receive()) is not None:
            body += chunk
    assert sse_text(body) == expected("the sibling", SIBLING_TOKENS)
    (record,) = server.logs.events("connection_crashed")
    assert record["http"] == "2"
    assert "Injected" in record["error"]
    return victim


async def still_serving(server: Server, baseline: int) -> None:
    """A new connection is answered; every stream has closed; no task is left."""
    peer = await Peer.open(server.port)
    assert await peer.healthz(1) == 200
    await peer.aclose()
    await server.service.wait_streams_closed()
    await server.service.runs.wait_idle()
    assert await tasks_living() == baseline


async def test_a_crash_in_http2_protocol_handling_ends_only_its_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception out of hypercorn's HTTP/2 event handling (injected on a
    PING with a marked payload) while the connection carries a streaming run:
    the connection gets GOAWAY(INTERNAL_ERROR) and is closed, its run is
    ended, ``connection_crashed`` is logged (``http`` 2), a stream on a
    sibling connection completes with the exact text, and the server serves
    new connections with no task left.  (Before the fix the exception ended
    ``serve_service``.)"""
    handle = hypercorn_fixes.original_handle_events

    async def faulty(self: Any, events: list[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, h2.events.PingReceived) and event.ping_data == CRASH:
                raise Injected("in H2Protocol._handle_events")
        await handle(self, events)

    monkeypatch.setattr(hypercorn_fixes, "original_handle_events", faulty)

    async def crash(server: Server) -> Peer:
        peer = await Peer.open(server.port)
        await victim_stream(peer)
        peer.h2.ping(CRASH)
        await peer.flush()
        await peer.until(lambda: False)  # until the server closes it
        return peer

    s = Settings(port=0, db=str(tmp_path / "t.db"), mock_delay_ms=10)
    with trio.fail_after(BOUND):
        async with running_server(s) as server:
            baseline = await tasks_living()
            peer = await crash_one_connection_beside_a_sibling(server, crash)
            term = peer.goaway()
            assert term is not None
            assert term.error_code == h2.errors.ErrorCodes.INTERNAL_ERROR
            assert peer.eof
            await peer.aclose()
            await still_serving(server, baseline)


async def test_a_crash_in_a_request_task_outside_the_app_ends_only_its_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in a request task after the app returned (hypercorn's
    ``_handle`` calls ``send(None)`` in a ``finally``, outside its own
    ``except``; injected for ``GET /healthz?crash``): the request's answer
    has gone out, then its connection -- with a streaming run on a sibling
    stream -- gets GOAWAY(INTERNAL_ERROR) and is closed; the server goes on as
    above.  (Before the fix the exception ended ``serve_service``.)"""
    app_send = HTTPStream.app_send

    async def faulty(self: HTTPStream, message: Any) -> None:
        if message is None and self.scope["query_string"] == b"crash":
            raise Injected("in a request task, after the app")
        await app_send(self, message)

    monkeypatch.setattr(HTTPStream, "app_send", faulty)

    async def crash(server: Server) -> Peer:
        peer = await Peer.open(server.port)
        await victim_stream(peer)
        peer.get(3, "/healthz?crash")
        await peer.flush()
        await peer.until(lambda: False)
        assert peer.status(3) == 200
        return peer

    s = Settings(port=0, db=str(tmp_path / "t.db"), mock_delay_ms=10)
    with trio.fail_after(BOUND):
        async with running_server(s) as server:
            baseline = await tasks_living()
            peer = await crash_one_connection_beside_a_sibling(server, crash)
            term = peer.goaway()
            assert term is not None
            assert term.error_code == h2.errors.ErrorCodes.INTERNAL_ERROR
            await peer.aclose()
            await still_serving(server, baseline)


async def test_a_crash_in_http11_protocol_handling_ends_only_its_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception out of hypercorn's HTTP/1.1 protocol (injected on a
    request carrying ``x-crash``) while another HTTP/1.1 connection streams:
    the failing connection is closed without an answer, ``connection_crashed``
    is logged (``http`` 1.1), the streaming connection completes, and the
    server goes on as above."""
    handle = H11Protocol.handle

    async def faulty(self: H11Protocol, event: Event) -> None:
        if isinstance(event, RawData) and b"x-crash" in event.data:
            raise Injected("in H11Protocol.handle")
        await handle(self, event)

    monkeypatch.setattr(H11Protocol, "handle", faulty)

    s = Settings(port=0, db=str(tmp_path / "t.db"), mock_delay_ms=10)
    with trio.fail_after(BOUND):
        async with running_server(s) as server:
            baseline = await tasks_living()
            body = {"model": "m", "messages": [{"role": "user", "content": "h1 sibling"}],
                    "stream": True, "max_tokens": SIBLING_TOKENS}  # fmt: skip
            sibling = await RawClient.post(server.port, CHAT, body)
            assert await sibling.start() == 200
            victim = await trio.open_tcp_stream("127.0.0.1", server.port)
            await victim.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-crash: 1\r\n\r\n")
            received = b""
            while data := await victim.receive_some(65536):
                received += data
            assert received == b""  # closed, unanswered
            await victim.aclose()
            events = await sibling.read_all()
            await sibling.aclose()
            text = "".join(
                orjson.loads(e.data)["choices"][0]["delta"].get("content") or ""
                for e in events
                if e.data.startswith('{"id"')
            )
            assert text == expected("h1 sibling", SIBLING_TOKENS)
            (record,) = server.logs.events("connection_crashed")
            assert record["http"] == "1.1"
            assert "Injected" in record["error"]
            await still_serving(server, baseline)
