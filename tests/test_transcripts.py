"""The groundwork for issue 20 ("a faithful relay") checks itself.

These tests do not exercise trio-stream.  They check that the recorded-shape
transcripts in ``tests/transcripts/`` are what they claim to be (parseable,
well-formed SSE or NDJSON, sourced), that the replaying fake upstream sends
them byte for byte over a real socket and records what it was sent, and that
:mod:`tests.relay_expect` computes, from them, the chunks and the
non-streamed answer a faithful relay must deliver.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import trio

from tests import relay_expect as rx
from tests.transcript_format import (
    DIRECTORY,
    SEPARATOR,
    Event,
    Transcript,
    all_transcripts,
    body_objects,
    by_name,
    load,
    ndjson_problems,
    read_sse,
    sse_objects,
    sse_problems,
    steps,
)
from tests.transcript_upstream import forwarded, replay_plan, replaying
from trio_stream.wire.sse import SSEDecoder

TRANSCRIPTS = all_transcripts()
NAMES = [t.name for t in TRANSCRIPTS]
SSE = [t for t in TRANSCRIPTS if t.body_format == "sse"]
NDJSON = [t for t in TRANSCRIPTS if t.body_format == "ndjson"]
OPENAI_STYLE = [t for t in TRANSCRIPTS if t.path == "/v1/chat/completions"]


def ids(ts: list[Transcript]) -> list[str]:
    return [t.name for t in ts]


# -- the files ------------------------------------------------------------------


def test_the_transcript_set_is_the_one_documented() -> None:
    """Every transcript file is named in tests/transcripts/README.md and every
    transcript name the README gives exists (the README is the map for issue 20)."""
    readme = (DIRECTORY / "README.md").read_text()
    named = set(re.findall(r"`((?:vllm|openai|openrouter|ollama)_[a-z0-9_]+)`", readme))
    assert sorted(named) == sorted(NAMES)
    assert len(TRANSCRIPTS) >= 20


@pytest.mark.parametrize("t", TRANSCRIPTS, ids=ids(TRANSCRIPTS))
def test_transcript_header_is_complete(t: Transcript) -> None:
    """Each transcript names its server, versions, sources, and which fields are
    documented and which inferred; its body length matches the header (an
    editor adding a final newline would change the bytes replayed)."""
    assert t.meta["sources"]
    assert t.meta["documented"]
    assert isinstance(t.meta["inferred"], list)
    assert t.meta["server"] in {"vLLM", "OpenAI", "OpenRouter", "Ollama"}
    assert t.meta["response"]["body_length"] == len(t.body)
    assert t.request.get("stream") is True, "every scenario is a streamed request"


@pytest.mark.parametrize("t", TRANSCRIPTS, ids=ids(TRANSCRIPTS))
def test_head_matches_body(t: Transcript) -> None:
    """The content-type names the body's format, a content-length (when given)
    is the body's length, and an HTTP error status goes with one JSON body."""
    ctype = (t.header("content-type") or "").split(";")[0]
    expected = {
        "sse": "text/event-stream",
        "ndjson": "application/x-ndjson",
        "json": "application/json",
    }
    assert ctype == expected[t.body_format]
    if (length := t.header("content-length")) is not None:
        assert int(length) == len(t.body)
    assert (t.status >= 400) == (t.body_format == "json")


def test_load_rejects_a_damaged_file(tmp_path: Path) -> None:
    """load() refuses a file whose body no longer has the recorded length, and
    one without the body separator, naming the defect."""
    good = (DIRECTORY / "ollama_error_404.transcript").read_bytes()
    damaged = tmp_path / "ollama_error_404.transcript"
    damaged.write_bytes(good + b"\n")
    with pytest.raises(ValueError, match="final newline"):
        load(damaged)
    damaged.write_bytes(good.replace(SEPARATOR, b"\n"))
    with pytest.raises(ValueError, match="body"):
        load(damaged)


# -- the strict SSE reader (the yardstick) ---------------------------------------


@pytest.mark.parametrize(
    ("body", "events", "comments", "oddities"),
    [
        (b"data: a\n\n", [Event("a")], [], 0),
        (b"data: a\r\ndata: b\r\n\r\n", [Event("a\nb")], [], 0),
        (b"data:a\rdata:  b\r\r", [Event("a\n b")], [], 0),
        (b": OPENROUTER PROCESSING\n\ndata: x\n\n", [Event("x")], ["OPENROUTER PROCESSING"], 0),
        (b"event: e\nid: 3\ndata: x\n\n", [Event("x", "e", "3")], [], 0),
        (b"id: 3\n\ndata: x\n\n", [Event("x", None, "3")], [], 1),
        (b"data: x\n", [], [], 1),
        (b"data: x", [], [], 1),
        (b"\xef\xbb\xbfdata: x\n\n", [Event("x")], [], 0),
        (b"foo: 1\ndata: x\n\n", [Event("x")], [], 1),
    ],
    ids=[
        "lf", "crlf-multiline", "cr-and-one-space-stripped", "comment", "event-and-id",
        "fieldless-event", "unterminated-event", "unterminated-line", "bom", "unknown-field",
    ],
)  # fmt: skip
def test_strict_reader_follows_the_spec(
    body: bytes, events: list[Event], comments: list[str], oddities: int
) -> None:
    """read_sse applies the WHATWG rules: CR, LF and CRLF end lines; one space
    after the colon is dropped; data lines join with LF; a blank line
    dispatches; comments are kept apart; an event never closed by a blank line
    is not dispatched (and is reported)."""
    reading = read_sse(body)
    assert reading.events == events
    assert reading.comments == comments
    assert len(reading.oddities) == oddities


@pytest.mark.parametrize("t", SSE, ids=ids(SSE))
def test_sse_transcript_is_well_formed(t: Transcript) -> None:
    """Every SSE transcript is well-formed per the spec: UTF-8, every event
    closed by a blank line, known fields only, each data one JSON object or
    [DONE], nothing after [DONE]."""
    assert sse_problems(t.body) == []
    assert read_sse(t.body).events, "at least one event"


@pytest.mark.parametrize("t", SSE, ids=ids(SSE))
def test_trio_stream_decoder_reads_transcripts_like_the_spec(t: Transcript) -> None:
    """trio_stream.wire.sse.SSEDecoder, fed the body one byte at a time, yields the
    same data as the strict reader and counts the same comments, so the
    transcripts exercise the product's parser and not a quirk of it."""
    decoder = SSEDecoder()
    got = [ev.data for i in range(len(t.body)) for ev in decoder.feed(t.body[i : i + 1])]
    reading = read_sse(t.body)
    assert got == [ev.data for ev in reading.events]
    assert decoder.comments == len(reading.comments)


@pytest.mark.parametrize("t", NDJSON, ids=ids(NDJSON))
def test_ndjson_transcript_is_well_formed(t: Transcript) -> None:
    """Every NDJSON transcript is one JSON object per newline-terminated line."""
    assert ndjson_problems(t.body) == []


def test_stream_ends_as_documented() -> None:
    """Successful OpenAI-style streams end with [DONE]; the two whose servers
    end an errored stream without it (OpenAI, OpenRouter) do not; vLLM sends
    [DONE] after its error event.  Ollama streams end with a done line or an
    error line."""
    no_done = {"openai_error_midstream", "openrouter_error_midstream"}
    for t in SSE:
        assert sse_objects(t.body)[1] == (t.name not in no_done), t.name
    for t in NDJSON:
        last = body_objects(t)[-1]
        assert last.get("done") is True or "error" in last, t.name


# -- the replaying fake, over a real socket -------------------------------------


async def _post(fake_url: str, t: Transcript, **kw: Any) -> tuple[httpx.Response, bytes]:
    base = fake_url.removesuffix("/v1")
    async with (
        httpx.AsyncClient(base_url=base, timeout=10) as client,
        client.stream("POST", t.path, json=t.request, **kw) as response,
    ):
        body = b"".join([part async for part in response.aiter_raw()])
    return response, body


@pytest.mark.parametrize("t", TRANSCRIPTS, ids=ids(TRANSCRIPTS))
async def test_replay_is_byte_exact(t: Transcript, nursery: trio.Nursery) -> None:
    """Over a real socket, the fake answers with the transcript's status, its
    headers in order (plus chunked framing when it gave no length) and its
    body byte for byte; it records the request path and body it received."""
    fake = replaying(t)
    await nursery.start(fake.serve)
    response, body = await _post(fake.url, t)
    assert response.status_code == t.status
    sent = [(k.lower(), v) for k, v in t.headers]
    got = [(k.decode().lower(), v.decode()) for k, v in response.headers.raw]
    if t.header("content-length") is None:
        assert got == [*sent, ("transfer-encoding", "chunked")]
    else:
        assert got == sent
    assert body == t.body
    (exchange,) = fake.exchanges
    assert exchange.target == t.path.encode()
    assert exchange.request == t.request
    assert orjson.loads(exchange.raw) == t.request
    assert (b"content-type", b"application/json") in exchange.headers


async def test_replay_cut_anywhere_is_still_exact(nursery: trio.Nursery) -> None:
    """Re-cut into 7-byte pieces (boundaries inside events and inside the UTF-8
    of "é" and of the multiplication sign), the body still arrives exactly."""
    t = by_name("vllm_logprobs")
    assert "é".encode() in t.body
    fake = replaying(t, piece=7)
    await nursery.start(fake.serve)
    _, body = await _post(fake.url, t)
    assert body == t.body


def test_replay_plan_flushes_per_event() -> None:
    """The default plan sends one step per SSE event (comments included) or
    NDJSON line, with the requested delay before each; joined, the steps are
    the body."""
    t = by_name("openrouter_reasoning")
    plan = replay_plan(t, delay=0.25)
    assert b"".join(s.data for s in plan.steps) == t.body
    assert [s.data for s in plan.steps] == steps(t)
    assert len(plan.steps) == len(read_sse(t.body).events) + len(read_sse(t.body).comments)
    assert all(s.delay == 0.25 for s in plan.steps)
    assert plan.steps[0].data == b": OPENROUTER PROCESSING\n\n"
    o = by_name("ollama_thinking")
    assert [s.data for s in replay_plan(o).steps] == o.body.splitlines(keepends=True)


async def test_replay_paces_events(nursery: trio.Nursery) -> None:
    """With a delay, the fake spaces its flushes: the whole body cannot arrive
    before (steps x delay) has passed (a lower bound only, so load cannot make
    it fail)."""
    t = by_name("vllm_reasoning")
    fake = replaying(t, delay=0.02)
    await nursery.start(fake.serve)
    started = time.monotonic()
    _, body = await _post(fake.url, t)
    assert body == t.body
    assert time.monotonic() - started >= 0.02 * len(steps(t))


async def test_replay_sequence_and_forwarded_requests(nursery: trio.Nursery) -> None:
    """replaying(a, b) answers the first request with a and every later one
    with b; forwarded() lists the request bodies received, so a test can check
    what a relay forwarded (here stream_options as the client sent it)."""
    limited, answer = by_name("openai_429_rate_limit"), by_name("openai_content_usage")
    fake = replaying(limited, answer)
    await nursery.start(fake.serve)
    first, _ = await _post(fake.url, limited)
    assert first.status_code == 429
    assert first.headers["retry-after"] == "7"
    for _ in range(2):
        again, body = await _post(fake.url, answer)
        assert again.status_code == 200
        assert body == answer.body
    assert [r.get("stream_options") for r in forwarded(fake)] == [
        None,
        {"include_usage": True},
        {"include_usage": True},
    ]


async def test_ollama_transcripts_replay_on_api_chat(nursery: trio.Nursery) -> None:
    """An Ollama transcript makes an Ollama-style fake: its url is the server
    root, and the request is recorded on /api/chat."""
    t = by_name("ollama_tool_calls")
    fake = replaying(t)
    await nursery.start(fake.serve)
    assert fake.fmt == "ollama"
    assert not fake.url.endswith("/v1")
    _, body = await _post(fake.url, t)
    assert body == t.body
    assert fake.exchanges[0].target == b"/api/chat"
    assert forwarded(fake)[0]["tools"][0]["function"]["name"] == "get_weather"


def _sdk_stream(url: str, t: Transcript) -> tuple[list[dict[str, Any]], openai.APIError | None]:
    """Stream ``t.request`` with the official SDK (sync client: see
    tests/test_openai_sdk.py for why); the chunks as dicts and the error raised."""
    extra = {k: v for k, v in t.request.items() if k not in ("model", "messages", "stream")}
    chunks: list[dict[str, Any]] = []
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=10) as client:
        try:
            stream = client.chat.completions.create(
                model=t.request["model"], messages=t.request["messages"], stream=True,
                extra_body=extra,
            )  # fmt: skip
            chunks.extend(chunk.to_dict() for chunk in stream)
        except openai.APIError as exc:
            return chunks, exc
    return chunks, None


@pytest.mark.parametrize("t", OPENAI_STYLE, ids=ids(OPENAI_STYLE))
async def test_official_sdk_reads_the_transcript(t: Transcript, nursery: trio.Nursery) -> None:
    """The official SDK, reading a replayed transcript directly, yields chunks
    whose to_dict() is exactly expected_chunks() (so a relay's output through
    the SDK can be compared with them); raises BadRequestError/RateLimitError/
    APIStatusError with the upstream's status for an HTTP error, and APIError
    with the upstream's message for an {"error": {...}} event or OpenRouter's
    error chunk.  vLLM's old flat error event and OpenRouter's chunk with
    ``finish_reason: "error"`` but no error object it does not recognise: it
    yields them as one more chunk and ends quietly (why issue 20 item 5 wants
    the relay to recognise those shapes)."""
    fake = replaying(t)
    await nursery.start(fake.serve)
    chunks, error = await trio.to_thread.run_sync(_sdk_stream, fake.url, t)
    if t.status >= 400:
        expected_class = {400: openai.BadRequestError, 429: openai.RateLimitError}.get(
            t.status, openai.APIStatusError
        )
        assert isinstance(error, expected_class)
        assert isinstance(error, openai.APIStatusError)
        assert error.status_code == t.status
        assert chunks == []
        return
    upstream = rx.midstream_error(t)
    if upstream is not None and upstream.dialect in ("vllm-flat", "openrouter-finish"):
        assert error is None
        assert chunks == [*rx.expected_chunks(t), body_objects(t)[-1]]
        return
    assert chunks == rx.expected_chunks(t)
    if upstream is None:
        assert error is None
    else:
        assert isinstance(error, openai.APIError)
        assert error.message == upstream.message


# -- relay_expect: errors ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "status", "dialect", "type_", "code", "param"),
    [
        ("vllm_error_400_flat", 400, "vllm-flat", "BadRequestError", 400, None),
        ("vllm_error_400_nested", 400, "openai", "BadRequestError", 400, "input_tokens"),
        ("openai_400_context_length", 400, "openai", "invalid_request_error",
         "context_length_exceeded", "messages"),
        ("openai_429_rate_limit", 429, "openai", "tokens", "rate_limit_exceeded", None),
        ("openrouter_error_402", 402, "openai", None, 402, None),
        ("ollama_error_404", 404, "ollama", None, None, None),
    ],
)  # fmt: skip
def test_http_error_identity(
    name: str, status: int, dialect: str, type_: str | None, code: str | int | None,
    param: str | None,
) -> None:  # fmt: skip
    """http_error() reads every dialect's error body into one identity (message,
    type, code, param) that a relay must keep, with the upstream's status."""
    t = by_name(name)
    err = rx.http_error(t)
    assert err is not None
    assert t.status == status
    assert (err.dialect, err.type, err.code, err.param) == (dialect, type_, code, param)
    assert err.message
    assert rx.expected_chunks(t) == []


@pytest.mark.parametrize(
    ("name", "dialect", "type_", "code"),
    [
        ("vllm_error_midstream_flat", "vllm-flat", "BadRequestError", 400),
        ("vllm_error_midstream_nested", "openai", "InternalServerError", 500),
        ("openai_error_midstream", "openai", "server_error", None),
        ("openrouter_error_midstream", "openrouter-chunk", None, "server_error"),
        ("openrouter_error_finish_reason", "openrouter-finish", None, None),
        ("ollama_error_midstream", "ollama", None, None),
    ],
)
def test_midstream_error_identity(
    name: str, dialect: str, type_: str | None, code: str | int | None
) -> None:
    """midstream_error() finds the one error event ending a 200 stream, in each
    dialect, and expected_chunks() leaves it out (it becomes the error frame),
    keeping every chunk before it."""
    t = by_name(name)
    err = rx.midstream_error(t)
    assert err is not None
    assert (err.dialect, err.type, err.code) == (dialect, type_, code)
    chunks = rx.expected_chunks(t)
    assert len(chunks) == len(body_objects(t)) - 1
    assert all(rx.as_error(c) is None for c in chunks)


def test_success_transcripts_carry_no_error() -> None:
    """Transcripts without "error" in their name have no error, before or
    during the stream."""
    for t in TRANSCRIPTS:
        if "error" not in t.name and t.status < 400:
            assert rx.midstream_error(t) is None, t.name


def test_rate_limit_headers_to_pass_on() -> None:
    """retry_after() and ratelimit_headers() give the 429's Retry-After and its
    six x-ratelimit-* headers as sent, which issue 20 item 5 says reach the
    client."""
    t = by_name("openai_429_rate_limit")
    assert rx.retry_after(t) == "7"
    assert [k for k, _ in rx.ratelimit_headers(t)] == [
        f"x-ratelimit-{w}-{r}"
        for w in ("limit", "remaining", "reset")
        for r in ("requests", "tokens")
    ]


# -- relay_expect: chunks ---------------------------------------------------------


@pytest.mark.parametrize("t", SSE, ids=ids(SSE))
def test_expected_chunks_are_the_upstream_objects(t: Transcript) -> None:
    """For an OpenAI-style upstream the chunks to deliver are the upstream's own
    objects, untouched, minus the error event."""
    objects = sse_objects(t.body)[0]
    assert rx.expected_chunks(t) == [o for o in objects if rx.as_error(o) is None]


def test_chunk_differences_sees_every_loss_but_the_rewrites() -> None:
    """chunk_differences() ignores id/created/model at the top level only, and
    reports a dropped field, a null turned absent, a changed value, a split
    chunk and an added key."""
    want = rx.expected_chunks(by_name("vllm_logprobs"))
    assert rx.chunk_differences(want, want) == []
    got = orjson.loads(orjson.dumps(want))
    got[1].update(id="run-1", created=0, model="x")
    assert rx.chunk_differences(want, got) == []
    del got[1]["choices"][0]["logprobs"]
    got[2]["choices"][0]["logprobs"]["content"][0]["bytes"] = [101]
    del got[0]["choices"][0]["logprobs"]
    got[4]["choices"][0]["extra"] = 1
    lost = repr(want[1]["choices"][0]["logprobs"])
    assert rx.chunk_differences(want, got) == [
        "chunk[0].choices[0].logprobs: missing (upstream sent None)",
        f"chunk[1].choices[0].logprobs: missing (upstream sent {lost})",
        "chunk[2].choices[0].logprobs.content[0].bytes: 1 items, upstream sent 2",
        "chunk[2].choices[0].logprobs.content[0].bytes[0]: 101, upstream sent 195",
        "chunk[4].choices[0].extra: added (1, upstream sent no such key)",
    ]
    split = rx.chunk_differences(want, want[:2] + want[1:])
    assert split[0] == "6 chunks received, upstream sent 5"
    nested_model = orjson.loads(orjson.dumps(want))
    nested_model[1]["choices"][0]["model"] = "x"
    assert rx.chunk_differences(want, nested_model) == [
        "chunk[1].choices[0].model: added ('x', upstream sent no such key)"
    ]


def test_merge_is_exact_or_nothing() -> None:
    """merge() joins two chunks only as issue 20 allows: text fields and logprobs
    lists concatenate; it refuses across a role, a finish_reason, different
    usage, or different delta fields."""
    lp = rx.expected_chunks(by_name("vllm_logprobs"))
    joined = rx.merge(lp[1], lp[2])
    assert joined is not None
    assert joined["choices"][0]["delta"] == {"content": " Caf\u00e9"}
    assert [e["token"] for e in joined["choices"][0]["logprobs"]["content"]] == [" Caf", "\u00e9"]
    assert rx.merge(lp[0], lp[1]) is None  # role chunk
    assert rx.merge(lp[3], lp[4]) is None  # across the finish
    usage = rx.expected_chunks(by_name("vllm_continuous_usage"))
    assert rx.merge(usage[1], usage[2]) is None  # per-chunk usage differs
    mixed = rx.expected_chunks(by_name("vllm_reasoning_content"))
    assert rx.merge(mixed[3], mixed[4]) is None  # reasoning_content then both fields
    assert rx.merge(mixed[1], mixed[2]) is not None  # two reasoning_content deltas


def test_chunk_differences_allows_exact_coalescing_only() -> None:
    """With coalescing=True, chunks merged exactly compare equal; a merge that
    loses something (here the logprobs) is still reported."""
    want = rx.expected_chunks(by_name("vllm_logprobs"))
    joined = rx.merge(want[1], want[2])
    assert joined is not None
    got = [want[0], joined, want[3], want[4]]
    assert rx.chunk_differences(want, got, coalescing=True) == []
    assert rx.chunk_differences(want, got) != []
    lossy = orjson.loads(orjson.dumps(got))
    lossy[1]["choices"][0]["logprobs"]["content"].pop()
    assert rx.chunk_differences(want, lossy, coalescing=True) != []


def test_ollama_lines_become_openai_chunks() -> None:
    """Each Ollama line maps to one chunk: thinking -> reasoning_content, tool
    calls with Ollama's id and index and arguments as JSON text, the done line
    -> finish_reason (tool_calls after a tool call) and usage from the eval
    counts."""
    thinking = rx.expected_chunks(by_name("ollama_thinking"))
    deltas = [c["choices"][0]["delta"] for c in thinking]
    assert deltas[:3] == [
        {"role": "assistant", "reasoning_content": "Seven"},
        {"reasoning_content": " eights are 56."},
        {"content": "7 \u00d7 8"},
    ]
    assert thinking[-1]["choices"][0]["finish_reason"] == "stop"
    assert thinking[-1]["usage"] == {
        "prompt_tokens": 26,
        "completion_tokens": 282,
        "total_tokens": 308,
    }
    tools = rx.expected_chunks(by_name("ollama_tool_calls"))
    assert tools[0]["choices"][0]["delta"]["tool_calls"] == [
        {
            "index": 0,
            "id": "call_k3x9q2m7",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Tokyo"}'},
        }
    ]
    assert tools[-1]["choices"][0]["finish_reason"] == "tool_calls"


# -- relay_expect: the non-streamed answer ---------------------------------------


def _message(name: str) -> dict[str, Any]:
    answer = rx.aggregate(by_name(name))
    assert answer["object"] == "chat.completion"
    message = answer["choices"][0]["message"]
    assert isinstance(message, dict)
    return message


def test_aggregate_reasoning_fields_as_the_upstream_named_them() -> None:
    """The non-streamed message keeps reasoning under the name(s) the upstream
    used: reasoning_content (old vLLM, Ollama mapped), both (vLLM's deprecation
    window), reasoning (current vLLM, OpenRouter), concatenated in order; a
    delta holding both reasoning and content feeds both."""
    old = _message("vllm_reasoning_content")
    assert old["reasoning_content"] == "Okay, the user asks for 7 times 8. That is 56."
    assert old["content"] == "\n\n7 \u00d7 8 = **56**"
    assert "reasoning" not in old
    both = _message("vllm_reasoning_both")
    assert (
        both["reasoning"] == both["reasoning_content"] == "The user wants 7 \u00d7 8, which is 56."
    )
    new = _message("vllm_reasoning")
    assert new["reasoning"] == "Seven eights are fifty-six."
    assert "reasoning_content" not in new
    assert _message("ollama_thinking")["reasoning_content"] == "Seven eights are 56."


def test_aggregate_tool_calls() -> None:
    """Tool-call fragments merge by index into OpenAI's message.tool_calls (id,
    type, function name, arguments concatenated into valid JSON); content is
    null beside them; finish_reason tool_calls."""
    for name, tool_id in [
        ("vllm_tool_calls", "chatcmpl-tool-040af537f3e14bd6986646facde02ce3"),
        ("openai_tool_calls", "call_Xk3b9QmT2vR7wP1sL5nY8cA4"),
        ("ollama_tool_calls", "call_k3x9q2m7"),
    ]:
        answer = rx.aggregate(by_name(name))
        (call,) = answer["choices"][0]["message"]["tool_calls"]
        assert call["id"] == tool_id
        assert call["type"] == "function"
        assert call["function"]["name"] == "get_weather"
        assert orjson.loads(call["function"]["arguments"]) == {"city": "Tokyo"}
        assert answer["choices"][0]["message"]["content"] is None
        assert answer["choices"][0]["finish_reason"] == "tool_calls"


def test_aggregate_refusal_and_openai_extras() -> None:
    """A refusal aggregates to refusal text with content null (not an empty
    success); system_fingerprint, service_tier and the whole usage with its
    details are kept; the stream-only obfuscation padding is not."""
    answer = rx.aggregate(by_name("openai_refusal"))
    message = answer["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "refusal": "I'm sorry, I can't help with that.",
    }
    assert answer["system_fingerprint"] == "fp_51e1070cf2"
    assert answer["service_tier"] == "default"
    assert answer["usage"]["completion_tokens_details"]["rejected_prediction_tokens"] == 0
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 0, "audio_tokens": 0}
    assert "obfuscation" not in answer
    assert answer["choices"][0]["logprobs"] is None


def test_aggregate_logprobs_concatenate() -> None:
    """logprobs.content is one list: every token entry of every chunk, in order,
    with its bytes and top_logprobs as sent."""
    answer = rx.aggregate(by_name("vllm_logprobs"))
    content = answer["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == [" Caf", "é", " ok"]
    assert content[1]["bytes"] == [195, 169]
    assert [len(e["top_logprobs"]) for e in content] == [2, 2, 2]
    assert answer["choices"][0]["message"]["content"] == " Café ok"
    assert answer["choices"][0]["stop_reason"] is None


def test_aggregate_vllm_usage_and_stop_reason() -> None:
    """With continuous usage the answer's usage is the final one, and vLLM's
    stop_reason (the stop string) stays on the choice."""
    answer = rx.aggregate(by_name("vllm_continuous_usage"))
    assert answer["usage"] == {"prompt_tokens": 20, "total_tokens": 24, "completion_tokens": 4}
    assert answer["choices"][0]["stop_reason"] == "END"
    assert answer["choices"][0]["finish_reason"] == "stop"


def test_aggregate_openrouter() -> None:
    """OpenRouter's reasoning, reasoning_details (fragments merged by index, the
    signature from the last), provider, native_finish_reason and usage with
    cost all reach the non-streamed answer."""
    answer = rx.aggregate(by_name("openrouter_reasoning"))
    message = answer["choices"][0]["message"]
    assert message["reasoning"] == "Seven times eight is 56."
    (detail,) = message["reasoning_details"]
    assert detail["text"] == "Seven times eight is 56."
    assert detail["type"] == "reasoning.text"
    assert detail["signature"].startswith("EqQB")
    assert answer["provider"] == "Anthropic"
    assert answer["choices"][0]["native_finish_reason"] == "end_turn"
    assert answer["usage"]["cost"] == 0.000519
    assert answer["usage"]["is_byok"] is False
    assert message["content"] == "7 \u00d7 8 = 56."


def test_aggregate_of_an_interrupted_stream_keeps_what_came() -> None:
    """Before a mid-stream error the aggregate holds the text so far and no
    finish_reason (the error, not a finish, ended it)."""
    answer = rx.aggregate(by_name("openrouter_error_midstream"))
    assert answer["choices"][0]["message"]["content"] == "Seven times"
    assert answer["choices"][0]["finish_reason"] is None


# -- coverage of issue 20's table -------------------------------------------------


def _deltas(t: Transcript) -> list[dict[str, Any]]:
    return [c["choices"][0].get("delta", {}) for c in rx.expected_chunks(t) if c.get("choices")]


def _choices(t: Transcript) -> list[dict[str, Any]]:
    return [c["choices"][0] for c in rx.expected_chunks(t) if c.get("choices")]


#: Each row of issue 20's table (and the brief's list), the transcripts that
#: exercise it, and a check that they really carry it.
COVERAGE: dict[str, tuple[list[str], Callable[[Transcript], bool]]] = {
    "logprobs on each choice": (
        ["vllm_logprobs"],
        lambda t: sum(bool((c.get("logprobs") or {}).get("content")) for c in _choices(t)) >= 3,
    ),
    "reasoning_content (vLLM, DeepSeek)": (
        ["vllm_reasoning_content", "vllm_reasoning_both"],
        lambda t: any(d.get("reasoning_content") for d in _deltas(t)),
    ),
    "reasoning (vLLM >= PR 27752, OpenRouter)": (
        ["vllm_reasoning", "vllm_reasoning_both", "openrouter_reasoning"],
        lambda t: any(d.get("reasoning") for d in _deltas(t)),
    ),
    "reasoning_details (OpenRouter)": (
        ["openrouter_reasoning"],
        lambda t: any(d.get("reasoning_details") for d in _deltas(t)),
    ),
    "refusal delta": (["openai_refusal"], lambda t: any(d.get("refusal") for d in _deltas(t))),
    "system_fingerprint and service_tier on the chunk": (
        ["openai_refusal", "openai_content_usage", "openai_tool_calls"],
        lambda t: all(
            c.get("system_fingerprint") and c.get("service_tier") for c in rx.expected_chunks(t)
        ),
    ),
    "stop_reason and other fields on the choice": (
        ["vllm_continuous_usage", "openrouter_reasoning"],
        lambda t: any(set(c) - {"index", "delta", "logprobs", "finish_reason"}
                      for c in _choices(t)),
    ),
    "one chunk with content and another delta field": (
        ["vllm_reasoning_content", "openrouter_reasoning"],
        lambda t: any(d.get("content") is not None and len(set(d) - {"role"}) > 1
                      for d in _deltas(t)),
    ),
    "usage with extra fields (cost)": (
        ["openrouter_reasoning"],
        lambda t: any("cost" in (c.get("usage") or {}) for c in rx.expected_chunks(t)),
    ),
    "per-chunk usage (continuous_usage_stats)": (
        ["vllm_continuous_usage"],
        lambda t: all(c.get("usage") for c in rx.expected_chunks(t))
        and t.request["stream_options"]["continuous_usage_stats"] is True,
    ),
    "usage details (prompt/completion_tokens_details)": (
        ["openai_refusal", "openai_content_usage"],
        lambda t: any(
            "completion_tokens_details" in (c.get("usage") or {}) for c in rx.expected_chunks(t)
        ),
    ),
    "obfuscation": (
        ["openai_refusal", "openai_content_usage"],
        lambda t: all("obfuscation" in c for c in rx.expected_chunks(t)),
    ),
    "tool calls (id, type, name, then argument fragments)": (
        ["vllm_tool_calls", "openai_tool_calls", "ollama_tool_calls"],
        lambda t: any(d.get("tool_calls") for d in _deltas(t)),
    ),
    "SSE comments": (["openrouter_reasoning", "openrouter_error_midstream"],
                     lambda t: bool(read_sse(t.body).comments)),
    "mid-stream error with its own code/type": (
        ["vllm_error_midstream_flat", "vllm_error_midstream_nested", "openai_error_midstream",
         "openrouter_error_midstream", "ollama_error_midstream"],
        lambda t: rx.midstream_error(t) is not None,
    ),
    "error chunk with finish_reason error and no error object": (
        ["openrouter_error_finish_reason"],
        lambda t: (err := rx.midstream_error(t)) is not None
        and err.dialect == "openrouter-finish" and bool(err.extra.get("native_finish_reason"))
        and all("error" not in obj for obj in body_objects(t)),
    ),
    "HTTP 400 context_length_exceeded": (
        ["openai_400_context_length", "vllm_error_400_flat", "vllm_error_400_nested"],
        lambda t: t.status == 400 and "context length" in (rx.http_error(t) or rx.UpstreamError(
            "", None, None, None, "")).message,
    ),
    "HTTP 429 with Retry-After and x-ratelimit-*": (
        ["openai_429_rate_limit"],
        lambda t: t.status == 429 and rx.retry_after(t) is not None
        and len(rx.ratelimit_headers(t)) == 6,
    ),
    "Ollama thinking": (["ollama_thinking"],
                        lambda t: any(d.get("reasoning_content") for d in _deltas(t))),
}  # fmt: skip


@pytest.mark.parametrize("row", list(COVERAGE), ids=list(COVERAGE))
def test_issue20_row_is_exercised(row: str) -> None:
    """Every row of issue 20's table has transcripts, and each of them really
    carries what the row is about."""
    names, carries = COVERAGE[row]
    for name in names:
        assert carries(by_name(name)), f"{name} does not carry {row!r}"
