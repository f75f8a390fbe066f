"""Token logprobs on ``/v1/responses`` (docs/api.md section 8, issue 20's
logprobs row), on the real server with a fake upstream replaying what vLLM
streams with ``logprobs: true, top_logprobs: 2``
(``tests/transcripts/vllm_logprobs.transcript``).

What the client receives is compared field by field with what the upstream
sent, streamed and not, raw and through the official SDK (sync client in a
worker thread, as in ``tests/test_openai_sdk.py``).
"""

from __future__ import annotations

from typing import Any

import orjson
import trio
from openai.types.responses import Response, ResponseOutputMessage, ResponseOutputText

from tests.conftest import loopback_client, running_server
from tests.test_openai_sdk import sdk
from tests.test_responses_tools import EVENT, serving
from tests.transcript_format import Transcript, by_name
from tests.transcript_upstream import forwarded
from trio_stream import Settings
from trio_stream.wire.sse import SSEDecoder

INCLUDE = ["message.output_text.logprobs"]
ASK = {"model": "m", "input": "Say café ok", "include": INCLUDE, "top_logprobs": 2}


def as_responses(token: dict[str, Any]) -> dict[str, Any]:
    """A chat logprob entry in the Responses ``Logprob`` shape: the same
    fields, chat's ``null`` bytes as ``[]``."""
    tops = [{**t, "bytes": t["bytes"] or []} for t in token["top_logprobs"] or ()]
    return {**token, "bytes": token["bytes"] or [], "top_logprobs": tops}


def sent_deltas(t: Transcript) -> list[tuple[str, list[dict[str, Any]]]]:
    """``(content, logprobs)`` of each chunk of ``t`` with text, in the
    Responses shape, in order."""
    out = []
    for line in t.body.decode().splitlines():
        if not line.startswith("data: {"):
            continue
        for choice in orjson.loads(line[6:])["choices"]:
            if choice["delta"].get("content"):
                tokens = (choice.get("logprobs") or {}).get("content") or []
                out.append((choice["delta"]["content"], [as_responses(x) for x in tokens]))
    return out


async def raw_events(server: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every event of one streamed response as sent (JSON), each validated
    with the SDK's event types, numbers gapless."""
    async with (
        loopback_client(server) as http,
        http.stream("POST", "/v1/responses", json={**body, "stream": True}) as r,
    ):
        assert r.status_code == 200
        raw = await r.aread()
    events = [orjson.loads(e.data) for e in SSEDecoder().feed(raw)]
    for event in events:
        EVENT.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def text_part(response: dict[str, Any]) -> dict[str, Any]:
    (message,) = response["output"]
    (part,) = message["content"]
    assert part["type"] == "output_text"
    return dict(part)


async def test_logprobs_reach_the_client_streamed_and_not(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """With ``include: ["message.output_text.logprobs"], top_logprobs: 2``
    the upstream is asked ``logprobs: true, top_logprobs: 2``; each
    ``response.output_text.delta`` carries exactly its chunk's
    ``logprobs.content`` (token, logprob, bytes, top_logprobs, field by
    field), and ``output_text.done``, the part and the final object --
    streamed and ``stream: false`` -- carry them all, in order.  The saved
    row read back shows the text with ``logprobs: []`` (the lists are not
    saved)."""
    t = by_name("vllm_logprobs")
    expected = sent_deltas(t)
    joined = [token for _, tokens in expected for token in tokens]
    assert len(joined) == 3
    assert all(len(x["top_logprobs"]) == 2 for x in joined)
    fake = await serving(settings, nursery, t)
    s = settings.replace(upstream="openai", upstream_url=fake.url)
    async with running_server(s) as server:
        events = await raw_events(server, ASK)
        async with loopback_client(server) as http:
            r = await http.post("/v1/responses", json=ASK)
            assert r.status_code == 200
            whole = r.json()
            saved = (await http.get(f"/v1/responses/{whole['id']}")).json()
    for body in forwarded(fake):
        assert (body["logprobs"], body["top_logprobs"]) == (True, 2)
    deltas = [(e["delta"], e["logprobs"]) for e in events
              if e["type"] == "response.output_text.delta"]  # fmt: skip
    assert deltas == expected
    (done,) = [e for e in events if e["type"] == "response.output_text.done"]
    assert done["logprobs"] == joined
    (part_done,) = [e for e in events if e["type"] == "response.content_part.done"]
    assert part_done["part"]["logprobs"] == joined
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    for response in (final, whole):
        Response.model_validate(response)
        assert response["top_logprobs"] == 2
        part = text_part(response)
        assert part["text"] == "".join(text for text, _ in expected)
        assert part["logprobs"] == joined
    part = text_part(saved)
    assert (part["text"], part["logprobs"]) == (text_part(whole)["text"], [])


async def test_the_sdk_parses_the_logprobs(settings: Settings, nursery: trio.Nursery) -> None:
    """The official SDK's ``responses.create(include=[...], top_logprobs=2)``
    parses the logprobs into its types: ``ResponseOutputText.logprobs`` of
    the answer, and ``ResponseTextDeltaEvent.logprobs`` of each streamed
    delta, equal field by field to what the upstream sent."""
    t = by_name("vllm_logprobs")
    expected = sent_deltas(t)
    joined = [token for _, tokens in expected for token in tokens]
    fake = await serving(settings, nursery, t)
    s = settings.replace(upstream="openai", upstream_url=fake.url)

    def use_sdk(server: Any) -> tuple[Response, list[Any]]:
        with sdk(server) as client:
            args: Any = {"model": "m", "input": ASK["input"], "include": INCLUDE,
                         "top_logprobs": 2}  # fmt: skip
            whole = client.responses.create(**args)
            with client.responses.create(**args, stream=True) as stream:
                events = list(stream)
        return whole, events

    async with running_server(s) as server:
        whole, events = await trio.to_thread.run_sync(use_sdk, server)
    for body in forwarded(fake):
        assert (body["logprobs"], body["top_logprobs"]) == (True, 2)
    (message,) = whole.output
    assert isinstance(message, ResponseOutputMessage)
    (part,) = message.content
    assert isinstance(part, ResponseOutputText)
    assert [x.model_dump() for x in part.logprobs or ()] == joined
    assert whole.top_logprobs == 2
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [(e.delta, [x.model_dump() for x in e.logprobs]) for e in deltas] == expected
    final = events[-1]
    assert final.type == "response.completed"
    assert [x.model_dump() for x in final.response.output[0].content[0].logprobs] == joined


async def test_a_background_response_keeps_its_logprobs_on_replay(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """A background response's logprobs are in the log, so the object read
    back from memory carries them and a replay from every
    ``starting_after`` is exactly the events numbered above it, logprobs
    included."""
    t = by_name("vllm_logprobs")
    joined = [token for _, tokens in sent_deltas(t) for token in tokens]
    fake = await serving(settings, nursery, t)
    s = settings.replace(upstream="openai", upstream_url=fake.url)
    async with running_server(s) as server, loopback_client(server) as http:
        events = await raw_events(server, {**ASK, "background": True})
        rid = events[0]["response"]["id"]
        assert events[-1]["type"] == "response.completed"
        stored = (await http.get(f"/v1/responses/{rid}")).json()
        assert text_part(stored)["logprobs"] == joined
        for after in range(-1, len(events)):
            query = f"stream=true&starting_after={after}" if after >= 0 else "stream=true"
            async with http.stream("GET", f"/v1/responses/{rid}?{query}") as r:
                raw = await r.aread()
            replay = [orjson.loads(e.data) for e in SSEDecoder().feed(raw)]
            assert replay == events[after + 1 :], after
