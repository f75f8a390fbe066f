"""HTTP/1.x framing at the edge: ambiguous bodies, pipelining after a close, the head cap.

* A request with both ``Content-Length`` and ``Transfer-Encoding`` is
  answered 400 ``ambiguous_framing`` with ``Connection: close``, and nothing
  sent after it on that connection is ever answered (RFC 9112 section 6.1: a
  proxy in front may have framed the body the other way, so what follows may
  be a request smuggled past it).
* Bytes sent after the last request of a connection (HTTP/1.0,
  ``Connection: close`` on either side) are never answered, and never cut
  the response that is on its way (``hypercorn_fixes`` fix 3).
* A request head over 16 KiB (hypercorn's ``h11_max_incomplete_size``) is
  refused with 431, however it arrives (fix 3); one of exactly 16 KiB is
  served.
* A request h11 refuses is answered with the OpenAI error body (fix 4).
* An answer that starts before the request's body has arrived says
  ``Connection: close``, as its connection is closed after it (fix 3).

Every test speaks raw bytes to a real in-process server on 127.0.0.1 and
reads the answer with h11, so a second response, or any byte after the
first one's end, fails the test.
"""

from __future__ import annotations

from typing import Any

import h11
import orjson
import pytest
import trio
import trio.testing

from tests.conftest import Server, running_server, tasks_living
from trio_stream import Settings
from trio_stream.server.serve import hypercorn_config

CHAT = "/v1/chat/completions"
#: The bound on one exchange (request sent -> EOF); the real figure is milliseconds.
BOUND = 10.0
#: The documented head cap (server.hypercorn_config, docs/api.md section 3.10).
HEAD_CAP = 16 * 1024
#: A request pipelined behind the one under test: it must never be answered.
SMUGGLED = b"GET /v1/models HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"


class Answer:
    """Everything the server sent on one connection, parsed by h11 as a client:
    exactly one response, its body, and then the EOF."""

    def __init__(self, response: h11.Response, body: bytes) -> None:
        self.status = response.status_code
        self.headers = {k.decode(): v.decode() for k, v in response.headers}
        self.body = body

    def error(self) -> dict[str, Any]:
        """The OpenAI error body's ``error`` object."""
        error = orjson.loads(self.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        return dict(error)


async def exchange(
    port: int, pieces: list[bytes], method: str = "GET", version: bytes = b"1.1"
) -> Answer:
    """Send ``pieces`` on a new connection, each once the server has handled
    the one before; read the one response and the EOF after it.  A byte after
    the response (a second response) or no EOF within :data:`BOUND` fails.

    The client side of h11 needs the request it is answering: a mirror with
    the same method (which decides how a response body is framed)."""
    with trio.fail_after(BOUND):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for piece in pieces:
                await stream.send_all(piece)
                await trio.testing.wait_all_tasks_blocked()  # loopback: read and handled
            client = h11.Connection(h11.CLIENT)
            mirror = [("host", "x"), ("connection", "close")]
            client.send(h11.Request(method=method, target="/", headers=mirror))
            client.send(h11.EndOfMessage())
            response, body = None, bytearray()
            while True:
                event = client.next_event()  # raises on a byte after the response
                if event is h11.NEED_DATA:
                    client.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.ConnectionClosed):
                    break
                else:
                    assert isinstance(event, h11.EndOfMessage), event
    assert response is not None, "no response"
    return Answer(response, bytes(body))


def chunked(data: bytes) -> bytes:
    """``data`` as one chunk and the terminator."""
    return b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data)


# -- Content-Length with Transfer-Encoding -------------------------------------------


#: Each route kind, as (method, target, body): a Quart JSON route, and the raw
#: endpoint both streaming and not.
ROUTES = {
    "healthz": ("GET", "/healthz", b""),
    "stream": ("POST", CHAT, orjson.dumps({"messages": [{"role": "user", "content": "x"}],
                                           "stream": True, "max_tokens": 3})),
    "json": ("POST", CHAT, orjson.dumps({"messages": [{"role": "user", "content": "x"}],
                                         "stream": False, "max_tokens": 3})),
}  # fmt: skip


def both_framings(method: str, target: str, body: bytes, version: bytes) -> bytes:
    """A request with both headers, its body chunked (as h11 reads it), and
    :data:`SMUGGLED` after it.  Its ``Content-Length`` spans the chunked body
    *and* the smuggled request: a front end that frames by ``Content-Length``
    forwards the smuggled request as body, unseen."""
    framed = chunked(body)
    head = (
        b"%b %b HTTP/%b\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\ntransfer-encoding: chunked\r\n\r\n"
    ) % (method.encode(), target.encode(), version, len(framed) + len(SMUGGLED))
    return head + framed + SMUGGLED


@pytest.mark.parametrize("version", [b"1.1", b"1.0"], ids=["http/1.1", "http/1.0"])
@pytest.mark.parametrize("route", list(ROUTES))
async def test_content_length_with_chunked_is_refused_and_what_follows_never_answered(
    route: str, version: bytes, settings: Settings
) -> None:
    """RFC 9112 section 6.1: a request with both ``Content-Length`` and
    ``Transfer-Encoding: chunked`` -- on a JSON route or the streaming
    endpoint -- is answered 400 ``ambiguous_framing`` with the OpenAI body and
    ``Connection: close``, the connection is closed right after, the request
    pipelined behind it is never answered, and no run starts.  Five rounds
    each: the answer must not race with the bytes behind the request (it
    used to be cut at random once the first half of the fix was in).  No
    task is left behind."""
    method, target, body = ROUTES[route]
    async with running_server(settings) as server:
        baseline = await tasks_living()
        for _ in range(5):
            raw = both_framings(method, target, body, version)
            answer = await exchange(server.port, [raw], method)
            assert answer.status == 400, answer.body
            assert answer.headers["connection"].lower() == "close"
            error = answer.error()
            assert (error["type"], error["code"]) == ("invalid_request_error", "ambiguous_framing")
        assert await tasks_living() == baseline
        assert not server.logs.events("stream_start")
        assert server.service.runs.live == 0


async def test_pipelined_request_after_a_connection_close_request_is_never_answered(
    settings: Settings,
) -> None:
    """A request with ``Connection: close`` and another pipelined behind it in
    the same write: the first is answered (200) and the connection closed;
    the second is never answered.  hypercorn answered 400 *instead of* the
    first, every time (h11 raised on the bytes behind a closing request)."""
    async with running_server(settings) as server:
        baseline = await tasks_living()
        first = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
        for _ in range(5):
            answer = await exchange(server.port, [first + SMUGGLED])
            assert (answer.status, answer.body) == (200, b'{"status":"ok"}')
        assert await tasks_living() == baseline


# -- the request head's cap -----------------------------------------------------------


def head_of(size: int) -> bytes:
    """A complete ``GET /healthz`` head of exactly ``size`` bytes (padded with
    one header)."""
    start, end = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-pad: ", b"\r\n\r\n"
    head = start + b"a" * (size - len(start) - len(end)) + end
    assert len(head) == size
    return head


def test_the_documented_head_cap_is_configured() -> None:
    """The cap these tests hold the server to is the one it is given."""
    assert hypercorn_config(Settings()).h11_max_incomplete_size == HEAD_CAP


async def expect_431(server: Server, pieces: list[bytes]) -> None:
    answer = await exchange(server.port, pieces)
    assert answer.status == 431, answer.body
    assert answer.headers["connection"] == "close"
    error = answer.error()
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_header_too_large")
    assert str(HEAD_CAP) in error["message"]


async def test_head_over_the_cap_is_refused_however_it_arrives(settings: Settings) -> None:
    """A head of exactly 16 KiB is served, whole or in two writes; one byte
    more is refused with 431 (OpenAI body, ``Connection: close``) when it
    arrives whole -- hypercorn served it, as it did a 60 KB header value:
    h11 checks its cap only on a head still incomplete, and hypercorn reads
    64 KiB at a time -- and when it arrives in pieces and never ends
    (h11's own check; hypercorn answered it with an empty body)."""
    async with running_server(settings) as server:
        at_cap = head_of(HEAD_CAP)
        for pieces in ([at_cap], [at_cap[:8000], at_cap[8000:]]):
            answer = await exchange(server.port, pieces)
            assert (answer.status, answer.body) == (200, b'{"status":"ok"}')
        await expect_431(server, [head_of(HEAD_CAP + 1)])
        await expect_431(server, [head_of(60_000)])
        await expect_431(server, [head_of(HEAD_CAP + 100)[: HEAD_CAP + 1]])  # never ends
        assert not server.logs.events("stream_start")


# -- what h11 refuses gets the OpenAI error body ----------------------------------------


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GET /healthz HTTP/1.1\r\nhost 127.0.0.1\r\n\r\n", 400, "invalid_http"),
        (b"GET /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
         400, "invalid_http"),
        (b"POST /healthz HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n",
         501, "unsupported_transfer_encoding"),
    ],
    ids=["no-colon", "two-lengths", "gzip"],
)  # fmt: skip
async def test_request_h11_refuses_gets_the_openai_error_body(
    raw: bytes, status: int, code: str, settings: Settings
) -> None:
    """docs/api.md section 2.2: every error answer is the OpenAI error body,
    also a request refused before it reaches the app (h11: malformed, or an
    unsupported ``Transfer-Encoding``); the connection is closed after it."""
    async with running_server(settings) as server:
        answer = await exchange(server.port, [raw + SMUGGLED])
    assert answer.status == status
    assert answer.headers["connection"] == "close"
    assert answer.headers["content-type"] == "application/json"
    error = answer.error()
    assert (error["type"], error["code"]) == ("invalid_request_error", code)


# -- an answer that starts before the request's body has arrived ----------------------


#: Handlers that answer before they read the body: (settings' keys, method, target, status).
EARLY = {
    "no-key": (("sk-early-8f14e45fceea",), "POST", CHAT, 401),
    "wrong-method": ((), "PUT", CHAT, 405),
    "unknown-path": ((), "POST", "/v1/nowhere", 404),
}


@pytest.mark.parametrize("case", list(EARLY))
async def test_an_answer_before_the_body_has_arrived_says_connection_close(
    case: str, settings: Settings
) -> None:
    """A request whose head has arrived and whose body has not, answered at
    once (401 for a missing key, 405, 404: no handler reads the body first):
    hypercorn closes its connection after the answer (what is still to come
    of the body cannot be read as the next request), and the answer says
    ``Connection: close`` (``hypercorn_fixes`` fix 3).  It used not to say
    so: an httpx client, which writes a head and its body separately, sent
    its next request on the closing connection now and then under load and
    got "Server disconnected without sending a response"
    (tests/test_keys.py's CLI test)."""
    keys, method, target, status = EARLY[case]
    body = orjson.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3})
    head = (
        b"%b %b HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n"
    ) % (method.encode(), target.encode(), len(body))
    async with running_server(settings.replace(api_keys=keys)) as server:
        baseline = await tasks_living()
        answer = await exchange(server.port, [head], method)  # the body never comes
        assert await tasks_living() == baseline
    assert answer.status == status, answer.body
    assert answer.headers["connection"] == "close"
    answer.error()  # the OpenAI error body
    assert not server.logs.events("stream_start")
