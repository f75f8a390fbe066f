"""Plain synchronous tests of request parsing and validation (trio_stream/wire/request.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from trio_stream.errors import ApiError
from trio_stream.wire.request import (
    MAX_DEPTH,
    nested_too_deep,
    parse_chat_request,
    parse_session_id,
)
from trio_stream.wire.responses import parse_responses_request

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
        "error": {
            "message": err.message, "type": "invalid_request_error", "param": err.param,
            "code": code,
        }
    }  # fmt: skip


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
    # max_completion_tokens is checked also when max_tokens is set (it won, and
    # the other went unchecked), and its range error names it.
    (
        "max-completion-tokens-string-beside-max-tokens",
        body(max_tokens=5, max_completion_tokens="x"),
        "invalid_type",
        "'max_completion_tokens' must be an integer",
    ),
    (
        "max-completion-tokens-negative-beside-max-tokens",
        body(max_tokens=5, max_completion_tokens=-7),
        "invalid_value",
        "'max_completion_tokens' must be between 1 and 1000000",
    ),
    (
        "max-completion-tokens-negative",
        body(max_completion_tokens=-7),
        "invalid_value",
        "'max_completion_tokens' must be between 1 and 1000000",
    ),
    (
        "max-completion-tokens-float",
        body(max_completion_tokens=2.5),
        "invalid_type",
        "'max_completion_tokens' must be an integer",
    ),
    (
        "max-completion-tokens-bool",
        body(max_tokens=5, max_completion_tokens=True),
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
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    req = parse_chat_request(orjson.dumps(fields))
    assert (req.model, req.stream, req.detach, req.max_tokens) == ("gpt", True, True, 3)
    assert req.messages == messages
    assert req.body == fields


@pytest.mark.parametrize(
    ("fields", "options"),
    [
        ({}, {"include_usage": True}),
        ({"stream": False}, {"include_usage": True}),
        ({"detach": True, "stream_options": {"include_usage": True}}, {"include_usage": True}),
        (
            {"stream_options": {"include_usage": False, "continuous_usage_stats": True}},
            {"include_usage": True, "continuous_usage_stats": True},
        ),
        (
            {"stream_options": {"include_obfuscation": False}},
            {"include_obfuscation": False, "include_usage": True},
        ),
    ],
    ids=["plain", "non-streaming", "with-extensions", "usage-off", "obfuscation"],
)
def test_upstream_body_strips_detach_keeps_stream_options_and_always_streams(
    fields: dict[str, Any], options: dict[str, Any]
) -> None:
    """The upstream never sees `detach`, always gets stream=true, gets the
    client's `stream_options` with `include_usage: true` set (trio-stream
    needs the usage: issue 20 item 4), and every other field untouched; the
    request's own body is not modified."""
    raw = body(model="m", top_p=0.9, **fields)
    req = parse_chat_request(raw)
    assert req.upstream_body() == {
        "messages": MSG, "model": "m", "top_p": 0.9, "stream": True, "stream_options": options
    }  # fmt: skip
    assert req.body == orjson.loads(raw)
    client_asked = bool((fields.get("stream_options") or {}).get("include_usage"))
    assert req.client_wants_usage is client_asked


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


# -- nesting depth (docs/api.md section 2.2) -------------------------------------


def nested(depth: int, kind: str = "array") -> bytes:
    """A chat body nested exactly ``depth`` levels deep (the body is level 1),
    the nesting in its one message's ``content``: ``{"messages": [{"role":
    "user", "content": X}]}`` is 3 levels around X."""
    inner = depth - 3
    if kind == "array":
        content = b"[" * inner + b"]" * inner
    else:  # objects, in an array (content must be a string, an array or null)
        content = b"[" + b'{"a":' * (inner - 1) + b"1" + b"}" * (inner - 1) + b"]"
    return b'{"messages": [{"role": "user", "content": ' + content + b"}]}"


@pytest.mark.parametrize("kind", ["array", "object"])
def test_the_nesting_limit_is_exact(kind: str) -> None:
    """A body nested MAX_DEPTH (250) levels deep is accepted and can be
    encoded again with room to spare (the upstream body); one level deeper is
    a 400 invalid_json whose message names the limit, for arrays and objects
    alike.  This also pins orjson's encoder limit that the check relies on."""
    req = parse_chat_request(nested(MAX_DEPTH, kind))
    orjson.dumps({"options": req.upstream_body()})  # re-encodable, one level deeper too
    orjson.dumps(req.messages)  # the mock upstream hashes these
    err = rejected(nested(MAX_DEPTH + 1, kind))
    assert_openai_400(err, "invalid_json", f"more than {MAX_DEPTH} levels deep")


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "NESTED"},  # a message's name, passed through
        {"tools": ["NESTED"]},  # tools, passed through
        {"top_p": "NESTED"},  # an ollama upstream nests it one level deeper
        {"anything": "NESTED"},  # any field passed through to the upstream
    ],
    ids=["message-name", "tools", "top_p", "unknown-field"],
)
def test_nesting_is_limited_in_every_field(fields: dict[str, Any]) -> None:
    """Wherever the deep nesting hides -- a message's ``name``, ``tools``, a
    passed-through field -- parsing refuses it (before: the run crashed when
    the body was encoded for the upstream).  The raw body of 1,024 levels,
    past orjson's decoder limit (1,024 levels), is refused with the same message."""
    for depth in (300, 1100):
        deep = b"[" * depth + b"]" * depth
        raw = orjson.dumps({"messages": MSG, **fields}).replace(b'"NESTED"', deep)
        assert_openai_400(rejected(raw), "invalid_json", f"more than {MAX_DEPTH} levels deep")


def test_responses_bodies_have_the_same_limit() -> None:
    """POST /v1/responses parses through the same function: a field it
    ignores does not let a too-deep body through, and 250 levels pass."""
    deep = b"[" * (MAX_DEPTH) + b"]" * (MAX_DEPTH)
    with pytest.raises(ApiError) as info:
        parse_responses_request(b'{"input": "hi", "metadata": ' + deep + b"}")
    assert_openai_400(info.value, "invalid_json", f"more than {MAX_DEPTH} levels deep")
    fits = b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1)
    chat, _ = parse_responses_request(b'{"input": "hi", "metadata": ' + fits + b"}")
    assert chat.messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("value", "too_deep"),
    [
        (1, False),
        ("x" * 10, False),
        ({}, False),
        ([[[]]], False),
        (orjson.loads(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH), False),
        (orjson.loads(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)), True),
        ([[1], [[[2]]]] * 100, False),  # wide, not deep: many brackets, 4 levels
    ],
    ids=["scalar", "string", "empty-object", "three", "at-limit", "past-limit", "wide"],
)
def test_nested_too_deep(value: Any, too_deep: bool) -> None:
    """nested_too_deep counts levels of objects and arrays, the value itself
    the first, and is false for anything within MAX_DEPTH however wide."""
    assert nested_too_deep(value) is too_deep


def test_short_bodies_are_never_walked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A body of at most 2 * MAX_DEPTH bytes cannot nest past the limit (each
    level takes two bytes), so it is not checked at all: the limit costs a
    typical request one ``len``.  A longer one is checked."""
    from trio_stream.wire import request as protocol

    calls: list[object] = []

    def counted(value: object) -> bool:
        calls.append(value)
        return False

    monkeypatch.setattr(protocol, "nested_too_deep", counted)
    short = body(model="m" * (2 * MAX_DEPTH - len(body(model=""))))
    assert len(short) == 2 * MAX_DEPTH
    parse_chat_request(short)
    assert calls == []
    parse_chat_request(body(model="m" * (2 * MAX_DEPTH)))
    assert len(calls) == 1
