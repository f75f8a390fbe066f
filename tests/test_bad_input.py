"""Bad input gets a clear error and costs nothing (issue 6, docs/api.md section 2).

One table: every row is a request (method, path, headers, body) and the answer
it must get (status, OpenAI error ``type`` and ``code``).  Every answer must be
the OpenAI error body ``{"error": {"message", "type", "param", "code"}}`` and no row may
start a run.  Two oversized bodies are sent on raw sockets, because the point
there is *when* the server answers: before the body has been sent (and so
before it could have been buffered).

Each row gets its own real in-process server on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h11
import httpx
import orjson
import pytest
import trio

from tests.conftest import Server, waitable_server
from trio_stream import Settings

KEY = "sk-test-bad-input-4b1d9e"
AUTH = {"authorization": f"Bearer {KEY}"}
LIMIT = 1024  # --max-body-bytes of every server here
CHAT = "/v1/chat/completions"
RUN = "/v1/runs/run_AAAAAAAAAAAAAAAAAAAAAA"
SESSION = "/v1/sessions/no-such-session"
MSGS = [{"role": "user", "content": "hi"}]
#: --body-timeout of the "slow-body" row's server, and how long its body pauses.
SLOW_BODY_TIMEOUT, SLOW_BODY_PAUSE = 0.25, 1.5

BAD_REQ, AUTH_ERR, NOT_FOUND = "invalid_request_error", "authentication_error", "not_found_error"


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    body: bytes | None
    status: int
    type: str
    code: str | None
    headers: dict[str, str | bytes] = field(default_factory=lambda: dict(AUTH))
    # "plain", "full" (one stream holds --max-streams=1), "draining", or
    # "slow-body" (the body stops after its first bytes: see slow_body)
    setup: str = "plain"
    # the "param" the error names; ANY: not checked (rows written before it)
    param: str | None = "*"


ANY = "*"


def chat(id_: str, body: Any, code: str, **kw: Any) -> Case:
    """A POST /v1/chat/completions row answered 400 invalid_request_error."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return Case(id_, "POST", CHAT, raw, 400, BAD_REQ, code, **kw)


def typed(field_: str, value: Any, code: str = "invalid_type", param: str | None = None) -> Case:
    """A chat body whose ``field_`` has a wrong type (or value); the error
    names ``param`` (default ``field_``)."""
    name = f"{field_}={orjson.dumps(value).decode()}"
    return chat(name, {"messages": MSGS, field_: value}, code, param=param or field_)


def session(id_: str, value: str | bytes) -> Case:
    body = orjson.dumps({"messages": MSGS})
    return Case(id_, "POST", CHAT, body, 400, BAD_REQ, "invalid_session_id",
                {**AUTH, "x-session-id": value})  # fmt: skip


def no_key(id_: str, method: str, path: str, headers: dict[str, str | bytes]) -> Case:
    body = orjson.dumps({"messages": MSGS}) if method == "POST" else None
    return Case(id_, method, path, body, 401, AUTH_ERR, "invalid_api_key", headers)


def wrong_method(method: str, path: str, name: str) -> Case:
    return Case(f"405-{method}-{name}", method, path, None, 405, BAD_REQ, "method_not_allowed")


GOOD = orjson.dumps({"messages": MSGS, "stream": True})
RESPONSES = "/v1/responses"


def nest(levels: int) -> bytes:
    """``levels`` arrays, one in the other."""
    return b"[" * levels + b"]" * levels


def deep(id_: str, shape: Any, depth: int, path: str = CHAT) -> Case:
    """A body nested ``depth`` levels deep in all (the body is level 1):
    ``shape(d)`` builds it around one placeholder, replaced by as many arrays
    as it takes.  Answered 400 invalid_json before any run starts."""
    raw = orjson.dumps(shape("@NEST@"))
    head = raw[: raw.index(b'"@NEST@"')]  # no string of these shapes holds a bracket
    around = head.count(b"[") + head.count(b"{") - head.count(b"]") - head.count(b"}")
    raw = raw.replace(b'"@NEST@"', nest(depth - around))
    return Case(id_, "POST", path, raw, 400, BAD_REQ, "invalid_json")


DEEP_BODY = orjson.dumps({"messages": MSGS}).replace(b'"hi"', nest(300))

CASES: list[Case] = [
    # 400: malformed JSON
    chat("json-truncated", b'{"messages": [', "invalid_json"),
    chat("json-garbage", b"not json at all", "invalid_json"),
    chat("json-trailing-garbage", b'{"messages": []} x', "invalid_json"),
    chat("json-single-quotes", b"{'messages': []}", "invalid_json"),
    chat("json-nan", b'{"messages": NaN}', "invalid_json"),
    chat("json-invalid-utf8", b'{"messages": "\xff\xfe"}', "invalid_json"),
    # 400: a JSON value that is not an object
    chat("not-object-array", [], "invalid_json"),
    chat("not-object-string", "hello", "invalid_json"),
    chat("not-object-number", 42, "invalid_json"),
    chat("not-object-null", None, "invalid_json"),
    chat("not-object-true", True, "invalid_json"),
    # 400: empty body
    chat("empty-body", b"", "invalid_json"),
    chat("whitespace-body", b" \r\n\t ", "invalid_json"),
    # 400: nested deeper than 250 levels (docs/api.md section 2.2), wherever:
    # before issue 18 each of these started a run that crashed re-encoding it
    deep("deep-content-251", lambda d: {"messages": [{"role": "user", "content": d}]}, 251),
    deep("deep-content-257", lambda d: {"messages": [{"role": "user", "content": d}]}, 257),
    deep("deep-name", lambda d: {"messages": [{"role": "user", "content": "x", "name": d}]}, 251),
    deep("deep-tools", lambda d: {"messages": MSGS, "tools": [d]}, 251),
    deep("deep-stream-true", lambda d: {"messages": MSGS, "stream": True, "x": d}, 251),
    deep("deep-responses", lambda d: {"input": "hi", "metadata": d}, 251, path=RESPONSES),
    deep(
        "deep-responses-stream",
        lambda d: {"input": "hi", "stream": True, "x": d},
        251,
        path=RESPONSES,
    ),
    # 400: no messages / empty messages / malformed messages
    chat("no-messages", {"model": "m"}, "missing_required_parameter"),
    chat("messages-null", {"messages": None}, "missing_required_parameter"),
    chat("messages-empty", {"messages": []}, "invalid_type"),
    chat("messages-string", {"messages": "hi"}, "invalid_type"),
    chat("messages-object", {"messages": {"role": "user"}}, "invalid_type"),
    chat("message-not-object", {"messages": [1]}, "invalid_type"),
    chat("message-no-role", {"messages": [{"content": "hi"}]}, "invalid_type"),
    chat("message-bad-role", {"messages": [{"role": "robot", "content": "x"}]}, "invalid_type"),
    chat("message-role-list", {"messages": [{"role": ["user"], "content": "x"}]}, "invalid_type"),
    chat("message-content-int", {"messages": [{"role": "user", "content": 1}]}, "invalid_type"),
    chat("message-content-obj", {"messages": [{"role": "user", "content": {}}]}, "invalid_type"),
    # 400: wrong types for each typed field
    typed("model", 7),
    typed("model", ["m"]),
    typed("stream", "yes"),
    typed("stream", 1),
    typed("detach", "true"),
    typed("detach", 0),
    typed("temperature", "hot"),
    typed("temperature", True),
    typed("max_tokens", "10"),
    typed("max_tokens", 1.5),
    typed("max_tokens", True),
    typed("max_tokens", 0, "invalid_value"),
    typed("max_tokens", -1, "invalid_value"),
    typed("max_tokens", 2_000_000, "invalid_value"),
    typed("max_completion_tokens", "10"),
    # ... also beside max_tokens, which wins (issue 18: these answered 200)
    chat(
        "max_completion_tokens-x-beside-max_tokens",
        {"messages": MSGS, "max_tokens": 5, "max_completion_tokens": "x"},
        "invalid_type",
    ),
    chat(
        "max_completion_tokens--7-beside-max_tokens",
        {"messages": MSGS, "max_tokens": 5, "max_completion_tokens": -7},
        "invalid_value",
    ),
    typed("max_completion_tokens", -7, "invalid_value"),
    typed("n", "1"),
    typed("n", 2, "invalid_value"),
    # the standard fields passed on to the upstream, checked by type (issue 20 item 4)
    typed("top_p", "x"),
    typed("top_p", True),
    typed("presence_penalty", "x"),
    typed("frequency_penalty", [0]),
    typed("seed", 1.5),
    typed("seed", "1"),
    typed("stop", 3),
    typed("stop", ["a", 1]),
    typed("logprobs", "yes"),
    typed("logprobs", 1),
    typed("top_logprobs", "5"),
    typed("top_logprobs", 21, "invalid_value"),
    typed("top_logprobs", -1, "invalid_value"),
    typed("logit_bias", [1]),
    typed("user", 7),
    typed("stream_options", "usage"),
    typed("stream_options", {"include_usage": "yes"}, param="stream_options.include_usage"),
    typed("response_format", "json"),
    typed("tools", {"type": "function"}),
    typed("tools", ["get_weather"], param="tools[0]"),
    typed("tools", [{"function": {"name": "f"}}], "missing_required_parameter", "tools[0].type"),
    typed("tools", [{"type": "function", "function": "f"}], param="tools[0].function"),
    typed("tools", [{"type": "function", "function": {}}], param="tools[0].function.name"),
    typed("tool_choice", 1),
    typed("parallel_tool_calls", "no"),
    # 400: bad X-Session-Id (header) and bad session ids in paths
    session("session-too-long", "s" * 129),
    session("session-space", "a b"),
    session("session-slash", "a/b"),
    session("session-percent", "a%20b"),
    session("session-empty", ""),
    session("session-latin1", b"caf\xe9"),
    Case(
        "session-path-too-long",
        "GET",
        f"/v1/sessions/{'s' * 129}/messages",
        None,
        400,
        BAD_REQ,
        "invalid_session_id",
    ),
    Case(
        "session-path-bad-char",
        "POST",
        "/v1/sessions/a%21b/interrupt",
        None,
        400,
        BAD_REQ,
        "invalid_session_id",
    ),
    # 401: missing key, wrong key, wrong scheme, on every /v1 route
    no_key("401-chat-missing", "POST", CHAT, {}),
    no_key("401-chat-wrong-key", "POST", CHAT, {"authorization": "Bearer sk-wrong"}),
    no_key("401-chat-same-length", "POST", CHAT, {"authorization": "Bearer " + "x" * len(KEY)}),
    no_key("401-chat-key-prefix", "POST", CHAT, {"authorization": "Bearer " + KEY[:-1]}),
    no_key("401-chat-key-plus-one", "POST", CHAT, {"authorization": "Bearer " + KEY + "0"}),
    no_key("401-chat-basic-scheme", "POST", CHAT, {"authorization": "Basic " + KEY}),
    no_key("401-chat-no-scheme", "POST", CHAT, {"authorization": KEY}),
    no_key("401-chat-empty-token", "POST", CHAT, {"authorization": "Bearer"}),
    no_key("401-run-missing", "GET", RUN, {}),
    no_key("401-events-missing", "GET", f"{RUN}/events", {}),
    no_key("401-cancel-missing", "POST", f"{RUN}/cancel", {}),
    no_key("401-interrupt-missing", "POST", f"{SESSION}/interrupt", {}),
    no_key("401-messages-missing", "GET", f"{SESSION}/messages", {}),
    no_key("401-models-missing", "GET", "/v1/models", {}),
    no_key("401-models-wrong-key", "GET", "/v1/models", {"authorization": "Bearer nope"}),
    # 404: unknown run or session, unknown path
    Case("404-run-get", "GET", RUN, None, 404, NOT_FOUND, "not_found"),
    Case("404-run-cancel", "POST", f"{RUN}/cancel", None, 404, NOT_FOUND, "not_found"),
    Case("404-run-events", "GET", f"{RUN}/events", None, 404, NOT_FOUND, "not_found"),
    Case("404-session-messages", "GET", f"{SESSION}/messages", None, 404, NOT_FOUND, "not_found"),
    Case(
        "404-session-interrupt", "POST", f"{SESSION}/interrupt", None, 404, NOT_FOUND, "not_found"
    ),
    Case("404-path-root", "GET", "/nope", None, 404, BAD_REQ, "unknown_url"),
    Case("404-path-v1-nope", "GET", "/v1/nope", None, 404, BAD_REQ, "unknown_url"),
    Case("404-path-typo", "POST", "/v1/chat/completion", GOOD, 404, BAD_REQ, "unknown_url"),
    Case("404-path-runs-deep", "GET", f"{RUN}/events/x", None, 404, BAD_REQ, "unknown_url"),
    # The page is at "/" only (docs/api.md section 9)
    Case(
        "404-playground-index", "GET", "/playground/index.html", None, 404, BAD_REQ, "unknown_url"
    ),
    # Routes that read no body do not parse one: a deep body changes nothing
    Case(
        "404-run-cancel-deep-body", "POST", f"{RUN}/cancel", DEEP_BODY, 404, NOT_FOUND, "not_found"
    ),
    Case(
        "404-session-interrupt-deep-body",
        "POST",
        f"{SESSION}/interrupt",
        DEEP_BODY,
        404,
        NOT_FOUND,
        "not_found",
    ),
    Case(
        "404-response-cancel-deep-body",
        "POST",
        "/v1/responses/resp_nope/cancel",
        DEEP_BODY,
        404,
        NOT_FOUND,
        "not_found",
    ),
    # 405: wrong method on each route
    wrong_method("GET", CHAT, "chat"),
    wrong_method("PUT", CHAT, "chat"),
    wrong_method("DELETE", CHAT, "chat"),
    wrong_method("POST", f"{RUN}/events", "events"),
    wrong_method("POST", RUN, "run"),
    wrong_method("DELETE", RUN, "run"),
    wrong_method("GET", f"{RUN}/cancel", "cancel"),
    wrong_method("GET", f"{SESSION}/interrupt", "interrupt"),
    wrong_method("POST", f"{SESSION}/messages", "messages"),
    wrong_method("POST", "/healthz", "healthz"),
    wrong_method("POST", "/metrics", "metrics"),
    wrong_method("POST", "/v1/models", "models"),
    # 408: a body not all in within --body-timeout
    Case(
        "408-slow-body",
        "POST",
        CHAT,
        GOOD[:10],
        408,
        BAD_REQ,
        "body_timeout",
        setup="slow-body",
    ),
    # 413: a body over --max-body-bytes (declared by Content-Length; JSON or not)
    Case(
        "413-content-length-json",
        "POST",
        CHAT,
        orjson.dumps({"messages": [{"role": "user", "content": "x" * LIMIT}]}),
        413,
        BAD_REQ,
        "request_too_large",
    ),
    Case(
        "413-content-length-garbage",
        "POST",
        CHAT,
        b"\0" * (LIMIT + 1),
        413,
        BAD_REQ,
        "request_too_large",
    ),
    # 429: over --max-streams, 503: shutting down
    Case(
        "429-max-streams",
        "POST",
        CHAT,
        GOOD,
        429,
        "rate_limit_error",
        "too_many_streams",
        setup="full",
    ),
    Case(
        "503-draining",
        "POST",
        CHAT,
        GOOD,
        503,
        "unavailable_error",
        "shutting_down",
        setup="draining",
    ),
]


def plain_client(server: Server) -> httpx.AsyncClient:
    """An httpx client for plain HTTP to 127.0.0.1.  ``verify=False`` only skips
    loading the CA bundle (about 0.1 s per client, and there is no TLS here)."""
    return httpx.AsyncClient(base_url=server.url, timeout=30, verify=False)


def bad_input_settings(tmp_path: Path, setup: str = "plain") -> Settings:
    settings = Settings(
        port=0, db=str(tmp_path / "bad.db"), api_keys=(KEY,), max_body_bytes=LIMIT,
        mock_delay_ms=5, max_streams=1 if setup == "full" else 10_000,
        graceful_timeout=60,
    )  # fmt: skip
    if setup == "slow-body":
        settings = replace(settings, body_timeout=SLOW_BODY_TIMEOUT)
    return settings


async def slow_body(first: bytes) -> AsyncIterator[bytes]:
    """A chunked body: ``first``, then nothing for SLOW_BODY_PAUSE seconds, long
    past the server's --body-timeout, then its end.  The client reads the
    answer only once its body is sent, and the server has answered by then."""
    yield first
    await trio.sleep(SLOW_BODY_PAUSE)


@asynccontextmanager
async def holding_one_stream(server: Server, client: httpx.AsyncClient) -> AsyncIterator[int]:
    """Keep one long attached stream open (its headers received); yields 1."""
    body = {"messages": MSGS, "stream": True, "max_tokens": 100_000}
    async with client.stream("POST", CHAT, json=body, headers=AUTH) as held:
        assert held.status_code == 200
        assert server.service.streams == 1
        yield 1


def raw_headers(headers: dict[str, str | bytes]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v if isinstance(v, bytes) else v.encode()) for k, v in headers.items()]


def assert_openai_error(
    response: httpx.Response, type_: str, code: str | None, param: str | None = ANY
) -> None:
    """The OpenAI error body, its four keys in OpenAI's order, with this
    ``type`` and ``code`` (and ``param``, unless ANY)."""
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert list(error) == ["message", "type", "param", "code"]
    assert isinstance(error["message"], str)
    assert error["message"]
    assert (error["type"], error["code"]) == (type_, code), error
    assert error["param"] is None or isinstance(error["param"], str)
    if param != ANY:
        assert error["param"] == param, error


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_bad_input_gets_its_error_and_costs_nothing(case: Case, tmp_path: Path) -> None:
    """Every row of the error table (docs/api.md section 2.2) answers its status with the OpenAI
    error body (429 with Retry-After, 405 with Allow, 408 with Connection:
    close), and starts no run."""
    settings = bad_input_settings(tmp_path, case.setup)
    with trio.fail_after(15):
        async with (
            waitable_server(settings) as (server, logs),
            plain_client(server) as client,
            holding_one_stream(server, client)
            if case.setup in ("full", "draining")
            else nullcontext(0),
        ):
            if case.setup == "draining":
                server.shutdown.set()
                await logs.wait_for("shutdown_start")
            starts = len(logs.events("stream_start"))
            content = slow_body(case.body or b"") if case.setup == "slow-body" else case.body
            response = await client.request(
                case.method, case.path, headers=raw_headers(case.headers), content=content
            )
            assert response.status_code == case.status, response.text
            assert_openai_error(response, case.type, case.code, case.param)
            if case.status == 429:
                assert int(response.headers["retry-after"]) >= 1
            if case.status == 405:
                assert case.method not in response.headers["allow"].split(", ")
            if case.status == 408:
                assert response.headers["connection"] == "close"
            assert len(logs.events("stream_start")) == starts  # no run was started
            assert server.service.runs.live == starts


# -- oversized bodies on raw sockets: answered before the body ends ----------


async def send_head(stream: trio.SocketStream, headers: list[tuple[str, str]]) -> h11.Connection:
    h = h11.Connection(h11.CLIENT)
    head = [("host", "127.0.0.1"), ("content-type", "application/json"), *AUTH.items(), *headers]
    await stream.send_all(h.send(h11.Request(method="POST", target=CHAT, headers=head)))
    return h


async def read_response(stream: trio.SocketStream, h: h11.Connection) -> tuple[int, bytes]:
    """Read one response (status, body) with h11, however much we had sent."""
    status, body = 0, b""
    while True:
        event = h.next_event()
        if event is h11.NEED_DATA:
            h.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return status, body


async def test_declared_oversized_body_is_refused_before_it_is_sent(tmp_path: Path) -> None:
    """A Content-Length over --max-body-bytes gets 413 at once: the server
    answers though not one byte of the (100 MB) body was sent, so it never
    tried to read or hold it."""
    with trio.fail_after(10):
        async with waitable_server(bad_input_settings(tmp_path)) as (server, logs):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                h = await send_head(stream, [("content-length", str(100_000_000))])
                status, body = await read_response(stream, h)
            assert status == 413
            assert orjson.loads(body)["error"]["code"] == "request_too_large"
            assert not logs.events("stream_start")


async def test_chunked_body_growing_past_the_limit_is_refused_midway(tmp_path: Path) -> None:
    """A chunked body (no Content-Length) that grows past --max-body-bytes gets
    413 while it is still open: the client sends twice the limit and never
    the last chunk, so an answer at all proves the server did not wait for
    (and buffer) the whole body."""
    with trio.fail_after(10):
        async with waitable_server(bad_input_settings(tmp_path)) as (server, logs):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                h = await send_head(stream, [("transfer-encoding", "chunked")])
                # 8 chunks of 256 B (2x the limit) in one write, never the final chunk.
                # One write, so the server reads it all and its close is a FIN, not a RST.
                chunks = b"".join(h.send(h11.Data(data=b"[" * 256)) or b"" for _ in range(8))
                await stream.send_all(chunks)
                status, body = await read_response(stream, h)
            assert status == 413
            assert orjson.loads(body)["error"]["code"] == "request_too_large"
            assert not logs.events("stream_start")


def test_the_table_covers_every_status_of_the_error_table() -> None:
    """The table has a row for each status of docs/api.md section 2.2 that one
    request can cause: not 409 (a second request), not 502/504 (upstream
    faults: tests/test_upstream_faults.py)."""
    assert {c.status for c in CASES} == {400, 401, 404, 405, 408, 413, 429, 503}
    assert len({c.id for c in CASES}) == len(CASES)
