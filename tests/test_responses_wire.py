"""The Responses API's pure seam (:mod:`trio_stream.wire.responses`):
request translation, event rendering and sequence numbers, the object.
Synchronous: no trio, no server."""

from __future__ import annotations

from typing import Any

import orjson
import pydantic
import pytest
from openai.types.responses import (
    Response,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseStreamEvent,
)

from trio_stream.core.log import Chunk, Entry, Outcome, RunStatus
from trio_stream.errors import ApiError
from trio_stream.wire.responses import (
    ResponseEvents,
    ResponseMeta,
    ResponseState,
    fold,
    parse_responses_request,
    response_object,
)
from trio_stream.wire.sse import SSEDecoder

EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
META = ResponseMeta("m", "be brief", 10, background=True)
USAGE = {
    "input_tokens": 1, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
    "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 4,
}  # fmt: skip
ENDINGS = [
    Outcome(RunStatus.COMPLETED, "stop"),
    Outcome(RunStatus.COMPLETED, "length"),
    Outcome(RunStatus.CANCELLED, "stopped", "The run was stopped."),
    Outcome(RunStatus.FAILED, "upstream_error", "boom"),
]


def entry(delta: dict[str, Any]) -> Entry:
    """A log entry carrying ``delta`` (the only place these tests build one:
    the renderer reads entries through ``wire.responses.delta_of``)."""
    return Chunk.of(delta)


def parse(body: dict[str, Any]) -> Any:
    return parse_responses_request(orjson.dumps(body))


def test_a_string_input_and_instructions_become_chat_messages() -> None:
    """``instructions`` is a system message first, a string ``input`` one user
    message; ``max_output_tokens`` is ``max_tokens``; ``background`` is the
    detach flag; unknown fields do not reach the upstream (``stream_options``
    is trio-stream's own request for usage)."""
    chat, meta = parse({"model": "m", "input": "hi", "instructions": "be brief",
                        "max_output_tokens": 7, "background": True, "stream": True,
                        "temperature": 0.5, "metadata": {"k": "v"}})  # fmt: skip
    assert chat.messages == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
    ]  # fmt: skip
    assert (chat.max_tokens, chat.detach, chat.stream, chat.model) == (7, True, True, "m")
    assert chat.upstream_body() == {
        "model": "m", "messages": chat.messages, "stream": True, "max_tokens": 7,
        "temperature": 0.5, "stream_options": {"include_usage": True},
    }  # fmt: skip
    assert meta == ResponseMeta("m", "be brief", 7, True, True, 0.5, None)


def test_message_lists_translate_their_parts() -> None:
    """Text parts (input_text, output_text) join into one string; an image
    keeps the message a list of chat parts; roles pass through."""
    chat, _ = parse({"input": [
        {"role": "user", "content": [{"type": "input_text", "text": "a"},
                                     {"type": "input_text", "text": "b"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "c"}]},
        {"role": "user", "content": [{"type": "input_image", "image_url": "http://i"}]},
    ]})  # fmt: skip
    assert chat.messages == [
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://i", "detail": "auto"}}]},
    ]  # fmt: skip
    assert chat.model == "mock"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"input": []}, "invalid_type"),
        ({"input": [{"role": "tool", "content": "x"}]}, "invalid_type"),
        ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
         "unsupported_content"),
        ({"input": "x", "previous_response_id": "resp_1"}, "unsupported_parameter"),
        ({"input": "x", "stream": "yes"}, "invalid_type"),
    ],
)  # fmt: skip
def test_what_cannot_be_served_is_refused(body: dict[str, Any], code: str) -> None:
    """Inputs the chat translation cannot carry are a 400 naming the problem."""
    with pytest.raises(ApiError) as info:
        parse(body)
    assert (info.value.status, info.value.code) == (400, code)


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"input": None}, "missing_required_parameter", "input"),
        ({"input": 5}, "invalid_type", "input"),
        ({"input": []}, "invalid_type", "input"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "invalid_value", "input"),
        ({"input": [{"role": "user", "content": 5}]}, "invalid_type", "input[0].content"),
        ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
         "unsupported_content", "input[0].content[0]"),
        ({"input": ["x", {"role": "tool", "content": "x"}]}, "unsupported_input", "input[0]"),
        ({"input": [{"role": "tool", "content": "x"}]}, "invalid_type", "input[0].role"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]},
         "unsupported_input", "input[0].type"),
        ({"input": [{"type": "function_call_output", "output": "x"}]},
         "invalid_type", "input[0].call_id"),
        ({"input": [{"type": "function_call_output", "call_id": "c",
                     "output": [{"type": "input_image", "image_url": "http://i"}]}]},
         "unsupported_content", "input[0].output"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]},
         "invalid_type", "input[0].output"),
        ({"input": [{"role": "user", "content": "x"},
                    {"type": "function_call", "call_id": "c", "name": "f"}]},
         "invalid_type", "input[1].arguments"),
        ({"tools": {"type": "function"}}, "invalid_type", "tools"),
        ({"tools": [{"type": "web_search"}]}, "unsupported_tool", "tools[0].type"),
        ({"tools": [{"type": "function", "name": "f"}, "x"]}, "unsupported_tool", "tools[1]"),
        ({"tools": [{"type": "function"}]}, "invalid_type", "tools[0].name"),
        ({"tools": [{"type": "function", "name": "f", "parameters": "x"}]},
         "invalid_type", "tools[0].parameters"),
        ({"tools": [{"type": "function", "name": "f", "strict": "x"}]},
         "invalid_type", "tools[0].strict"),
        ({"tools": [{"type": "function", "name": "f", "description": 5}]},
         "invalid_type", "tools[0].description"),
        ({"tool_choice": "sometimes"}, "unsupported_tool_choice", "tool_choice"),
        ({"tool_choice": {"type": "file_search"}}, "unsupported_tool_choice", "tool_choice"),
        ({"tool_choice": {"type": "function"}}, "invalid_type", "tool_choice.name"),
        ({"parallel_tool_calls": "x"}, "invalid_type", "parallel_tool_calls"),
        ({"text": "x"}, "invalid_type", "text"),
        ({"text": {"format": "x"}}, "invalid_type", "text.format"),
        ({"text": {"format": {"type": "grammar"}}}, "unsupported_parameter", "text.format.type"),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}},
         "invalid_type", "text.format.name"),
        ({"text": {"format": {"type": "json_schema", "name": "n"}}},
         "invalid_type", "text.format.schema"),
        ({"previous_response_id": "resp_1"}, "unsupported_parameter", "previous_response_id"),
        ({"conversation": "conv_1"}, "unsupported_parameter", "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "unsupported_parameter", "prompt"),
        ({"model": 5}, "invalid_type", "model"),
        ({"instructions": 5}, "invalid_type", "instructions"),
        ({"stream": "yes"}, "invalid_type", "stream"),
        ({"background": "yes"}, "invalid_type", "background"),
        ({"store": "yes"}, "invalid_type", "store"),
        ({"background": True, "store": False}, "invalid_value", "store"),
        ({"max_output_tokens": "x"}, "invalid_type", "max_output_tokens"),
        ({"max_output_tokens": 0}, "invalid_value", "max_output_tokens"),
        ({"temperature": "x"}, "invalid_type", "temperature"),
        ({"top_p": "x"}, "invalid_type", "top_p"),
        ({"reasoning": "x"}, "invalid_type", "reasoning"),
        ({"reasoning": {"effort": 5}}, "invalid_type", "reasoning.effort"),
        ({"include": "x"}, "invalid_type", "include"),
        ({"include": ["file_search_call.results"]}, "unsupported_parameter", "include[0]"),
        ({"top_logprobs": "x"}, "invalid_type", "top_logprobs"),
        ({"top_logprobs": 21}, "invalid_value", "top_logprobs"),
    ],
)  # fmt: skip
def test_every_400_names_its_field_in_param(body: dict[str, Any], code: str, param: str) -> None:
    """Every 400 of the Responses request parser carries ``param``, the path
    of the field at fault, as OpenAI's error body does and as the chat
    parser's 400s do (docs/api.md section 2.2): a client or SDK can point
    at the field without parsing the message.  One case per raise site."""
    with pytest.raises(ApiError) as info:
        parse({"input": "x", **body})
    assert (info.value.status, info.value.code, info.value.param) == (400, code, param)
    assert orjson.loads(info.value.body())["error"]["param"] == param


def events_of(raw: bytes) -> list[Any]:
    """Decode SSE bytes, check ``id:`` = ``sequence_number``, validate strictly."""
    out = []
    for e in SSEDecoder().feed(raw):
        event = EVENT.validate_json(e.data)
        assert e.id == str(event.sequence_number)
        assert e.event == event.type
        out.append(event)
    return out


def whole_stream(
    outcome: Outcome, entries: list[Any], after: int = -1, batch: int = 1
) -> list[Any]:
    """Every event of a run with ``entries`` and ``outcome`` numbered above
    ``after``, the log given to the renderer ``batch`` entries at a time."""
    ev = ResponseEvents("resp_abc", META, 1.0, after)
    raw = ev.preamble()
    for i in range(0, len(entries), batch):
        raw += ev.deltas(entries[i : i + batch], i + 1)
    return events_of(raw + ev.trailing(outcome, USAGE))


@pytest.mark.parametrize("outcome", ENDINGS, ids=lambda o: f"{o.status.value}-{o.reason}")
def test_sequence_numbers_are_a_pure_function_of_the_log(outcome: Outcome) -> None:
    """Numbers start at 0 and have no gaps; for text, log entry n is n + 3
    (the message item and its part open at 2 and 3); the trailing events
    follow the last entry; a delta with nothing to show makes no event; a
    replay after any N, however the log is batched, yields exactly the
    events numbered above N."""
    text = ["a", "b", "c"]
    full = whole_stream(outcome, text)
    numbers = [e.sequence_number for e in full]
    assert numbers == list(range(len(full)))
    assert [e.delta for e in full if e.type == "response.output_text.delta"] == text
    assert [e.sequence_number for e in full if hasattr(e, "delta")] == [4, 5, 6]
    entries: list[Any] = ["a", "b", entry({"audio": {"id": "x"}}), "c"]
    full = whole_stream(outcome, entries)
    assert [e.sequence_number for e in full] == list(range(len(full)))
    for after in range(-1, len(full)):
        for batch in (1, 3):
            replay = whole_stream(outcome, entries, after, batch)
            assert [e.model_dump() for e in replay] == [
                e.model_dump() for e in full if e.sequence_number > after
            ], (after, batch)
    kinds = {
        "stop": "response.completed", "length": "response.incomplete",
        "stopped": "error", "upstream_error": "response.failed",
    }  # fmt: skip
    assert full[-1].type == kinds[outcome.reason]


def test_the_object_by_status() -> None:
    """The object validates with the SDK's ``Response`` in every state, and
    its status and output follow the run: queued (background, nothing yet),
    in_progress, and each ending; ``output_text`` is the text received."""

    def obj(outcome: Outcome | None, deltas: int, content: str) -> Response:
        entries = list(content) if deltas else []
        state = ResponseState("resp_abc", META, 1.5, fold("resp_abc", entries), outcome,
                              USAGE if outcome else None)  # fmt: skip
        return Response.model_validate(response_object(state))

    assert (obj(None, 0, "").status, obj(None, 0, "").output) == ("queued", [])
    assert obj(None, 2, "ab").status == "in_progress"
    assert obj(None, 2, "ab").output_text == "ab"
    statuses = [obj(o, 3, "abc") for o in ENDINGS]
    assert [r.status for r in statuses] == ["completed", "incomplete", "cancelled", "failed"]
    assert all(r.output_text == "abc" for r in statuses)
    assert statuses[1].incomplete_details is not None
    assert statuses[3].error is not None
    assert statuses[3].error.message == "boom"
    assert statuses[0].usage is not None
    assert statuses[0].usage.total_tokens == 4


# -- function calling, reasoning, refusal (issue 20 item 6) -------------------
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}}


def test_function_tools_tool_choice_and_text_format_become_their_chat_shapes() -> None:
    """A flat Responses function tool becomes chat's nested ``function``;
    ``tool_choice`` (a string or a named function), ``parallel_tool_calls``,
    ``text.format`` (json_schema, json_object) and ``reasoning.effort`` reach
    the upstream in their chat shapes, and the object echoes what was asked."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    chat, meta = parse({
        "input": "hi", "parallel_tool_calls": False,
        "tools": [{"type": "function", "name": "get_weather", "description": "d",
                   "parameters": WEATHER, "strict": True},
                  {"type": "function", "name": "noop", "parameters": None, "strict": None}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_schema", "name": "out", "schema": schema,
                            "strict": True}},
        "reasoning": {"effort": "low"},
    })  # fmt: skip
    body = chat.upstream_body()
    assert body["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "d",
                                          "parameters": WEATHER, "strict": True}},
        {"type": "function", "function": {"name": "noop"}},
    ]  # fmt: skip
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True},
    }  # fmt: skip
    assert body["reasoning_effort"] == "low"
    state = ResponseState("resp_abc", meta, 1.0, fold("resp_abc", []), None, None)
    shown = Response.model_validate(response_object(state))
    assert [t.name for t in shown.tools] == ["get_weather", "noop"]  # type: ignore[union-attr]
    assert shown.tool_choice.name == "get_weather"  # type: ignore[union-attr]
    assert shown.parallel_tool_calls is False
    assert shown.text is not None
    assert shown.text.format is not None
    assert shown.text.format.type == "json_schema"
    for choice in ("auto", "none", "required"):
        assert parse({"input": "x", "tool_choice": choice})[0].body["tool_choice"] == choice
    chat, _ = parse({"input": "x", "text": {"format": {"type": "json_object"}}})
    assert chat.body["response_format"] == {"type": "json_object"}
    chat, _ = parse({"input": "x", "text": {"format": {"type": "text"}}, "tools": []})
    assert "response_format" not in chat.body
    assert "tools" not in chat.body


def test_function_call_items_round_trip_as_assistant_tool_calls_and_tool_messages() -> None:
    """Echoed ``function_call`` items join the assistant message before them
    (or make one), ``function_call_output`` items become ``tool`` messages
    (text parts joined), ``reasoning`` items are not sent, an echoed refusal
    stays a refusal."""
    chat, _ = parse({"input": [
        {"role": "user", "content": "weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Let me look.", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
         "arguments": "{\"city\":\"Tokyo\"}", "status": "completed"},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather",
         "arguments": "{\"city\":\"Oslo\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "22C"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "3"}, {"type": "input_text", "text": "C"}]},
        {"type": "function_call", "call_id": "call_3", "name": "noop", "arguments": ""},
        {"type": "message", "role": "assistant", "content": [
            {"type": "refusal", "refusal": "I can't."}]},
    ]})  # fmt: skip

    def call(i: str, name: str, args: str) -> dict[str, Any]:
        return {"id": i, "type": "function", "function": {"name": name, "arguments": args}}

    assert chat.messages == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            call("call_1", "get_weather", '{"city":"Tokyo"}'),
            call("call_2", "get_weather", '{"city":"Oslo"}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "3C"},
        {"role": "assistant", "content": None, "tool_calls": [call("call_3", "noop", "")]},
        {"role": "assistant", "content": None, "refusal": "I can't."},
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"tools": [{"type": "function", "name": "f"}, {"type": "file_search"}]}, "tools[1]"),
        ({"tools": [{"type": "computer_use_preview"}]}, "tools[0]"),
        ({"tools": [{"type": "mcp", "server_label": "x"}]}, "tools[0]"),
        ({"tools": [{"type": "function", "name": "f", "parameters": "x"}]},
         "tools[0].parameters"),
        ({"tools": {"type": "function"}}, "tools"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format"),
        ({"text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format.schema"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"input": [{"type": "function_call_output", "call_id": "c",
                     "output": [{"type": "input_image", "image_url": "http://i"}]}]},
         "input[0].output"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
         "input[0].arguments"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ],
)  # fmt: skip
def test_what_the_translation_cannot_carry_is_a_400_naming_the_field(
    body: dict[str, Any], field: str
) -> None:
    """Tools of other types, other tool choices and formats, item references
    and malformed function items are refused (400, the field named in the
    message), never dropped."""
    with pytest.raises(ApiError) as info:
        parse({"input": "x", **body})
    assert info.value.status == 400
    assert f"'{field}'" in info.value.message


def openai_call(index: int, *pieces: str, call_id: str = "call_1", name: str = "f") -> list[Any]:
    """OpenAI's tool-call deltas: id, name and ``""`` first, then fragments."""
    first = {"index": index, "id": call_id, "type": "function",
             "function": {"name": name, "arguments": ""}}  # fmt: skip
    rest = [{"index": index, "function": {"arguments": p}} for p in pieces]
    return [entry({"tool_calls": [d]}) for d in [first, *rest]]


def kinds(events: list[Any]) -> list[tuple[str, int | None]]:
    return [(e.type, getattr(e, "output_index", None)) for e in events]


DONE = Outcome(RunStatus.COMPLETED, "tool_calls")


def test_text_then_tool_calls_stream_as_items_in_order() -> None:
    """Text then two tool calls: the message item (index 0) is closed when
    the first call opens; each call is a ``function_call`` item with its
    ``call_id``, ``name`` and argument deltas, closed at the end with
    ``function_call_arguments.done``; the response is ``completed`` and its
    output lists the message and both calls."""
    entries = ["Let ", "me.", *openai_call(0, '{"a":', "1}"),
               *openai_call(1, "{}", call_id="call_2", name="g")]  # fmt: skip
    events = whole_stream(DONE, entries)
    assert kinds(events) == [
        ("response.created", None), ("response.in_progress", None),
        ("response.output_item.added", 0), ("response.content_part.added", 0),
        ("response.output_text.delta", 0), ("response.output_text.delta", 0),
        ("response.output_text.done", 0), ("response.content_part.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.output_item.added", 2),
        ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.done", 1), ("response.output_item.done", 1),
        ("response.function_call_arguments.done", 2), ("response.output_item.done", 2),
        ("response.completed", None),
    ]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = events[9].item
    assert (added.type, added.call_id, added.name, added.arguments) == (
        "function_call", "call_1", "f", "")  # fmt: skip
    assert (events[14].arguments, events[14].model_dump()["name"]) == ('{"a":1}', "f")
    final = events[-1].response
    assert final.status == "completed"
    assert final.output_text == "Let me."
    calls = [o for o in final.output if o.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments, c.status) for c in calls] == [
        ("call_1", "f", '{"a":1}', "completed"), ("call_2", "g", "{}", "completed")]  # fmt: skip
    assert len({o.id for o in final.output}) == 3
    for after in range(-1, len(events)):
        replay = whole_stream(DONE, entries, after, batch=2)
        assert [e.model_dump() for e in replay] == [e.model_dump() for e in events[after + 1 :]]


def test_a_tool_call_only_answer_has_no_message_item() -> None:
    """vLLM's shape (name first, no ``arguments`` key, then fragments): one
    ``function_call`` item at index 0 and no empty message; while running
    the object shows the call ``in_progress`` with the arguments so far."""
    first = {"index": 0, "id": "chatcmpl-tool-1", "type": "function",
             "function": {"name": "get_weather"}}  # fmt: skip
    entries: list[Any] = [entry({"tool_calls": [first]})] + [
        entry({"tool_calls": [{"index": 0, "function": {"arguments": p}}]})
        for p in ('{"city": "', "Tokyo", '"}')
    ]
    events = whole_stream(DONE, entries)
    assert [e.type for e in events][2:] == [
        "response.output_item.added", *["response.function_call_arguments.delta"] * 3,
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip
    assert [o.type for o in events[-1].response.output] == ["function_call"]
    running = ResponseState("resp_abc", META, 1.0, fold("resp_abc", entries[:2]), None, None)
    shown = Response.model_validate(response_object(running))
    assert shown.status == "in_progress"
    (call,) = shown.output
    assert (call.type, call.status, call.arguments) == (  # type: ignore[union-attr]
        "function_call", "in_progress", '{"city": "')  # fmt: skip


def test_reasoning_is_an_item_before_the_message_and_a_refusal_a_part() -> None:
    """``reasoning_content`` (or ``reasoning``) deltas make a ``reasoning``
    item with a ``reasoning_text`` part, closed when the answer starts; a
    ``refusal`` delta is a ``refusal`` content part of the message with
    ``response.refusal.delta``/``.done``; a delta with both reasoning and
    text ends its reasoning before the text; numbers stay gapless and
    replays exact."""
    entries: list[Any] = [entry({"reasoning_content": "Think"}),
                          entry({"reasoning_content": "ing."}), "Hi"]  # fmt: skip
    events = whole_stream(Outcome(RunStatus.COMPLETED, "stop"), entries)
    assert kinds(events)[2:] == [
        ("response.output_item.added", 0), ("response.content_part.added", 0),
        ("response.reasoning_text.delta", 0), ("response.reasoning_text.delta", 0),
        ("response.reasoning_text.done", 0), ("response.content_part.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1), ("response.content_part.added", 1),
        ("response.output_text.delta", 1),
        ("response.output_text.done", 1), ("response.content_part.done", 1),
        ("response.output_item.done", 1), ("response.completed", None),
    ]  # fmt: skip
    reasoning, message = events[-1].response.output
    assert reasoning.type == "reasoning"
    assert reasoning.summary == []
    assert [c.text for c in reasoning.content] == ["Thinking."]
    assert message.content[0].text == "Hi"
    assert message.id == "msg_abc"

    refused = whole_stream(
        Outcome(RunStatus.COMPLETED, "stop"),
        [entry({"refusal": "I can"}), entry({"refusal": "'t."})],
    )
    assert [e.type for e in refused][2:] == [
        "response.output_item.added", "response.content_part.added",
        "response.refusal.delta", "response.refusal.delta", "response.refusal.done",
        "response.content_part.done", "response.output_item.done", "response.completed",
    ]  # fmt: skip
    (message,) = refused[-1].response.output
    assert message.type == "message"
    assert [(p.type, p.refusal) for p in message.content] == [("refusal", "I can't.")]
    both = whole_stream(DONE, [entry({"reasoning_content": "56.", "content": "7"}), "!"])
    output = both[-1].response.model_dump()["output"]  # one chunk: its reasoning ends first
    assert [(o["type"], [p["text"] for p in o["content"]]) for o in output] == [
        ("reasoning", ["56."]), ("message", ["7!"])]  # fmt: skip
    for entries in ([entry({"reasoning": "r"}), entry({"refusal": "no"})],
                    ["a", entry({"refusal": "b"}), "c"]):  # fmt: skip
        full = whole_stream(DONE, entries)
        assert [e.sequence_number for e in full] == list(range(len(full)))
        for after in range(-1, len(full)):
            replay = whole_stream(DONE, entries, after)
            assert [e.model_dump() for e in replay] == [e.model_dump() for e in full[after + 1 :]]


def test_an_empty_answer_is_one_empty_message_and_a_failure_leaves_items_open() -> None:
    """A completed run with no delta answers one empty message (as before);
    a failed one after a tool-call delta ends with ``response.failed``, its
    call ``incomplete``, no ``.done`` events."""
    empty = whole_stream(Outcome(RunStatus.COMPLETED, "stop"), [])
    assert [e.sequence_number for e in empty] == list(range(8))
    assert empty[-1].response.output_text == ""
    assert [o.type for o in empty[-1].response.output] == ["message"]
    failed = whole_stream(ENDINGS[3], openai_call(0, "{"))
    assert [e.type for e in failed][-1] == "response.failed"
    assert not any(e.type.endswith(".done") for e in failed)
    (call,) = failed[-1].response.output
    assert (call.status, call.arguments) == ("incomplete", "{")


def test_a_tool_call_without_an_id_gets_one() -> None:
    """An upstream that sends no tool-call ``id`` still gives each
    ``function_call`` item a ``call_id`` (unique in the response), so the
    client can answer it with a ``function_call_output``."""
    calls = [{"index": i, "function": {"name": "f", "arguments": "{}"}} for i in (0, 1)]
    events = whole_stream(DONE, [entry({"tool_calls": calls})])
    output = events[-1].response.output
    assert [o.call_id for o in output] == ["call_abc_0", "call_abc_1"]
    assert [o.id for o in output] == ["fc_abc_0", "fc_abc_1"]


def test_include_and_top_logprobs_ask_the_chat_upstream_for_logprobs() -> None:
    """``include: ["message.output_text.logprobs"]`` is the upstream's
    ``logprobs: true``; ``top_logprobs`` (with or without it) is
    ``logprobs: true`` and ``top_logprobs``, echoed on the object; without
    either nothing about logprobs is sent."""
    include = {"include": ["message.output_text.logprobs"]}
    asked: list[tuple[dict[str, Any], dict[str, Any], int | None]] = [
        (include, {"logprobs": True}, None),
        ({**include, "top_logprobs": 2}, {"logprobs": True, "top_logprobs": 2}, 2),
        ({"top_logprobs": 0}, {"logprobs": True, "top_logprobs": 0}, 0),
        ({"include": [], "top_logprobs": None}, {}, None),
        ({}, {}, None),
    ]  # fmt: skip
    for extra, sent, top in asked:
        chat, meta = parse({"model": "m", "input": "hi", **extra})
        body = chat.upstream_body()
        assert {k: body[k] for k in ("logprobs", "top_logprobs") if k in body} == sent, extra
        assert meta.top_logprobs == top
        state = ResponseState("resp_abc", meta, 1.0, fold("resp_abc", []), None, None)
        assert Response.model_validate(response_object(state)).top_logprobs == top


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"include": "message.output_text.logprobs"}, "invalid_type", "include"),
        ({"include": [1]}, "invalid_type", "include"),
        ({"include": ["message.output_text.logprobs", "reasoning.encrypted_content"]},
         "unsupported_parameter", "include[1]"),
        ({"include": ["file_search_call.results"]}, "unsupported_parameter", "include[0]"),
        ({"top_logprobs": "2"}, "invalid_type", "top_logprobs"),
        ({"top_logprobs": True}, "invalid_type", "top_logprobs"),
        ({"top_logprobs": 1.5}, "invalid_type", "top_logprobs"),
        ({"top_logprobs": 21}, "invalid_value", "top_logprobs"),
        ({"top_logprobs": -1}, "invalid_value", "top_logprobs"),
    ],
)  # fmt: skip
def test_include_and_top_logprobs_are_validated(
    body: dict[str, Any], code: str, param: str
) -> None:
    """``include`` is an array of strings naming only what this server can
    give (the output text's logprobs): anything else is a 400
    ``unsupported_parameter`` naming the value's place, never ignored;
    ``top_logprobs`` is an integer in 0..20 (``invalid_type`` /
    ``invalid_value``)."""
    with pytest.raises(ApiError) as info:
        parse({"input": "x", **body})
    assert (info.value.status, info.value.code, info.value.param) == (400, code, param)
    assert f"'{param}'" in info.value.message


def lp(token: str, logprob: float, top: list[Any] | None, raw: bytes | None = b"") -> Any:
    """A chat ``logprobs.content`` entry (``raw``: its bytes; b"" means the
    token's UTF-8, None a ``null``)."""
    data = list(token.encode()) if raw == b"" else None if raw is None else list(raw)
    return {"token": token, "logprob": logprob, "bytes": data, "top_logprobs": top}


def with_logprobs(delta: dict[str, Any], tokens: list[Any], shape: bool = False) -> Chunk:
    """A log entry as vLLM streams it with ``logprobs: true``: ``delta`` and
    its choice's ``logprobs.content``."""
    choice = {"index": 0, "delta": delta, "logprobs": {"content": tokens}, "finish_reason": None}
    return Chunk({"object": "chat.completion.chunk", "choices": [choice]}, shape)


def as_responses(token: dict[str, Any]) -> dict[str, Any]:
    """The Responses ``Logprob`` of a chat entry: ``null`` bytes are ``[]``."""
    tops = [{**t, "bytes": t["bytes"] or []} for t in token["top_logprobs"] or ()]
    return {**token, "bytes": token["bytes"] or [], "top_logprobs": tops}


def test_token_logprobs_ride_the_text_deltas_and_join_in_the_part() -> None:
    """Each ``response.output_text.delta`` carries its chunk's
    ``logprobs.content`` field by field (chat's ``null`` bytes as ``[]``,
    the Responses type having a list); ``output_text.done``, the
    ``output_text`` part, the item and the final object carry the
    concatenation.  A ``str`` entry carries its shape's logprobs (it stands
    for that chunk with its text), a reasoning chunk's logprobs have no
    place (none shown), a chunk with no text but tokens makes an empty text
    delta with them.  The SDK's types parse every event and the object, and
    replays from any N are exact."""
    t1 = lp(" Caf", -0.5, [lp(" Caf", -0.5, None), lp(" The", -8.0, None, None)])
    t2 = lp("é", -0.1, [lp("é", -0.1, None)], raw=None)
    t3 = lp("\ufffd", -1.0, [], raw=b"\xe2")
    entries: list[Any] = [
        with_logprobs({"reasoning_content": "hm"}, [lp("hm", -2.0, [])]),
        with_logprobs({"content": " Caf"}, [t1], shape=True),
        " Caf",  # the same chunk again: its text and the shape's logprobs
        with_logprobs({"content": "é"}, [t2]),
        with_logprobs({"content": ""}, [t3]),
        entry({"content": "!"}),
        with_logprobs({"content": ""}, []),
    ]  # fmt: skip
    done = Outcome(RunStatus.COMPLETED, "stop")
    events = whole_stream(done, entries)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [e.delta for e in deltas] == [" Caf", " Caf", "é", "", "!"]
    expected = [[as_responses(t1)], [as_responses(t1)], [as_responses(t2)], [as_responses(t3)], []]
    assert [[x.model_dump() for x in e.logprobs] for e in deltas] == expected
    assert expected[2][0]["bytes"] == []
    assert expected[0][0]["top_logprobs"][1]["bytes"] == []
    joined = [token for tokens in expected for token in tokens]
    (text_done,) = [e for e in events if e.type == "response.output_text.done"]
    assert [x.model_dump() for x in text_done.logprobs] == joined
    (reasoning_done,) = [e for e in events if e.type == "response.reasoning_text.done"]
    assert reasoning_done.text == "hm"
    parts = [e.part for e in events if e.type == "response.content_part.done"]
    assert [p.model_dump().get("logprobs") for p in parts] == [None, joined]
    final = events[-1].response
    assert final.output_text == " Caf Café!"
    for response in (final, Response.model_validate(response_object(ResponseState(
            "resp_abc", META, 1.0, fold("resp_abc", entries), done, USAGE)))):  # fmt: skip
        message = response.output[1]
        assert isinstance(message, ResponseOutputMessage)
        (part,) = message.content
        assert isinstance(part, ResponseOutputText)
        assert [x.model_dump() for x in part.logprobs or ()] == joined
    for after in range(-1, len(events)):
        replay = whole_stream(done, entries, after, batch=2)
        assert [e.model_dump() for e in replay] == [e.model_dump() for e in events[after + 1 :]]
