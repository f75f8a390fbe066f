"""The direct DATA path of HTTP/2 streams (``server.h2direct``), over h2c and TLS.

The unit tests hold the frame encoding to ``h2``'s own ``send_data`` and the
synchronous TLS write to ``trio.SSLStream``'s own records; the integration
tests run the real server on real sockets, with :mod:`trio_stream.load.h2`
as the client, whose flow control is honest (a stream's window is credited
only when its chunks are read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import orjson
import pytest
import trio
import trio.testing
from hypercorn.protocol.h2 import H2Protocol, StreamBuffer
from hypercorn.trio.worker_context import EventWrapper
from priority import priority

from tests.conftest import running_server, tasks_living, waitable_server
from tests.protocols import client_context, h2_context, server_context, serving
from trio_stream import Settings
from trio_stream.http import transport
from trio_stream.load.h2 import H2Connection, H2Stream, open_h2_connection
from trio_stream.server import h2direct
from trio_stream.upstream import mocktext
from trio_stream.wire.sse import SSEDecoder

CHAT = "/v1/chat/completions"
JSON_HEADERS = [("content-type", "application/json")]


# --- the frame: h2's bytes, h2's bookkeeping ---------------------------------------------


def _server_with_open_stream() -> h2.connection.H2Connection:
    """A server-side ``h2`` connection with stream 1 open (request headers received)."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":path", "/"), (":scheme", "http"),
                            (":authority", "x")])  # fmt: skip
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    server.data_to_send()
    return server


def test_encoded_frame_is_what_h2_send_data_makes() -> None:
    """``encode_data`` writes the bytes ``H2Connection.send_data`` writes and
    leaves the same windows and stream state: for two chunks in a row."""
    ours, theirs = _server_with_open_stream(), _server_with_open_stream()
    for chunk in (b"data: {}\n\n", b"x" * 1000):
        assert h2direct.encode_data(ours, 1, chunk)
        theirs.send_data(1, chunk)
        assert ours.data_to_send() == theirs.data_to_send()
        assert ours.local_flow_control_window(1) == theirs.local_flow_control_window(1)
        assert ours.outbound_flow_control_window == theirs.outbound_flow_control_window
        assert ours.streams[1].state_machine.state == theirs.streams[1].state_machine.state


def test_encode_declines_what_does_not_fit_and_changes_nothing() -> None:
    """A chunk larger than the window or a frame, or for an unknown stream, is
    declined with no byte and no window change (hypercorn's path sends it);
    a stream whose sending half is closed raises h2's ProtocolError, as
    ``send_data`` does."""
    conn = _server_with_open_stream()
    window = conn.local_flow_control_window(1)
    assert not h2direct.encode_data(conn, 1, b"x" * (window + 1))
    assert not h2direct.encode_data(conn, 1, b"x" * (conn.max_outbound_frame_size + 1))
    assert not h2direct.encode_data(conn, 3, b"x")
    assert conn.data_to_send() == b""
    assert conn.local_flow_control_window(1) == window
    conn.send_headers(1, [(":status", "200")], end_stream=True)
    with pytest.raises(h2.exceptions.ProtocolError):
        h2direct.encode_data(conn, 1, b"x")


def test_encoded_last_frame_is_what_h2_send_data_makes_with_end_stream() -> None:
    """``encode_data(..., end_stream=True)`` -- the direct end of a body --
    writes the bytes ``send_data(..., end_stream=True)`` writes (the
    ``END_STREAM`` flag on the chunk's own frame) and leaves the same windows
    and stream state, with a payload and without one; afterwards both refuse
    more DATA on the stream with h2's ``ProtocolError``."""
    for last in (b"data: [DONE]\n\n", b""):
        ours, theirs = _server_with_open_stream(), _server_with_open_stream()
        assert h2direct.encode_data(ours, 1, b"first", False)
        theirs.send_data(1, b"first")
        assert h2direct.encode_data(ours, 1, last, True)
        theirs.send_data(1, last, end_stream=True)
        assert ours.data_to_send() == theirs.data_to_send()
        assert ours.local_flow_control_window(1) == theirs.local_flow_control_window(1)
        assert ours.outbound_flow_control_window == theirs.outbound_flow_control_window
        assert ours.streams[1].state_machine.state == theirs.streams[1].state_machine.state
        with pytest.raises(h2.exceptions.ProtocolError):
            h2direct.encode_data(ours, 1, b"more")
        with pytest.raises(h2.exceptions.ProtocolError):
            theirs.send_data(1, b"more")


class _Protocol:
    """What ``DirectData`` and ``Flusher`` read of hypercorn's ``H2Protocol``: its
    ``h2`` connection, its stream buffers (hypercorn's own ``StreamBuffer`` with
    the trio worker's event class) and a task group that only records spawns."""

    def __init__(self) -> None:
        self.connection = _server_with_open_stream()
        self.stream_buffers = {1: StreamBuffer(EventWrapper)}
        self.closed = False
        self.spawned: list[object] = []
        self.task_group = self
        # What finish_ended reads too: the send task's event, the priority
        # tree with stream 1 in it, blocked (as _create_stream leaves it).
        self.has_data = EventWrapper()
        self.priority = priority.PriorityTree()
        self.priority.insert_stream(1)
        self.priority.block(1)

    def spawn(self, fn: object) -> None:
        self.spawned.append(fn)


def _direct(protocol: _Protocol, lock: trio.Lock) -> h2direct.DirectData:
    async def broken() -> None:
        raise AssertionError("nothing is written here")

    link = transport.Link(cast(Any, None), lock, broken)
    flusher = h2direct.Flusher(link, cast(Any, protocol))
    return h2direct.DirectData(flusher, cast(Any, protocol), 1)


async def test_bytes_left_in_hypercorns_buffer_go_first_with_the_next_chunk() -> None:
    """A chunk declined while the send lock is held goes to hypercorn's
    ``StreamBuffer`` (as the caller's ASGI send does).  The stream's next
    chunk, with the lock free, takes those bytes along in front of its own,
    in one DATA frame, and empties hypercorn's buffer with its events set (a
    later ``drain()``, the end of the body, does not wait): the stream is back
    on the direct path at once, in order, instead of declining for as long
    as hypercorn's send task has not sent the buffer."""
    protocol, lock = _Protocol(), trio.Lock()
    direct = _direct(protocol, lock)
    buffer = protocol.stream_buffers[1]
    async with lock:
        assert not await direct.send(b"one,")
    assert protocol.connection.data_to_send() == b""  # declined: nothing encoded
    await buffer.push(b"one,")  # where the caller's ASGI send puts it
    assert await direct.send(b"two")
    theirs = _server_with_open_stream()
    theirs.send_data(1, b"one,two")
    assert protocol.connection.data_to_send() == theirs.data_to_send()
    assert buffer.buffer == b""
    with trio.fail_after(1):  # its event is set: returns at its checkpoint
        await buffer.drain()
    assert len(protocol.spawned) == 1  # the flusher was woken (its task spawned)


async def test_held_bytes_that_do_not_fit_with_the_chunk_stay_with_hypercorn() -> None:
    """When hypercorn's buffered bytes and the chunk together exceed one
    frame (or the window), the chunk is declined with nothing encoded and the
    buffer untouched: it goes behind them through hypercorn's path."""
    protocol, lock = _Protocol(), trio.Lock()
    direct = _direct(protocol, lock)
    buffer = protocol.stream_buffers[1]
    window = protocol.connection.local_flow_control_window(1)
    held = b"x" * (protocol.connection.max_outbound_frame_size - 2)
    await buffer.push(held)  # below hypercorn's high water: push does not wait
    assert not await direct.send(b"abc")
    assert protocol.connection.data_to_send() == b""
    assert bytes(buffer.buffer) == held
    assert protocol.connection.local_flow_control_window(1) == window


async def test_end_of_body_is_completed_without_the_send_task_only_when_it_is_idle() -> None:
    """``finish_ended`` completes hypercorn's ``EndBody`` of a stream (drops its
    buffer, takes it out of the priority tree) only when hypercorn's send task
    has nothing left to do for it: the buffer is empty, ``h2`` has the sending
    half closed (the direct END_STREAM), and the send task is parked on
    ``has_data`` -- not inside ``_send_data``, where a buffer taken from under it
    would raise ``KeyError`` out of the connection's task.  Otherwise it
    changes nothing and hypercorn's ``stream_send`` does the work."""
    protocol, lock = _Protocol(), trio.Lock()
    direct = _direct(protocol, lock)
    proto = cast(Any, protocol)
    assert not h2direct.finish_ended(proto, 1)  # the stream is still open in h2
    assert await direct.end(b"data: [DONE]\n\n")
    assert not h2direct.finish_ended(proto, 1)  # nobody waits on has_data: the task runs
    async with trio.open_nursery() as nursery:
        nursery.start_soon(protocol.has_data.wait)  # the send task, parked for work
        await trio.testing.wait_all_tasks_blocked()
        await protocol.stream_buffers[1].push(b"x")  # hypercorn still holds bytes
        assert not h2direct.finish_ended(proto, 1)
        await protocol.stream_buffers[1].pop(1)
        assert h2direct.finish_ended(proto, 1)
        assert 1 not in protocol.stream_buffers
        with pytest.raises(priority.MissingStreamError):
            protocol.priority.remove_stream(1)  # already out of the tree
        assert not h2direct.finish_ended(proto, 1)  # done once: nothing left
        await protocol.has_data.set()


async def test_tls_records_written_without_send_all_are_read_in_order(tmp_path: Path) -> None:
    """The synchronous TLS write (``transport._tls_encrypt_nowait``, on trio's
    private ``SSLStream`` state) makes records the peer decrypts, interleaved
    with ``send_all``'s in order; it declines while the inner send lock is held.
    """
    server_ctx, client_ctx = server_context(), client_context()
    a, b = trio.testing.memory_stream_pair()
    server = trio.SSLStream(a, server_ctx, server_side=True)
    client = trio.SSLStream(b, client_ctx, server_hostname="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    await server.send_all(b"one,")  # trio sends the delayed session tickets here
    raw = transport._tls_encrypt_nowait(server, b"two,")
    assert raw is not None
    await a.send_all(raw)
    await server.send_all(b"three")
    received = b""
    while len(received) < len(b"one,two,three"):
        received += await client.receive_some()
    assert received == b"one,two,three"
    async with server._inner_send_lock:
        assert transport._tls_encrypt_nowait(server, b"four") is None


# --- over real sockets: h2c and TLS ------------------------------------------------------


@pytest.fixture(params=["h2c", "h2tls"])
def proto(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def body(content: str, max_tokens: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {"model": "m", "messages": messages, "stream": True, "max_tokens": max_tokens}


async def post(conn: H2Connection, content: str, max_tokens: int) -> H2Stream:
    return await conn.request("POST", CHAT, JSON_HEADERS, orjson.dumps(body(content, max_tokens)))


async def read_text(stream: H2Stream) -> tuple[str, str]:
    """The concatenated delta text of ``stream``, and its last event."""
    decoder = SSEDecoder()
    events = []
    while (chunk := await stream.receive()) is not None:
        events += decoder.feed(chunk)
    chunks = [orjson.loads(e.data) for e in events if e.data.startswith('{"id"')]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks), events[-1].data


def expected(content: str, max_tokens: int) -> str:
    return mocktext.expected_text(body(content, max_tokens)["messages"], max_tokens)


async def twenty_exact_streams(conn: H2Connection, max_tokens: int) -> None:
    """Open 20 streams on ``conn`` at once; each must answer 200 with its exact text."""
    streams = [(i, await post(conn, f"stream {i}", max_tokens)) for i in range(20)]
    for i, st in streams:
        assert await st.response() == 200
        assert await read_text(st) == (expected(f"stream {i}", max_tokens), "[DONE]")


class Counts:
    """How many chunks went the direct way, and in how many writes."""

    def __init__(self) -> None:
        self.direct = 0
        self.declined = 0
        self.writes = 0


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Counts:
    seen = Counts()
    send, write = h2direct.DirectData.send, h2direct._write

    async def counting_send(self: h2direct.DirectData, data: bytes) -> bool:
        done = await send(self, data)
        if done:
            seen.direct += 1
        else:
            seen.declined += 1
        return done

    async def counting_write(link: transport.Link, frames: bytes) -> None:
        seen.writes += 1
        await write(link, frames)

    monkeypatch.setattr(h2direct.DirectData, "send", counting_send)
    monkeypatch.setattr(h2direct, "_write", counting_write)
    return seen


async def test_streams_of_one_connection_share_writes(
    settings: Settings, tmp_path: Path, proto: str, counts: Counts
) -> None:
    """20 streams at once on one connection: every text arrives exact, almost
    every chunk after the first went the direct way, in fewer writes than
    chunks (the frames of streams whose tokens came in the same scheduler
    batch left together), and no task is left once the connection closes."""
    s, ctx = serving(settings, proto, tmp_path), h2_context(proto)
    s = s.replace(mock_delay_ms=20)
    with trio.fail_after(20):
        async with running_server(s) as server:
            baseline = await tasks_living()
            async with open_h2_connection("127.0.0.1", server.port, ctx) as conn:
                await twenty_exact_streams(conn, 40)
            await server.service.wait_streams_closed()
            assert await tasks_living() == baseline
    assert counts.direct >= 20 * 30
    assert counts.writes < counts.direct


def _record_protocols(monkeypatch: pytest.MonkeyPatch) -> list[H2Protocol]:
    """Every hypercorn ``H2Protocol`` made from now on (the connections' HTTP/2 state)."""
    made: list[H2Protocol] = []
    init = H2Protocol.__init__

    def recording_init(self: H2Protocol, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(H2Protocol, "__init__", recording_init)
    return made


async def test_heads_first_chunks_and_ends_skip_hypercorns_send_task(
    settings: Settings, tmp_path: Path, proto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 streams on one connection: after each HEADERS frame (hypercorn's),
    every chunk -- the first one too -- and the stream's END_STREAM go the
    direct way, and the end of each body is completed without hypercorn's
    send task: that task never sends a frame (``_send_data`` is never called),
    every text arrives exact and ends, and no task is left.  Through
    hypercorn's path each stream cost the send task a wake-up, a walk of the
    priority tree and a write for its first chunk, for its last, and for its
    END_STREAM."""
    called = {"send_data": 0, "finished": 0}
    send_data, finish = H2Protocol._send_data, h2direct.finish_ended

    async def counting_send_data(self: H2Protocol, stream_id: int) -> None:
        called["send_data"] += 1
        await send_data(self, stream_id)

    def counting_finish(protocol: H2Protocol, stream_id: int) -> bool:
        done = finish(protocol, stream_id)
        called["finished"] += done
        return done

    monkeypatch.setattr(H2Protocol, "_send_data", counting_send_data)
    monkeypatch.setattr(h2direct, "finish_ended", counting_finish)
    protocols = _record_protocols(monkeypatch)
    s, ctx = serving(settings, proto, tmp_path), h2_context(proto)
    s = s.replace(mock_delay_ms=10)
    with trio.fail_after(20):
        async with running_server(s) as server:
            baseline = await tasks_living()
            async with open_h2_connection("127.0.0.1", server.port, ctx) as conn:
                await twenty_exact_streams(conn, 20)
                await server.service.wait_streams_closed()
                await trio.testing.wait_all_tasks_blocked()
                assert [p.stream_buffers for p in protocols] == [{}]  # nothing left behind
            assert await tasks_living() == baseline
    assert called == {"send_data": 0, "finished": 20}


async def test_a_direct_end_that_hypercorn_completes_still_ends_every_stream(
    settings: Settings, tmp_path: Path, proto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When ``finish_ended`` declines (its send task busy), hypercorn's own path
    completes the ``EndBody`` of a stream whose ``END_STREAM`` already went out
    directly: its send task finds the stream ended in ``h2``, drops the buffer
    and releases the writer's ``drain`` -- every stream ends, exact, the
    connection serves the next ones, and hypercorn holds no buffer for any
    of them afterwards (its per-stream state is freed on a connection that
    lives on)."""
    monkeypatch.setattr(h2direct, "finish_ended", lambda protocol, stream_id: False)
    protocols = _record_protocols(monkeypatch)
    s, ctx = serving(settings, proto, tmp_path), h2_context(proto)
    s = s.replace(mock_delay_ms=5)
    with trio.fail_after(20):
        async with running_server(s) as server:
            baseline = await tasks_living()
            async with open_h2_connection("127.0.0.1", server.port, ctx) as conn:
                for batch in range(2):
                    streams = [(i, await post(conn, f"s{batch}.{i}", 10)) for i in range(10)]
                    for i, st in streams:
                        assert await read_text(st) == (expected(f"s{batch}.{i}", 10), "[DONE]")
                await server.service.wait_streams_closed()
                await trio.testing.wait_all_tasks_blocked()
                assert [p.stream_buffers for p in protocols] == [{}]
            assert await tasks_living() == baseline


async def test_streams_starting_together_all_stay_on_the_direct_path(
    settings: Settings, tmp_path: Path, proto: str, counts: Counts
) -> None:
    """50 streams started at once on one connection, while their heads are
    being written: not one chunk is declined (each stream's last
    chunk goes through ``DirectData.end``, which this does not count).
    hypercorn's own ``protocol_send`` held the send lock across its schedule
    points, so chunks that came while it wrote
    found the lock held and took hypercorn's path -- under load nearly all of
    them (docs/design.md section 15)."""
    s, ctx = serving(settings, proto, tmp_path), h2_context(proto)
    s = s.replace(mock_delay_ms=2)
    with trio.fail_after(30):
        async with (
            running_server(s) as server,
            open_h2_connection("127.0.0.1", server.port, ctx) as conn,
        ):
            streams = [(i, await post(conn, f"stream {i}", 30)) for i in range(50)]
            for i, st in streams:
                assert await st.response() == 200
                assert await read_text(st) == (expected(f"stream {i}", 30), "[DONE]")
    assert counts.direct > 50 * 20
    assert counts.declined == 0


async def test_small_window_stalled_stream_does_not_hold_its_sibling(
    settings: Settings, tmp_path: Path, proto: str, counts: Counts
) -> None:
    """With a 2,000-byte stream window, a stream nobody reads stops at its
    window while its sibling on the same connection streams to the end; then
    reading the stalled one credits its window (WINDOW_UPDATE) and it too
    arrives whole, in order -- its chunks went the direct way while they fit,
    and through hypercorn's flow-controlled path when they did not."""
    s, ctx = serving(settings, proto, tmp_path), h2_context(proto)
    s = s.replace(mock_delay_ms=1)
    with trio.fail_after(20):
        async with (
            waitable_server(s) as (server, logs),
            open_h2_connection("127.0.0.1", server.port, ctx, stream_window=2_000) as conn,
        ):
            stalled = await post(conn, "nobody reads me yet", 1000)
            assert await stalled.response() == 200
            record = await logs.wait_for("stream_start")
            run = server.service.runs.runs[record["trace"]]
            while True:  # the writer stops: the window is used up
                cursor = run.writer_cursor
                await trio.sleep(0.2)  # real time: that is what a stall is
                if run.writer_cursor == cursor:
                    break
            # The window (2,000 bytes) and hypercorn's stream buffer (32 KiB)
            # hold a few hundred events of the 1,000.
            assert 0 < cursor < 500
            sibling = await post(conn, "the sibling", 200)
            assert await read_text(sibling) == (expected("the sibling", 200), "[DONE]")
            assert run.writer_cursor == cursor  # still stuck while its sibling ended
            assert await read_text(stalled) == (expected("nobody reads me yet", 1000), "[DONE]")
    assert counts.direct > 0
    assert counts.declined > 0  # the window ran out: hypercorn's path waited for credit


async def test_reset_stream_spares_its_siblings(
    settings: Settings, tmp_path: Path, proto: str
) -> None:
    """Resetting 5 of 10 streams mid-stream on one connection cancels their
    runs (client_disconnect); the other 5 finish with the exact text while the
    direct path writes for them, and the connection serves a new stream."""
    s, ctx = serving(settings, proto, tmp_path), h2_context(proto)
    s = s.replace(mock_delay_ms=5)
    with trio.fail_after(20):
        async with running_server(s) as server:
            async with open_h2_connection("127.0.0.1", server.port, ctx) as conn:
                streams = [(i, await post(conn, f"s{i}", 1000 if i % 2 else 60)) for i in range(10)]
                firsts = {i: await st.receive() for i, st in streams}
                assert all(firsts.values())
                for i, st in streams:
                    if i % 2:
                        await st.reset()
                for i, st in streams:
                    if not i % 2:
                        text, last = await read_text(st)
                        decoder = SSEDecoder()
                        head = [orjson.loads(e.data) for e in decoder.feed(firsts[i] or b"")
                                if e.data.startswith('{"id"')]  # fmt: skip
                        text = "".join(c["choices"][0]["delta"].get("content") or ""
                                       for c in head) + text  # fmt: skip
                        assert (text, last) == (expected(f"s{i}", 60), "[DONE]")
                again = await post(conn, "after", 10)
                assert await read_text(again) == (expected("after", 10), "[DONE]")
            await server.service.runs.wait_idle()
            cancelled = server.logs.events("stream_cancelled", reason="client_disconnect")
            assert len(cancelled) == 5


async def test_graceful_shutdown_ends_every_stream_with_the_shutdown_event(
    settings: Settings, tmp_path: Path, proto: str, counts: Counts
) -> None:
    """A graceful shutdown with 10 streams mid-way on one connection (their
    chunks going the direct way): each stream's text is a prefix of its
    answer, its last event is the ``shutdown`` error (the run's terminal frame
    goes out after every direct chunk), and the server is done within
    --graceful-timeout + 2 s.  Without hypercorn_fixes fix 7 the last stream
    of the connection often got GOAWAY without its END_STREAM."""
    s, ctx = serving(settings, proto, tmp_path), h2_context(proto)
    s = s.replace(mock_delay_ms=10, graceful_timeout=0.5)
    with trio.fail_after(15):
        async with (
            waitable_server(s) as (server, logs),
            open_h2_connection("127.0.0.1", server.port, ctx) as conn,
        ):
            streams = [(i, await post(conn, f"s{i}", 5000)) for i in range(10)]
            for _, st in streams:
                assert await st.receive()  # under way
            direct_before = counts.direct
            server.shutdown.set()
            t0 = trio.current_time()
            results = {}
            for i, st in streams:
                decoder, events = SSEDecoder(), []
                while (chunk := await st.receive()) is not None:
                    events += decoder.feed(chunk)
                results[i] = events
            await logs.wait_for("shutdown_complete")
            assert trio.current_time() - t0 < s.graceful_timeout + 2
    assert counts.direct > direct_before  # the grace period streamed directly
    for i, events in results.items():
        error = orjson.loads(events[-1].data)["error"]
        assert (error["type"], error["code"]) == ("stream_cancelled", "shutdown"), i
        deltas = [orjson.loads(e.data) for e in events if e.data.startswith('{"id"')]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in deltas)
        assert expected(f"s{i}", 5000).find(text) >= 0
    assert {r["reason"] for r in logs.events("stream_cancelled")} == {"shutdown"}
