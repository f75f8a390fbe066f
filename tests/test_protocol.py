"""Plain synchronous tests of request parsing and validation (trio_stream/wire/request.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from trio_stream.errors import ApiError
from trio_stream.wire.request import parse_chat_request, parse_session_id

MSG = [{"role": "user", "content": "hi"}]


def body(**fields: Any) -> bytes:
    return orjson.dumps({"messages": MSG, **fields})


def rejected(raw: bytes) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_chat_request(raw)
    return info.value


def assert_openai_400(err: ApiError, code: str, fragment: str) -> None:
    """Status 400, invalid_request_error, the code, a message naming the
    problem, and the same three in the OpenAI error body."""
    assert err.status == 400
    assert err.type == "invalid_request_error"
    assert err.code == code
    assert fragment in err.message
    assert orjson.loads(err.body()) == {
        "error": {"message": err.message, "type": "invalid_request_error", "code": code}
    }


INVALID = [
    ("empty", b"", "invalid_json", "empty"),
    ("whitespace", b"  \n", "invalid_json", "empty"),
    ("not-json", b"{nope", "invalid_json", "not valid JSON"),
    ("not-utf8", b'{"a": "\xff"}', "invalid_json", "not valid JSON"),
    ("array", b"[]", "invalid_json", "JSON object"),
    ("string", b'"x"', "invalid_json", "JSON object"),
    ("null", b"null", "invalid_json", "JSON object"),
    ("no-messages", b"{}", "missing_required_parameter", "'messages' is required"),
    ("null-messages", b'{"messages": null}', "missing_required_parameter", "'messages'"),
    ("empty-messages", b'{"messages": []}', "invalid_type", "'messages' must be a non-empty"),
    ("messages-object", b'{"messages": {}}', "invalid_type", "'messages' must be a non-empty"),
    ("message-not-object", b'{"messages": ["hi"]}', "invalid_type", "'messages[0]'"),
    ("no-role", b'{"messages": [{"content": "x"}]}', "invalid_type", "'messages[0].role'"),
    (
        "bad-role",
        orjson.dumps({"messages": [*MSG, {"role": "robot"}]}),
        "invalid_type",
        "'messages[1].role'",
    ),
    ("role-list", b'{"messages": [{"role": []}]}', "invalid_type", "'messages[0].role'"),
    ("role-object", b'{"messages": [{"role": {}}]}', "invalid_type", "'messages[0].role'"),
    (
        "content-number",
        b'{"messages": [{"role": "user", "content": 1}]}',
        "invalid_type",
        "'messages[0].content'",
    ),
    ("model-number", body(model=1), "invalid_type", "'model' must be a string"),
    ("stream-string", body(stream="yes"), "invalid_type", "'stream' must be a boolean"),
    ("stream-int", body(stream=1), "invalid_type", "'stream' must be a boolean"),
    ("detach-string", body(detach="true"), "invalid_type", "'detach' must be a boolean"),
    ("temperature-string", body(temperature="hot"), "invalid_type", "'temperature'"),
    ("temperature-bool", body(temperature=True), "invalid_type", "'temperature'"),
    ("max-tokens-float", body(max_tokens=1.5), "invalid_type", "'max_tokens' must be an int"),
    ("max-tokens-bool", body(max_tokens=True), "invalid_type", "'max_tokens'"),
    ("max-tokens-zero", body(max_tokens=0), "invalid_value", "between 1 and 1000000"),
    ("max-tokens-negative", body(max_tokens=-5), "invalid_value", "between 1 and 1000000"),
    ("max-tokens-huge", body(max_tokens=1_000_001), "invalid_value", "between 1 and 1000000"),
    (
        "max-completion-tokens-string",
        body(max_completion_tokens="9"),
        "invalid_type",
        "'max_completion_tokens'",
    ),
    ("n-2", body(n=2), "invalid_value", "'n': 1"),
    ("n-string", body(n="1"), "invalid_type", "'n' must be an integer"),
]


@pytest.mark.parametrize(
    ("raw", "code", "fragment"), [row[1:] for row in INVALID], ids=[row[0] for row in INVALID]
)
def test_invalid_requests_are_400_with_a_clear_message(
    raw: bytes, code: str, fragment: str
) -> None:
    """Every malformed request is an ApiError 400 (never another exception)
    whose message names the offending field, in the OpenAI error body."""
    assert_openai_400(rejected(raw), code, fragment)


def test_minimal_request_defaults() -> None:
    """Only messages are required: model defaults to "mock", stream and detach
    to false, max_tokens to none."""
    req = parse_chat_request(body())
    assert (req.model, req.messages, req.stream, req.max_tokens, req.detach) == (
        "mock",
        MSG,
        False,
        None,
        False,
    )


@pytest.mark.parametrize(
    ("fields", "max_tokens"),
    [
        ({"max_tokens": 5}, 5),
        ({"max_completion_tokens": 7}, 7),
        ({"max_tokens": 5, "max_completion_tokens": 7}, 5),
        ({"max_tokens": None, "max_completion_tokens": 7}, 7),
        ({"max_tokens": 1_000_000}, 1_000_000),
    ],
    ids=[
        "max_tokens",
        "max_completion_tokens",
        "max_tokens-wins",
        "null-falls-back",
        "upper-bound",
    ],
)
def test_max_tokens_sources(fields: dict[str, Any], max_tokens: int) -> None:
    """max_tokens, else max_completion_tokens, limits the reply."""
    assert parse_chat_request(body(**fields)).max_tokens == max_tokens


def test_full_request_is_parsed_and_kept() -> None:
    """Recognised fields are typed; the body is kept whole for the upstream;
    null optional fields count as absent; every role and list content is accepted."""
    messages = [
        {"role": r, "content": "x"}
        for r in ("system", "developer", "assistant", "tool", "function")
    ] + [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "user"}]
    fields = {
        "model": "gpt",
        "messages": messages,
        "stream": True,
        "detach": True,
        "temperature": 0.5,
        "max_tokens": 3,
        "n": 1,
        "top_p": None,
        "tools": [{"type": "function"}],
    }
    req = parse_chat_request(orjson.dumps(fields))
    assert (req.model, req.stream, req.detach, req.max_tokens) == ("gpt", True, True, 3)
    assert req.messages == messages
    assert req.body == fields


@pytest.mark.parametrize(
    "fields",
    [{}, {"stream": False}, {"detach": True, "stream_options": {"include_usage": True}}],
    ids=["plain", "non-streaming", "with-extensions"],
)
def test_upstream_body_strips_extensions_and_always_streams(fields: dict[str, Any]) -> None:
    """The upstream never sees `detach` or `stream_options`, always gets
    stream=true, and gets every other field untouched; the request's own body
    is not modified."""
    raw = body(model="m", top_p=0.9, **fields)
    req = parse_chat_request(raw)
    assert req.upstream_body() == {"messages": MSG, "model": "m", "top_p": 0.9, "stream": True}
    assert req.body == orjson.loads(raw)


@pytest.mark.parametrize(
    "value",
    [None, "a", "A-z_0.9:x", "x" * 128, "run:1.2-3_4"],
    ids=["absent", "one-char", "all-classes", "128-chars", "mixed"],
)
def test_valid_session_ids(value: str | None) -> None:
    """X-Session-Id: absent, or 1-128 chars of A-Za-z0-9._:- passes unchanged."""
    assert parse_session_id(value) == value


@pytest.mark.parametrize(
    "value",
    ["", "x" * 129, "a b", "a/b", "a\nb", "é", "a\0", "x\n", "*"],
    ids=[
        "empty",
        "129-chars",
        "space",
        "slash",
        "newline",
        "non-ascii",
        "nul",
        "trailing-lf",
        "star",
    ],
)
def test_invalid_session_ids(value: str) -> None:
    """Any other X-Session-Id is a 400 invalid_session_id naming the header
    (a trailing newline must not slip past the regex)."""
    with pytest.raises(ApiError) as info:
        parse_session_id(value)
    assert_openai_400(info.value, "invalid_session_id", "X-Session-Id")
