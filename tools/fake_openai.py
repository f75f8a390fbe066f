"""A fake OpenAI server for the benchmark: the mock reply over real HTTP, at a fixed rate.

``POST /v1/chat/completions`` streams the reply of :mod:`trio_stream.upstream.mocktext`
(the bytes of ``tools/peers/_mock.py``: one ``chat.completion.chunk`` event
per token, a finish chunk, ``data: [DONE]``), one token every ``--delay-ms``
(20 tokens/s at 50; ``--first-token-ms``: another wait before the first
token, the response's headers going at once), paced on an absolute schedule
from the request's arrival so it never drifts.  ``GET /v1/models`` lists one model.  HTTP/1.1 with
keep-alive and chunked responses; a client closing mid-stream stops its
timer at once.

Built to cost little per token, so it is never the bench's bottleneck: an
asyncio protocol (uvloop when installed), one ``transport.write`` per token
from a loop timer, no framework and no task per stream.

    python tools/fake_openai.py --port 9000 --delay-ms 50

Once it listens it prints ``listening port=N`` on stdout (``--port 0``: a
free port, chosen by the kernel; the tests read it from there).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import cast

import orjson

from tools.peers._mock import MockReply

HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)
MODELS = orjson.dumps({"object": "list", "data": [{"id": "mock", "object": "model"}]})
MAX_HEAD = 65536


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def simple(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
        status.encode(), content_type, len(body), body,
    )  # fmt: skip


class Connection(asyncio.Protocol):
    """One client connection: parse requests one at a time, stream each reply."""

    def __init__(self, delay: float, first: float | None = None) -> None:
        self.delay = delay
        self.first = delay if first is None else first  # the wait for the first token
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.reply: MockReply | None = None  # the reply being streamed, if any
        self.sent = 0
        self.started = 0.0
        self.timer: asyncio.TimerHandle | asyncio.Handle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.reply is None:
            self.next_request()

    def next_request(self) -> None:
        """Answer the requests buffered, up to the first one that streams."""
        while self.reply is None and self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self.transport.close()
                return
            lines = self.buffer[:end].split(b"\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path = lines[0].split(b" ")[:2]
            self.answer(method, path, body)

    def answer(self, method: bytes, path: bytes, body: bytes) -> None:
        assert self.transport is not None
        if method == b"GET" and path.endswith(b"/models"):
            self.transport.write(simple("200 OK", MODELS))
        elif method == b"POST" and path.endswith(b"/chat/completions"):
            try:
                self.reply = MockReply.from_body(body)
            except (ValueError, KeyError, TypeError):
                self.transport.write(simple("400 Bad Request", b'{"error": "bad request"}'))
                return
            self.transport.write(HEAD)
            self.sent = 0
            self.started = self.loop.time()
            self.schedule()
        else:
            self.transport.write(simple("404 Not Found", b'{"error": "not found"}'))

    def schedule(self) -> None:
        if self.delay or self.first:
            at = self.started + self.first + self.sent * self.delay
            self.timer = self.loop.call_at(at, self.tick)
        else:
            self.timer = self.loop.call_soon(self.tick)

    def tick(self) -> None:
        """Send the next token; after the last, the tail and the end of the body."""
        reply, transport = self.reply, self.transport
        if reply is None or transport is None:
            return
        if self.sent < len(reply.tokens):
            transport.write(chunk(reply.event(self.sent)))
            self.sent += 1
            if self.sent < len(reply.tokens):
                self.schedule()
                return
        transport.write(chunk(reply.tail()) + b"0\r\n\r\n")
        self.reply, self.timer = None, None
        self.next_request()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0: any free port (printed)")
    parser.add_argument(
        "--delay-ms", type=float, default=50.0,
        help="gap before each token in ms (50 = 20 tokens/s); 0 = at once",
    )  # fmt: skip
    parser.add_argument(
        "--first-token-ms", type=float,
        help="wait before the first token in ms (default: --delay-ms); the headers go at once",
    )  # fmt: skip
    parser.add_argument("--no-uvloop", action="store_true", help="the stdlib asyncio loop")
    return parser.parse_args(argv)


async def serve(host: str, port: int, delay: float, first: float | None = None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(delay, first), host, port, backlog=4096)
    print(f"listening port={server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    first = None if args.first_token_ms is None else args.first_token_ms / 1000
    coro = serve(args.host, args.port, args.delay_ms / 1000, first)
    if not args.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.run(coro)
            return
    asyncio.run(coro)


if __name__ == "__main__":
    main()
