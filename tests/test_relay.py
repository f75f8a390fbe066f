"""Issue 20: a faithful relay -- what the client receives is what the upstream sent.

Every transcript in ``tests/transcripts/`` is replayed by a real HTTP fake
upstream (:mod:`tests.transcript_upstream`) behind a real trio-stream, and
what reaches the client is compared field by field with what the upstream
sent (:mod:`tests.relay_expect`), allowing exactly the rewrites that
docs/api.md lists under "What trio-stream rewrites":

* streamed (``stream: true``), with trio-stream's default coalescing;
* ``stream: false`` (the aggregate in OpenAI's non-streamed shape);
* through the official ``openai`` SDK, streamed and not;
* a detached run, replayed whole and resumed after entry 1 and mid-way;
* a follower on another node in cluster mode (two processes, one Redis).

The matrix is kept fast: one in-process server per transcript serves every
local route in turn; the cluster test starts its two nodes once and replays
every OpenAI-style transcript through them in sequence.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import trio

from tests import relay_expect as rx
from tests.conftest import Server, running_server, serve_process
from tests.redis_server import RedisServer
from tests.transcript_format import Transcript, all_transcripts, read_sse
from tests.transcript_upstream import forwarded, replaying
from trio_stream import Settings

DOCS = Path(__file__).resolve().parent.parent / "docs" / "api.md"
TRANSCRIPTS = all_transcripts()
#: Transcripts that stream a 2xx answer (HTTP errors are issue 20 item 5's).
STREAMED = [t for t in TRANSCRIPTS if t.status < 400]
COMPLETE = [t for t in STREAMED if rx.midstream_error(t) is None]
OPENAI_STYLE = [t for t in COMPLETE if t.path == "/v1/chat/completions"]


def ids(ts: list[Transcript]) -> list[str]:
    return [t.name for t in ts]


def documented_rewrites() -> frozenset[str]:
    """The chunk keys docs/api.md says trio-stream rewrites (its marker line)."""
    found = re.search(r"<!-- rewrites: ([a-z_, ]+) -->", DOCS.read_text())
    assert found, "docs/api.md lost its rewrite list marker"
    return frozenset(k.strip() for k in found.group(1).split(","))


REWRITES = documented_rewrites()


def events(body: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """(chunks, error frames, saw [DONE]) of an SSE body."""
    chunks: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    done = False
    for ev in read_sse(body).events:
        if ev.data == "[DONE]":
            done = True
            continue
        obj = orjson.loads(ev.data)
        (errors if "error" in obj else chunks).append(obj)
    return chunks, errors, done


def faithful(expected: list[dict[str, Any]], got: list[dict[str, Any]]) -> list[str]:
    return rx.chunk_differences(expected, got, REWRITES, coalescing=True)


def answer_differences(t: Transcript, got: dict[str, Any]) -> list[str]:
    """``stream: false`` against the aggregate; usage only when the upstream
    sent one (else trio-stream's counted usage stands in, docs/api.md 2.10)."""
    want = rx.aggregate(t)
    if want["usage"] is None:
        want = {k: v for k, v in want.items() if k != "usage"}
        got = {k: v for k, v in got.items() if k != "usage"}
    return rx.chunk_differences([want], [got], REWRITES)


@asynccontextmanager
async def relay(t: Transcript) -> AsyncIterator[Server]:
    """An in-process trio-stream whose upstream replays ``t`` for every request."""
    async with trio.open_nursery() as nursery:
        fake = replaying(t)
        await nursery.start(fake.serve)
        with tempfile.TemporaryDirectory() as d:
            settings = Settings(port=0, db=f"{d}/relay.db").replace(
                upstream=fake.fmt, upstream_url=fake.url
            )
            async with running_server(settings) as server:
                yield server
        nursery.cancel_scope.cancel()


def request(t: Transcript, **changes: Any) -> dict[str, Any]:
    return {**t.request, **changes}


def sdk(url: str, t: Transcript) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The official SDK (sync client in a thread, see tests/test_openai_sdk.py):
    the streamed chunks and the non-streamed answer, as dicts of what was set."""
    extra = {k: v for k, v in t.request.items() if k not in ("model", "messages", "stream")}
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=10) as client:
        stream = client.chat.completions.create(
            model=t.request["model"], messages=t.request["messages"], stream=True,
            extra_body=extra,
        )  # fmt: skip
        chunks = [chunk.to_dict() for chunk in stream]
        whole = client.chat.completions.create(
            model=t.request["model"], messages=t.request["messages"], stream=False,
            extra_body={k: v for k, v in extra.items() if k != "stream_options"},
        )  # fmt: skip
    return chunks, whole.to_dict()


@pytest.mark.parametrize("t", STREAMED, ids=ids(STREAMED))
async def test_every_route_relays_what_the_upstream_sent(t: Transcript) -> None:
    """For one transcript, every local route delivers the upstream's chunks
    field by field except the documented rewrites: the live stream (role
    chunk, every delta/choice/chunk field, one chunk per event unless merged
    exactly), ``stream: false`` (reasoning, refusal, logprobs, usage, extras
    aggregated), the official SDK both ways, and a detached run replayed from
    its start, after entry 1 and from mid-way (Last-Event-ID)."""
    expected = rx.expected_chunks(t)
    error = rx.midstream_error(t)
    async with relay(t) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        r = await c.post("/v1/chat/completions", json=request(t))
        assert r.status_code == 200
        chunks, errors, done = events(r.content)
        assert faithful(expected, chunks) == []
        if error is not None:
            assert len(errors) == 1
            assert not done
            return  # the error frame's identity is issue 20 item 5's
        assert errors == []
        assert done

        r = await c.post("/v1/chat/completions", json=request(t, stream=False))
        assert r.status_code == 200
        assert answer_differences(t, r.json()) == []

        if t.path == "/v1/chat/completions":
            streamed, whole = await trio.to_thread.run_sync(sdk, server.url + "/v1", t)
            assert faithful(expected, streamed) == []
            assert answer_differences(t, whole) == []

        r = await c.post("/v1/chat/completions", json=request(t, detach=True))
        run_id = r.headers["x-run-id"]
        for k in sorted({0, 1, len(expected) // 2}):
            r = await c.get(f"/v1/runs/{run_id}/events", headers={"Last-Event-ID": str(k)})
            assert r.status_code == 200
            chunks, errors, done = events(r.content)
            assert faithful(expected[k:], chunks) == [], f"resumed after {k}"
            assert done


def test_rewrite_list_is_what_the_yardstick_allows() -> None:
    """docs/api.md's rewrite list is exactly the set of chunk keys the
    comparisons above ignore (relay_expect.REWRITES): a rewrite added to the
    code without the docs, or to the docs without the yardstick, fails here."""
    assert REWRITES == rx.REWRITES


@pytest.mark.parametrize("key", sorted(REWRITES))
async def test_each_documented_rewrite_happens(key: str) -> None:
    """Each documented rewrite is one the code makes (the list holds nothing
    trio-stream does not rewrite): without that key in the allowed set, the
    streamed chunks differ from the upstream's, and only in that key (the
    request names the model by an alias, as a client of a gateway may: the
    transcripts' upstreams answer with the name they were asked for)."""
    t = next(t for t in OPENAI_STYLE if t.name == "openai_content_usage")
    async with relay(t) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        r = await c.post("/v1/chat/completions", json=request(t, model="an-alias"))
    chunks, _, _ = events(r.content)
    diffs = rx.chunk_differences(rx.expected_chunks(t), chunks, REWRITES - {key}, coalescing=True)
    assert diffs
    assert all(re.match(rf"chunk\[\d+\]\.{key}: ", d) for d in diffs), diffs


# -- a follower on another node ---------------------------------------------------


OLLAMA = [t for t in COMPLETE if t.body_format == "ndjson"]


@pytest.mark.parametrize("api", ["openai", "ollama"])
async def test_followers_on_another_node_relay_what_the_upstream_sent(
    api: str, own_redis: RedisServer, tmp_path: Path
) -> None:
    """Cluster mode: a detached run started on node 1 and followed from node 2
    (which reads the Redis log) delivers, for every transcript of the API,
    the upstream's chunks field by field except the documented rewrites,
    from the start and resumed after entry 1 -- the Redis log carries every
    field, the shape of text entries and the chunks after the finish."""
    transcripts = OPENAI_STYLE if api == "openai" else OLLAMA
    async with trio.open_nursery() as nursery:
        fake = replaying(*transcripts)
        await nursery.start(fake.serve)
        args = ("--port", "0", "--redis", own_redis.url, "--db", str(tmp_path / "c.db"),
                "--upstream", fake.fmt, "--upstream-url", fake.url)  # fmt: skip
        async with serve_process(*args) as one, serve_process(*args) as two:
            for t in transcripts:
                expected = rx.expected_chunks(t)
                async with httpx.AsyncClient(timeout=15) as c:
                    r = await c.post(
                        f"http://127.0.0.1:{one.port}/v1/chat/completions",
                        json=request(t, detach=True),
                    )
                    assert r.status_code == 200, t.name
                    run_id = r.headers["x-run-id"]
                    for k in (0, 1):
                        r = await c.get(
                            f"http://127.0.0.1:{two.port}/v1/runs/{run_id}/events",
                            headers={"Last-Event-ID": str(k)},
                        )
                        chunks, errors, done = events(r.content)
                        diffs = faithful(expected[k:], chunks)
                        assert diffs == [], (t.name, k, diffs)
                        assert errors == []
                        assert done
        nursery.cancel_scope.cancel()


# -- the saved message ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("openai_refusal", {"refusal"}),
        ("vllm_reasoning_content", {"reasoning_content"}),
        ("openrouter_reasoning", {"reasoning_content"}),
        ("vllm_logprobs", {"logprobs"}),
        ("ollama_thinking", {"reasoning_content"}),
    ],
)
async def test_the_saved_message_keeps_what_the_answer_carried(name: str, fields: set[str]) -> None:
    """Issue 20 item 3: ``GET /v1/sessions/{id}/messages`` returns what the
    stream carried besides the text -- the reasoning (under
    ``reasoning_content``, whichever field the upstream used), the refusal
    (saved as a refusal: ``refusal`` set, not an empty complete answer),
    whether logprobs came -- with the finish reason and the upstream's usage."""
    t = next(t for t in COMPLETE if t.name == name)
    answer = rx.aggregate(t)
    message = answer["choices"][0]["message"]
    headers = {"X-Session-Id": "s1"}
    async with relay(t) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        r = await c.post("/v1/chat/completions", json=request(t), headers=headers)
        assert r.status_code == 200
        saved: list[dict[str, Any]] = []
        with trio.fail_after(5):
            while not saved:  # the save lands in the run's cleanup, just after the stream
                r = await c.get("/v1/sessions/s1/messages")
                saved = r.json()["data"] if r.status_code == 200 else []
                if not saved:
                    await trio.sleep(0.01)
    (row,) = saved
    assert row["status"] == "complete"
    assert row["reason"] == answer["choices"][0]["finish_reason"]
    assert row["content"] == (message["content"] or "")
    extra = {"reasoning_content", "refusal", "logprobs"} & row.keys()
    assert extra == fields
    if "refusal" in fields:
        assert row["refusal"] == message["refusal"]
    if "reasoning_content" in fields:
        assert row["reasoning_content"] == message.get(
            "reasoning_content", message.get("reasoning")
        )
    if "logprobs" in fields:
        assert row["logprobs"] is True
    if answer["usage"] is not None:
        usage = {k: v for k, v in row["usage"].items() if k not in ("source", "model")}
        assert usage == answer["usage"]


# -- Ollama's request -------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "options", "top"),
    [
        ({"response_format": {"type": "json_object"}, "stop": "x"}, {"stop": ["x"]},
         {"format": "json"}),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "n",
          "schema": {"type": "object"}}}, "stop": ["a", "b"], "max_tokens": 5},
         {"stop": ["a", "b"], "num_predict": 5}, {"format": {"type": "object"}}),
        ({"response_format": {"type": "text"}, "think": True}, None, {"think": True}),
    ],
    ids=["json-object-and-stop-string", "json-schema-and-stop-list", "text-and-think"],
)  # fmt: skip
async def test_ollama_gets_format_stop_and_think(
    sent: dict[str, Any], options: dict[str, Any] | None, top: dict[str, Any]
) -> None:
    """Issue 20 item 7: an Ollama upstream is sent ``response_format`` as its
    ``format`` (json_object -> "json", json_schema -> the schema, text ->
    nothing), ``stop`` as ``options.stop`` (a string as a one-item list), and
    its own ``think`` as given (they were dropped)."""
    t = next(t for t in COMPLETE if t.name == "ollama_thinking")
    async with trio.open_nursery() as nursery:
        fake = replaying(t)
        await nursery.start(fake.serve)
        with tempfile.TemporaryDirectory() as d:
            settings = Settings(port=0, db=f"{d}/relay.db").replace(
                upstream=fake.fmt, upstream_url=fake.url
            )
            async with (
                running_server(settings) as server,
                httpx.AsyncClient(base_url=server.url, timeout=10) as c,
            ):
                r = await c.post("/v1/chat/completions", json=request(t, stream=False, **sent))
                assert r.status_code == 200
        nursery.cancel_scope.cancel()
    (body,) = forwarded(fake)
    assert body.get("options") == options
    assert {k: body[k] for k in top} == top
    assert "format" in top or "format" not in body
