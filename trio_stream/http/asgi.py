"""Small raw-ASGI helpers for the streaming endpoints."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from ..errors import ApiError, store_unavailable, too_large, unavailable
from ..shared import SharedUnavailable
from ..store import StoreUnavailable

Scope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[AsgiMessage]]
Send = Callable[[AsgiMessage], Awaitable[None]]

JSON = b"application/json"


def as_api_error(exc: ApiError | SharedUnavailable | StoreUnavailable) -> ApiError:
    """The HTTP answer to an error: the seam where the words of the layers
    below become HTTP.  The shared state out of reach (cluster mode) and the
    database out of reach are each a 503 with ``Retry-After`` (the driver's
    message names hosts and ports, so the store's is not passed on); an
    :class:`ApiError` is its own answer."""
    if isinstance(exc, SharedUnavailable):
        return unavailable(str(exc))
    if isinstance(exc, StoreUnavailable):
        return store_unavailable()
    return exc


class ClientGone(Exception):
    """The client disconnected before its request was read."""


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _would_wait(receive: Receive) -> bool:
    """Might ``receive()`` wait?  No when it is our server's inbox
    (``server.connection.AppInbox.receive``) with a message queued; yes
    otherwise, or when it cannot tell."""
    queued = getattr(getattr(receive, "__self__", None), "queued", None)
    return queued is None or not queued()


async def read_body(
    receive: Receive, scope: Scope, limit: int, before_wait: Callable[[], None] | None = None
) -> bytes:
    """Read the request body, refusing (413) as soon as it passes ``limit``.

    A declared ``Content-Length`` over the limit is refused before reading a
    byte, so an oversized body is never held in memory.  There is no deadline
    here: the caller puts one around the whole read (``--body-timeout``, see
    :func:`trio_stream.http.common.read_request`), so that a client dribbling a
    byte at a time is cut as surely as one that stops.  ``before_wait`` is
    called before a ``receive()`` that may wait (not before one whose message
    is already queued): the caller arms that deadline there, and a body that
    came with its head arms none.

    Cancellation: a checkpoint per ``receive()``.  A ``Cancelled`` (the caller's ``--body-
    timeout``) leaves the body partly read; the caller answers 408 and closes the connection.
    """
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    parts: list[bytes] = []
    size = 0
    while True:
        if before_wait is not None and _would_wait(receive):
            before_wait()
            before_wait = None  # once: it arms one deadline for the whole body
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
    """Sends the response head.  Cancellation: a checkpoint (the ASGI ``send``); a ``Cancelled``
    may leave the head unsent, and the request then ends without a response.
    """
    headers = [(b"content-type", content_type), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def send_bytes(
    send: Send, status: int, body: bytes, content_type: bytes = JSON,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> None:  # fmt: skip
    """Sends a whole response: the head, then the body in one message.  Cancellation: checkpoints
    at each send; a ``Cancelled`` may leave the head sent and the body not.
    """
    await start(send, status, content_type, extra)
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(
    send: Send, error: ApiError, extra: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Sends ``error`` as its OpenAI error body, with its headers and ``extra``.  Cancellation: as
    :func:`send_bytes`.
    """
    await send_bytes(send, error.status, error.body(), JSON, [*error.headers, *extra])
