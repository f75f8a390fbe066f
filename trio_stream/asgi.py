"""Small raw-ASGI helpers for the streaming endpoints."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Iterable, MutableMapping
from typing import Any

from .errors import ApiError, too_large

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"


class ServerApp:
    """What hypercorn's worker calls per request: hypercorn's ``ASGIWrapper``
    without its ``async def``.

    ``__call__`` hands back the app's own coroutine, so the request task
    awaits the app directly: one coroutine frame fewer for as long as the
    request lives (an open stream holds its request task's whole chain).
    """

    __slots__ = ("app",)

    def __init__(self, app: Callable[[Scope, Receive, Send], Coroutine[Any, Any, None]]) -> None:
        self.app = app

    def __call__(
        self, scope: Any, receive: Any, send: Any, sync_spawn: Any, call_soon: Any
    ) -> Coroutine[Any, Any, None]:
        return self.app(scope, receive, send)


class ClientGone(Exception):
    """The client disconnected before its request was read."""


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def read_body(receive: Receive, scope: Scope, limit: int) -> bytes:
    """Read the request body, refusing (413) as soon as it passes ``limit``.

    A declared ``Content-Length`` over the limit is refused before reading a
    byte, so an oversized body is never held in memory.  There is no deadline
    here: the caller puts one around the whole read (``--body-timeout``, see
    :func:`trio_stream.endpoints.read_request`), so that a client dribbling a
    byte at a time is cut as surely as one that stops.
    """
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def framing_conflict(scope: Scope) -> bool:
    """Whether the request carries both ``Content-Length`` and
    ``Transfer-Encoding`` (RFC 9112 section 6.1; h11 frames such a body by
    ``Transfer-Encoding`` alone and would keep the connection)."""
    length = encoding = False
    for key, _ in scope["headers"]:
        if key == b"content-length":
            length = True
        elif key == b"transfer-encoding":
            encoding = True
    return length and encoding


def close_headers(error: ApiError, http_version: str) -> tuple[tuple[bytes, bytes], ...]:
    """``Connection: close`` for an error that ends its connection, on HTTP/1.x.

    With it h11 (and so hypercorn) closes the connection after the answer, and
    the client knows not to reuse it.  HTTP/2 forbids the header; there the
    answer ends the stream, and the connection's other streams go on.
    """
    if error.closes and http_version in ("1.0", "1.1"):
        return ((b"connection", b"close"),)
    return ()


async def start(
    send: Send, status: int, content_type: bytes, extra: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    headers = [(b"content-type", content_type), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def send_bytes(
    send: Send, status: int, body: bytes, content_type: bytes = JSON,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> None:  # fmt: skip
    await start(send, status, content_type, extra)
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(
    send: Send, error: ApiError, extra: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    await send_bytes(send, error.status, error.body(), JSON, [*error.headers, *extra])
