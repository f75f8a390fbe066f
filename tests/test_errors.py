"""Plain synchronous tests of the exception tree and error bodies (trio_stream/errors.py)."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest

from trio_stream import errors
from trio_stream.errors import (
    ApiError,
    ConfigError,
    TrioStreamError,
    UpstreamError,
    error_body,
)

FACTORIES: list[tuple[str, Callable[[], ApiError], int, str, str | None]] = [
    ("400", lambda: errors.bad_request("bad", "invalid_json"), 400, "invalid_request_error",
     "invalid_json"),
    ("400-no-code", lambda: errors.bad_request("bad"), 400, "invalid_request_error", None),
    ("401", errors.unauthorized, 401, "authentication_error", "invalid_api_key"),
    ("404", lambda: errors.not_found("no run"), 404, "not_found_error", "not_found"),
    ("405", lambda: errors.method_not_allowed("PUT", "/v1/models"), 405,
     "invalid_request_error", "method_not_allowed"),
    ("404-route", lambda: errors.unknown_route("/nope"), 404, "invalid_request_error",
     "unknown_url"),
    ("408", lambda: errors.body_timeout(30), 408, "invalid_request_error", "body_timeout"),
    ("413", lambda: errors.too_large(10), 413, "invalid_request_error", "request_too_large"),
    ("429", lambda: errors.too_many_streams(5), 429, "rate_limit_error", "too_many_streams"),
    ("502", lambda: UpstreamError("down"), 502, "upstream_error", None),
    ("504", lambda: UpstreamError("slow", timeout=True), 504, "upstream_error", None),
    ("502-code", lambda: UpstreamError("x", code="malformed_chunk"), 502, "upstream_error",
     "malformed_chunk"),
    ("500-internal", errors.InternalError, 500, "server_error", "internal_error"),
    ("503", errors.shutting_down, 503, "unavailable_error", "shutting_down"),
    ("503-shared-state", lambda: errors.unavailable("connection refused"), 503,
     "unavailable_error", "shared_state_unavailable"),
]  # fmt: skip

#: The rows whose error carries Retry-After: the ones a client should retry.
RETRY_AFTER = {"429", "503-shared-state"}


@pytest.mark.parametrize(
    ("make", "status", "type_", "code"),
    [row[1:] for row in FACTORIES],
    ids=[row[0] for row in FACTORIES],
)
def test_status_type_code_and_body(
    make: Callable[[], ApiError], status: int, type_: str, code: str | None
) -> None:
    """Each client-visible error has the status and OpenAI `type` of docs/api.md
    section 2, and its body is exactly {"error": {message, type, code}}."""
    err = make()
    assert (err.status, err.type, err.code) == (status, type_, code)
    assert err.message
    assert str(err) == err.message
    assert orjson.loads(err.body()) == {
        "error": {"message": err.message, "type": type_, "param": None, "code": code}
    }


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: errors.method_not_allowed("PUT", "/v1/models"), "PUT"),
        (lambda: errors.method_not_allowed("PUT", "/v1/models"), "/v1/models"),
        (lambda: errors.unknown_route("/nope"), "/nope"),
        (lambda: errors.too_large(1234), "1234"),
        (lambda: errors.body_timeout(2.5), "2.5 seconds"),
        (lambda: errors.too_many_streams(77), "77"),
        (lambda: errors.unavailable("connection refused"), "connection refused"),
        (errors.unauthorized, "Authorization: Bearer"),
    ],
    ids=[
        "405-method",
        "405-path",
        "404-path",
        "413-limit",
        "408-seconds",
        "429-limit",
        "503-shared-state-detail",
        "401-how-to",
    ],
)
def test_messages_say_what_is_wrong(make: Callable[[], ApiError], fragment: str) -> None:
    """Messages carry the detail a client needs (method, path, limit, header)."""
    assert fragment in make().message


@pytest.mark.parametrize(
    ("make", "header"),
    [
        (lambda: errors.too_many_streams(5), b"1"),
        (lambda: errors.too_many_streams(5, 7), b"7"),
        (lambda: errors.unavailable("down"), b"1"),
        (lambda: errors.unavailable("down", 7), b"7"),
    ],
    ids=["429-default", "429-7s", "503-shared-state-default", "503-shared-state-7s"],
)
def test_retry_after_is_on_the_429_and_the_shared_state_503(
    make: Callable[[], ApiError], header: bytes
) -> None:
    """The errors a client should retry carry Retry-After (default 1 s): 429
    (too many streams) and the 503 of cluster mode's unreachable Redis
    (shared_state_unavailable)."""
    assert make().headers == ((b"retry-after", header),)


def test_no_other_error_has_retry_after() -> None:
    """Every other error, the 503 of a shutdown included, carries no header."""
    assert {row[0] for row in FACTORIES if row[1]().headers} == RETRY_AFTER


def test_only_the_408_closes_the_connection() -> None:
    """A 408 (its body never arrived whole) is the one error after which the
    connection must not carry another request; no other error asks for that."""
    closing = [row[0] for row in FACTORIES if row[1]().closes]
    assert closing == ["408"]


def test_error_body_escapes() -> None:
    """error_body is valid JSON whatever the message holds; a null code stays null."""
    message = 'quote " backslash \\ newline \n é'
    assert orjson.loads(error_body(message, "t", None)) == {
        "error": {"message": message, "type": "t", "param": None, "code": None}
    }


def test_one_small_exception_tree() -> None:
    """Everything the project raises on purpose is a TrioStreamError;
    UpstreamError is an ApiError (it can become an HTTP answer); ConfigError is not."""
    assert issubclass(ApiError, TrioStreamError)
    assert issubclass(UpstreamError, ApiError)
    assert issubclass(errors.InternalError, ApiError)
    assert not issubclass(errors.InternalError, UpstreamError)  # a crash is not the upstream's
    assert issubclass(ConfigError, TrioStreamError)
    assert not issubclass(ConfigError, ApiError)
    assert issubclass(TrioStreamError, Exception)
