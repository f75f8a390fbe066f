"""The project's exception tree, and the OpenAI error body.

Every error a client can see is an :class:`ApiError`; it knows its HTTP status,
its OpenAI ``type``, ``param`` and ``code``, and renders the OpenAI error body::

    {"error": {"message": "...", "type": "...", "param": "..." | null, "code": "..." | null}}

``param`` names the request field at fault (``null`` when none), as OpenAI's
does.  An error the upstream reported (:class:`UpstreamReported`) is rendered
as the upstream sent it, in this same shape (docs/api.md section 2.2.1).

Errors from trio, httpx or sqlite are translated into these types at the seam
where they are caught (``raise ApiError(...) from exc``).  ``trio.Cancelled``
is never translated: it always propagates.

This module never imports trio.
"""

from __future__ import annotations

from typing import Any

import orjson


class TrioStreamError(Exception):
    """Base class of every exception trio_stream raises on purpose."""


class ConfigError(TrioStreamError):
    """A setting is invalid; raised before anything starts."""


class ApiError(TrioStreamError):
    """An error with an HTTP status and an OpenAI error body.

    ``closes``: the connection must not carry another request after this
    answer (its request was never read to the end).  How that is said depends
    on the HTTP version, so the layer that answers adds it
    (:func:`trio_stream.http.asgi.close_headers`).
    """

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        code: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        *,
        closes: bool = False,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.code = code
        self.headers = headers
        self.closes = closes
        self.param = param

    def body(self) -> bytes:
        """The OpenAI error body, as JSON bytes."""
        return error_body(self.message, self.type, self.code, self.param)


class UpstreamError(ApiError):
    """The upstream refused, failed, timed out or sent something unreadable.

    Before the first token it becomes an HTTP 502 (or 504 for a timeout);
    after it, an ``upstream_error`` event on the stream.  ``headers`` are
    answered with it (an upstream 5xx's ``Retry-After``, say).  ``error`` is
    ``None``: trio-stream's own account (see :class:`UpstreamReported`).
    """

    error: dict[str, Any] | None = None
    #: The HTTP status the upstream answered, if it answered one (>= 400);
    #: ``None`` for a transport failure, a timeout or an error inside a stream.
    #: The router classifies failures by it (:func:`trio_stream.core.router.classify`).
    upstream_status: int | None = None

    def __init__(
        self, message: str, *, timeout: bool = False, code: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:  # fmt: skip
        super().__init__(504 if timeout else 502, "upstream_error", message, code, headers)


class UpstreamsUnavailable(UpstreamError):
    """No upstream member of the model can take the request now
    (:mod:`trio_stream.core.router` rule B3): 429 ``upstreams_busy`` when every
    one is at its ``max_streams``, 503 ``upstreams_cooling_down`` when every one
    is cooling down after failures; ``Retry-After`` either way."""

    def __init__(self, status: int, retry_after: int) -> None:
        if status == 429:
            message = "Every upstream serving this model is at its stream limit."
            type_, code = "rate_limit_error", "upstreams_busy"
        else:
            message = "Every upstream serving this model is cooling down after failures."
            type_, code = "unavailable_error", "upstreams_cooling_down"
        super().__init__(message, code=code, headers=((b"retry-after", str(retry_after).encode()),))
        self.status = status
        self.type = type_


class UpstreamReported(UpstreamError):
    """An error the upstream itself reported, kept as it sent it.

    ``error`` is the upstream's error object in OpenAI's shape -- ``message``,
    ``type``, ``param``, ``code`` (each ``null`` if the upstream sent none,
    ``code`` a number if it sent one), any other key the upstream put in it
    (OpenRouter's ``metadata``) -- plus ``"source": "upstream"``.  It is what
    the client receives: as the body of an HTTP answer (``status``: the
    upstream's own for a 4xx it answered, else 502) or as the stream's error
    frame once the stream has started.  ``upstream_status`` is the HTTP status
    the upstream answered (``None`` for an error event inside a stream).
    ``type``/``code`` of the :class:`ApiError` stay trio-stream's
    (``upstream_error``/``upstream_reported``) for logs; the client sees
    ``error``.
    """

    def __init__(
        self, error: dict[str, Any], *, status: int = 502, upstream_status: int | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:  # fmt: skip
        super().__init__(str(error["message"]), code="upstream_reported", headers=headers)
        self.status = status
        self.error = error
        self.upstream_status = upstream_status

    def body(self) -> bytes:
        return orjson.dumps({"error": self.error})


class InternalError(ApiError):
    """A run crashed on an error of our own (a bug, logged as ``run_crashed``).

    Before anything was sent it is an HTTP 500; after, a ``server_error``
    event.  Never dressed as a cancellation or an upstream failure.
    """

    def __init__(self) -> None:
        super().__init__(500, "server_error", INTERNAL_MESSAGE, "internal_error")


#: The message of every :class:`InternalError` (it says nothing of the bug).
INTERNAL_MESSAGE = "The server failed while running this request; the failure is logged."


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    """Render ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def bad_request(message: str, code: str | None = None, param: str | None = None) -> ApiError:
    """400 ``invalid_request_error``; ``param`` names the request field at fault."""
    return ApiError(400, "invalid_request_error", message, code, param=param)


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "authentication_error",
        "Missing or invalid API key. Send 'Authorization: Bearer <key>'.",
        "invalid_api_key",
    )


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found_error", message, "not_found")


def method_not_allowed(method: str, path: str) -> ApiError:
    return ApiError(
        405, "invalid_request_error", f"Method {method} is not allowed on {path}.",
        "method_not_allowed",
    )  # fmt: skip


def unknown_route(path: str) -> ApiError:
    return ApiError(404, "invalid_request_error", f"Unknown path {path}.", "unknown_url")


def too_large(limit: int) -> ApiError:
    return ApiError(
        413, "invalid_request_error", f"Request body is larger than {limit} bytes.",
        "request_too_large",
    )  # fmt: skip


def body_timeout(seconds: float) -> ApiError:
    """408: the whole request body did not arrive within ``--body-timeout``
    seconds of the request's start.  The connection is closed after it."""
    return ApiError(
        408, "invalid_request_error",
        f"The request body did not arrive within {seconds:g} seconds.", "body_timeout",
        closes=True,
    )  # fmt: skip


def ambiguous_framing() -> ApiError:
    """400: an HTTP/1.x request with both ``Content-Length`` and
    ``Transfer-Encoding``.  RFC 9112 section 6.1: a proxy in front may have
    framed its body the other way, so the rest of the connection cannot be
    trusted; the connection is closed after the answer."""
    return ApiError(
        400, "invalid_request_error",
        "A request may not carry both Content-Length and Transfer-Encoding.",
        "ambiguous_framing", closes=True,
    )  # fmt: skip


def too_many_streams(limit: int, retry_after: int = 1) -> ApiError:
    return ApiError(
        429, "rate_limit_error", f"Too many concurrent streams (limit {limit}).",
        "too_many_streams", ((b"retry-after", str(retry_after).encode()),),
    )  # fmt: skip


def shutting_down() -> ApiError:
    return ApiError(503, "unavailable_error", "The server is shutting down.", "shutting_down")


def unavailable(detail: str, retry_after: int = 1) -> ApiError:
    """503: the shared state (cluster mode's Redis) cannot be reached now."""
    return ApiError(
        503, "unavailable_error", f"Shared state unavailable, retry shortly ({detail}).",
        "shared_state_unavailable", ((b"retry-after", str(retry_after).encode()),),
    )  # fmt: skip


def store_unavailable(retry_after: int = 1) -> ApiError:
    """503: the database of saved messages (``--db``) cannot be reached now.

    The driver's message is logged, not sent: it names hosts and ports.
    """
    return ApiError(
        503, "unavailable_error", "The message store is unavailable, retry shortly.",
        "store_unavailable", ((b"retry-after", str(retry_after).encode()),),
    )  # fmt: skip


def model_not_found(model: str) -> ApiError:
    """404: no upstream member serves ``model`` (OpenAI's own code for it)."""
    return ApiError(
        404, "invalid_request_error", f"The model {model!r} does not exist.", "model_not_found"
    )
