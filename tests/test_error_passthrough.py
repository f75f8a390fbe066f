"""Errors keep their identity, and ``stream_options`` reaches the upstream
(issue 20 items 4 and 5; docs/api.md sections 2.2.1 and 2.3).

Every test replays a transcript of what a real model server sends
(``tests/transcripts/``) from a real HTTP server on 127.0.0.1
(:mod:`tests.transcript_upstream`), through a real trio-stream server, and
compares what the client receives with what the upstream sent
(:mod:`tests.relay_expect`), field by field:

* an upstream HTTP 4xx keeps its status, its error (in OpenAI's shape, plus
  ``source: upstream``) and its ``Retry-After``/``x-ratelimit-*`` headers,
  streamed or not, and through the official SDK, which raises the matching
  class, does not retry a 400 and honours ``Retry-After`` on a 429;
* a mid-stream error event ends the stream with the upstream's error as the
  error frame, live and on a replay, and is a 502 with that error for
  ``stream: false``;
* the client's ``stream_options`` is forwarded as sent, with
  ``include_usage: true``, and the usage chunk is withheld from a client that
  did not ask for it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import openai
import orjson
import pydantic
import pytest
import trio
from openai.types.responses import Response, ResponseStreamEvent

from tests import relay_expect as rx
from tests.conftest import Server, loopback_client, running_server
from tests.transcript_format import Transcript, by_name, read_sse
from tests.transcript_upstream import forwarded, replaying
from tools.fakes import FakeUpstream
from trio_stream import Settings
from trio_stream.errors import UpstreamError, UpstreamReported
from trio_stream.http.service import PUBLIC_TENANT
from trio_stream.upstream.base import Finish
from trio_stream.upstream.wire import http_error, openai_items, reported_error

CHAT = "/v1/chat/completions"

HTTP_ERRORS = [
    "openai_400_context_length",
    "openai_429_rate_limit",
    "vllm_error_400_flat",
    "vllm_error_400_nested",
    "openrouter_error_402",
    "ollama_error_404",
]
MIDSTREAM_ERRORS = [
    "vllm_error_midstream_flat",
    "vllm_error_midstream_nested",
    "openai_error_midstream",
    "openrouter_error_midstream",
    "openrouter_error_finish_reason",
    "ollama_error_midstream",
]
#: The upstream headers an HTTP error is answered with (docs/api.md 2.2.1).
PASSED = ("retry-after", "retry-after-ms", "x-should-retry", "x-request-id")


@asynccontextmanager
async def relaying(
    settings: Settings, *transcripts: Transcript
) -> AsyncIterator[tuple[Server, FakeUpstream]]:
    """A replaying fake upstream for ``transcripts`` and a trio-stream in front of it."""
    async with trio.open_nursery() as nursery:
        fake = replaying(*transcripts)
        await nursery.start(fake.serve)
        s = settings.replace(upstream=fake.fmt, upstream_url=fake.url)
        async with running_server(s) as server:
            yield server, fake
        nursery.cancel_scope.cancel()


def expected_error(err: rx.UpstreamError | None) -> dict[str, Any]:
    """The error object a client must receive for the upstream's ``err``."""
    assert err is not None
    return {
        "message": err.message, "type": err.type, "param": err.param, "code": err.code,
        **err.extra, "source": "upstream",
    }  # fmt: skip


def passed_headers(t: Transcript) -> list[tuple[str, str]]:
    """The transcript's headers that must reach the client, in order."""
    return [(k, v) for k, v in t.headers if k in PASSED or k.startswith("x-ratelimit-")]


def request_of(t: Transcript, **changes: Any) -> dict[str, Any]:
    return {**t.request, **changes}


def frames(body: bytes) -> list[str]:
    """The ``data`` of every SSE event, read by the strict reader."""
    return [e.data for e in read_sse(body).events]


def text_of(data: list[str]) -> str:
    chunks = [orjson.loads(d) for d in data if d.startswith('{"id"')]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def upstream_text(t: Transcript) -> str:
    """The text of the chunks a faithful relay delivers before the error."""
    return "".join(
        (c["choices"][0]["delta"].get("content") or "")
        for c in rx.expected_chunks(t)
        if c.get("choices")
    )


# -- HTTP errors ----------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("name", HTTP_ERRORS)
async def test_upstream_http_error_keeps_status_body_and_headers(
    settings: Settings, name: str, stream: bool
) -> None:
    """An upstream HTTP 4xx reaches the client with the same status, the
    upstream's error in OpenAI's shape (message, type, param, code as sent,
    in any dialect; ``source: upstream``) and the upstream's Retry-After /
    x-ratelimit-* / x-request-id headers in order, streamed or not; the
    upstream was asked once.  (Before: 502, the body flattened into the
    message, no Retry-After.)"""
    t = by_name(name)
    with trio.fail_after(20):
        async with relaying(settings, t) as (server, fake), loopback_client(server) as client:
            r = await client.post(CHAT, json=request_of(t, stream=stream))
    assert r.status_code == t.status
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": expected_error(rx.http_error(t))}
    got = [(k.decode(), v.decode()) for k, v in r.headers.raw]
    assert [h for h in got if h in passed_headers(t)] == passed_headers(t)
    assert not any(k.startswith("openai-") for k, _ in got)  # only the listed ones pass
    if name == "openai_429_rate_limit":
        assert r.headers["retry-after"] == rx.retry_after(t) == "7"
        assert [(k, r.headers[k]) for k, _ in rx.ratelimit_headers(t)] == rx.ratelimit_headers(t)
    assert r.headers["x-run-id"].startswith("run_")
    assert len(forwarded(fake)) == 1


@pytest.mark.parametrize("status", [401, 407])
async def test_upstream_auth_errors_stay_502(settings: Settings, status: int) -> None:
    """An upstream 401/407 is about trio-stream's own credentials for the
    upstream, not the client's request: it stays trio-stream's 502
    ``upstream_http_<status>``, naming the status and quoting the upstream's
    message (so a client never takes it for a bad key of its own)."""
    t = by_name("openai_400_context_length")
    t = dataclasses.replace(t, status=status)
    with trio.fail_after(20):
        async with relaying(settings, t) as (server, _), loopback_client(server) as client:
            r = await client.post(CHAT, json=request_of(t))
    assert r.status_code == 502
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "upstream_error",
        f"upstream_http_{status}",
        None,
    )
    assert error["message"].startswith(f"The upstream answered HTTP {status}: This model's")
    assert "source" not in error


# -- errors inside the stream -----------------------------------------------------


@pytest.mark.parametrize("name", MIDSTREAM_ERRORS)
async def test_midstream_error_frame_is_the_upstreams(settings: Settings, name: str) -> None:
    """An error event inside the upstream's 200 stream (OpenAI's, vLLM's flat
    and nested ones, OpenRouter's error chunk, Ollama's error line) ends the
    client's stream, after the text that came before it, with one error frame
    that is the upstream's error (type, code, message as sent, ``source:
    upstream``), and no [DONE].  OpenRouter's chunk with ``finish_reason:
    "error"`` and no error object is such an error too, its
    ``native_finish_reason`` kept in the frame.  (Before: ``code:
    upstream_error`` always, and vLLM's flat event vanished: "ended the
    stream without finishing"; the finish_reason-only chunk was a completed
    answer ending in [DONE].)"""
    t = by_name(name)
    with trio.fail_after(20):
        async with relaying(settings, t) as (server, _), loopback_client(server) as client:
            r = await client.post(CHAT, json=request_of(t))
            await server.service.wait_streams_closed()
    assert r.status_code == 200
    data = frames(r.content)
    assert text_of(data) == upstream_text(t)
    assert "[DONE]" not in data
    assert orjson.loads(data[-1]) == {"error": expected_error(rx.midstream_error(t))}
    assert server.logs.events("stream_cancelled", reason="upstream_error")


@pytest.mark.parametrize("name", MIDSTREAM_ERRORS)
async def test_midstream_error_without_streaming_is_502_with_the_upstreams_error(
    settings: Settings, name: str
) -> None:
    """``stream: false``: a run the upstream failed with an error event is
    answered 502 with the upstream's error as the body."""
    t = by_name(name)
    with trio.fail_after(20):
        async with relaying(settings, t) as (server, _), loopback_client(server) as client:
            r = await client.post(CHAT, json=request_of(t, stream=False))
    assert r.status_code == 502
    assert r.json() == {"error": expected_error(rx.midstream_error(t))}


async def test_replay_of_a_failed_run_ends_with_the_upstreams_error(settings: Settings) -> None:
    """A detached run that the upstream failed mid-stream, replayed after its
    first event, ends with the same upstream error frame (the identity lives
    in the run's outcome, not in the live writer)."""
    t = by_name("vllm_error_midstream_flat")
    with trio.fail_after(20):
        async with relaying(settings, t) as (server, _), loopback_client(server) as client:
            r = await client.post(CHAT, json=request_of(t, detach=True))
            run_id = r.headers["x-run-id"]
            live = frames(r.content)
            replay = await client.get(f"/v1/runs/{run_id}/events", headers={"last-event-id": "1"})
    want = {"error": expected_error(rx.midstream_error(t))}
    assert orjson.loads(live[-1]) == want
    assert replay.status_code == 200
    assert orjson.loads(frames(replay.content)[-1]) == want


# -- the official SDK -----------------------------------------------------------


def sdk(server: Server, max_retries: int) -> openai.OpenAI:
    http = httpx2.Client(transport=httpx2.HTTPTransport(), verify=False)
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=max_retries, http_client=http,
        timeout=30,
    )  # fmt: skip


def _sdk_call(server: Server, t: Transcript, stream: bool, max_retries: int) -> Any:
    """The SDK's answer (text) or the exception it raised, and the seconds it took."""
    started = time.monotonic()
    with sdk(server, max_retries) as client:
        try:
            if stream:
                chunks = client.chat.completions.create(
                    model=t.request["model"], messages=t.request["messages"], stream=True
                )
                result: Any = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                answer = client.chat.completions.create(
                    model=t.request["model"], messages=t.request["messages"]
                )
                result = answer.choices[0].message.content
        except openai.APIError as exc:
            result = exc
    return result, time.monotonic() - started


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_sdk_raises_bad_request_and_does_not_retry_a_400(
    settings: Settings, stream: bool
) -> None:
    """The official SDK, with its default two retries, raises BadRequestError
    for the upstream's 400, with the upstream's code, param and type, and
    asks once: the upstream saw one request.  (Before: a 502, which the SDK
    retried twice, so the upstream was asked 3 times.)"""
    t = by_name("openai_400_context_length")
    with trio.fail_after(30):
        async with relaying(settings, t) as (server, fake):
            error, _ = await trio.to_thread.run_sync(_sdk_call, server, t, stream, 2)
    assert isinstance(error, openai.BadRequestError)
    assert error.status_code == 400
    want = rx.http_error(t)
    assert want is not None
    assert (error.code, error.param, error.type) == (want.code, want.param, want.type)
    assert error.body == expected_error(want)
    assert want.message in error.message
    assert len(forwarded(fake)) == 1


async def test_sdk_raises_rate_limit_error(settings: Settings) -> None:
    """Without retries the SDK raises RateLimitError for the upstream's 429,
    and sees its Retry-After and x-ratelimit-* headers."""
    t = by_name("openai_429_rate_limit")
    with trio.fail_after(30):
        async with relaying(settings, t) as (server, fake):
            error, _ = await trio.to_thread.run_sync(_sdk_call, server, t, True, 0)
    assert isinstance(error, openai.RateLimitError)
    assert error.code == "rate_limit_exceeded"
    assert error.response.headers["retry-after"] == "7"
    for k, v in rx.ratelimit_headers(t):
        assert error.response.headers[k] == v
    assert len(forwarded(fake)) == 1


async def test_sdk_honours_retry_after_on_a_429(settings: Settings) -> None:
    """With one retry the SDK waits what the upstream's Retry-After says
    before asking again, and gets the answer of the second request.  The
    transcript's 429 is replayed with ``retry-after: 2`` instead of 7 (the
    SDK's own back-off without the header is under 1 s, so 2 s tells them
    apart at a third of the cost)."""
    limited = by_name("openai_429_rate_limit")
    headers = [(k, "2" if k == "retry-after" else v) for k, v in limited.headers]
    limited = dataclasses.replace(limited, headers=headers)
    answer = by_name("openai_content_usage")
    with trio.fail_after(30):
        async with relaying(settings, limited, answer) as (server, fake):
            text, took = await trio.to_thread.run_sync(_sdk_call, server, limited, True, 1)
    assert text == upstream_text(answer)
    assert len(forwarded(fake)) == 2
    assert took >= 2.0


async def test_sdk_raises_the_upstreams_midstream_error(settings: Settings) -> None:
    """The SDK raises APIError with the upstream's message for vLLM's flat
    error event relayed by trio-stream (read from vLLM directly, the SDK
    yields that event as a chunk and ends quietly)."""
    t = by_name("vllm_error_midstream_flat")
    with trio.fail_after(30):
        async with relaying(settings, t) as (server, _):
            error, _ = await trio.to_thread.run_sync(_sdk_call, server, t, True, 0)
    want = rx.midstream_error(t)
    assert want is not None
    assert isinstance(error, openai.APIError)
    assert error.message == want.message
    assert error.body == expected_error(want)
    assert error.code == str(want.code)  # the SDK reads code as a string
    assert error.type == want.type


# -- stream_options (issue 20 item 4) ---------------------------------------------


@pytest.mark.parametrize(
    ("options", "forwarded_options"),
    [
        (None, {"include_usage": True}),
        ({"include_obfuscation": False}, {"include_obfuscation": False, "include_usage": True}),
        (
            {"include_usage": False, "continuous_usage_stats": True},
            {"include_usage": True, "continuous_usage_stats": True},
        ),
        (
            {"include_usage": True, "continuous_usage_stats": True},
            {"include_usage": True, "continuous_usage_stats": True},
        ),
    ],
    ids=["absent", "obfuscation", "usage-off", "usage-on"],
)
async def test_stream_options_are_forwarded_with_include_usage(
    settings: Settings, options: dict[str, Any] | None, forwarded_options: dict[str, Any]
) -> None:
    """The client's ``stream_options`` reaches the upstream as sent, with
    ``include_usage: true`` set (trio-stream needs the usage); every other
    field of the body is forwarded unchanged; the stream ends with a usage
    chunk only when the client asked for one.  (Before: the upstream got
    ``{"include_usage": true}`` whatever the client sent.)"""
    t = by_name("vllm_continuous_usage")
    body = {k: v for k, v in t.request.items() if k != "stream_options"}
    if options is not None:
        body["stream_options"] = options
    with trio.fail_after(20):
        async with relaying(settings, t) as (server, fake), loopback_client(server) as client:
            r = await client.post(CHAT, json=body)
    (sent,) = forwarded(fake)
    assert sent == {**body, "stream_options": forwarded_options}
    data = frames(r.content)
    assert data[-1] == "[DONE]"
    usage_chunks = [d for d in data[:-1] if orjson.loads(d).get("choices") == []]
    wants = bool(options and options.get("include_usage"))
    assert len(usage_chunks) == (1 if wants else 0)
    if wants:
        assert orjson.loads(usage_chunks[0])["usage"]["total_tokens"] > 0


async def test_usage_chunk_withheld_and_usage_still_counted(settings: Settings) -> None:
    """A client that did not ask for usage gets none, yet trio-stream asked
    the upstream for it and keeps it (the run's usage is the upstream's, not
    a count of its own)."""
    t = by_name("openai_content_usage")
    body = {k: v for k, v in t.request.items() if k != "stream_options"}
    with trio.fail_after(20):
        async with relaying(settings, t) as (server, fake), loopback_client(server) as client:
            r = await client.post(CHAT, json=body)
            await server.service.wait_streams_closed()
            saved = await server.service.store.get(PUBLIC_TENANT, r.headers["x-run-id"])
    assert forwarded(fake)[0]["stream_options"] == {"include_usage": True}
    data = frames(r.content)
    assert data[-1] == "[DONE]"
    assert all(orjson.loads(d).get("usage") is None for d in data[:-1])
    upstream_usage = rx.aggregate(t)["usage"]
    assert saved is not None
    assert saved.usage is not None
    assert saved.usage["source"] == "upstream"
    assert saved.usage["prompt_tokens"] == upstream_usage["prompt_tokens"]
    assert saved.usage["completion_tokens"] == upstream_usage["completion_tokens"]


# -- the Responses API (docs/api.md section 8) -------------------------------------

EVENT: Any = pydantic.TypeAdapter(ResponseStreamEvent)

#: The Responses ``error.code`` each upstream error maps to (its list is fixed).
RESPONSES_CODE = {
    "openai_400_context_length": "invalid_prompt",
    "openai_429_rate_limit": "rate_limit_exceeded",
    "vllm_error_400_flat": "invalid_prompt",
    "vllm_error_400_nested": "invalid_prompt",
    "openrouter_error_402": "server_error",
    "ollama_error_404": "server_error",
    "vllm_error_midstream_flat": "invalid_prompt",
    "vllm_error_midstream_nested": "server_error",
    "openai_error_midstream": "server_error",
    "openrouter_error_midstream": "server_error",
    "openrouter_error_finish_reason": "server_error",
    "ollama_error_midstream": "server_error",
}


def responses_body(t: Transcript, stream: bool) -> dict[str, Any]:
    return {"model": t.request["model"], "input": t.request["messages"], "stream": stream}


def responses_error(name: str, err: rx.UpstreamError | None) -> dict[str, Any]:
    assert err is not None
    param = err.param if isinstance(err.param, str) else None
    return {"code": RESPONSES_CODE[name], "message": err.message, "param": param, "type": err.type}


@pytest.mark.parametrize("name", HTTP_ERRORS + MIDSTREAM_ERRORS)
async def test_responses_stream_fails_with_the_upstreams_error(
    settings: Settings, name: str
) -> None:
    """A streamed response (whose first events go out at once) that the
    upstream refused or failed ends with ``response.failed``, whose
    ``error`` keeps the upstream's message, param and type, with the
    Responses code the upstream's error maps to; every event validates with
    the SDK's models.  (Before: ``server_error`` with trio-stream's message.)"""
    t = by_name(name)
    err = rx.http_error(t) or rx.midstream_error(t)
    with trio.fail_after(20):
        async with relaying(settings, t) as (server, _), loopback_client(server) as client:
            r = await client.post("/v1/responses", json=responses_body(t, True))
    assert r.status_code == 200
    events = [EVENT.validate_json(e.data) for e in read_sse(r.content).events]
    last = events[-1]
    assert last.type == "response.failed"
    assert last.response.status == "failed"
    assert last.response.error.model_dump(exclude_none=False, exclude_unset=True) == (
        responses_error(name, err)
    )
    assert last.response.output_text == upstream_text(t)


@pytest.mark.parametrize("name", HTTP_ERRORS)
async def test_responses_whole_answers_the_upstreams_http_error(
    settings: Settings, name: str
) -> None:
    """``stream: false`` (foreground): an upstream HTTP 4xx is answered with
    its status, the upstream's error body and its headers, as in chat (the
    response never started; OpenAI's Responses API answers a request it
    refuses the same way).  (Before: 200 with a failed object.)"""
    t = by_name(name)
    with trio.fail_after(20):
        async with relaying(settings, t) as (server, _), loopback_client(server) as client:
            r = await client.post("/v1/responses", json=responses_body(t, False))
    assert r.status_code == t.status
    assert r.json() == {"error": expected_error(rx.http_error(t))}
    got = [(k.decode(), v.decode()) for k, v in r.headers.raw]
    assert [h for h in got if h in passed_headers(t)] == passed_headers(t)


@pytest.mark.parametrize("name", MIDSTREAM_ERRORS)
async def test_responses_whole_midstream_error_is_a_failed_object(
    settings: Settings, name: str
) -> None:
    """``stream: false``: a response the upstream failed after it started is
    answered 200 with the ``failed`` object, its ``error`` the upstream's
    (as in the stream); the object validates with the SDK's model."""
    t = by_name(name)
    err = rx.midstream_error(t)
    with trio.fail_after(20):
        async with relaying(settings, t) as (server, _), loopback_client(server) as client:
            r = await client.post("/v1/responses", json=responses_body(t, False))
    assert r.status_code == 200
    obj = Response.model_validate(r.json())
    assert obj.status == "failed"
    assert r.json()["error"] == responses_error(name, err)


@pytest.mark.parametrize("name", MIDSTREAM_ERRORS)
async def test_a_failed_response_read_back_keeps_the_upstreams_error(
    settings: Settings, name: str
) -> None:
    """A response the upstream failed mid-stream, read back from its saved
    row once its run has left memory, shows the same ``error`` as the live
    object -- the upstream's message, param, type and mapped code -- and the
    same output.  (Before: the row kept no error, so it read back as
    ``server_error`` "The upstream failed.")"""
    t = by_name(name)
    with trio.fail_after(20):
        async with relaying(settings, t) as (server, _), loopback_client(server) as client:
            r = await client.post("/v1/responses", json=responses_body(t, False))
            live = r.json()
            assert server.service.runs.runs == {}  # attached: gone from memory once answered
            saved = await server.service.store.get(PUBLIC_TENANT, live["id"])
            got = await client.get(f"/v1/responses/{live['id']}")
    assert saved is not None
    assert saved.status == "failed"
    assert got.status_code == 200
    again = got.json()
    Response.model_validate(again)
    assert live["status"] == again["status"] == "failed"
    assert again["error"] == live["error"] == responses_error(name, rx.midstream_error(t))
    assert again["output"] == live["output"]


# -- the recognising and the normalising, sans-IO ---------------------------------


def test_error_shapes_are_recognised_and_normalised() -> None:
    """reported_error() reads each dialect into OpenAI's four keys (null when
    absent, values as sent), keeps the upstream's other keys (OpenRouter's
    ``metadata``) and adds ``source: upstream`` last; a chunk whose ``error``
    is null, or that has none, is no error."""
    src = {"source": "upstream"}
    assert reported_error({"object": "error", "message": "m", "type": "T", "param": None,
                           "code": 400}) == {
        "message": "m", "type": "T", "param": None, "code": 400, **src}  # fmt: skip
    assert reported_error({"error": "gone"}) == {
        "message": "gone", "type": None, "param": None, "code": None, **src}  # fmt: skip
    meta = {"provider_name": "X", "raw": {"detail": [1]}}
    assert reported_error({"error": {"code": 403, "message": "flagged", "metadata": meta}}) == {
        "message": "flagged",
        "type": None,
        "param": None,
        "code": 403,
        "metadata": meta,
        **src,
    }
    assert reported_error({"id": "c", "choices": [], "error": None}) is None
    assert reported_error({"id": "c", "choices": []}) is None
    assert reported_error({"object": "chat.completion.chunk", "message": "x"}) is None


def test_a_choice_that_finishes_on_error_is_the_upstreams_error() -> None:
    """A chunk whose choice says ``finish_reason: "error"`` with no top-level
    ``error`` is decoded as the upstream's error, never as a finish: the
    choice's own ``error`` object when it has one, else a message naming
    what the choice said; its ``native_finish_reason`` kept as a key
    (docs/api.md 2.2.1).  Other finish reasons stay finishes."""

    def chunk(**choice: Any) -> bytes:
        return orjson.dumps({"choices": [{"index": 0, "delta": {"content": ""}, **choice}]})

    src = {"source": "upstream"}
    with pytest.raises(UpstreamReported) as info:
        openai_items(chunk(finish_reason="error", native_finish_reason="SAFETY"))
    assert info.value.error == {
        "message": 'The upstream ended its answer with finish_reason "error" '
                   '(native_finish_reason "SAFETY").',
        "type": None, "param": None, "code": None, "native_finish_reason": "SAFETY", **src,
    }  # fmt: skip
    with pytest.raises(UpstreamReported) as info:
        openai_items(chunk(finish_reason="error"))
    assert info.value.error == {
        "message": 'The upstream ended its answer with finish_reason "error".',
        "type": None, "param": None, "code": None, **src,
    }  # fmt: skip
    own = {"code": 502, "message": "Provider returned error", "metadata": {"raw": "x"}}
    with pytest.raises(UpstreamReported) as info:
        openai_items(chunk(finish_reason="error", native_finish_reason=None, error=own))
    assert info.value.error == {
        "message": "Provider returned error", "type": None, "param": None, "code": 502,
        "metadata": {"raw": "x"}, **src,
    }  # fmt: skip
    assert openai_items(chunk(finish_reason="stop", native_finish_reason="STOP"))[-1] == (
        Finish("stop")
    )


def test_odd_error_values_are_made_encodable() -> None:
    """A message that is not a string becomes its JSON text (none: says so);
    an upstream key named ``source`` is replaced; a value nested too deep to
    be encoded again is dropped (a standard key: null), so the frame can
    always be written."""
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    got = reported_error({"error": {"message": {"a": 1}, "source": "x", "code": deep,
                                    "extra": deep}})  # fmt: skip
    assert got == {"message": '{"a":1}', "type": None, "param": None, "code": None,
                   "source": "upstream"}  # fmt: skip
    orjson.dumps({"error": got})
    assert reported_error({"error": {}}) == {
        "message": "The upstream reported an error without a message.", "type": None,
        "param": None, "code": None, "source": "upstream",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("status", "body", "answer", "kind"),
    [
        (400, b'{"error": {"message": "bad"}}', 400, UpstreamReported),
        (422, b'{"object": "error", "message": "bad"}', 422, UpstreamReported),
        (401, b'{"error": {"message": "bad key"}}', 502, UpstreamError),
        (407, b'{"error": "proxy"}', 502, UpstreamError),
        (404, b"<html>Not Found</html>", 502, UpstreamError),
        (404, b'{"detail": "Not Found"}', 502, UpstreamError),
        (500, b'{"error": {"message": "boom"}}', 502, UpstreamError),
        (503, b"", 502, UpstreamError),
    ],
)
def test_http_error_status_and_headers(
    status: int, body: bytes, answer: int, kind: type[UpstreamError]
) -> None:
    """A 4xx with an error object keeps its status (but 401/407, about
    trio-stream's own credentials); a 4xx without one (a proxy's page, a
    framework's 404) and any 5xx is trio-stream's 502 naming the status.
    Either way only Retry-After, Retry-After-Ms, X-Should-Retry,
    X-Request-Id and x-ratelimit-* are answered with it, in order."""
    headers = [(b"content-type", b"application/json"), (b"retry-after", b"3"),
               (b"set-cookie", b"a=b"), (b"x-ratelimit-remaining-tokens", b"5"),
               (b"x-should-retry", b"false"), (b"openai-organization", b"o")]  # fmt: skip
    exc = http_error(status, headers, body)
    assert type(exc) is kind
    assert exc.status == answer
    assert exc.headers == (
        (b"retry-after", b"3"), (b"x-ratelimit-remaining-tokens", b"5"),
        (b"x-should-retry", b"false"),
    )  # fmt: skip
    if kind is UpstreamError:
        assert exc.code == f"upstream_http_{status}"
        assert exc.message.startswith(f"The upstream answered HTTP {status}")
