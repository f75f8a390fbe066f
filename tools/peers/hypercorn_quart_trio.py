"""Peer: hypercorn (trio worker) + quart-trio with a naive async-generator body.

The baseline the issue names: what a Quart user writes first -- an async
generator that sleeps and yields SSE bytes, returned as the response body.
``RESPONSE_TIMEOUT`` is lifted (quart-trio would cut a stream at 60 s) and
the listen backlog matches uvicorn's (hypercorn's default of 100 drops SYNs
under a burst of 1,000 connections).  Tokens are paced as trio-stream's mock
paces them (one shared :class:`Ticker` timer), so the simulated upstream costs
the same in every trio server.

    python tools/peers/hypercorn_quart_trio.py --port 8002 --delay-ms 0
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from tools.peers._mock import MockReply, parse_args
from trio_stream.upstream.mock import Ticker


def make_app(delay: float, ticker: Ticker) -> QuartTrio:
    app = QuartTrio(__name__)
    app.config["RESPONSE_TIMEOUT"] = None

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        reply = MockReply.from_body(await request.get_data())

        async def body() -> AsyncIterator[bytes]:
            for i in range(len(reply.tokens)):
                if delay:
                    await ticker.sleep(delay)
                else:
                    await trio.lowlevel.checkpoint()
                yield reply.event(i)
            yield reply.tail()

        return Response(body(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def main() -> None:
    args = parse_args(__doc__ or "")
    config = Config()
    config.bind = [f"{args.host}:{args.port}"]
    config.accesslog = None
    config.backlog = 2048
    trio.run(serve_app, args.delay_ms / 1000, config)


async def serve_app(delay: float, config: Config) -> None:
    ticker = Ticker()
    async with trio.open_nursery() as nursery:
        await nursery.start(ticker.run)
        await serve(make_app(delay, ticker), config)


if __name__ == "__main__":
    main()
