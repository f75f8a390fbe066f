"""What the HTTP upstreams share: the httpx client and error translation.

HTTP/1.1 only, on purpose: httpcore's HTTP/2 does not send ``RST_STREAM`` when
a response is closed early (httpcore issue #943), so a cancelled run would keep
the upstream generating.  Closing an unfinished HTTP/1.1 response closes its
connection, which every upstream notices at once.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any, cast

import httpx
import trio

from ..config import Settings
from ..errors import UpstreamError

_ERROR_SNIPPET = 512


def make_client(settings: Settings, base_url: str, api_key: str | None) -> httpx.AsyncClient:
    """One pooled client per app.  No read timeout: runs.py times each token."""
    t = settings.connect_timeout
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        http1=True,
        http2=False,
        headers=headers,
        timeout=httpx.Timeout(connect=t, read=None, write=t, pool=t),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        trust_env=False,
    )


@contextmanager
def map_errors() -> Iterator[None]:
    """Translate httpx errors into :class:`UpstreamError` (never ``Cancelled``)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamError(f"The upstream timed out: {exc!r}", timeout=True) from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(f"The upstream request failed: {exc!r}") from exc


@asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> AsyncIterator[httpx.Response]:
    """POST ``body`` and yield the streaming response; 4xx/5xx become errors."""
    with map_errors():
        async with client.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                raw = await response.aread()
                text = raw[:_ERROR_SNIPPET].decode("utf-8", errors="replace")
                raise UpstreamError(
                    f"The upstream answered HTTP {response.status_code}: {text}",
                    code=f"upstream_http_{response.status_code}",
                )
            yield response


async def get_json(client: httpx.AsyncClient, path: str) -> Any:
    with map_errors():
        response = await client.get(path)
        if response.status_code >= 400:
            raise UpstreamError(f"The upstream answered HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError as exc:
            raise UpstreamError("The upstream sent malformed JSON") from exc


def raw_chunks(response: httpx.Response) -> RawChunks:
    """``response.aiter_raw()``, to be closed with ``contextlib.aclosing``."""
    return RawChunks(response)


class RawChunks:
    """``response.aiter_raw()`` whose ``aclose()`` also ends httpx's inner generators.

    httpx reads a body through five nested async generators.  Closing only the
    outer one while it waits at a ``yield`` abandons the others, and trio warns
    (``ResourceWarning``) when it collects them.  So ``aclose()`` closes the
    response (and its connection), then resumes the outer generator until it
    ends or fails: every layer finishes itself.  Shielded, with a deadline.
    """

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._it = cast(AsyncGenerator[bytes, None], response.aiter_raw())

    def __aiter__(self) -> RawChunks:
        return self

    async def __anext__(self) -> bytes:
        return await anext(self._it)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True) as cs:
            cs.deadline = trio.current_time() + 1.0
            await self._response.aclose()
            with suppress(httpx.HTTPError, httpx.StreamError):
                async for _ in self._it:
                    pass  # buffered bytes of a closed connection, then the end
