"""trio_stream.server.hypercorn_fixes: process-wide patches, applied only where they belong.

Each patch replaces a private method of hypercorn, so it is applied only to
the release it was written for.  For each, a canary drives hypercorn's *own*
method and fails as soon as that method no longer has the bug: on an
upgrade, it says whether the fix (and its version pin) can go.  The fixed
``StreamBuffer.pop`` is tested in ``tests/test_stall.py``; the fixed
``H2Protocol._handle_events`` here, in memory (hypercorn's HTTP/2 protocol
against an h2 client), and in ``tests/test_body_timeout.py`` on a real server;
the fixed ``H11Protocol`` connection here, in memory, and with the fixed
error answer in ``tests/test_http1_framing.py`` on a real server;
the fixed ``_priority_updated`` and ``initiate`` here, in memory, and in
``tests/test_h2_frames.py`` on a real server; the fixed ``_send_data`` here,
in memory, and in the stress suite's h2c create/cancel cycles
(``tests/test_stress.py``).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import pytest
import trio
import trio.testing
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h2 import BUFFER_HIGH_WATER, H2Protocol, StreamBuffer
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import EventWrapper, WorkerContext
from hypercorn.typing import ConnectionState
from priority.priority import TooManyStreamsError

from trio_stream import EventLogger, RecordingSink
from trio_stream.server import hypercorn_fixes

#: The Content-Length of a body sent late: 1 byte, the answer, then the rest.
DECLARED = 60_000
REST = DECLARED - 1


def recording_logger() -> tuple[EventLogger, RecordingSink]:
    sink = RecordingSink()
    return EventLogger(sink=sink, stream=io.StringIO()), sink


async def test_canary_hypercorn_pop_still_resumes_a_writer_on_a_zero_byte_pop() -> None:
    """hypercorn's own StreamBuffer.pop (unpatched) still has the bug the fix
    exists for: with the client's window at 0, a 0-byte pop resumes a writer
    paused at the high-water mark, although nothing was drained.  If this
    fails, hypercorn fixed it: drop the fix (or re-pin FIXED_VERSION)."""
    assert hypercorn_fixes.original_pop.__module__ == "hypercorn.protocol.h2"
    buffer = StreamBuffer(EventWrapper)
    pushed = trio.Event()

    async def writer() -> None:
        await buffer.push(b"x" * BUFFER_HIGH_WATER)  # pauses: the buffer is full
        pushed.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            assert not pushed.is_set()
            assert await hypercorn_fixes.original_pop(buffer, 0) == b""  # window 0
            await trio.testing.wait_all_tasks_blocked()
            assert pushed.is_set(), (
                "hypercorn's StreamBuffer.pop no longer resumes the writer on a 0-byte pop: "
                "trio_stream.server.hypercorn_fixes may be unneeded"
            )
            nursery.cancel_scope.cancel()
    assert len(buffer.buffer) == BUFFER_HIGH_WATER  # resumed, yet nothing drained


# -- H2Protocol._handle_events: body bytes of a stream hypercorn has forgotten -----------


async def app(scope: Any, receive: Any, send: Any) -> None:
    """``/refuse`` answers 413 at once without reading the body (as trio-stream
    does for a Content-Length over --max-body-bytes); ``/hold`` answers 200
    with one chunk and then waits for the client to go, never ending its
    body (a long answer); any other path reads the whole body and answers 200
    with it (or nothing, if the client goes)."""
    if scope["path"] == "/hold":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"held", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        return
    body, more = b"", scope["path"] != "/refuse"
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body, more = body + message["body"], message["more_body"]
    status = 413 if scope["path"] == "/refuse" else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body})


class Wire:
    """hypercorn's ``H2Protocol`` in memory, with an h2 client on the other end."""

    def __init__(self, task_group: TaskGroup) -> None:
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.client.initiate_connection()
        self.sent = bytearray()  # by the server, not yet read by the client
        self.events: list[h2.events.Event] = []  # the client's, so far
        self.protocol = H2Protocol(
            ASGIWrapper(app), Config(), WorkerContext(None), task_group, ConnectionState({}),
            False, None, None, self._server_sends,
        )  # fmt: skip

    async def _server_sends(self, event: Event) -> None:
        if isinstance(event, RawData):
            self.sent += event.data

    async def exchange(self) -> None:
        """Give the server what the client queued, let every task run, and
        give the client what the server sent back."""
        await self.protocol.handle(RawData(data=self.client.data_to_send()))
        await trio.testing.wait_all_tasks_blocked()
        data, self.sent = bytes(self.sent), bytearray()
        self.events += self.client.receive_data(data)

    async def post(self, stream_id: int, path: str, body: bytes, *, end: bool = True) -> None:
        """POST ``body`` to ``path``, declaring DECLARED bytes unless ``end``."""
        length = len(body) if end else DECLARED
        headers = [(":method", "POST"), (":path", path), (":scheme", "http"),
                   (":authority", "x"), ("content-length", str(length))]  # fmt: skip
        self.client.send_headers(stream_id, headers)
        await self.upload(stream_id, body, end=end)

    async def upload(self, stream_id: int, data: bytes, *, end: bool) -> None:
        """Send ``data`` as flow control allows, exchanging with the server
        whenever the window is spent; fail if the server never reopens it."""
        while True:
            window = self.client.local_flow_control_window(stream_id)
            if data and window == 0:
                await self.exchange()
                assert self.client.local_flow_control_window(stream_id), "flow control stalled"
                continue
            size = min(window, self.client.max_outbound_frame_size, len(data))
            chunk, data = data[:size], data[size:]
            self.client.send_data(stream_id, chunk, end_stream=end and not data)
            if not data:
                break
        await self.exchange()

    def response(self, stream_id: int) -> tuple[int, bytes]:
        """The status and body the client has received on ``stream_id``."""
        events = [e for e in self.events if getattr(e, "stream_id", None) == stream_id]
        (head,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
        return int(dict(head.headers)[b":status"]), body


@asynccontextmanager
async def wire() -> AsyncIterator[Wire]:
    """A :class:`Wire`, its connection set up."""
    with trio.fail_after(5):
        async with TaskGroup() as task_group:
            w = Wire(task_group)
            await w.protocol.initiate()
            await w.exchange()
            yield w
            await w.protocol.handle(Closed())  # ends hypercorn's send task


@pytest.fixture
def fixed() -> None:
    """The fixes installed, as ``serve_service`` installs them."""
    hypercorn_fixes.apply()
    assert hypercorn_fixes.applied()


async def refused(w: Wire) -> None:
    """Stream 1: 413 after 1 of its DECLARED body bytes; hypercorn has
    answered it and forgotten it, and the client may send the rest."""
    await w.post(1, "/refuse", b"x", end=False)
    assert w.response(1) == (413, b"")
    assert 1 not in w.protocol.streams


async def test_canary_hypercorn_handle_events_still_raises_on_a_forgotten_streams_data(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hypercorn's own H2Protocol._handle_events (unpatched) still has the bug
    the fix exists for: DATA on a stream it has answered and forgotten raises
    KeyError, which ends the connection's task (and, in trio-stream, the
    server).  If this fails, hypercorn fixed it: drop the fix (or re-pin
    FIXED_VERSION)."""
    original = hypercorn_fixes.original_handle_events
    assert original.__module__ == "hypercorn.protocol.h2"
    monkeypatch.setattr(H2Protocol, "_handle_events", original)
    async with wire() as w:
        await refused(w)
        w.client.send_data(1, b"x" * 100)
        with pytest.raises(KeyError):
            await w.exchange()


@pytest.mark.usefixtures("fixed")
async def test_forgotten_streams_body_is_dropped_and_acknowledged_like_a_read_one() -> None:
    """With the fix, the rest of a body the server has already answered is
    dropped without an error, and acknowledged: the client's connection
    window (which all its streams share) ends exactly where it ends when the
    app reads the same bytes."""
    async with wire() as dropped, wire() as read:
        await refused(dropped)
        await read.post(1, "/echo", b"x", end=False)
        before = dropped.client.outbound_flow_control_window
        for w in (dropped, read):
            await w.upload(1, b"x" * REST, end=False)
        window = dropped.client.outbound_flow_control_window
        assert window == read.client.outbound_flow_control_window
        assert window > before - REST  # some came back already


@pytest.mark.usefixtures("fixed")
async def test_connection_serves_another_stream_after_a_forgotten_streams_body() -> None:
    """With the fix, after the rest of a forgotten stream's body (data and
    its end) the connection is fine: a new stream's whole body reaches the
    app, which answers it."""
    async with wire() as w:
        await refused(w)
        await w.upload(1, b"x" * REST, end=True)
        body = b"y" * DECLARED
        await w.post(3, "/echo", body)
        assert w.response(3) == (200, body)


@pytest.mark.usefixtures("fixed")
async def test_body_sent_with_its_headers_reaches_the_app() -> None:
    """A stream's HEADERS, DATA and end, handled in one batch, are all handed
    to hypercorn: the fix tests whether a stream is tracked event by event,
    so data for a stream opened by the same batch is not dropped."""
    async with wire() as w:
        await w.post(1, "/echo", b"z" * 1000)
        assert w.response(1) == (200, b"z" * 1000)


# -- H2Protocol._priority_updated: PRIORITY frames, without bound -------------------------


async def test_canary_hypercorn_priority_updated_still_refuses_the_1001st_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hypercorn's own H2Protocol._priority_updated (unpatched) still has the
    bug the fix exists for: a PRIORITY frame for a stream it does not track
    inserts that stream into its priority tree for good, and the 1,001st
    raises priority.TooManyStreamsError, which ends the connection's task
    (and, in trio-stream before the connection guard, the server).  If this
    fails, hypercorn fixed it: drop the fix (or re-pin FIXED_VERSION)."""
    original = hypercorn_fixes.original_priority_updated
    assert original.__module__ == "hypercorn.protocol.h2"
    monkeypatch.setattr(H2Protocol, "_priority_updated", original)
    async with wire() as w:
        for i in range(1001):
            w.client.prioritize(2 * i + 1, weight=16)
        with pytest.raises(TooManyStreamsError):
            await w.exchange()


@pytest.mark.usefixtures("fixed")
async def test_priority_frames_are_ignored_and_streams_are_still_served() -> None:
    """With the fix, 1,001 PRIORITY frames for streams never opened, then a
    request, then a PRIORITY frame for its closed stream: nothing is raised,
    the request is answered, and hypercorn's priority tree holds no stream
    once it has been (only what hypercorn itself inserts: open streams)."""
    async with wire() as w:
        for i in range(1001):
            w.client.prioritize(2 * i + 1, weight=16)
        await w.exchange()
        await w.post(2003, "/echo", b"ok")
        assert w.response(2003) == (200, b"ok")
        w.client.prioritize(2003, weight=16)
        await w.exchange()
        assert list(w.protocol.priority._streams) == [0]  # the tree's root only


# -- H2Protocol._send_data: a stream the client reset ------------------------------------


async def held_then_reset(w: Wire) -> None:
    """Stream 1: ``/hold`` answers with a chunk (the send task sent it, then
    blocked the stream, its buffer empty); then the client resets it."""
    w.client.send_headers(1, [(":method", "GET"), (":path", "/hold"), (":scheme", "http"),
                              (":authority", "x")], end_stream=True)  # fmt: skip
    await w.exchange()
    assert w.response(1) == (200, b"held")
    w.client.reset_stream(1)
    await w.exchange()
    assert 1 not in w.protocol.streams  # the app was told and has returned


async def test_canary_hypercorn_send_data_still_keeps_a_reset_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hypercorn's own H2Protocol._send_data (unpatched) still has the bug the
    fix exists for: a stream the client reset, reached by the send task while
    h2 still holds it (closed), is blocked again and stays in the priority
    tree and the stream buffers for good -- one more leak per reset, until
    the tree refuses its 1,001st stream.  If this fails, hypercorn fixed it:
    drop the fix (or re-pin FIXED_VERSION)."""
    original = hypercorn_fixes.original_send_data
    assert original.__module__ == "hypercorn.protocol.h2"
    monkeypatch.setattr(H2Protocol, "_send_data", original)
    async with wire() as w:
        await held_then_reset(w)
        assert 1 in w.protocol.stream_buffers
        assert list(w.protocol.priority._streams) == [0, 1]


@pytest.mark.usefixtures("fixed")
async def test_a_reset_stream_leaves_neither_buffer_nor_tree_node() -> None:
    """With the fix, a stream the client reset while hypercorn still tracked
    it is dropped by the send task: no buffer and no priority tree node is
    left (the tree holds its root only), and the connection serves the next
    stream."""
    async with wire() as w:
        await held_then_reset(w)
        assert w.protocol.stream_buffers == {}
        assert list(w.protocol.priority._streams) == [0]
        await w.post(3, "/echo", b"next")
        assert w.response(3) == (200, b"next")


# -- H2Protocol.initiate: the idle timer of an h2c connection by prior knowledge ---------


async def initiated(upgrade: bool = False) -> list[Event]:
    """What a fresh ``H2Protocol`` tells its server while it initiates (an
    ``Upgrade: h2c`` one opens stream 1 with the upgrade request)."""
    told: list[Event] = []

    async def send(event: Event) -> None:
        told.append(event)

    with trio.fail_after(5):
        async with TaskGroup() as task_group:
            protocol = H2Protocol(
                ASGIWrapper(app), Config(), WorkerContext(None), task_group,
                ConnectionState({}), False, None, None, send,
            )  # fmt: skip
            if upgrade:
                request = [(b":method", b"GET"), (b":path", b"/refuse"), (b":scheme", b"http"),
                           (b":authority", b"x")]  # fmt: skip
                settings = h2.connection.H2Connection().initiate_upgrade_connection()
                await protocol.initiate(request, settings)
            else:
                await protocol.initiate()
            await trio.testing.wait_all_tasks_blocked()  # stream 1 answered, if any
            await protocol.handle(Closed())  # ends hypercorn's send task
    return told


async def test_canary_hypercorn_initiate_still_leaves_the_idle_timer_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hypercorn's own H2Protocol.initiate (unpatched) still has the bug the
    fix exists for: it never says the new connection is idle, so on an h2c
    connection by prior knowledge -- whose HTTP/1.1 protocol stopped the idle
    timer on reading the preface -- no timer runs until a stream has ended.
    If this fails, hypercorn fixed it: drop the fix (or re-pin FIXED_VERSION)."""
    original = hypercorn_fixes.original_initiate
    assert original.__module__ == "hypercorn.protocol.h2"
    monkeypatch.setattr(H2Protocol, "initiate", original)
    assert not [e for e in await initiated() if isinstance(e, Updated)]


@pytest.mark.usefixtures("fixed")
async def test_initiate_arms_the_idle_timer_only_without_a_stream() -> None:
    """With the fix, a new HTTP/2 connection without a stream says it is idle
    (``Updated(idle=True)``: the server arms its idle timer); one opened by
    ``Upgrade: h2c``, which carries stream 1, does not (that stream's end
    will)."""
    assert [e for e in await initiated() if isinstance(e, Updated)] == [Updated(idle=True)]
    assert [e for e in await initiated(upgrade=True) if isinstance(e, Updated)] == [
        Updated(idle=True)  # from stream 1's end (its app answered at once), not from initiate
    ]


def test_fix_is_not_applied_to_another_hypercorn_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """On any hypercorn other than FIXED_VERSION, apply() leaves hypercorn's
    methods as they are, says so (False), and logs hypercorn_fix_skipped,
    once for each fix, with the version found."""
    unpatch(monkeypatch)
    monkeypatch.setattr(hypercorn_fixes, "hypercorn_version", lambda: "0.19.0")
    logger, sink = recording_logger()
    assert hypercorn_fixes.apply(logger) is False
    assert StreamBuffer.pop is hypercorn_fixes.original_pop
    assert H2Protocol._handle_events is hypercorn_fixes.original_handle_events
    assert H11Protocol.__init__ is hypercorn_fixes.original_h11_init
    assert H11Protocol._send_error_response is hypercorn_fixes.original_send_error_response
    assert H2Protocol._priority_updated is hypercorn_fixes.original_priority_updated
    assert H2Protocol.initiate is hypercorn_fixes.original_initiate
    assert H2Protocol.stream_send is hypercorn_fixes.original_stream_send
    assert H2Protocol._send_data is hypercorn_fixes.original_send_data
    assert not hypercorn_fixes.applied()
    records = sink.events("hypercorn_fix_skipped")
    assert [r["fix"] for r in records] == [
        "StreamBuffer.pop", "H2Protocol._handle_events", "H11Protocol.__init__",
        "H11Protocol._send_error_response", "H2Protocol._priority_updated",
        "H2Protocol.initiate", "H2Protocol.stream_send", "H2Protocol._send_data",
    ]  # fmt: skip
    for record in records:
        assert (record["hypercorn"], record["written_for"]) == (
            "0.19.0",
            hypercorn_fixes.FIXED_VERSION,
        )


def test_fix_is_applied_to_its_hypercorn_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """On FIXED_VERSION, apply() installs every fix, idempotently, and logs nothing."""
    unpatch(monkeypatch)
    monkeypatch.setattr(hypercorn_fixes, "hypercorn_version", lambda: hypercorn_fixes.FIXED_VERSION)
    logger, sink = recording_logger()
    assert hypercorn_fixes.apply(logger) is True
    assert hypercorn_fixes.apply(logger) is True
    assert hypercorn_fixes.applied()
    assert StreamBuffer.pop is not hypercorn_fixes.original_pop
    assert H2Protocol._handle_events is not hypercorn_fixes.original_handle_events
    assert H11Protocol.__init__ is not hypercorn_fixes.original_h11_init
    assert H11Protocol._send_error_response is not hypercorn_fixes.original_send_error_response
    assert H2Protocol._priority_updated is not hypercorn_fixes.original_priority_updated
    assert H2Protocol.initiate is not hypercorn_fixes.original_initiate
    assert H2Protocol.stream_send is not hypercorn_fixes.original_stream_send
    assert H2Protocol._send_data is not hypercorn_fixes.original_send_data
    assert not sink.records


def unpatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """hypercorn's own methods back in place (for this test only)."""
    monkeypatch.setattr(StreamBuffer, "pop", hypercorn_fixes.original_pop)
    monkeypatch.setattr(H2Protocol, "_handle_events", hypercorn_fixes.original_handle_events)
    monkeypatch.setattr(H11Protocol, "__init__", hypercorn_fixes.original_h11_init)
    monkeypatch.setattr(
        H11Protocol, "_send_error_response", hypercorn_fixes.original_send_error_response
    )
    monkeypatch.setattr(H2Protocol, "_priority_updated", hypercorn_fixes.original_priority_updated)
    monkeypatch.setattr(H2Protocol, "initiate", hypercorn_fixes.original_initiate)
    monkeypatch.setattr(H2Protocol, "stream_send", hypercorn_fixes.original_stream_send)
    monkeypatch.setattr(H2Protocol, "_send_data", hypercorn_fixes.original_send_data)


# -- H11Protocol: the head cap, bytes after the last request, the error body -----------


def h11_protocol(sent: list[Event] | None = None) -> H11Protocol:
    """A hypercorn HTTP/1.1 protocol (not connected to anything), built by
    whatever ``H11Protocol.__init__`` is installed; what it sends goes to
    ``sent``."""

    async def send(event: Event) -> None:
        if sent is not None:
            sent.append(event)

    app: Any = None  # nothing here reaches the app
    task_group: Any = None
    return H11Protocol(
        app, Config(), WorkerContext(None), task_group, ConnectionState({}), False, None, None,
        send,
    )  # fmt: skip


def test_canary_hypercorn_h11_connection_still_lets_a_whole_head_over_the_cap_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hypercorn's own H11Protocol.__init__ (unpatched) still gives a plain h11
    connection, which takes a complete head of 60 KB although
    ``h11_max_incomplete_size`` is 16 KiB: h11 checks it only on an
    incomplete one.  If this fails, hypercorn (or h11) fixed it: drop that
    half of fix 3 (or re-pin FIXED_VERSION)."""
    assert hypercorn_fixes.original_h11_init.__module__ == "hypercorn.protocol.h11"
    monkeypatch.setattr(H11Protocol, "__init__", hypercorn_fixes.original_h11_init)
    connection = h11_protocol().connection
    assert isinstance(connection, h11.Connection)
    connection.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 60_000 + b"\r\n\r\n")
    assert isinstance(connection.next_event(), h11.Request)


def test_canary_hypercorn_h11_connection_still_raises_on_bytes_after_the_last_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hypercorn's own connection still raises (which hypercorn answers with
    400, in place of the app's response) on a request pipelined behind a
    ``Connection: close`` one.  If this fails: drop that half of fix 3."""
    monkeypatch.setattr(H11Protocol, "__init__", hypercorn_fixes.original_h11_init)
    connection = h11_protocol().connection
    first = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    connection.receive_data(first + b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert isinstance(connection.next_event(), h11.Request)
    assert isinstance(connection.next_event(), h11.EndOfMessage)
    with pytest.raises(h11.RemoteProtocolError):
        connection.next_event()


@pytest.mark.usefixtures("fixed")
def test_fixed_h11_connection_caps_a_whole_head_and_drops_bytes_after_the_last_request() -> None:
    """With fix 3: a complete head of exactly the cap is taken, one byte more
    is refused (431, as h11's own check), and bytes after a closing request
    are dropped (the connection then waits for the EOF)."""
    cap = Config().h11_max_incomplete_size
    start, end = b"GET / HTTP/1.1\r\nhost: x\r\nx-pad: ", b"\r\n\r\n"
    for size, ok in ((cap, True), (cap + 1, False)):
        connection = h11_protocol().connection
        assert isinstance(connection, hypercorn_fixes.ServerH11Connection)
        connection.receive_data(start + b"a" * (size - len(start) - len(end)) + end)
        if ok:
            assert isinstance(connection.next_event(), h11.Request)
        else:
            with pytest.raises(h11.RemoteProtocolError) as caught:
                connection.next_event()
            assert caught.value.error_status_hint == 431
            assert connection.their_state is h11.ERROR
    connection = h11_protocol().connection
    first = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    connection.receive_data(first + b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert isinstance(connection.next_event(), h11.Request)
    assert isinstance(connection.next_event(), h11.EndOfMessage)
    assert connection.next_event() is h11.NEED_DATA  # the second request is gone
    connection.receive_data(b"more")
    assert connection.next_event() is h11.NEED_DATA
    connection.receive_data(b"")
    assert isinstance(connection.next_event(), h11.ConnectionClosed)


async def test_canary_hypercorn_still_answers_a_refused_request_with_an_empty_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hypercorn's own H11Protocol._send_error_response still answers with an
    empty body (not the OpenAI error body).  If this fails: look again at fix 4."""
    original = hypercorn_fixes.original_send_error_response
    assert original.__module__ == "hypercorn.protocol.h11"
    monkeypatch.setattr(H11Protocol, "_send_error_response", original)
    sent: list[Event] = []
    await h11_protocol(sent)._send_error_response(400)
    wire = b"".join(e.data for e in sent if isinstance(e, RawData))
    assert wire.startswith(b"HTTP/1.1 400 ")
    assert wire.endswith(b"\r\n\r\n")  # the head, and no body
    assert b"content-length: 0\r\n" in wire
