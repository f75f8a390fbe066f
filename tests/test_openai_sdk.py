"""The official ``openai`` Python SDK parses every event of our streams.

Which client, and why: ``AsyncOpenAI`` does run under trio (its httpx2 runs
on anyio, which supports trio through sniffio) and gets the exact text -- see
the last test.  But when its stream ends (``[DONE]`` or an error event) it
leaves its inner async generators unfinished, and trio reports each one as a
``ResourceWarning`` when it is collected, which ``filterwarnings=error``
turns into failures in whichever test happens to be running.  So the other
tests drive the *sync* ``OpenAI`` client in ``trio.to_thread.run_sync``
against the in-process server: the same SSE parsing code
(``openai._streaming``), no trio involved on the client side.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import trio
import trio.testing

from tests.conftest import Server, loopback_client, running_server
from tools.fakes import FakeUpstream, Plan, Step, openai_chunk
from trio_stream import Settings
from trio_stream.upstream import mocktext

MESSAGES: list[Any] = [{"role": "user", "content": "hello sdk"}]


class _TeeStream(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, sink: bytearray) -> None:
        self._inner = inner
        self._sink = sink

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._sink += chunk
            yield chunk

    def close(self) -> None:
        self._inner.close()


class TeeTransport(httpx2.BaseTransport):
    """Records every response body byte the SDK reads (to see the ``: ping``s)."""

    def __init__(self) -> None:
        self._inner = httpx2.HTTPTransport()
        self.raw = bytearray()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = self._inner.handle_request(request)
        assert isinstance(response.stream, httpx2.SyncByteStream)
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=_TeeStream(response.stream, self.raw),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._inner.close()


def sdk(server: Server, transport: httpx2.BaseTransport | None = None) -> openai.OpenAI:
    http = httpx2.Client(transport=transport or httpx2.HTTPTransport(), verify=False)
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0, http_client=http
    )


async def test_sdk_streams_the_exact_text(settings: Settings) -> None:
    """The SDK's stream yields every chunk; the deltas join to the mock's exact
    text and the last chunk carries finish_reason ``length``."""

    def consume() -> tuple[str, list[str | None]]:
        with sdk(server) as client:
            stream = client.chat.completions.create(
                model="m", messages=MESSAGES, stream=True, max_tokens=25
            )
            with stream:
                chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        return text, [c.choices[0].finish_reason for c in chunks]

    with trio.fail_after(10):
        async with running_server(settings) as server:
            text, finishes = await trio.to_thread.run_sync(consume)
    assert text == mocktext.expected_text(MESSAGES, 25)
    assert finishes[-1] == "length"
    assert set(finishes[:-1]) == {None}


async def test_sdk_gets_the_exact_whole_completion(settings: Settings) -> None:
    """``stream=False`` parses as a ChatCompletion with the exact text."""

    def complete() -> openai.types.chat.ChatCompletion:
        with sdk(server) as client:
            return client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=25)

    with trio.fail_after(10):
        async with running_server(settings) as server:
            completion = await trio.to_thread.run_sync(complete)
    assert completion.choices[0].message.content == mocktext.expected_text(MESSAGES, 25)
    assert completion.choices[0].finish_reason == "length"


async def test_sdk_raises_api_error_on_a_superseded_stream(settings: Settings) -> None:
    """Our error event (a run superseded by a newer request of its session)
    reaches SDK users as an ``openai.APIError`` carrying our error object --
    not a connection error, not a JSON or validation failure -- after the
    chunks that came before it."""
    first_chunk = trio.Event()
    session = {"X-Session-Id": "sdk-session"}

    def consume_until_error() -> tuple[str, BaseException | None]:
        pieces: list[str] = []
        with sdk(server) as client:
            stream = client.chat.completions.create(
                model="m", messages=MESSAGES, stream=True, max_tokens=500, extra_headers=session
            )
            try:
                with stream:
                    for chunk in stream:
                        pieces.append(chunk.choices[0].delta.content or "")
                        if len(pieces) == 1:
                            trio.from_thread.run_sync(first_chunk.set)
            except openai.APIError as exc:
                return "".join(pieces), exc
        return "".join(pieces), None

    outcome: list[tuple[str, BaseException | None]] = []

    async def consumer() -> None:
        outcome.append(await trio.to_thread.run_sync(consume_until_error))

    with trio.fail_after(15):
        async with (
            running_server(settings.replace(mock_delay_ms=20)) as server,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(consumer)
            await first_chunk.wait()
            async with loopback_client(server) as http:
                body = {"model": "m", "messages": MESSAGES, "max_tokens": 3}
                r = await http.post("/v1/chat/completions", json=body, headers=session)
            assert r.status_code == 200

    [(text, error)] = outcome
    assert type(error) is openai.APIError
    assert error.body == {
        "message": "A newer request of this session superseded this run.",
        "type": "stream_cancelled",
        "param": None,
        "code": "superseded",
    }
    assert (error.type, error.code) == ("stream_cancelled", "superseded")
    assert text
    assert mocktext.expected_text(MESSAGES, 500).startswith(text)


async def stream_with_pings(
    settings: Settings, fake: FakeUpstream, first: str, second: str, *, silence_first: bool
) -> tuple[str, bytes]:
    """Stream ``first`` + ``second`` through the SDK with 0.3 s of upstream
    silence (before ``first``, or between the two) and a 0.05 s ping interval;
    returns the SDK's text and the raw bytes it received."""
    gap_before, gap_between = (0.3, 0.0) if silence_first else (0.0, 0.3)
    fake.plan = lambda _: Plan(
        steps=[
            Step(openai_chunk(first), delay=gap_before),
            Step(openai_chunk(second), delay=gap_between),
            Step(openai_chunk(finish="stop")),
            Step(b"data: [DONE]\n\n"),
        ]
    )
    s = settings.replace(upstream="openai", upstream_url=fake.url, ping_interval=0.05)
    tee = TeeTransport()

    def consume() -> str:
        with sdk(server, tee) as client:
            stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            with stream:
                return "".join(c.choices[0].delta.content or "" for c in stream)

    with trio.fail_after(10):
        async with running_server(s) as server:
            text = await trio.to_thread.run_sync(consume)
    return text, bytes(tee.raw)


async def test_sdk_ignores_ping_comments(settings: Settings, fake_openai: FakeUpstream) -> None:
    """While the upstream is silent the server sends ``: ping`` comments; the
    SDK skips them and still yields exactly the text."""
    text, raw = await stream_with_pings(settings, fake_openai, "slow", " reply", silence_first=True)
    assert text == "slow reply"
    assert raw.startswith(b": ping\n")  # the silence was filled with pings


async def test_sdk_survives_pings_between_numbered_events(
    settings: Settings, fake_openai: FakeUpstream
) -> None:
    """Pings that come *after* an ``id:``'d event are skipped too.  The SDK's
    decoder dispatches an event on every blank line once it has seen an id, so
    a ping must be a bare comment line: this failed when pings were
    ``: ping`` plus a blank line."""
    text, raw = await stream_with_pings(
        settings, fake_openai, "first", " second", silence_first=False
    )
    assert text == "first second"
    first, _, rest = raw.partition(b"\n\n")
    assert first.startswith(b"id: 1\n")
    assert rest.startswith(b": ping\n")  # the silence after event 1 was filled


async def test_async_client_runs_under_trio_but_leaves_generators_to_trio(
    settings: Settings,
) -> None:
    """``AsyncOpenAI`` streams the exact text under trio; its stream then
    leaves ``openai._streaming`` generators unfinished (trio's ResourceWarning).
    If a future SDK stops doing that, this test fails: the other tests could
    then use the async client directly."""
    async with running_server(settings) as server:
        http = httpx2.AsyncClient(verify=False)
        client = openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="unused", max_retries=0, http_client=http
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            async with client:
                stream = await client.chat.completions.create(
                    model="m", messages=MESSAGES, stream=True, max_tokens=25
                )
                text = "".join([c.choices[0].delta.content or "" async for c in stream])
            gc.collect()
            await trio.testing.wait_all_tasks_blocked()  # trio's finalizer tasks ran
    assert text == mocktext.expected_text(MESSAGES, 25)
    abandoned = {str(w.message).split("'")[1] for w in caught if w.category is ResourceWarning}
    assert "openai._streaming.AsyncStream._iter_events" in abandoned
