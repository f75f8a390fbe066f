"""What the HTTP upstreams share: the two clients and error translation.

* The completion request (``POST``, a streamed body read once per token) goes
  through :class:`~trio_stream.upstream.h1.Pool`, our own HTTP/1.1 client on
  trio + h11: the per-token read is the hot path (docs/design.md section 15).
* The rare calls (``GET /models``, ``GET /api/tags``) stay on httpx: they are
  not per token, so httpx's few extra layers cost nothing that matters.

HTTP/1.1 only, on purpose: closing an unfinished HTTP/1.1 response closes its
connection, which every upstream notices at once.  (httpcore's HTTP/2 did not
even send ``RST_STREAM`` when a response was closed early, httpcore issue
#943, so a cancelled run would have kept the upstream generating.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from ..config import Settings
from ..errors import UpstreamError
from .h1 import Pool


def make_client(settings: Settings, base_url: str, api_key: str | None) -> httpx.AsyncClient:
    """The httpx client for the non-streaming calls."""
    t = settings.connect_timeout
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        http1=True,
        http2=False,
        headers=_auth(api_key),
        timeout=httpx.Timeout(connect=t, read=None, write=t, pool=t),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=4),
        trust_env=False,
    )


def make_pool(settings: Settings, base_url: str, api_key: str | None) -> Pool:
    """The pool for the streaming completion requests."""
    headers = list(_auth(api_key).items())
    return Pool(base_url, connect_timeout=settings.connect_timeout, headers=headers)


def _auth(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


@contextmanager
def map_errors() -> Iterator[None]:
    """Translate httpx errors into :class:`UpstreamError` (never ``Cancelled``)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamError(f"The upstream timed out: {exc!r}", timeout=True) from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(f"The upstream request failed: {exc!r}") from exc


async def get_json(client: httpx.AsyncClient, path: str) -> Any:
    """``GET path`` on the upstream, its JSON body.  Raises :class:`UpstreamError`.  Cancellation:
    a checkpoint; a ``Cancelled`` propagates untouched and httpx closes the request.
    """
    with map_errors():
        response = await client.get(path)
        if response.status_code >= 400:
            raise UpstreamError(f"The upstream answered HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError as exc:
            raise UpstreamError("The upstream sent malformed JSON") from exc
