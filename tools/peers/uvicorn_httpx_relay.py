"""Peer: the thin relay -- uvicorn (uvloop, httptools) + starlette + httpx.

What the least a proxy in that stack does: forward the request body to
``{--upstream-url}/chat/completions`` and relay the SSE reply, event by event
(the lines up to each blank line, one write per event), to the client.  No
sessions, no saving, no cancel, no backpressure window: the floor a full
proxy's cost is measured against.  The httpx pool is unbounded, as
trio-stream's is (httpx's default of 100 connections would queue the rest).

    python tools/peers/uvicorn_httpx_relay.py --port 8004 --upstream-url http://127.0.0.1:9000/v1
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def make_app(upstream_url: str) -> Starlette:
    client = httpx.AsyncClient(
        base_url=upstream_url.rstrip("/"), http1=True, http2=False, trust_env=False,
        timeout=httpx.Timeout(connect=10, read=None, write=10, pool=10),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
    )  # fmt: skip

    async def chat_completions(request: Request) -> Response:
        body = await request.body()
        upstream = client.build_request(
            "POST", "/chat/completions", content=body,
            headers={"content-type": "application/json"},
        )  # fmt: skip
        response = await client.send(upstream, stream=True)
        if response.status_code != 200:
            content = await response.aread()
            await response.aclose()
            return Response(content, response.status_code, media_type="application/json")

        async def events() -> AsyncIterator[bytes]:
            try:
                lines: list[str] = []
                async for line in response.aiter_lines():
                    lines.append(line)
                    if not line:  # the blank line that ends an event
                        yield "\n".join(lines).encode() + b"\n"
                        lines = []
            finally:
                await response.aclose()

        headers = {"cache-control": "no-cache"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-url", required=True, help="http://host:port/v1")
    args = parser.parse_args()
    uvicorn.run(make_app(args.upstream_url), host=args.host, port=args.port,
                log_level="warning", access_log=False, loop="uvloop", http="httptools")  # fmt: skip


if __name__ == "__main__":
    main()
