"""Plain synchronous tests of the upstream wire decoders (trio_stream/upstream/wire.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from trio_stream.core.log import RunLog, Chunk
from trio_stream.errors import UpstreamError
from trio_stream.upstream import Finish, Item
from trio_stream.upstream.wire import ollama_items, openai_items
from trio_stream.wire.usage import Usage


def oa(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> str:
    """An OpenAI chat.completion.chunk with one choice."""
    choice: dict[str, Any] = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    return orjson.dumps(
        {"id": "c", "object": "chat.completion.chunk", "choices": [choice], **extra}
    ).decode()


CALL = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}


@pytest.mark.parametrize(
    ("data", "items"),
    [
        (oa({"role": "assistant", "content": "Hi"}), ["Hi"]),
        (oa({"content": " there"}), [" there"]),
        (oa({"role": "assistant", "content": ""}), []),
        (oa({"role": "assistant"}), []),
        (oa({"content": None}), []),
        (oa({}, "stop"), [Finish("stop")]),
        (oa({"content": "end"}, "length"), ["end", Finish("length")]),
        (oa({"tool_calls": [CALL]}), [Chunk.of({"tool_calls": [CALL]})]),
        (
            oa({"content": "a", "tool_calls": [CALL], "refusal": None}, "tool_calls"),
            ["a", Chunk.of({"tool_calls": [CALL]}), Finish("tool_calls")],
        ),
        (oa({"refusal": "no"}), [Chunk.of({"refusal": "no"})]),
        ('{"choices": [], "usage": {"total_tokens": 3}}', []),
        ('{"usage": {"total_tokens": 3}}', []),
        ('{"choices": null}', []),
        ('{"choices": [{"delta": null}]}', []),
        ('{"choices": [{"delta": {"content": 5}}]}', []),
    ],
    ids=[
        "first-content",
        "content",
        "empty-content",
        "role-only",
        "null-content",
        "finish",
        "content-and-finish",
        "tool-call",
        "content-tool-finish",
        "refusal",
        "usage-only-empty-choices",
        "usage-only-no-choices",
        "null-choices",
        "null-delta",
        "non-string-content-ignored",
    ],
)
def test_openai_items(data: str, items: list[Item]) -> None:
    """One SSE data field maps to its content, its non-content delta (role and
    nulls dropped) and its finish, in that order; usage-only chunks map to nothing."""
    assert openai_items(data) == items


@pytest.mark.parametrize(
    ("data", "code", "fragment"),
    [
        ('{"error": {"message": "overloaded"}}', "upstream_reported", "overloaded"),
        ('{"error": "boom"}', "upstream_reported", "boom"),
        ("not json", "malformed_chunk", "malformed chunk"),
        ("", "malformed_chunk", "malformed chunk"),
        ("[1]", "malformed_chunk", "not an object"),
        ('{"choices": "x"}', "malformed_chunk", "malformed choices"),
        ('{"choices": [1]}', "malformed_chunk", "malformed choices"),
        ('{"choices": [{"delta": "x"}]}', "malformed_chunk", "malformed delta"),
        ('{"choices": [{"delta": {"tool_calls": 1}}]}', "malformed_chunk", "tool calls"),
        ('{"choices": [{"delta": {"tool_calls": [1]}}]}', "malformed_chunk", "tool calls"),
        (
            '{"choices": [{"delta": {"tool_calls": [{"index": "0"}]}}]}',
            "malformed_chunk",
            "tool calls",
        ),
        (
            '{"choices": [{"delta": {"tool_calls": [{"function": "f"}]}}]}',
            "malformed_chunk",
            "tool calls",
        ),
        (
            '{"choices": [{"delta": {"tool_calls": [{"function": {"name": 1}}]}}]}',
            "malformed_chunk",
            "tool calls",
        ),
    ],
    ids=[
        "error-object",
        "error-string",
        "not-json",
        "empty",
        "not-an-object",
        "choices-string",
        "choice-not-object",
        "delta-string",
        "tool-calls-not-list",
        "tool-call-not-object",
        "tool-call-index-string",
        "tool-call-function-string",
        "tool-call-name-number",
    ],
)
def test_openai_malformed_or_error(data: str, code: str, fragment: str) -> None:
    """An error object or anything malformed is an UpstreamError (502,
    upstream_error) with a code and a message saying what was wrong."""
    with pytest.raises(UpstreamError) as info:
        openai_items(data)
    err = info.value
    assert (err.status, err.type, err.code) == (502, "upstream_error", code)
    assert fragment in err.message


@pytest.mark.parametrize(
    "data",
    [
        '{"choices": [{"delta": {"content": "hé"}, "finish_reason": "stop"}]}',
        '{"error": {"message": "overloaded"}}',
        "not json",
        "[1]",
    ],
    ids=["chunk", "error-object", "not-json", "not-an-object"],
)
def test_openai_items_same_from_bytes_and_str(data: str) -> None:
    """The upstream path hands the SSE data over as bytes: the items, or the
    error's code and message, are exactly those of the same data as ``str``."""

    def outcome(value: str | bytes | bytearray) -> Any:
        try:
            return openai_items(value)
        except UpstreamError as exc:
            return (exc.code, exc.message)

    assert outcome(data.encode()) == outcome(bytearray(data.encode())) == outcome(data)


def test_openai_items_invalid_utf8_bytes_are_replaced() -> None:
    """Data bytes that are not UTF-8 read as if decoded with U+FFFD (what the
    str-based SSE decoder did), not as a malformed chunk."""
    raw = b'{"choices": [{"delta": {"content": "a\xffb"}}]}'
    assert openai_items(raw) == ["a\ufffdb"]


def ol(message: dict[str, Any] | None = None, **fields: Any) -> bytes:
    """One Ollama /api/chat NDJSON line."""
    obj: dict[str, Any] = {"model": "llama", "done": False, **fields}
    if message is not None:
        obj["message"] = {"role": "assistant", **message}
    return orjson.dumps(obj)


def ollama_call(index: int, name: str, arguments: str) -> dict[str, Any]:
    return {
        "index": index,
        "id": f"call_{index}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


@pytest.mark.parametrize(
    ("line", "items"),
    [
        (ol({"content": "Hi"}), ["Hi"]),
        (ol({"content": ""}), []),
        (ol({"content": ""}, done=True, done_reason="stop"), [Finish("stop")]),
        (ol({"content": "x"}, done=True, done_reason="length"), ["x", Finish("length")]),
        (ol(done=True), [Finish("stop")]),
        (ol(done=True, done_reason="load"), [Finish("stop")]),
        (
            ol({"tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]}),
            [Chunk.of({"tool_calls": [ollama_call(0, "f", '{"x":1}')]})],
        ),
        (
            ol(
                {
                    "tool_calls": [
                        {"function": {"name": "f", "arguments": "raw"}},
                        {"function": {"name": "g"}},
                    ]
                }
            ),
            [Chunk.of({"tool_calls": [ollama_call(0, "f", "raw"), ollama_call(1, "g", "{}")]})],
        ),
        (b"", []),
        (b"  \r", []),
        (b'{"message": null}', []),
    ],
    ids=[
        "content",
        "empty-content",
        "done-stop",
        "done-length",
        "done-without-message",
        "other-done-reason-is-stop",
        "tool-call-object-arguments",
        "tool-calls-string-and-missing-arguments",
        "empty-line",
        "blank-line",
        "null-message",
    ],
)
def test_ollama_items(line: bytes, items: list[Item]) -> None:
    """One NDJSON line maps to content, tool calls in OpenAI delta shape (with
    index, id and JSON-string arguments) and a finish when done."""
    assert ollama_items(line) == items


@pytest.mark.parametrize(
    ("line", "code", "fragment"),
    [
        (b'{"error": "model not found"}', "upstream_reported", "model not found"),
        (b"{oops", "malformed_chunk", "malformed line"),
        (b"\xff\xfe", "malformed_chunk", "malformed line"),
        (b"42", "malformed_chunk", "not an object"),
        (b'{"message": "x"}', "malformed_chunk", "malformed message"),
        (b'{"message": {"tool_calls": 5}}', "malformed_chunk", "tool calls"),
        (b'{"message": {"tool_calls": [{"function": "f"}]}}', "malformed_chunk", "tool calls"),
        (b'{"message": {"tool_calls": [{"function": null}]}}', "malformed_chunk", "tool calls"),
        (
            b'{"message": {"tool_calls": [{"function": {"name": 3}}]}}',
            "malformed_chunk",
            "tool calls",
        ),
    ],
    ids=[
        "error",
        "not-json",
        "not-utf8",
        "not-an-object",
        "message-string",
        "tool-calls-number",
        "tool-call-function-string",
        "tool-call-function-null",
        "tool-call-name-number",
    ],
)
def test_ollama_malformed_or_error(line: bytes, code: str, fragment: str) -> None:
    """An error line or anything malformed is an UpstreamError with a code."""
    with pytest.raises(UpstreamError) as info:
        ollama_items(line)
    assert info.value.code == code
    assert fragment in info.value.message


def test_decoded_tool_calls_merge_in_the_run_log() -> None:
    """What the decoders accept, the run log can merge: an OpenAI call split
    over three chunks becomes one call with the joined arguments, and an
    Ollama call arrives whole."""
    log = RunLog()
    for data in [
        oa({"tool_calls": [CALL]}),
        oa({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
        oa({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
    ]:
        for item in openai_items(data):
            assert not isinstance(item, Finish | Usage)
            log.append(item)
    assert log.tool_calls == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    ]
    log = RunLog()
    (item,) = ollama_items(ol({"tool_calls": [{"function": {"name": "g", "arguments": {}}}]}))
    assert not isinstance(item, Finish | Usage)
    log.append(item)
    assert log.tool_calls == [
        {"id": "call_0", "type": "function", "function": {"name": "g", "arguments": "{}"}}
    ]
