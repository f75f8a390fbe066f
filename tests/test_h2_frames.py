"""What an HTTP/2 peer can make the server do with the frames it may send (issue 18, item 1).

Each frame type a client can put on the wire is sent in bulk (1,000 of it)
on a connection of its own, against a real server (h2c by prior knowledge,
127.0.0.1): what the protocol allows keeps the connection serving; what it
forbids ends that connection with GOAWAY; nothing ends the server, and a
stream on a sibling connection runs to its end meanwhile.  The peer is the
``h2`` library as a raw client over a plain trio socket, with the frames
``h2`` would refuse to send built by ``hyperframe``.

Also here: idle h2c connections are closed after the keep-alive timeout,
with GOAWAY (docs/api.md section 3.9).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import partial
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import orjson
import pytest
import trio
import trio.testing
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PushPromiseFrame,
    RstStreamFrame,
    WindowUpdateFrame,
)

from tests.conftest import running_server, tasks_living
from trio_stream import Settings, mocktext
from trio_stream.load.h2 import open_h2_connection
from trio_stream.sse import SSEDecoder
from trio_stream.store import open_store

BULK = 1000  # frames of one type on one connection
EXCHANGE_BOUND = 10.0  # seconds for one connection's flood and its answers (real time)
KEEP_ALIVE = 5.0  # server.hypercorn_config: keep_alive_timeout
CHAT = "/v1/chat/completions"
SIBLING_TOKENS = 300  # at 10 ms: the sibling stream outlives most of the floods


class Peer:
    """One raw h2c connection: ``h2`` as the client, plus hand-made frames.

    ``events`` are the client's ``h2`` events so far; ``eof`` whether the
    server closed the connection.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.events: list[h2.events.Event] = []
        self.statuses: dict[int, int] = {}  # stream id -> response status
        self.ends: set[int] = set()  # streams ended or reset by the server
        self.eof = False

    @classmethod
    async def open(cls, port: int) -> Peer:
        """Connect and send the preface and SETTINGS."""
        peer = cls(await trio.open_tcp_stream("127.0.0.1", port))
        peer.h2.initiate_connection()
        await peer.flush()
        return peer

    async def flush(self) -> None:
        """Send what ``h2`` has queued."""
        if data := self.h2.data_to_send():
            await self.stream.send_all(data)

    async def send_raw(self, frames: list[Frame]) -> None:
        """Send hand-made frames, bypassing the client's state machine."""
        await self.stream.send_all(b"".join(f.serialize() for f in frames))

    async def until(self, done: Callable[[], bool]) -> None:
        """Read until ``done()`` holds or the server closes the connection
        (a reset is a close too)."""
        while not done() and not self.eof:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                self.eof = True
                break
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError:
                continue  # the server's frames after its GOAWAY: only the close matters now
            self.events += events
            for e in events:
                if isinstance(e, h2.events.ResponseReceived):
                    self.statuses[e.stream_id] = int(dict(e.headers or [])[b":status"])
                elif isinstance(e, h2.events.StreamEnded | h2.events.StreamReset):
                    self.ends.add(e.stream_id)
            await self.flush()  # ACKs h2 owes the server

    def has_settings(self) -> bool:
        """Has the server's SETTINGS frame arrived?"""
        return any(isinstance(e, h2.events.RemoteSettingsChanged) for e in self.events)

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        found = [e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)]
        return found[0] if found else None

    def ended(self, stream_id: int) -> bool:
        return stream_id in self.ends

    def status(self, stream_id: int) -> int | None:
        return self.statuses.get(stream_id)

    def get(self, stream_id: int, path: str = "/healthz") -> None:
        """Queue ``GET path`` on ``stream_id`` (sent by the next :meth:`flush`)."""
        headers = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "x")]
        self.h2.send_headers(stream_id, headers, end_stream=True)

    async def healthz(self, stream_id: int) -> int | None:
        """GET /healthz on ``stream_id`` of this connection; its status (None: no answer)."""
        self.get(stream_id)
        await self.flush()
        await self.until(lambda: self.ended(stream_id))
        return self.status(stream_id)

    async def aclose(self) -> None:
        await self.stream.aclose()


def unknown_frame(stream_id: int, payload: bytes = b"x") -> bytes:
    """A frame of type 0xFA (none RFC 9113 defines), built by hand."""
    return len(payload).to_bytes(3, "big") + b"\xfa\x00" + stream_id.to_bytes(4, "big") + payload


def split_headers(encoded: bytes, continuations: int) -> list[Frame]:
    """One HEADERS frame ``h2`` encoded, re-cut into a HEADERS frame and
    ``continuations`` CONTINUATION frames carrying its header block (the
    HPACK state stays the client's own, so the connection can go on)."""
    frame, length = Frame.parse_frame_header(memoryview(encoded[:9]))
    assert isinstance(frame, HeadersFrame)
    assert len(encoded) == 9 + length
    frame.parse_body(memoryview(encoded[9:]))
    block = frame.data
    size, extra = divmod(len(block), continuations + 1)
    assert size > 0
    cuts = [i * size + min(i, extra) for i in range(continuations + 2)]
    chunks = [block[a:b] for a, b in itertools.pairwise(cuts)]
    flags = ["END_STREAM"] if "END_STREAM" in frame.flags else []
    frames: list[Frame] = [HeadersFrame(frame.stream_id, data=chunks[0], flags=flags)]
    for i, chunk in enumerate(chunks[1:], start=2):
        last = ["END_HEADERS"] if i == len(chunks) else []
        frames.append(ContinuationFrame(frame.stream_id, data=chunk, flags=last))
    return frames


# -- the floods: each gets a fresh connection; returns what it expects --------------------
# "serving": the connection must still answer GET /healthz afterwards.
# "goaway": the server must end the connection with GOAWAY(PROTOCOL_ERROR).
# "closed": the server must close the connection (the client said GOAWAY itself).


async def priority(peer: Peer) -> str:
    """PRIORITY for streams 1, 3, 5, ... (weight 16, no dependency): the
    crash of the issue (a tree of at most 1,000 streams in hypercorn)."""
    for i in range(BULK):
        peer.h2.prioritize(2 * i + 1, weight=16)
    await peer.flush()
    await peer.healthz(2 * BULK + 1)
    return "serving"


async def priority_of_closed_streams(peer: Peer) -> str:
    """The well-behaved variant: 1,001 requests, each followed by a PRIORITY
    frame for its closed stream (in rounds of 50 streams, under the server's
    100 concurrent streams)."""
    sid, rounds = 1, (BULK + 1 + 49) // 50
    for _ in range(rounds):
        ids = list(range(sid, sid + 100, 2))
        for i in ids:
            peer.get(i)
        await peer.flush()
        await peer.until(partial(peer.ends.issuperset, ids))
        assert [peer.status(i) for i in ids] == [200] * len(ids)
        for i in ids:
            peer.h2.prioritize(i, weight=16)
        sid += 100
    await peer.flush()
    await peer.healthz(sid)
    return "serving"


async def settings(peer: Peer) -> str:
    for _ in range(BULK):
        peer.h2.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 4096})
    await peer.flush()
    await peer.healthz(1)
    return "serving"


async def ping(peer: Peer) -> str:
    for i in range(BULK):
        peer.h2.ping(i.to_bytes(8, "big"))
    await peer.flush()
    await peer.healthz(1)
    return "serving"


async def window_update(peer: Peer) -> str:
    for _ in range(BULK):
        peer.h2.increment_flow_control_window(1)
    await peer.flush()
    await peer.healthz(1)
    return "serving"


async def unknown_frame_type(peer: Peer) -> str:
    """Frames of an unknown type are ignored (RFC 9113 section 4.1), on the
    connection and on streams never opened."""
    await peer.stream.send_all(b"".join(unknown_frame(2 * i % 7) for i in range(BULK)))
    await peer.healthz(1)
    return "serving"


async def headers(peer: Peer) -> str:
    """100 requests at once (the server's concurrent-stream limit), then one
    whose header block comes in a HEADERS frame and 60 CONTINUATION frames."""
    ids = list(range(1, 201, 2))
    for i in ids:
        peer.get(i)
    await peer.flush()
    await peer.until(lambda: peer.ends.issuperset(ids))
    assert [peer.status(i) for i in ids] == [200] * len(ids)
    await peer.send_raw(padded_get(peer, 201, 60))
    await peer.until(lambda: peer.ended(201))
    assert peer.status(201) == 200
    return "serving"


async def continuation(peer: Peer) -> str:
    """A header block cut into a HEADERS frame and 1,000 CONTINUATION frames:
    ``h2`` refuses more than 64 (``frame_buffer.CONTINUATION_BACKLOG``), a
    connection error."""
    await peer.send_raw(padded_get(peer, 1, BULK))
    return "goaway"


def padded_get(peer: Peer, stream_id: int, continuations: int) -> list[Frame]:
    """``GET /healthz`` with ~10 KB of headers, as a HEADERS frame and
    ``continuations`` CONTINUATION frames."""
    pad = [NeverIndexedHeaderTuple("x-pad", "p" * 100)] * 100  # never indexed: 10 KB of block
    pseudo = [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"), (":authority", "x")]
    peer.h2.send_headers(stream_id, [*pseudo, *pad], end_stream=True)
    return split_headers(peer.h2.data_to_send(), continuations)


async def answered_stream(peer: Peer) -> None:
    assert await peer.healthz(1) == 200


async def rst_stream_of_a_closed_stream(peer: Peer) -> str:
    await answered_stream(peer)
    await peer.send_raw([RstStreamFrame(1, error_code=8) for _ in range(BULK)])
    await peer.healthz(3)
    return "serving"


async def data_of_a_closed_stream(peer: Peer) -> str:
    await answered_stream(peer)
    await peer.send_raw([DataFrame(1, data=b"x") for _ in range(BULK)])
    await peer.healthz(3)
    return "serving"


async def rst_stream_of_idle_streams(peer: Peer) -> str:
    await peer.send_raw([RstStreamFrame(2 * i + 1, error_code=8) for i in range(BULK)])
    return "goaway"


async def data_of_idle_streams(peer: Peer) -> str:
    await peer.send_raw([DataFrame(2 * i + 1, data=b"x") for i in range(BULK)])
    return "goaway"


async def window_update_of_idle_streams(peer: Peer) -> str:
    await peer.send_raw([WindowUpdateFrame(2 * i + 1, window_increment=1) for i in range(BULK)])
    return "goaway"


async def push_promise_from_a_client(peer: Peer) -> str:
    """Only a server may push (RFC 9113 section 8.4): a connection error."""
    block = b"\x82\x84\x86"  # :method GET, :path /, :scheme http (static table)
    frames: list[Frame] = [HeadersFrame(1, data=block + b"\x41\x01x", flags=["END_HEADERS"])]
    frames += [
        PushPromiseFrame(1, promised_stream_id=2 * i + 2, data=block, flags=["END_HEADERS"])
        for i in range(BULK)
    ]
    await peer.send_raw(frames)
    return "goaway"


async def goaway(peer: Peer) -> str:
    await peer.send_raw([GoAwayFrame(0, last_stream_id=0, error_code=0) for _ in range(BULK)])
    return "closed"


FLOODS = [
    priority, priority_of_closed_streams, settings, ping, window_update, unknown_frame_type,
    headers, continuation, rst_stream_of_a_closed_stream, data_of_a_closed_stream,
    rst_stream_of_idle_streams, data_of_idle_streams, window_update_of_idle_streams,
    push_promise_from_a_client, goaway,
]  # fmt: skip


def chat(content: str, max_tokens: int) -> bytes:
    messages = [{"role": "user", "content": content}]
    return orjson.dumps({"model": "m", "messages": messages, "stream": True,
                         "max_tokens": max_tokens})  # fmt: skip


async def test_every_frame_type_in_bulk_ends_at_most_its_own_connection(tmp_path: Path) -> None:
    """Each frame type a client can send, 1,000 of it on one h2c connection:
    PRIORITY (for new streams, and for closed ones after 1,001 requests),
    SETTINGS, PING, WINDOW_UPDATE, unknown frame types, HEADERS (100 at once,
    and one cut into 1,000 CONTINUATION frames), RST_STREAM and DATA for
    closed streams -- all of which the connection survives and still answers
    a request after -- and RST_STREAM, DATA and WINDOW_UPDATE for streams never
    opened, and PUSH_PROMISE from a client -- which end that connection with
    GOAWAY(PROTOCOL_ERROR) -- and GOAWAY, which ends it.  Meanwhile a stream
    on a sibling connection completes with the exact text, no connection
    crashed, the server still serves a new connection, and no task is left.
    (Before the fix the first flood, PRIORITY, ended the process.)"""
    s = Settings(port=0, db=str(tmp_path / "t.db"), mock_delay_ms=10)
    async with running_server(s) as server:
        baseline = await tasks_living()
        async with open_h2_connection("127.0.0.1", server.port) as sibling:
            stream = await sibling.request(
                "POST", CHAT, [("content-type", "application/json")],
                chat("the sibling", SIBLING_TOKENS),
            )  # fmt: skip
            assert await stream.response() == 200
            outcomes: dict[str, tuple[str, bool, int | None]] = {}
            for flood in FLOODS:
                with trio.fail_after(EXCHANGE_BOUND):
                    peer = await Peer.open(server.port)
                    try:
                        await peer.until(peer.has_settings)
                        expect = await flood(peer)
                        if expect != "serving":
                            await peer.until(lambda: False)  # until the server closes it
                        term = peer.goaway()
                        code = None if term is None else term.error_code
                        outcomes[flood.__name__] = (expect, peer.eof, code)
                    finally:
                        await peer.aclose()
            text, events = "", SSEDecoder()
            with trio.fail_after(EXCHANGE_BOUND):
                while (chunk := await stream.receive()) is not None:
                    for event in events.feed(chunk):
                        if event.data.startswith('{"id"'):
                            delta = orjson.loads(event.data)["choices"][0]["delta"]
                            text += delta.get("content") or ""
        messages = [{"role": "user", "content": "the sibling"}]
        assert text == mocktext.expected_text(messages, SIBLING_TOKENS)
        for name, (expect, eof, code) in outcomes.items():
            if expect == "serving":
                assert (eof, code) == (False, None), name
            elif expect == "goaway":
                assert (eof, code) == (True, h2.errors.ErrorCodes.PROTOCOL_ERROR), name
            else:
                assert eof, name
        assert server.logs.events("connection_crashed") == []
        with trio.fail_after(EXCHANGE_BOUND):
            peer = await Peer.open(server.port)
            assert await peer.healthz(1) == 200
            await peer.aclose()
            await server.service.wait_streams_closed()
        assert await tasks_living() == baseline


# -- idle h2c connections ---------------------------------------------------------------


async def idle_until_closed(peer: Peer) -> float:
    """Read until the server closes the connection; the trio time it did."""
    await peer.until(lambda: False)
    assert peer.eof
    return trio.current_time()


async def test_an_h2c_connection_without_streams_gets_goaway_after_keep_alive(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An h2c (prior knowledge) connection that opens no stream is closed
    exactly ``keep_alive_timeout`` (5 s) after it opened, with
    GOAWAY(NO_ERROR, last stream 0) first; PINGs do not keep it open.
    (Before the fix it was never closed: the HTTP/1.1 protocol stopped the
    idle timer when it read the preface, and nothing re-armed it.)"""
    s = Settings(port=0, db=str(tmp_path / "t.db"))
    async with running_server(s, store=open_store(s.db, threaded=False)) as server:
        quiet = await Peer.open(server.port)
        pinging = await Peer.open(server.port)
        opened = trio.current_time()
        closed: dict[str, float] = {}

        async def pings() -> None:
            with trio.move_on_after(KEEP_ALIVE + 1):
                while True:
                    await trio.sleep(1)
                    if pinging.eof:
                        return
                    pinging.h2.ping(b"12345678")
                    await pinging.flush()

        async def close_time(name: str, peer: Peer) -> None:
            closed[name] = await idle_until_closed(peer)

        with trio.fail_after(KEEP_ALIVE + 5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(close_time, "quiet", quiet)
                nursery.start_soon(close_time, "pinging", pinging)
                nursery.start_soon(pings)
        for name, peer in (("quiet", quiet), ("pinging", pinging)):
            term = peer.goaway()
            assert term is not None, name
            assert (term.error_code, term.last_stream_id) == (h2.errors.ErrorCodes.NO_ERROR, 0)
            assert closed[name] - opened == pytest.approx(KEEP_ALIVE, abs=0.01), name
            await peer.aclose()


async def test_an_h2c_connection_is_closed_after_keep_alive_once_its_streams_end(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An h2c connection is not closed while a stream is open (here one
    longer than ``keep_alive_timeout``); once its last stream has ended it is
    closed ``keep_alive_timeout`` later, with GOAWAY(NO_ERROR) naming that
    last stream.  (The restart after a stream is ``connection.IdleTimer``'s;
    before it, and before the GOAWAY, the connection stayed open.)"""
    s = Settings(port=0, db=str(tmp_path / "t.db"), mock_delay_ms=100)
    async with running_server(s, store=open_store(s.db, threaded=False)) as server:
        peer = await Peer.open(server.port)
        body = chat("longer than the keep-alive", 80)  # 8 s of tokens
        peer.h2.send_headers(
            1, [(":method", "POST"), (":path", CHAT), (":scheme", "http"), (":authority", "x"),
                ("content-type", "application/json"), ("content-length", str(len(body)))],
        )  # fmt: skip
        peer.h2.send_data(1, body, end_stream=True)
        await peer.flush()
        with trio.fail_after(20):
            await peer.until(lambda: peer.ended(1))
            ended = trio.current_time()
            assert peer.status(1) == 200
            assert not peer.eof
            closed = await idle_until_closed(peer)
        term = peer.goaway()
        assert term is not None
        assert (term.error_code, term.last_stream_id) == (h2.errors.ErrorCodes.NO_ERROR, 1)
        assert closed - ended == pytest.approx(KEEP_ALIVE, abs=0.05)
        await peer.aclose()
