"""The Responses API's pure seam (:mod:`trio_stream.wire.responses`):
request translation, event rendering and sequence numbers, the object.
Synchronous: no trio, no server."""

from __future__ import annotations

from typing import Any

import orjson
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from trio_stream.core.log import Chunk, Outcome, RunStatus
from trio_stream.errors import ApiError
from trio_stream.wire.responses import (
    PREAMBLE,
    ResponseEvents,
    ResponseMeta,
    ResponseState,
    log_cursor,
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


def parse(body: dict[str, Any]) -> Any:
    return parse_responses_request(orjson.dumps(body))


def test_a_string_input_and_instructions_become_chat_messages() -> None:
    """``instructions`` is a system message first, a string ``input`` one user
    message; ``max_output_tokens`` is ``max_tokens``; ``background`` is the
    detach flag; unknown fields do not reach the upstream."""
    chat, meta = parse({"model": "m", "input": "hi", "instructions": "be brief",
                        "max_output_tokens": 7, "background": True, "stream": True,
                        "temperature": 0.5, "metadata": {"k": "v"}})  # fmt: skip
    assert chat.messages == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
    ]  # fmt: skip
    assert (chat.max_tokens, chat.detach, chat.stream, chat.model) == (7, True, True, "m")
    assert chat.upstream_body() == {
        "model": "m", "messages": chat.messages, "stream": True, "max_tokens": 7,
        "temperature": 0.5,
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


def events_of(raw: bytes) -> list[Any]:
    """Decode SSE bytes, check ``id:`` = ``sequence_number``, validate strictly."""
    out = []
    for e in SSEDecoder().feed(raw):
        event = EVENT.validate_json(e.data)
        assert e.id == str(event.sequence_number)
        assert e.event == event.type
        out.append(event)
    return out


def whole_stream(outcome: Outcome, entries: list[Any], after: int = -1) -> list[Any]:
    ev = ResponseEvents("resp_abc", META, 1.0, after)
    content = "".join(e for e in entries if isinstance(e, str))
    cursor = log_cursor(after)
    raw = ev.preamble() + ev.deltas(entries[cursor:], cursor + 1)
    return events_of(raw + ev.trailing(content, len(entries), outcome, USAGE))


@pytest.mark.parametrize("outcome", ENDINGS, ids=lambda o: f"{o.status.value}-{o.reason}")
def test_sequence_numbers_are_a_pure_function_of_the_log(outcome: Outcome) -> None:
    """Preamble 0-3, log entry n is n + 3, the trailing events follow the last
    entry; a replay after any N yields exactly the events numbered above N
    (a tool delta keeps its number but is not sent)."""
    entries: list[Any] = ["a", "b", Chunk.of({"refusal": "r"}), "c"]
    full = whole_stream(outcome, entries)
    numbers = [e.sequence_number for e in full]
    assert numbers[: PREAMBLE + 2] == [0, 1, 2, 3, 4, 5]
    assert 6 not in numbers  # the tool delta's number
    assert numbers == sorted(numbers)
    for after in range(-1, numbers[-1] + 1):
        replay = whole_stream(outcome, entries, after)
        assert [e.model_dump() for e in replay] == [
            e.model_dump() for e in full if e.sequence_number > after
        ], after
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
        state = ResponseState("resp_abc", META, 1.5, content, deltas, outcome,
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
