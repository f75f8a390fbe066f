"""Ollama: ``POST {url}/api/chat`` streaming NDJSON, mapped to OpenAI chunks.

The completion streams through :class:`~trio_stream.upstream.h1.Pool` (one
socket read and one llhttp parse per read), ``/api/tags`` through httpx.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from typing import Any

import orjson
import trio

from ..config import Settings
from ..wire.request import ChatRequest
from ..wire.sse import LineDecoder
from ._http import get_json, make_client, make_pool
from .base import UpstreamItem
from .h1 import Response
from .wire import StreamState, ollama_items


class OllamaUpstream:
    name = "ollama"

    def __init__(self, settings: Settings) -> None:
        assert settings.upstream_url
        self.client = make_client(settings, settings.upstream_url, None)
        self.pool = make_pool(settings, settings.upstream_url, None)

    def stream(
        self, request: ChatRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[UpstreamItem]]:
        return self._stream(request)

    @asynccontextmanager
    async def _stream(self, request: ChatRequest) -> AsyncIterator[AsyncIterator[UpstreamItem]]:
        async with (
            self.pool.post(
                "/api/chat", orjson.dumps(_body(request)), request.trace_headers
            ) as response,
            aclosing(_items(response)) as items,
        ):
            yield items

    async def models(self) -> list[dict[str, Any]]:
        """``GET /api/tags``.  Cancellation: a checkpoint; a ``Cancelled`` leaves nothing behind."""
        body = await get_json(self.client, "/api/tags")
        models = body.get("models") if isinstance(body, dict) else None
        return [
            {"id": m.get("name"), "object": "model", "created": 0, "owned_by": "ollama"}
            for m in models or []
            if isinstance(m, dict)
        ]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """No background work.  Cancellation: returns at once after ``started()``, without a
        checkpoint.
        """
        task_status.started()  # no background work: the pools need none

    async def aclose(self) -> None:
        """Close the pool, then the httpx client.  Cancellation: the pool's closes are shielded;
        the caller shields the whole with a deadline.
        """
        await self.pool.aclose()
        await self.client.aclose()


def _body(request: ChatRequest) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if request.max_tokens is not None:
        options["num_predict"] = request.max_tokens
    for name in ("temperature", "top_p", "seed"):
        if request.body.get(name) is not None:
            options[name] = request.body[name]
    body: dict[str, Any] = {"model": request.model, "messages": request.messages, "stream": True}
    stop = request.body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop:
        options["stop"] = stop
    if options:
        body["options"] = options
    if request.body.get("tools"):
        body["tools"] = request.body["tools"]
    if (fmt := _format(request.body.get("response_format"))) is not None:
        body["format"] = fmt
    for name in ("think", "keep_alive"):  # Ollama's own fields, passed on as sent
        if request.body.get(name) is not None:
            body[name] = request.body[name]
    return body


def _format(response_format: Any) -> Any:
    """OpenAI's ``response_format`` as Ollama's ``format``: ``json_object`` ->
    ``"json"``, ``json_schema`` -> its schema; ``text`` (or none) -> None."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = response_format.get("json_schema")
        if isinstance(schema, dict) and isinstance(schema.get("schema"), dict):
            return schema["schema"]
        return "json"
    return None


async def _items(response: Response) -> AsyncGenerator[UpstreamItem, None]:
    lines = LineDecoder()
    state = StreamState()
    while raw := await response.read():
        for line in lines.feed(raw):
            for item in ollama_items(line, state):
                yield item
    for line in lines.flush():
        for item in ollama_items(line, state):
            yield item
