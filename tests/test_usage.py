"""Token usage (docs/api.md section 2.10): ``stream_options.include_usage``
through the official SDK, the upstream's figures passed through, the counted
fallback, and the pure rules of :mod:`trio_stream.wire.usage`."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio

from tests.conftest import loopback_client, running_server
from tests.test_openai_sdk import sdk
from tools.fakes import FakeUpstream, Plan, Step, ollama_line, openai_chunk
from trio_stream import Settings
from trio_stream.core.log import Chunk
from trio_stream.http.service import PUBLIC_TENANT
from trio_stream.upstream import Finish
from trio_stream.upstream.wire import ollama_items, openai_items
from trio_stream.wire.usage import Usage, estimate_prompt, settle

MESSAGES: list[Any] = [{"role": "user", "content": "count my tokens"}]  # 15 chars: 4 tokens
UPSTREAM_USAGE = {
    "prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
    "prompt_tokens_details": {"cached_tokens": 2},
}  # fmt: skip


def usage_chunk(usage: dict[str, Any]) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "fake",
             "choices": [], "usage": usage}  # fmt: skip
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def openai_plan(*, with_usage: bool) -> Plan:
    steps = [Step(openai_chunk(t)) for t in ("one", " two", " three")]
    steps.append(Step(openai_chunk(finish="stop")))
    if with_usage:
        steps.append(Step(usage_chunk(UPSTREAM_USAGE)))
    steps.append(Step(b"data: [DONE]\n\n"))
    return Plan(steps=steps)


def stream_with_usage(server: Any) -> list[Any]:
    with sdk(server) as client:
        stream = client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        with stream:
            return list(stream)


@pytest.mark.parametrize("with_usage", [True, False], ids=["upstream-figures", "counted"])
async def test_include_usage_with_the_chat_sdk(
    settings: Settings, fake_openai: FakeUpstream, with_usage: bool
) -> None:
    """With ``include_usage`` the SDK's last chunk has ``usage`` and no
    choices, after the finish chunk.  An upstream that reports usage (asked
    for with ``stream_options``) has its figures passed through, details and
    all; one that reports none gets counted figures: 3 deltas, 15 prompt
    characters / 4 rounded up.  Non-streamed answers and the saved message
    carry the same usage."""
    fake_openai.plan = lambda _: openai_plan(with_usage=with_usage)
    s = settings.replace(upstream="openai", upstream_url=fake_openai.url)
    with trio.fail_after(20):
        async with running_server(s) as server:
            chunks = await trio.to_thread.run_sync(stream_with_usage, server)
            async with loopback_client(server) as http:
                r = await http.post("/v1/chat/completions", json={"messages": MESSAGES})
            saved = await server.service.store.get(PUBLIC_TENANT, r.headers["x-run-id"])
    expected = UPSTREAM_USAGE if with_usage else {
        "prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7,
    }  # fmt: skip
    *content, finish, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in content) == "one two three"
    assert finish.choices[0].finish_reason == "stop"
    assert finish.usage is None
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.model_dump(exclude_none=True) == expected
    assert r.json()["usage"] == expected
    assert saved is not None
    assert saved.usage is not None
    source = "upstream" if with_usage else "counted"
    assert saved.usage == {**expected, "source": source, "model": "mock"}
    for request in fake_openai.requests:
        assert request["stream_options"] == {"include_usage": True}


async def test_without_include_usage_there_is_no_usage_chunk(settings: Settings) -> None:
    """Without ``stream_options`` the stream is as before: finish chunk, then
    ``[DONE]``, no usage chunk."""

    def consume() -> list[Any]:
        with sdk(server) as client:
            stream = client.chat.completions.create(
                model="m", messages=MESSAGES, stream=True, max_tokens=3
            )
            with stream:
                return list(stream)

    async with running_server(settings) as server:
        chunks = await trio.to_thread.run_sync(consume)
    assert all(c.usage is None and c.choices for c in chunks)


async def test_ollama_counts_are_passed_through(
    settings: Settings, fake_ollama: FakeUpstream
) -> None:
    """Ollama's ``prompt_eval_count`` and ``eval_count`` (on its last line)
    are the usage of a chat completion and of a response."""
    done = orjson.loads(ollama_line(done=True))
    done.update(prompt_eval_count=9, eval_count=2)
    fake_ollama.plan = lambda _: Plan(
        steps=[Step(ollama_line("hi")), Step(ollama_line(" there")),
               Step(orjson.dumps(done) + b"\n")],
        content_type="application/x-ndjson",
    )  # fmt: skip
    s = settings.replace(upstream="ollama", upstream_url=fake_ollama.url)
    async with running_server(s) as server, loopback_client(server) as http:
        chat = (await http.post("/v1/chat/completions", json={"messages": MESSAGES})).json()
        response = (await http.post("/v1/responses", json={"input": "x"})).json()
    assert chat["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert response["usage"]["input_tokens"] == 9
    assert response["usage"]["output_tokens"] == 2
    assert response["output"][0]["content"][0]["text"] == "hi there"


# -- the pure rules -----------------------------------------------------------


def test_wire_maps_usage_to_an_item() -> None:
    """An OpenAI usage chunk (alone, or on the finish chunk) and Ollama's
    counts become a ``Usage`` item after the chunk that carries it (relayed as
    sent) and before the ``Finish``; a malformed usage counts nothing, never
    an error (usage is advisory)."""
    alone = usage_chunk(UPSTREAM_USAGE).removeprefix(b"data: ").decode()
    (chunk, usage) = openai_items(alone)
    assert isinstance(chunk, Chunk)
    assert chunk.body["usage"] == UPSTREAM_USAGE
    assert usage == Usage(11, 3, 14, extra={"prompt_tokens_details": {"cached_tokens": 2}})
    both = orjson.loads(openai_chunk("x", finish="stop").removeprefix(b"data: "))
    both["usage"] = {"prompt_tokens": 1, "completion_tokens": 1}
    items = openai_items(orjson.dumps(both).decode())
    assert items[1:] == [Usage(1, 1, 2), Finish("stop")]
    for bad in ({"prompt_tokens": "1", "completion_tokens": 1}, {"total_tokens": 3}, 5, None):
        assert openai_items(orjson.dumps({"choices": [], "usage": bad}).decode()) == []
    line = orjson.dumps({"message": {"content": ""}, "done": True, "eval_count": 4})
    assert ollama_items(line)[1:] == [Usage(0, 4, 4), Finish("stop")]


def test_counting_rules() -> None:
    """Counted usage: prompt = text characters / 4 rounded up (string
    contents and text parts; images count nothing), completion = deltas.  A
    completed run with the upstream's figures keeps them; a run that ended
    early is always counted over what it received."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "abcde"},
        {"role": "user", "content": [{"type": "text", "text": "abc"},
                                     {"type": "image_url", "image_url": {"url": "u"}}]},
    ]  # fmt: skip
    assert estimate_prompt(messages) == 2  # 8 characters
    assert estimate_prompt([]) == 0
    reported = Usage(100, 50, 150)
    assert settle(reported, messages, 7, complete=True) is reported
    assert settle(reported, messages, 7, complete=False) == Usage(2, 7, 9, "counted")
    assert settle(None, messages, 7, complete=True) == Usage(2, 7, 9, "counted")
    assert Usage.from_record(Usage(1, 2, 3, "counted").record()) == Usage(1, 2, 3, "counted")
    assert Usage.from_record(None) is None
    assert reported.responses() == {
        "input_tokens": 100, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 50, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 150,
    }  # fmt: skip


async def test_an_existing_sqlite_file_gains_the_usage_column(tmp_path: Any) -> None:
    """A database file written before usage was kept is migrated on open
    (``ALTER TABLE ... ADD COLUMN usage``): its rows read back with usage
    ``None``, and new saves keep theirs."""
    import sqlite3

    from trio_stream.store import Message, SQLiteStore

    path = str(tmp_path / "old.db")
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE messages (run_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, session_id TEXT,"
        " content TEXT NOT NULL, tool_calls TEXT, status TEXT NOT NULL, reason TEXT,"
        " events INTEGER NOT NULL, detached INTEGER NOT NULL, created REAL NOT NULL)"
    )
    old.execute("INSERT INTO messages VALUES ('run_old', 't', NULL, 'x', NULL, 'complete',"
                " 'stop', 1, 0, 1.0)")  # fmt: skip
    old.commit()
    old.close()
    store = SQLiteStore(path, threaded=False)
    try:
        before = await store.get("t", "run_old")
        usage = Usage(1, 2, 3, "counted").record()
        await store.save(Message("run_new", "t", None, "y", None, "complete", "stop", 2, False,
                                 2.0, usage))  # fmt: skip
        after = await store.get("t", "run_new")
    finally:
        store.close()
    assert before is not None
    assert (before.content, before.usage) == ("x", None)
    assert after is not None
    assert after.usage == usage
