"""Peer: hypercorn (trio worker) + quart-trio with a naive async-generator body.

The baseline the issue names: what a Quart user writes first -- an async
generator that sleeps and yields SSE bytes, returned as the response body.
``RESPONSE_TIMEOUT`` is lifted (quart-trio would cut a stream at 60 s) and
the listen backlog matches uvicorn's (hypercorn's default of 100 drops SYNs
under a burst of 1,000 connections).

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


def make_app(delay: float) -> QuartTrio:
    app = QuartTrio(__name__)
    app.config["RESPONSE_TIMEOUT"] = None

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        reply = MockReply.from_body(await request.get_data())

        async def body() -> AsyncIterator[bytes]:
            for i in range(len(reply.tokens)):
                if delay:
                    await trio.sleep(delay)
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
    trio.run(serve, make_app(args.delay_ms / 1000), config)


if __name__ == "__main__":
    main()
