"""Plain synchronous tests of the upstream wire decoders (trio_stream/upstream/wire.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from trio_stream.core.log import Chunk, RunLog
from trio_stream.errors import UpstreamError
from trio_stream.upstream import Finish, Item, ResponseModel
from trio_stream.upstream.wire import StreamState, ollama_items, openai_items
from trio_stream.wire.usage import Usage


def oa(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> str:
    """An OpenAI chat.completion.chunk with one choice."""
    choice: dict[str, Any] = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    return orjson.dumps(
        {"id": "c", "object": "chat.completion.chunk", "choices": [choice], **extra}
    ).decode()


CALL = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}


def body(data: str) -> dict[str, Any]:
    """A chunk as the log keeps it: as sent, minus id/created/model."""
    obj = orjson.loads(data)
    return {k: v for k, v in obj.items() if k not in ("id", "created", "model")}


@pytest.mark.parametrize(
    ("data", "after"),
    [
        (oa({"role": "assistant", "content": "Hi"}), []),
        (oa({"content": " there"}), []),
        (oa({"role": "assistant", "content": ""}), []),
        (oa({"role": "assistant"}), []),
        (oa({"content": None}), []),
        (oa({}, "stop"), [Finish("stop")]),
        (oa({"content": "end"}, "length"), [Finish("length")]),
        (oa({"tool_calls": [CALL]}), []),
        (
            oa({"content": "a", "tool_calls": [CALL], "refusal": None}, "tool_calls"),
            [Finish("tool_calls")],
        ),
        (oa({"refusal": "no"}), []),
        ('{"choices": [{"delta": null}]}', []),
        ('{"choices": [{"delta": {"content": 5}}]}', []),
        (oa({"content": "x"}, logprobs={"content": []}, system_fingerprint="fp"), []),
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
        "null-delta",
        "non-string-content-kept",
        "extra-fields-kept",
    ],
)
def test_openai_items(data: str, after: list[Item]) -> None:
    """Issue 20 item 1: one SSE data field is one entry, the upstream's chunk as
    sent (role, nulls, every field) minus id/created/model, then its finish."""
    assert openai_items(data) == [Chunk(body(data)), *after]


@pytest.mark.parametrize(
    "data",
    [
        '{"choices": [], "usage": {"total_tokens": 3}}',
        '{"usage": {"total_tokens": 3}}',
        '{"choices": null}',
        '{"choices": []}',
    ],
    ids=["unusable-usage-empty-choices", "unusable-usage-no-choices", "null-choices", "empty"],
)
def test_openai_items_without_a_choice_or_usage(data: str) -> None:
    """A chunk with no choice and no usable usage carries nothing to relay."""
    assert openai_items(data) == []


def test_openai_items_text_fast_path() -> None:
    """The first text-only chunk of a stream sets its shape (a Chunk with
    shape=True); later text-only chunks with the same other fields are bare
    strings; one that differs in any field (here logprobs) stays a Chunk."""
    state = StreamState()
    role = oa({"role": "assistant", "content": ""})
    first, second = oa({"content": "He"}), oa({"content": "llo"})
    other = oa({"content": "!"}, logprobs={"content": []})
    assert openai_items(role, state) == [Chunk(body(role))]
    assert openai_items(first, state) == [Chunk(body(first), shape=True)]
    assert openai_items(second, state) == ["llo"]
    assert openai_items(other, state) == [Chunk(body(other))]


def test_the_upstream_model_is_said_once_before_the_first_entry() -> None:
    """The upstream's ``model`` (``gen_ai.response.model`` in traces) is said
    once, as a ResponseModel just before the stream's first entry, whichever
    way that entry is made (a role chunk, the first text-only chunk, a
    usage-only chunk; after an opening chunk with no choices and an empty
    model, as Azure sends), and never again; it is never in an entry.  A
    stream that names no model says none.  Ollama's first line likewise."""
    named = "gpt-4o-2024-08-06"
    role = oa({"role": "assistant", "content": ""}, model=named)
    text, more = oa({"content": "Hi"}, model=named), oa({"content": "!"}, model="other")
    state = StreamState()
    assert openai_items(role, state) == [ResponseModel(named), Chunk(body(role))]
    assert openai_items(text, state) == [Chunk(body(text), shape=True)]
    assert openai_items(more, state) == ["!"]
    state = StreamState()
    assert openai_items(text, state) == [ResponseModel(named), Chunk(body(text), shape=True)]
    assert openai_items(role, state) == [Chunk(body(role))]
    state = StreamState()
    azure = '{"id": "", "object": "", "created": 0, "model": "", "choices": [], "x": []}'
    assert openai_items(azure, state) == []
    assert openai_items(role, state) == [ResponseModel(named), Chunk(body(role))]
    state = StreamState()
    counts = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    alone = orjson.dumps({"model": named, "choices": [], "usage": counts}).decode()
    assert openai_items(alone, state) == [
        ResponseModel(named), Chunk(body(alone)), Usage(1, 2, 3)
    ]  # fmt: skip
    state = StreamState()
    unnamed = oa({"role": "assistant", "content": ""})
    assert openai_items(unnamed, state) == [Chunk(body(unnamed))]
    assert openai_items(text, state) == [Chunk(body(text), shape=True)]  # too late: none
    state = StreamState()
    first = ollama_items(ol({"content": "Hi"}), state)
    assert first[0] == ResponseModel("llama")
    assert [type(item) for item in first] == [ResponseModel, Chunk]
    assert ollama_items(ol({"content": " there"}), state) == [" there"]


@pytest.mark.parametrize(
    "data",
    [
        '{"choices": [{"index": 1, "delta": {"content": "x"}}]}',
        '{"choices": [{"index": 0, "delta": {}}, {"index": 1, "delta": {}}]}',
    ],
    ids=["index-1", "two-choices"],
)
def test_openai_items_other_choice_is_malformed(data: str) -> None:
    """Issue 20 item 8: trio-stream asks for n = 1, so a choice index other
    than 0 (or a second choice) is the upstream's protocol error, never text
    merged into choice 0."""
    with pytest.raises(UpstreamError) as info:
        openai_items(data)
    assert info.value.code == "malformed_chunk"


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
    assert openai_items(raw) == [Chunk({"choices": [{"delta": {"content": "a\ufffdb"}}]})]


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
        (ol({"content": ""}), [Chunk.of({})]),
        (
            ol({"content": ""}, done=True, done_reason="stop"),
            [Chunk.of({}, "stop"), Finish("stop")],
        ),
        (
            ol({"content": "x"}, done=True, done_reason="length"),
            [Chunk.of({"content": "x"}, "length"), Finish("length")],
        ),
        (ol(done=True), [Chunk.of({}, "stop"), Finish("stop")]),
        (ol(done=True, done_reason="load"), [Chunk.of({}, "load"), Finish("load")]),
        (
            ol({"content": "", "thinking": "hm"}),
            [Chunk.of({"reasoning_content": "hm"})],
        ),
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
        (b'{"message": null}', [Chunk.of({})]),
    ],
    ids=[
        "content",
        "empty-content",
        "done-stop",
        "done-length",
        "done-without-message",
        "other-done-reason-kept",
        "thinking-is-reasoning-content",
        "tool-call-object-arguments",
        "tool-calls-string-and-missing-arguments",
        "empty-line",
        "blank-line",
        "null-message",
    ],
)
def test_ollama_items(line: bytes, items: list[Item]) -> None:
    """Issue 20 item 7: one NDJSON line is one entry in the OpenAI chunk shape
    (thinking as reasoning_content, tool calls with index, id and JSON-string
    arguments, done_reason as sent) and a finish when done."""
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


def test_ollama_tool_call_keeps_its_id_and_finishes_tool_calls() -> None:
    """Issue 20 item 7: Ollama's own tool-call id and function.index are kept
    (they were rewritten to call_<position>), and its done_reason "stop" after
    a tool call reads "tool_calls", as Ollama's own OpenAI layer says."""
    state = StreamState()
    call = {"id": "call_k3x9q2m7", "function": {"index": 2, "name": "f", "arguments": {}}}
    (said, item) = ollama_items(ol({"content": "", "tool_calls": [call]}), state)
    assert said == ResponseModel("llama")
    assert isinstance(item, Chunk)
    assert item.delta["tool_calls"] == [
        {"index": 2, "id": "call_k3x9q2m7", "type": "function",
         "function": {"name": "f", "arguments": "{}"}}
    ]  # fmt: skip
    items = ollama_items(ol({"content": ""}, done=True, done_reason="stop"), state)
    assert items[-1] == Finish("tool_calls")
    assert isinstance(items[0], Chunk)
    assert items[0].finish_reason == "tool_calls"


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
            assert not isinstance(item, Finish | Usage | ResponseModel)
            log.append(item)
    assert log.tool_calls == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    ]
    log = RunLog()
    (item,) = ollama_items(ol({"tool_calls": [{"function": {"name": "g", "arguments": {}}}]}))
    assert not isinstance(item, Finish | Usage | ResponseModel)
    log.append(item)
    assert log.tool_calls == [
        {"id": "call_0", "type": "function", "function": {"name": "g", "arguments": "{}"}}
    ]
