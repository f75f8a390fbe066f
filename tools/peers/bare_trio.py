"""Peer: a bare trio socket server writing the same SSE bytes -- the ceiling.

No framework: a hand-written HTTP/1.1 request reader (keep-alive, a
``Content-Length`` body) and a chunked response, one ``send_all`` per event.
It answers ``POST /v1/chat/completions`` and nothing else (404).  Tokens are
paced as trio-stream's mock paces them (one shared :class:`Ticker` timer).  This is the
least work a trio server can do per event; trio-stream's distance from it is
the cost of hypercorn, ASGI and the run machinery.

    python tools/peers/bare_trio.py --port 8003 --delay-ms 0
"""

from __future__ import annotations

from functools import partial

import trio

from tools.peers._mock import MockReply, parse_args
from trio_stream.upstream.mock import Ticker

HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
MAX_HEAD = 65536


class BadRequest(Exception):
    pass


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def read_request(stream: trio.SocketStream, buf: bytearray) -> tuple[bytes, bytes] | None:
    """The next request's first line and body; ``None`` when the client closed."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > MAX_HEAD:
            raise BadRequest("request head too large")
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[: end + 4]
    length = 0
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(buf) < length:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    body = bytes(buf[:length])
    del buf[:length]
    return head[0].encode("latin-1"), body


async def stream_reply(
    stream: trio.SocketStream, reply: MockReply, delay: float, ticker: Ticker
) -> None:
    await stream.send_all(HEAD)
    for i in range(len(reply.tokens)):
        if delay:
            await ticker.sleep(delay)
        else:
            await trio.lowlevel.checkpoint()
        await stream.send_all(chunked(reply.event(i)))
    await stream.send_all(chunked(reply.tail()) + b"0\r\n\r\n")


async def handle(delay: float, ticker: Ticker, stream: trio.SocketStream) -> None:
    buf = bytearray()
    try:
        while (request := await read_request(stream, buf)) is not None:
            first_line, body = request
            if not first_line.startswith(b"POST /v1/chat/completions "):
                await stream.send_all(NOT_FOUND)
                continue
            await stream_reply(stream, MockReply.from_body(body), delay, ticker)
    except (trio.BrokenResourceError, trio.ClosedResourceError, BadRequest, ValueError, KeyError):
        pass  # the client went away or sent garbage: drop the connection
    finally:
        await trio.aclose_forcefully(stream)


async def serve(host: str, port: int, delay: float) -> None:
    ticker = Ticker()
    async with trio.open_nursery() as nursery:
        await nursery.start(ticker.run)
        await trio.serve_tcp(partial(handle, delay, ticker), port, host=host)


def main() -> None:
    args = parse_args(__doc__ or "")
    trio.run(serve, args.host, args.port, args.delay_ms / 1000)


if __name__ == "__main__":
    main()
