"""Function calling, reasoning and refusals on ``/v1/responses`` (docs/api.md
section 8, issue 20 item 6), on the real server with a fake upstream that
replays what OpenAI and vLLM send (``tests/transcripts``).

Every event and object is validated strictly with the official SDK's
models; the SDK itself (sync client in a worker thread, as in
``tests/test_openai_sdk.py``) parses the streamed and non-streamed answers
into its types.
"""

from __future__ import annotations

from typing import Any

import orjson
import pydantic
import pytest
import trio
from openai.types.responses import Response, ResponseFunctionToolCall, ResponseStreamEvent

from tests.conftest import loopback_client, running_server
from tests.test_openai_sdk import sdk
from tests.transcript_format import Transcript, by_name
from tests.transcript_upstream import forwarded, replaying
from tools.fakes import FakeUpstream
from trio_stream import Settings
from trio_stream.wire.sse import SSEDecoder

EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
TOOL = {
    "type": "function", "name": "get_weather", "description": "Get the current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
    "strict": None,
}  # fmt: skip
QUESTION = "What is the weather in Tokyo?"
ASK = {"model": "m", "input": QUESTION, "tools": [TOOL]}


def the_call(t: Transcript) -> tuple[str, str, str]:
    """``(id, name, arguments)`` of the one tool call a transcript streams."""
    call_id, name, arguments = "", "", ""
    for line in t.body.decode().splitlines():
        if not line.startswith("data: {"):
            continue
        for choice in orjson.loads(line[6:]).get("choices") or ():
            for part in choice["delta"].get("tool_calls") or ():
                call_id = part.get("id") or call_id
                name += part.get("function", {}).get("name") or ""
                arguments += part.get("function", {}).get("arguments") or ""
    return call_id, name, arguments


async def serving(settings: Settings, nursery: trio.Nursery, *ts: Transcript) -> FakeUpstream:
    fake = replaying(*ts)
    await nursery.start(fake.serve)
    return fake


async def events_of(server: Any, body: dict[str, Any]) -> list[Any]:
    """Every event of one streamed response, strictly validated, numbers gapless."""
    async with (
        loopback_client(server) as http,
        http.stream("POST", "/v1/responses", json={**body, "stream": True}) as r,
    ):
        assert r.status_code == 200
        raw = await r.aread()
    events = []
    for e in SSEDecoder().feed(raw):
        event = EVENT.validate_json(e.data)
        assert e.id == str(event.sequence_number)
        events.append(event)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


@pytest.mark.parametrize("name", ["openai_tool_calls", "vllm_tool_calls"])
async def test_tool_calls_come_back_as_function_call_items(
    settings: Settings, nursery: trio.Nursery, name: str
) -> None:
    """A flat Responses function tool reaches the upstream in chat's shape
    (``tool_choice`` too); the tool call the upstream streams comes back as
    one ``function_call`` item with the upstream's ``call_id``, ``name`` and
    exact ``arguments`` -- added, argument deltas, ``.done``, item done --
    and the response is ``completed`` with the call in its ``output``,
    streamed and not, and when retrieved from its saved row."""
    t = by_name(name)
    call_id, fn, arguments = the_call(t)
    fake = await serving(settings, nursery, t)
    s = settings.replace(upstream="openai", upstream_url=fake.url)
    async with running_server(s) as server:
        events = await events_of(server, {**ASK, "tool_choice": "required"})
        async with loopback_client(server) as http:
            r = await http.post("/v1/responses", json=ASK)
            assert r.status_code == 200
            whole = Response.model_validate(r.json())
            got = await http.get(f"/v1/responses/{whole.id}")
            again = Response.model_validate(got.json())
    sent = forwarded(fake)
    assert sent[0]["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather",
        "parameters": TOOL["parameters"]}}]  # fmt: skip
    assert sent[0]["tool_choice"] == "required"
    assert "tool_choice" not in sent[1]
    kinds = [e.type for e in events]
    assert kinds[2] == "response.output_item.added"
    assert kinds[-3:] == [
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == arguments
    assert events[2].item.type == "function_call"
    assert (events[2].item.call_id, events[2].item.name) == (call_id, fn)
    assert events[-3].arguments == arguments
    for response in (events[-1].response, whole, again):
        assert response.status == "completed"
        (item,) = response.output
        assert isinstance(item, ResponseFunctionToolCall)
        assert (item.call_id, item.name, item.arguments, item.status) == (
            call_id, fn, arguments, "completed")  # fmt: skip
    for response in (events[-1].response, whole):  # a saved row does not keep the tools
        assert [t.name for t in response.tools] == ["get_weather"]  # type: ignore[union-attr]


async def test_a_function_call_output_round_trip(settings: Settings, nursery: trio.Nursery) -> None:
    """The client sends the first answer's output back as input, with a
    ``function_call_output``: the upstream receives the assistant message
    with the same ``tool_calls`` (id, name, arguments) and a ``tool``
    message answering that id, and the second answer is text."""
    t = by_name("openai_tool_calls")
    fake = await serving(settings, nursery, t, by_name("openai_content_usage"))
    s = settings.replace(upstream="openai", upstream_url=fake.url)
    async with running_server(s) as server, loopback_client(server) as http:
        first = (await http.post("/v1/responses", json=ASK)).json()
        (call,) = first["output"]
        follow_up = [
            {"role": "user", "content": ASK["input"]}, *first["output"],
            {"type": "function_call_output", "call_id": call["call_id"], "output": "22C"},
        ]  # fmt: skip
        events = await events_of(server, {**ASK, "input": follow_up})
    call_id, name, arguments = the_call(t)
    sent = forwarded(fake)[1]["messages"]
    assert sent == [
        {"role": "user", "content": ASK["input"]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "22C"},
    ]  # fmt: skip
    final = events[-1].response
    assert final.status == "completed"
    assert final.output_text == "7 \N{MULTIPLICATION SIGN} 8 = 56."


@pytest.mark.parametrize(
    ("name", "kinds"),
    [
        ("vllm_reasoning_content", ["reasoning", "message"]),
        ("openrouter_reasoning", ["reasoning", "message"]),
        ("openai_refusal", ["message"]),
    ],
)
async def test_reasoning_and_refusal_reach_the_output(
    settings: Settings, nursery: trio.Nursery, name: str, kinds: list[str]
) -> None:
    """Reasoning the upstream streams is one ``reasoning`` item (its
    ``reasoning_text`` deltas join to the upstream's reasoning), followed by
    one message item -- also when one chunk ends the reasoning and starts the
    answer; a refusal is a ``refusal`` part with
    ``response.refusal.delta``/``.done`` -- not dropped as before, in the
    stream and in the stored object."""
    t = by_name(name)
    fake = await serving(settings, nursery, t, t)
    s = settings.replace(upstream="openai", upstream_url=fake.url)
    async with running_server(s) as server, loopback_client(server) as http:
        events = await events_of(server, {"input": "7 times 8?"})
        whole = Response.model_validate((await http.post(
            "/v1/responses", json={"input": "7 times 8?"})).json())  # fmt: skip
    final = events[-1].response
    assert final.status == "completed"
    assert [o.type for o in final.output] == kinds
    streamed: dict[str, str] = {}
    for chunk in t.body.decode().splitlines():
        if chunk.startswith("data: {"):
            for choice in orjson.loads(chunk[6:]).get("choices") or ():
                delta = choice["delta"]
                for key in ("reasoning_content", "reasoning", "refusal", "content"):
                    if isinstance(delta.get(key), str):
                        streamed[key] = streamed.get(key, "") + delta[key]
    reasoning = streamed.get("reasoning_content") or streamed.get("reasoning") or ""
    for response in (final, whole):
        output = response.model_dump()["output"]
        got = "".join(c["text"] for o in output if o["type"] == "reasoning"
                      for c in o["content"])  # fmt: skip
        assert got == reasoning
        refusals = [p["refusal"] for o in output if o["type"] == "message"
                    for p in o["content"] if p["type"] == "refusal"]  # fmt: skip
        assert "".join(refusals) == streamed.get("refusal", "")
        assert response.output_text == streamed.get("content", "")
    if "refusal" in streamed:
        assert [e.type for e in events if "refusal" in e.type] == [
            *["response.refusal.delta"] * 3, "response.refusal.done"]  # fmt: skip


THOUGHT_THEN_TEXT = [("reasoning", ["reasoning_text"]), ("message", ["output_text"])]


@pytest.mark.parametrize(
    ("name", "kinds"),
    [
        ("vllm_reasoning_content", THOUGHT_THEN_TEXT),
        ("vllm_reasoning", THOUGHT_THEN_TEXT),
        ("openrouter_reasoning", THOUGHT_THEN_TEXT),
        ("ollama_thinking", THOUGHT_THEN_TEXT),
        ("openai_refusal", [("message", ["refusal"])]),
    ],
)
async def test_a_saved_response_shows_its_reasoning_and_refusal_as_live(
    settings: Settings, nursery: trio.Nursery, name: str, kinds: list[Any]
) -> None:
    """A response read back from its saved row, once its run has left memory,
    has the same ``output`` as the live answer: the ``reasoning`` item with
    its ``reasoning_text`` and the message with its ``output_text`` or
    ``refusal`` part -- same ids, texts and statuses.  (Before: the row's
    output was its text and tool calls only; the reasoning item and the
    refusal were gone, a refusal read back as an empty message.)"""
    t = by_name(name)
    fake = await serving(settings, nursery, t)
    s = settings.replace(upstream=fake.fmt, upstream_url=fake.url)
    async with running_server(s) as server, loopback_client(server) as http:
        r = await http.post("/v1/responses", json={"model": "m", "input": "7 times 8?"})
        assert r.status_code == 200
        live = r.json()
        assert server.service.runs.runs == {}  # attached: gone from memory once answered
        got = await http.get(f"/v1/responses/{live['id']}")
    assert got.status_code == 200
    saved = got.json()
    Response.model_validate(saved)
    assert saved["status"] == live["status"] == "completed"
    assert [(o["type"], [p["type"] for p in o["content"]]) for o in live["output"]] == kinds
    assert saved["output"] == live["output"]


async def test_the_sdk_parses_function_calls_streamed_and_not(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """The official SDK's ``responses.create(tools=[...])`` parses the
    answer into its types (a ``ResponseFunctionToolCall`` in ``output``),
    with ``stream=True`` every event, and its ``responses.stream`` helper
    accumulates the events into the same final response."""
    t = by_name("openai_tool_calls")
    call_id, name, arguments = the_call(t)
    fake = await serving(settings, nursery, t)
    s = settings.replace(upstream="openai", upstream_url=fake.url)

    def use_sdk(server: Any) -> tuple[Response, list[Any], Response]:
        with sdk(server) as client:
            tools: Any = [TOOL]
            whole = client.responses.create(model="m", input=QUESTION, tools=tools)
            with client.responses.create(
                model="m", input=QUESTION, tools=tools, stream=True
            ) as stream:
                events = list(stream)
            with client.responses.stream(model="m", input=QUESTION, tools=tools) as helper:
                for _ in helper:
                    pass
                accumulated = helper.get_final_response()
        return whole, events, accumulated

    async with running_server(s) as server:
        whole, events, accumulated = await trio.to_thread.run_sync(use_sdk, server)
    assert events[-1].type == "response.completed"
    for response in (whole, events[-1].response, accumulated):
        (item,) = response.output
        assert isinstance(item, ResponseFunctionToolCall)
        assert (item.call_id, item.name, item.arguments) == (call_id, name, arguments)


async def test_a_background_response_with_tool_calls_replays_exactly(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """A background response that streamed a tool call replays, from every
    ``starting_after``, exactly the events numbered above it."""
    fake = await serving(settings, nursery, by_name("vllm_tool_calls"))
    s = settings.replace(upstream="openai", upstream_url=fake.url)
    async with running_server(s) as server, loopback_client(server) as http:
        events = await events_of(server, {**ASK, "background": True})
        rid = events[0].response.id
        assert events[-1].type == "response.completed"
        for after in range(-1, len(events)):
            query = f"stream=true&starting_after={after}" if after >= 0 else "stream=true"
            async with http.stream("GET", f"/v1/responses/{rid}?{query}") as r:
                raw = await r.aread()
            replay = [EVENT.validate_json(e.data) for e in SSEDecoder().feed(raw)]
            assert [e.model_dump() for e in replay] == [
                e.model_dump() for e in events[after + 1 :]
            ], after
