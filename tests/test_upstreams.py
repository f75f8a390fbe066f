"""The HTTP upstreams (``openai``, ``ollama``) against real fake servers.

Every test talks to the in-process server over a real socket, and the server
talks to a :class:`~tools.fakes.FakeUpstream` on 127.0.0.1 in that upstream's
own wire format (OpenAI SSE, Ollama NDJSON).  Covered: exact text streamed and
whole, ``/v1/models``, and the two ways an upstream failure reaches a client:
an HTTP 502/504 with the OpenAI error body before the first token, an
``upstream_error`` event after it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio

from tests.conftest import RawClient, Server, loopback_client, running_server
from tools.fakes import FakeUpstream, Plan, Step, token_plan
from trio_stream import Settings
from trio_stream.upstream import mocktext

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "upstream please"}]


def chat(stream: bool, max_tokens: int = 12) -> dict[str, Any]:
    return {"model": "m", "messages": MESSAGES, "stream": stream, "max_tokens": max_tokens}


def delta_text(events: list[Any]) -> str:
    chunks = [orjson.loads(e.data) for e in events if e.data.startswith('{"id"')]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


@asynccontextmanager
async def serving(settings: Settings, fake: FakeUpstream, **changes: Any) -> AsyncIterator[Server]:
    s = settings.replace(upstream=fake.fmt, upstream_url=fake.url, **changes)
    async with running_server(s) as server:
        yield server


@pytest.fixture(params=["openai", "ollama"])
async def fake(request: pytest.FixtureRequest, nursery: trio.Nursery) -> FakeUpstream:
    fake = FakeUpstream(request.param)
    await nursery.start(fake.serve)
    return fake


async def test_streamed_text_is_exact(settings: Settings, fake: FakeUpstream) -> None:
    """Every token the upstream sends reaches the client once, in order, ending
    with the upstream's finish_reason and [DONE]; the upstream was asked in its
    own wire format (streaming, with the token limit)."""
    with trio.fail_after(10):
        async with serving(settings, fake) as server:
            client = await RawClient.post(server.port, CHAT, chat(stream=True))
            try:
                assert await client.start() == 200
                events = await client.read_all()
            finally:
                await client.aclose()
    assert delta_text(events) == mocktext.expected_text(MESSAGES, 12)
    assert orjson.loads(events[-2].data)["choices"][0]["finish_reason"] == "length"
    assert events[-1].data == "[DONE]"
    (sent,) = fake.requests
    assert sent["messages"] == MESSAGES
    assert sent["stream"] is True
    if fake.fmt == "openai":
        assert sent["max_tokens"] == 12
    else:
        assert sent["options"] == {"num_predict": 12}


async def test_whole_completion_is_exact(settings: Settings, fake: FakeUpstream) -> None:
    """``stream: false`` answers one chat.completion object built from the same
    upstream stream, with the exact text."""
    with trio.fail_after(10):
        async with serving(settings, fake) as server, loopback_client(server) as http:
            r = await http.post(CHAT, json=chat(stream=False))
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": mocktext.expected_text(MESSAGES, 12),
    }
    assert body["choices"][0]["finish_reason"] == "length"


async def test_completed_runs_reuse_the_upstream_connection(
    settings: Settings, fake: FakeUpstream
) -> None:
    """After finish_reason the rest of the upstream body is read, so the
    connection goes back to the pool: three runs in a row use one upstream
    connection (no connection churn per completion)."""
    with trio.fail_after(10):
        async with serving(settings, fake) as server, loopback_client(server) as http:
            for _ in range(3):
                r = await http.post(CHAT, json=chat(stream=False))
                assert r.status_code == 200
    assert len(fake.requests) == 3
    assert len(fake.connections) == 1


async def test_models_come_from_the_upstream(settings: Settings, fake: FakeUpstream) -> None:
    """``GET /v1/models`` lists the upstream's models in the OpenAI shape."""
    with trio.fail_after(10):
        async with serving(settings, fake) as server, loopback_client(server) as http:
            r = await http.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fake"]
    assert all(m["object"] == "model" for m in body["data"])


async def test_models_of_the_mock(settings: Settings) -> None:
    """The built-in mock lists itself."""
    async with running_server(settings) as server, loopback_client(server) as http:
        r = await http.get("/v1/models")
    assert r.status_code == 200
    assert r.json() == {
        "object": "list",
        "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "trio-stream"}],
    }


def _assert_upstream_error(body: Any, code: str | None = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "upstream_error"
    assert isinstance(body["error"]["message"], str)
    if code is not None:
        assert body["error"]["code"] == code


@pytest.mark.parametrize("stream", [True, False])
async def test_refused_upstream_is_502(settings: Settings, stream: bool) -> None:
    """An upstream that refuses the connection gives HTTP 502 with the OpenAI
    error body, streamed or not (a stream has sent no header yet)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nothing listens there any more
    s = settings.replace(upstream="openai", upstream_url=f"http://127.0.0.1:{port}/v1")
    with trio.fail_after(10):
        async with running_server(s) as server, loopback_client(server) as http:
            r = await http.post(CHAT, json=chat(stream=stream))
    assert r.status_code == 502
    assert r.headers["content-type"] == "application/json"
    _assert_upstream_error(r.json())


@pytest.mark.parametrize("stream", [True, False])
async def test_upstream_5xx_is_502(settings: Settings, fake: FakeUpstream, stream: bool) -> None:
    """An upstream answering HTTP 500 gives HTTP 502 naming the upstream status."""
    fake.plan = lambda _: Plan(status=500, steps=[Step(b'{"error":"boom"}')])
    with trio.fail_after(10):
        async with serving(settings, fake) as server, loopback_client(server) as http:
            r = await http.post(CHAT, json=chat(stream=stream))
    assert r.status_code == 502
    _assert_upstream_error(r.json(), "upstream_http_500")


async def test_first_token_timeout_is_504_and_closes_upstream(
    settings: Settings, fake: FakeUpstream
) -> None:
    """An upstream that sends no first token within --first-token-timeout gives
    HTTP 504, and its connection is closed (the run does not wait for ever)."""
    fake.plan = lambda _: token_plan(["late"], fmt=fake.fmt, hang_after=0)
    with trio.fail_after(10):
        async with (
            serving(settings, fake, first_token_timeout=0.2) as server,
            loopback_client(server) as http,
        ):
            r = await http.post(CHAT, json=chat(stream=True))
            await fake.wait_for(lambda: fake.open_connections == 0)
    assert r.status_code == 504
    _assert_upstream_error(r.json())
    assert server.logs.events("stream_cancelled", reason="upstream_error")


def _two_tokens_then(fmt: str, how: str) -> Plan:
    if how == "hang":
        return token_plan(["one", " two", " three"], fmt=fmt, hang_after=2)
    plan = token_plan(["one", " two"], fmt=fmt)
    if how == "drop":
        plan.steps = [*plan.steps[:2], Step(drop=True)]
    else:  # the upstream reports an error in its stream
        plan.steps = [*plan.steps[:2], Step(b'data: {"error": {"message": "overloaded"}}\n\n')]
    return plan


@pytest.mark.parametrize("how", ["drop", "hang", "error"])
async def test_failure_after_first_token_is_an_error_event(
    settings: Settings, fake_openai: FakeUpstream, how: str
) -> None:
    """Once tokens flowed (status 200 sent), an upstream that drops or stalls
    past --token-timeout ends the stream with one ``upstream_error`` event
    after the tokens received, and no [DONE]; one that reports an error, with
    that error (``source: upstream``)."""
    fake_openai.plan = lambda _: _two_tokens_then("openai", how)
    with trio.fail_after(10):
        async with serving(settings, fake_openai, token_timeout=0.2) as server:
            client = await RawClient.post(server.port, CHAT, chat(stream=True))
            try:
                assert await client.start() == 200
                events = await client.read_all()
            finally:
                await client.aclose()
            await server.service.wait_streams_closed()
    assert delta_text(events) == "one two"
    error = orjson.loads(events[-1].data)
    if how == "error":  # the upstream's own error, as it sent it (issue 20 item 5)
        assert error == {"error": {"message": "overloaded", "type": None, "param": None,
                                   "code": None, "source": "upstream"}}  # fmt: skip
    else:
        _assert_upstream_error(error)
    assert all(e.data != "[DONE]" for e in events)
    (end,) = server.logs.events("stream_end")
    assert end["status"] == "failed"


async def test_ollama_drop_after_first_token_is_an_error_event(
    settings: Settings, fake_ollama: FakeUpstream
) -> None:
    """The same for the Ollama wire format: a dropped NDJSON stream after a
    token ends the client stream with an ``upstream_error`` event."""
    fake_ollama.plan = lambda _: _two_tokens_then("ollama", "drop")
    with trio.fail_after(10):
        async with serving(settings, fake_ollama) as server:
            client = await RawClient.post(server.port, CHAT, chat(stream=True))
            try:
                events = await client.read_all()
            finally:
                await client.aclose()
    assert delta_text(events) == "one two"
    _assert_upstream_error(orjson.loads(events[-1].data))
