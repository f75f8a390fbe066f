"""Peer: uvicorn + starlette + sse-starlette serving the mock stream.

What a user of that stack writes: an async generator of event dicts handed to
``EventSourceResponse``.  ``sep="\\n"`` makes the bytes match trio-stream's
(sse-starlette's default line separator is ``\\r\\n``).

    python tools/peers/uvicorn_sse_starlette.py --port 8001 --delay-ms 0
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from tools.peers._mock import MockReply, parse_args


def make_app(delay: float) -> Starlette:
    async def chat_completions(request: Request) -> EventSourceResponse:
        reply = MockReply.from_body(await request.body())

        async def events() -> AsyncIterator[dict[str, Any]]:
            for i in range(len(reply.tokens)):
                await asyncio.sleep(delay)  # sleep(0): the one checkpoint per token
                yield {"id": str(i + 1), "data": reply.chunk(i).decode()}
            yield {"data": reply.finish_chunk().decode()}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events(), sep="\n")

    return Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"])])


def main() -> None:
    args = parse_args(__doc__ or "")
    app = make_app(args.delay_ms / 1000)
    # asyncio and h11, as measured before uvloop and httptools were bench extras
    # (uvicorn's "auto" would pick those now); the relay peer uses them.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                loop="asyncio", http="h11")  # fmt: skip


if __name__ == "__main__":
    main()
