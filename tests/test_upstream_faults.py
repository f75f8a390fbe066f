"""Upstream faults (issue 6): an upstream that fails, stalls or lies never
leaves a task or a connection behind.

Every fault is played by a real :class:`~tools.fakes.FakeUpstream` on
127.0.0.1 (OpenAI SSE and Ollama NDJSON), against a real in-process server.
For each fault the client gets the right answer -- an HTTP 502/504 before the
first token, an ``upstream_error`` event after it -- and then:

* the partial content, if any, is saved exactly once, as ``failed``;
* no upstream request is still in flight, and every upstream connection the
  run abandoned is closed (a response read to its end may stay pooled);
* Trio's live task count is back at its baseline.

The timeouts are real (0.3 s): real sockets rule out the autojump clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import httpx
import orjson
import pytest
import trio

from tests.conftest import Server, running_server, tasks_living
from tools.fakes import FakeUpstream, Plan, Step, ollama_line, openai_chunk
from trio_stream import Settings
from trio_stream.http.service import PUBLIC_TENANT
from trio_stream.wire.sse import SSEDecoder

TIMEOUT = 0.3  # first-token and inter-token timeouts of every server here
MESSAGES = [{"role": "user", "content": "fault"}]
CHAT = "/v1/chat/completions"
CONTENT_TYPE = {"openai": "text/event-stream", "ollama": "application/x-ndjson"}


class TrackingUpstream(FakeUpstream):
    """A FakeUpstream that also counts responses in flight (request received,
    response neither finished nor abandoned)."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self.in_flight = 0

    async def _respond(self, stream: Any, h: h11.Connection, request: dict[str, Any]) -> bool:
        self.in_flight += 1
        try:
            return await super()._respond(stream, h, request)
        finally:
            self.in_flight -= 1
            self._notify()


def token(fmt: str, text: str) -> Step:
    return Step(openai_chunk(text) if fmt == "openai" else ollama_line(text))


def finish(fmt: str) -> list[Step]:
    if fmt == "openai":
        return [Step(openai_chunk(finish="stop")), Step(b"data: [DONE]\n\n")]
    return [Step(ollama_line(done=True))]


def raw(fmt: str, openai: bytes, ollama: bytes) -> Step:
    return Step(openai if fmt == "openai" else ollama)


def malformed(fmt: str) -> Step:
    return raw(fmt, b"data: {nope\n\n", b"{nope\n")


def error_object(fmt: str) -> Step:
    return raw(fmt, b'data: {"error": {"message": "overloaded"}}\n\n', b'{"error": "overloaded"}\n')


def too_deep(fmt: str) -> Step:
    """A non-text delta nested 300 levels deep: orjson reads it (up to 1,024)
    but cannot write it again (254), so relaying it crashed the writer."""
    nest = b"[" * 300 + b"]" * 300
    return raw(
        fmt,
        b'data: {"choices": [{"index": 0, "delta": {"refusal": ' + nest + b"}}]}\n\n",
        b'{"message": {"role": "assistant", "content": "", "tool_calls": [{"function": '
        b'{"name": "f", "arguments": ' + nest + b"}}]}}\n",
    )


HELLO = ["Hel", "lo"]


@dataclass(frozen=True)
class Fault:
    id: str
    steps: Callable[[str], list[Step]]
    status: int  # the HTTP status of a streaming request
    code: str | None  # the error body's code (status != 200) or the error event's code
    message: str  # part of the error's message
    content: str = ""  # what the client receives, and the server saves, before the fault
    upstream_status: int = 200
    closes: bool = True  # the upstream connection must end up closed
    # the error's type: trio-stream's, or None for the upstream's own error
    # (which also says "source": "upstream"; issue 20 item 5)
    type: str | None = "upstream_error"
    completes: bool = False  # not a fault: the run completes


FAULTS = [
    Fault("no-first-token", lambda f: [Step(hang=True)], 504, None, "no first token in time"),
    Fault(
        "slow-first-token",
        lambda f: [Step(delay=5 * TIMEOUT), token(f, "late")],
        504,
        None,
        "no first token in time",
    ),
    Fault(
        "malformed-first-chunk",
        lambda f: [malformed(f), Step(hang=True)],
        502,
        "malformed_chunk",
        "malformed",
    ),
    Fault(
        "error-object-first",
        lambda f: [error_object(f), Step(hang=True)],
        502,
        None,
        "overloaded",
        type=None,
    ),
    Fault(
        "too-deep-first-delta",
        lambda f: [too_deep(f), Step(hang=True)],
        502,
        "malformed_chunk",
        "nested more than 250 levels deep",
    ),
    Fault(
        "http-400",
        lambda f: [Step(b'{"error": "bad model"}')],
        400,
        None,
        "bad model",
        upstream_status=400,
        closes=False,
        type=None,
    ),
    Fault(
        "http-429",
        lambda f: [Step(b'{"error": "slow down"}')],
        429,
        None,
        "slow down",
        upstream_status=429,
        closes=False,
        type=None,
    ),
    Fault(
        "http-500",
        lambda f: [Step(b"boom")],
        502,
        "upstream_http_500",
        "HTTP 500",
        upstream_status=500,
        closes=False,
    ),
    Fault(
        "http-503",
        lambda f: [Step(b"busy")],
        502,
        "upstream_http_503",
        "HTTP 503",
        upstream_status=503,
        closes=False,
    ),
    Fault("ends-before-first-token", lambda f: [], 502, None, "without finishing", closes=False),
    Fault(
        "malformed-mid-stream",
        lambda f: [token(f, "Hel"), token(f, "lo"), malformed(f), Step(hang=True)],
        200,
        "upstream_error",
        "malformed",
        "Hello",
    ),
    Fault(
        "error-object-mid-stream",
        lambda f: [token(f, "Hel"), token(f, "lo"), error_object(f), Step(hang=True)],
        200,
        None,
        "overloaded",
        "Hello",
        type=None,
    ),
    Fault(
        "too-deep-delta-mid-stream",
        lambda f: [token(f, "Hel"), token(f, "lo"), too_deep(f), Step(hang=True)],
        200,
        "upstream_error",
        "nested more than 250 levels deep",
        "Hello",
    ),
    Fault(
        "dropped-mid-stream",
        lambda f: [token(f, "Hel"), token(f, "lo"), Step(drop=True)],
        200,
        "upstream_error",
        "upstream",
        "Hello",
    ),
    Fault(
        "silent-mid-stream",
        lambda f: [token(f, "Hel"), token(f, "lo"), Step(hang=True)],
        200,
        "upstream_error",
        "no next token in time",
        "Hello",
    ),
    Fault(
        "ends-mid-stream",
        lambda f: [token(f, "Hel"), token(f, "lo")],
        200,
        "upstream_error",
        "without finishing",
        "Hello",
        closes=False,
    ),
    # The control: gaps just under the timeout are not a fault.
    Fault(
        "slow-but-steady",
        lambda f: [
            Step(delay=TIMEOUT / 4),
            token(f, "Hel"),
            Step(delay=TIMEOUT / 4),
            token(f, "lo"),
            *finish(f),
        ],
        200,
        None,
        "",
        "Hello",
        closes=False,
        completes=True,
    ),
]


def fault_plan(fault: Fault, fmt: str) -> Callable[[dict[str, Any]], Plan]:
    steps = fault.steps(fmt)
    content_type = CONTENT_TYPE[fmt] if fault.upstream_status == 200 else "application/json"
    return lambda _: Plan(status=fault.upstream_status, steps=steps, content_type=content_type)


def fault_settings(tmp_path: Path, fmt: str, url: str) -> Settings:
    return Settings(
        port=0, db=str(tmp_path / "faults.db"), upstream=fmt, upstream_url=url,
        first_token_timeout=TIMEOUT, token_timeout=TIMEOUT, connect_timeout=2,
    )  # fmt: skip


def plain_client(server: Server) -> httpx.AsyncClient:
    # Plain HTTP to 127.0.0.1: verify=False only skips loading the CA bundle.
    return httpx.AsyncClient(base_url=server.url, timeout=10, verify=False)


async def stream_chat(client: httpx.AsyncClient) -> tuple[httpx.Response, list[str], bytes]:
    """POST a streaming chat; returns the response, its SSE data fields, and
    the raw body."""
    body = {"model": "fake", "messages": MESSAGES, "stream": True}
    async with client.stream("POST", CHAT, json=body) as r:
        raw_body = await r.aread()
    return r, [e.data for e in SSEDecoder().feed(raw_body)], raw_body


def text_of(data: list[str]) -> str:
    chunks = [orjson.loads(d) for d in data if d.startswith('{"id"')]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


async def assert_saved(server: Server, run_id: str, content: str, status: str) -> None:
    """Saved exactly once (or, without content, not at all)."""
    store = server.service.store
    saved = await store.get(PUBLIC_TENANT, run_id)
    if not content:
        assert saved is None
        return
    assert saved is not None
    assert await store.count(run_id) == 1
    assert (saved.content, saved.status) == (content, status)
    assert saved.reason == ("upstream_error" if status == "failed" else "stop")
    assert not server.logs.events("save_duplicate_refused")
    assert not server.logs.events("save_failed")


@pytest.mark.parametrize("fmt", ["openai", "ollama"])
@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
async def test_upstream_fault_is_answered_saved_and_leaves_nothing(
    fault: Fault, fmt: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """An upstream fault before the first token is an HTTP 502/504
    ``upstream_error`` (an HTTP 4xx of the upstream keeps its status, and an
    error the upstream reported its own identity, ``source: upstream``);
    after it, one ``upstream_error`` event (or the upstream's error) ends the stream
    (no [DONE]) and the partial is saved once as failed.  Afterwards no
    upstream request is in flight, an abandoned upstream connection is
    closed, and no task is left."""
    fake = TrackingUpstream(fmt)
    fake.plan = fault_plan(fault, fmt)
    await nursery.start(fake.serve)
    with trio.fail_after(10):
        async with (
            running_server(fault_settings(tmp_path, fmt, fake.url)) as server,
            plain_client(server) as client,
        ):
            assert (await client.get("/healthz")).status_code == 200  # warm one connection
            baseline = await tasks_living()
            response, data, raw_body = await stream_chat(client)
            run_id = response.headers["x-run-id"]

            assert response.status_code == fault.status, raw_body
            if fault.status != 200:
                error = orjson.loads(raw_body)["error"]
            elif fault.completes:
                assert data[-1] == "[DONE]"
            else:
                error = orjson.loads(data[-1])["error"]
            if not fault.completes:
                assert (error["type"], error["code"]) == (fault.type, fault.code)
                assert (error.get("source") == "upstream") is (fault.type is None)
                assert fault.message in error["message"]
                assert "[DONE]" not in data
                assert server.logs.events("stream_cancelled", trace=run_id, reason="upstream_error")
            assert text_of(data) == fault.content

            await fake.wait_for(lambda: fake.in_flight == 0)
            if fault.closes:
                await fake.wait_for(lambda: fake.open_connections == 0)
            assert len(fake.requests) == 1
            saved_status = "complete" if fault.completes else "failed"
            await assert_saved(server, run_id, fault.content, saved_status)
            # A response read to its end may stay in the pool: its fake handler
            # task is then the only task beyond the baseline.
            assert await tasks_living() == baseline + fake.open_connections


@pytest.mark.parametrize(
    ("fault_id", "status"),
    [("http-500", 502), ("dropped-mid-stream", 502), ("silent-mid-stream", 504)],
)
async def test_non_streaming_request_gets_the_fault_as_an_http_error(
    fault_id: str, status: int, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """``stream: false`` turns any upstream fault, before or after the first
    token, into one HTTP error with an ``upstream_error`` body (504 for a
    timeout); the partial is still saved once, and no task is left."""
    fault = next(f for f in FAULTS if f.id == fault_id)
    fake = TrackingUpstream("openai")
    fake.plan = fault_plan(fault, "openai")
    await nursery.start(fake.serve)
    with trio.fail_after(10):
        async with (
            running_server(fault_settings(tmp_path, "openai", fake.url)) as server,
            plain_client(server) as client,
        ):
            assert (await client.get("/healthz")).status_code == 200
            baseline = await tasks_living()
            response = await client.post(CHAT, json={"model": "fake", "messages": MESSAGES})
            assert response.status_code == status
            assert response.json()["error"]["type"] == "upstream_error"
            await fake.wait_for(lambda: fake.in_flight == 0)
            if fault.closes:
                await fake.wait_for(lambda: fake.open_connections == 0)
            await assert_saved(server, response.headers["x-run-id"], fault.content, "failed")
            assert await tasks_living() == baseline + fake.open_connections


async def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    sock = trio.socket.socket()
    with sock:
        await sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("fmt", ["openai", "ollama"])
@pytest.mark.parametrize("stream", [True, False])
async def test_refused_upstream_is_a_502(fmt: str, stream: bool, tmp_path: Path) -> None:
    """An upstream that refuses the connection is an HTTP 502 upstream_error,
    nothing is saved, and no task is left."""
    url = f"http://127.0.0.1:{await closed_port()}" + ("/v1" if fmt == "openai" else "")
    with trio.fail_after(10):
        async with (
            running_server(fault_settings(tmp_path, fmt, url)) as server,
            plain_client(server) as client,
        ):
            assert (await client.get("/healthz")).status_code == 200
            baseline = await tasks_living()
            body = {"model": "fake", "messages": MESSAGES, "stream": stream}
            response = await client.post(CHAT, json=body)
            assert response.status_code == 502
            error = response.json()["error"]
            assert error["type"] == "upstream_error"
            assert "failed" in error["message"]
            await assert_saved(server, response.headers["x-run-id"], "", "failed")
            assert await tasks_living() == baseline


async def test_upstream_that_accepts_but_never_answers_is_a_504(tmp_path: Path) -> None:
    """An upstream that accepts the connection and never sends a response
    head is a 504 after the first-token timeout, and the server closes that
    connection (the listener sees EOF)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    received = bytearray()
    closed = trio.Event()

    async def mute(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                received.extend(data)
        closed.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as upstream_nursery:
            await upstream_nursery.start(trio.serve_listeners, mute, listeners)
            url = f"http://127.0.0.1:{port}/v1"
            async with (
                running_server(fault_settings(tmp_path, "openai", url)) as server,
                plain_client(server) as client,
            ):
                t0 = trio.current_time()
                response = await client.post(CHAT, json={"messages": MESSAGES, "stream": True})
                assert response.status_code == 504
                assert response.json()["error"]["type"] == "upstream_error"
                assert trio.current_time() - t0 >= TIMEOUT
                await closed.wait()
                assert received.startswith(b"POST /v1/chat/completions")
            upstream_nursery.cancel_scope.cancel()
