"""The Responses API (docs/api.md section 8) through the official ``openai``
SDK, against a real in-process server and the fake upstream.

As in ``tests/test_openai_sdk.py`` the *sync* client runs in a worker thread
(``trio.to_thread.run_sync``): the async client leaves its generators to
trio's finalizer.  Every event and object is also validated strictly against
the SDK's own pydantic models (the SDK itself builds them without
validation), so "the SDK parses it" means every field has the declared type.
"""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pydantic
import pytest
import trio
import trio.testing
from openai.types.responses import Response, ResponseStreamEvent

from tests.conftest import (
    RawClient,
    Server,
    loopback_client,
    running_server,
    tasks_living,
    waitable_server,
)
from tests.test_openai_sdk import sdk
from tools.fakes import FakeUpstream, mock_plan, token_plan
from trio_stream import Settings
from trio_stream.http.service import PUBLIC_TENANT
from trio_stream.upstream import mocktext
from trio_stream.wire.sse import SSEDecoder, SSEEvent

PROMPT = "tell me a story"
MESSAGES = [{"role": "user", "content": PROMPT}]
EVENT = pydantic.TypeAdapter(ResponseStreamEvent)


def keyed(server: Server, key: str) -> openai.OpenAI:
    """The sync SDK client with ``key``."""
    client = sdk(server)
    return client.with_options(api_key=key)


def check_event(data: str | bytes) -> Any:
    """Strictly validate one event's JSON with the SDK's union; return it."""
    return EVENT.validate_json(data)


def check_object(data: dict[str, Any]) -> Response:
    return Response.model_validate(data)


async def test_background_stream_resumes_after_a_dropped_connection(settings: Settings) -> None:
    """A background response survives its streaming client: after 7 deltas the
    client drops the connection; ``retrieve(stream=True, starting_after=n)``
    replays exactly the events after ``n`` then follows live, so the text is
    the mock's exact reply and the last event is ``response.completed``."""

    def first_part() -> tuple[str, list[str], int]:
        with sdk(server) as client:
            stream = client.responses.create(
                model="mock", input=PROMPT, background=True, stream=True, max_output_tokens=40
            )
            pieces: list[str] = []
            kinds: list[str] = []
            last = -1
            for event in stream:
                assert event.sequence_number == last + 1  # increasing, no gaps
                last = event.sequence_number
                kinds.append(event.type)
                if event.type == "response.created":
                    response_id = event.response.id
                    assert event.response.status == "queued"
                if event.type == "response.output_text.delta":
                    pieces.append(event.delta)
                    if len(pieces) == 7:
                        break
            stream.close()  # the connection is dropped mid-stream
        return response_id, pieces, last

    def second_part(response_id: str, after: int) -> list[Any]:
        with sdk(server) as client:
            stream = client.responses.retrieve(response_id, stream=True, starting_after=after)
            with stream:
                return list(stream)

    with trio.fail_after(20):
        async with running_server(settings.replace(mock_delay_ms=20)) as server:
            response_id, pieces, last = await trio.to_thread.run_sync(first_part)
            assert response_id.startswith("resp_")
            assert len(pieces) == 7
            assert last == 3 + 7
            rest = await trio.to_thread.run_sync(second_part, response_id, last)
            run = server.service.runs.runs[response_id]
            assert run.detached
            assert run.log.status.value == "completed"
    assert [e.sequence_number for e in rest] == list(range(last + 1, last + 1 + len(rest)))
    text = "".join(pieces) + "".join(
        e.delta for e in rest if e.type == "response.output_text.delta"
    )
    expected = mocktext.expected_text(MESSAGES, 40)
    assert text == expected
    assert rest[-1].type == "response.incomplete"  # max_output_tokens reached: "length"
    assert rest[-1].response.output_text == expected
    assert rest[-1].response.incomplete_details is not None
    assert rest[-1].response.usage is not None
    assert rest[-1].response.usage.output_tokens == 40


async def test_background_stream_ends_with_completed(settings: Settings) -> None:
    """Without ``max_output_tokens`` the mock stops by itself (``stop``): the
    replay from the middle ends with ``response.completed``, whose response
    carries the whole text and the usage."""

    def run_it() -> tuple[list[Any], list[Any]]:
        with sdk(server) as client:
            with client.responses.create(input=PROMPT, background=True, stream=True) as stream:
                head: list[Any] = [e for _, e in zip(range(10), stream, strict=False)]
            rid = head[0].response.id
            tail = client.responses.retrieve(rid, stream=True, starting_after=9)
            with tail:
                return head, list(tail)

    with trio.fail_after(20):
        async with running_server(settings.replace(mock_delay_ms=5)) as server:
            head, tail = await trio.to_thread.run_sync(run_it)
    events = head + tail
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:4]] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
    ]  # fmt: skip
    assert [e.type for e in events[-4:]] == [
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    expected = mocktext.expected_text(MESSAGES, None)
    assert events[-1].response.output_text == expected
    assert events[-4].text == expected
    assert events[-1].response.usage.output_tokens == 64


async def test_polling_retrieve_until_completed_and_another_key_gets_404(
    settings: Settings,
) -> None:
    """A background response is answered at once (``queued``); polling
    ``retrieve`` sees it through to ``completed`` with the exact
    ``output_text`` and usage.  A client with another key gets 404 on every
    route of it (tenant isolation), and so does a chat run's id."""
    s = settings.replace(api_keys=("key-a", "key-b"), mock_delay_ms=2)

    def poll() -> tuple[Any, list[Any], Any, list[int]]:
        with keyed(server, "key-a") as client:
            created = client.responses.create(input=PROMPT, background=True, max_output_tokens=12)
            seen: list[Any] = [created.status]
            while (got := client.responses.retrieve(created.id)).status not in (
                "completed",
                "incomplete",
            ):
                seen.append(got.status)
        statuses: list[int] = []
        with keyed(server, "key-b") as other:
            for call in (
                lambda: other.responses.retrieve(created.id),
                lambda: other.responses.cancel(created.id),
                lambda: other.responses.retrieve(created.id, stream=True),
            ):
                try:
                    call()
                except openai.NotFoundError as exc:
                    statuses.append(exc.status_code)
        return created, seen, got, statuses

    with trio.fail_after(20):
        async with running_server(s) as server:
            created, seen, final, statuses = await trio.to_thread.run_sync(poll)
            async with loopback_client(server) as http:
                auth = {"authorization": "Bearer key-a"}
                chat = await http.post(
                    "/v1/chat/completions",
                    json={"messages": MESSAGES, "max_tokens": 2},
                    headers=auth,
                )
                run_id = chat.headers["x-run-id"]
                as_response = await http.get(f"/v1/responses/{run_id}", headers=auth)
    assert created.status == "queued"
    assert set(seen) <= {"queued", "in_progress"}
    assert final.status == "incomplete"  # max_output_tokens reached
    assert final.output_text == mocktext.expected_text(MESSAGES, 12)
    assert final.usage is not None
    assert (final.usage.output_tokens, final.usage.input_tokens) == (12, 4)  # 15 chars / 4
    assert statuses == [404, 404, 404]
    assert as_response.status_code == 404


async def test_cancel_a_background_response_while_the_upstream_hangs(
    settings: Settings, fake_openai: FakeUpstream
) -> None:
    """Cancelling a background response whose upstream hangs closes the
    upstream connection within 1 s, answers ``cancelled``; a second cancel
    answers the same object; the partial text is saved exactly once."""
    tokens = ["Once", " upon", " a", " time"]
    fake_openai.plan = lambda _: token_plan(tokens, hang_after=3)
    s = settings.replace(upstream="openai", upstream_url=fake_openai.url)

    with trio.fail_after(20):
        async with running_server(s) as server:

            def create() -> str:
                with sdk(server) as client:
                    return client.responses.create(input=PROMPT, background=True).id

            response_id = await trio.to_thread.run_sync(create)
            run = server.service.runs.runs[response_id]
            while run.log.last_seq < 3:
                await run.wait_changed()
            await trio.testing.wait_all_tasks_blocked()  # the upstream hangs now

            def cancel_twice() -> tuple[Any, Any]:
                with sdk(server) as client:
                    return client.responses.cancel(response_id), client.responses.cancel(
                        response_id
                    )

            cancelled_at = trio.current_time()
            first, second = await trio.to_thread.run_sync(cancel_twice)
            await fake_openai.wait_for(lambda: fake_openai.open_connections == 0)
            (conn,) = fake_openai.connections
            assert conn.closed is not None
            assert conn.closed - cancelled_at < 1.0
            await run.done.wait()
            saved = await server.service.store.get(PUBLIC_TENANT, response_id)
            count = await server.service.store.count(response_id)
            duplicates = server.logs.events("save_duplicate_refused")
    assert first.status == "cancelled"
    assert first.output_text == "Once upon a"
    assert second.model_dump() == first.model_dump()
    assert first.usage is not None
    assert first.usage.output_tokens == 3
    assert saved is not None
    assert count == 1
    assert duplicates == []
    assert (saved.status, saved.reason, saved.content) == ("partial", "stopped", "Once upon a")
    assert saved.usage is not None
    assert saved.usage["completion_tokens"] == 3


async def test_a_foreground_stream_whose_client_leaves_is_cancelled(
    settings: Settings, fake_openai: FakeUpstream
) -> None:
    """A foreground (attached) streaming response is cancelled when its client
    goes away, exactly like a chat stream: the upstream connection closes, the
    partial text is saved (``client_disconnect``), the run leaves memory, and
    trio's task count is back to its baseline."""
    fake_openai.plan = mock_plan("openai", 0.01)
    s = settings.replace(upstream="openai", upstream_url=fake_openai.url)
    with trio.fail_after(20):
        async with running_server(s) as server:
            baseline = await tasks_living()
            body = {"model": "m", "input": PROMPT, "stream": True, "max_output_tokens": 200}
            client = await RawClient.post(server.port, "/v1/responses", body)
            events: list[SSEEvent] = []
            while len([e for e in events if "output_text.delta" in e.data]) < 3:
                event = await client.next_event()
                assert event is not None
                events.append(event)
            await client.aclose()
            await fake_openai.wait_for(lambda: fake_openai.open_connections == 0)
            await server.service.runs.wait_idle()
            await server.service.wait_streams_closed()
            response_id = client.headers["x-run-id"]
            saved = await server.service.store.get(PUBLIC_TENANT, response_id)
            assert server.service.runs.runs == {}
            assert await tasks_living() == baseline
    for event in events:
        check_event(event.data)
        assert event.id == str(orjson.loads(event.data)["sequence_number"])
    received = "".join(orjson.loads(e.data).get("delta", "") for e in events)
    assert saved is not None
    assert (saved.status, saved.reason) == ("partial", "client_disconnect")
    assert saved.content.startswith(received)
    assert saved.usage is not None
    assert saved.usage["source"] == "counted"


async def raw_events(server: Server, path: str, **kw: Any) -> list[Any]:
    """Every event of one stream, validated strictly with the SDK's models."""
    async with loopback_client(server) as http, http.stream("POST", path, **kw) as r:
        assert r.status_code == 200
        body = await r.aread()
    return [check_event(e.data) for e in SSEDecoder().feed(body)]


@pytest.mark.parametrize(
    ("max_tokens", "last"), [(None, "response.completed"), (5, "response.incomplete")]
)
async def test_every_event_and_object_validates_with_the_sdk_models(
    settings: Settings, max_tokens: int | None, last: str
) -> None:
    """A foreground stream's events (completed, and incomplete at
    ``max_output_tokens``), the non-streamed object and the retrieved one all
    pass the SDK's pydantic validation; sequence numbers start at 0 without a
    gap; instructions reach the upstream as a system message."""
    body: dict[str, Any] = {"input": [{"role": "user", "content": PROMPT}], "stream": True}
    body["instructions"] = "be brief"
    if max_tokens:
        body["max_output_tokens"] = max_tokens
    messages = [{"role": "system", "content": "be brief"}, *MESSAGES]
    async with running_server(settings) as server:
        events = await raw_events(server, "/v1/responses", json=body)
        async with loopback_client(server) as http:
            whole = (await http.post("/v1/responses", json={**body, "stream": False})).json()
            again = (await http.get(f"/v1/responses/{whole['id']}")).json()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == last
    assert events[-1].response.output_text == mocktext.expected_text(messages, max_tokens)
    assert events[-1].response.instructions == "be brief"
    assert check_object(whole).output_text == mocktext.expected_text(messages, max_tokens)
    assert check_object(again).output_text == whole["output"][0]["content"][0]["text"]
    assert again["status"] == whole["status"] == last.removeprefix("response.")
    assert again["usage"] == whole["usage"]


async def test_failed_and_cancelled_streams_end_with_their_events(
    settings: Settings, fake_openai: FakeUpstream
) -> None:
    """An upstream that fails mid-stream ends the stream with
    ``response.failed`` (status ``failed``, an ``error``); a stream superseded
    by a newer request of its session ends with an ``error`` event whose code
    is the reason.  Both validate with the SDK's models."""
    fake_openai.plan = lambda _: token_plan(["a", "b", "c"], hang_after=2)
    s = settings.replace(upstream="openai", upstream_url=fake_openai.url, token_timeout=0.2)
    async with running_server(s) as server:
        failed = await raw_events(server, "/v1/responses", json={"input": "x", "stream": True})
    assert failed[-1].type == "response.failed"
    assert failed[-1].response.status == "failed"
    assert failed[-1].response.error is not None
    assert failed[-1].response.output_text == "ab"

    session = {"x-session-id": "resp-s"}
    got: list[Any] = []
    async with (
        waitable_server(settings.replace(mock_delay_ms=20)) as (server, logs),
        trio.open_nursery() as nursery,
    ):

        async def first() -> None:
            got.extend(
                await raw_events(
                    server,
                    "/v1/responses",
                    json={"input": "x", "stream": True},
                    headers=session,
                )
            )

        nursery.start_soon(first)
        await logs.wait_for("stream_start")
        async with loopback_client(server) as http:
            r = await http.post(
                "/v1/responses", json={"input": "y", "max_output_tokens": 1}, headers=session
            )
            assert r.status_code == 200
    assert got[-1].type == "error"
    assert got[-1].code == "superseded"


async def test_bad_requests_and_routes(settings: Settings) -> None:
    """Requests the translation cannot serve (an input item or a tool type
    it does not carry, a function tool or call without its fields) are
    refused with 400 before any run, ``param`` naming the field; unknown
    paths under /v1/responses are 404, wrong methods 405 with ``Allow``; a
    malformed ``starting_after`` or ``stream`` query is 400 naming it."""
    async with running_server(settings) as server, loopback_client(server) as http:
        for body, code, param in [
            ({}, "missing_required_parameter", "input"),
            ({"input": 5}, "invalid_type", "input"),
            ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "unsupported_input",
             "input[0].type"),
            ({"input": [{"type": "function_call"}]}, "invalid_type", "input[0].call_id"),
            ({"input": "x", "tools": [{"type": "function"}]}, "invalid_type", "tools[0].name"),
            ({"input": "x", "tools": [{"type": "web_search"}]}, "unsupported_tool",
             "tools[0].type"),
            ({"input": "x", "previous_response_id": "resp_1"}, "unsupported_parameter",
             "previous_response_id"),
            ({"input": "x", "background": True, "store": False}, "invalid_value", "store"),
            ({"input": "x", "max_output_tokens": 0}, "invalid_value", "max_output_tokens"),
            ({"input": "x", "text": {"format": "json"}}, "invalid_type", "text.format"),
        ]:  # fmt: skip
            r = await http.post("/v1/responses", json=body)
            error = r.json()["error"]
            assert (r.status_code, error["code"], error["param"]) == (400, code, param), body
        assert (await http.get("/v1/responses")).headers["allow"] == "POST"
        assert (await http.post("/v1/responses/resp_x")).status_code == 405
        assert (await http.get("/v1/responses/resp_x")).status_code == 404
        assert (await http.get("/v1/responses/resp_x/nope")).status_code == 404
        r = await http.get("/v1/responses/resp_x?stream=true&starting_after=-1")
        assert (r.status_code, r.json()["error"]["param"]) == (400, "starting_after")
        r = await http.get("/v1/responses/resp_x?stream=maybe")
        assert (r.status_code, r.json()["error"]["param"]) == (400, "stream")
        assert server.service.runs.runs == {}


async def test_store_false_is_not_saved(settings: Settings) -> None:
    """``store: false`` (foreground): the answer is whole, nothing is saved,
    and once the run has left memory the response is unknown (404)."""
    async with running_server(settings) as server, loopback_client(server) as http:
        r = await http.post(
            "/v1/responses", json={"input": "x", "store": False, "max_output_tokens": 3}
        )
        assert r.status_code == 200
        assert r.json()["status"] == "incomplete"
        rid = r.json()["id"]
        assert await server.service.store.count(rid) == 0
        assert (await http.get(f"/v1/responses/{rid}")).status_code == 404


async def test_saved_row_fallback(settings: Settings) -> None:
    """After the run left memory, ``GET`` answers from the saved row: status,
    text, model and usage as they were."""
    async with running_server(settings) as server, loopback_client(server) as http:
        r = await http.post("/v1/responses", json={"model": "mock", "input": "x"})
        live = r.json()
        assert server.service.runs.runs == {}  # attached: gone once answered
        saved = (await http.get(f"/v1/responses/{live['id']}")).json()
    check_object(saved)
    for key in ("id", "status", "output", "usage", "model", "created_at"):
        assert saved[key] == live[key], key
