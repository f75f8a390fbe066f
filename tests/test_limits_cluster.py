"""Per-key limits on the real server, on real sockets, with a real Redis:
two nodes that share it enforce one limit together; Redis stopped is
answered as ``limits_on_outage`` says, fast; the official SDK's back-off
honours our 429."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import trio

from tests.conftest import loopback_client, running_server
from tests.redis_server import RedisServer
from trio_stream import Settings
from trio_stream.limits.keys import parse_keys

BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
AUTH = {"authorization": "Bearer sk-alice"}


def keys(**limits: Any) -> Any:
    return parse_keys([{"name": "alice", "secret": "sk-alice", **limits}])


def node_settings(tmp_path: Path, redis: RedisServer, **changes: Any) -> Settings:
    base: dict[str, Any] = {"port": 0, "db": str(tmp_path / "limits.db"), "mock_delay_ms": 1}
    return Settings(**{**base, "redis": redis.url, **changes})


async def test_two_nodes_admit_exactly_rpm_together(tmp_path: Path, own_redis: RedisServer) -> None:
    """``rpm = 60`` on two nodes sharing one Redis: 100 requests sent at once,
    alternating between the nodes, are admitted exactly 60 times; each of
    the other 40 is 429 with a ``Retry-After`` within 1 s of the time until
    the first admitted request is a minute old."""
    settings = node_settings(tmp_path, own_redis)
    async with AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(running_server(settings, keys=keys(rpm=60)))
            for _ in range(2)
        ]
        clients = [await stack.enter_async_context(loopback_client(s)) for s in servers]
        answers: list[httpx.Response] = []

        async def send(client: httpx.AsyncClient) -> None:
            answers.append(await client.post("/v1/chat/completions", json=BODY, headers=AUTH))

        start = time.monotonic()
        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(send, clients[i % 2])
        now = time.monotonic()
    assert sorted(a.status_code for a in answers) == [200] * 60 + [429] * 40
    for answer in answers:
        if answer.status_code == 429:
            assert answer.json()["error"]["code"] == "rate_limit_exceeded"
            retry = int(answer.headers["retry-after"])
            # the first admission was between start and now: the window frees
            # between start + 60 and now + 60, counted in whole seconds
            assert 60 - (now - start) - 1 <= retry <= 61


async def test_max_streams_holds_across_nodes(tmp_path: Path, own_redis: RedisServer) -> None:
    """``max_streams = 2`` across two nodes: two open streams (one per node)
    leave a third refused on either node, until one of them ends."""
    settings = node_settings(tmp_path, own_redis, mock_delay_ms=200)
    async with AsyncExitStack() as stack:
        a, b = [
            await stack.enter_async_context(running_server(settings, keys=keys(max_streams=2)))
            for _ in range(2)
        ]
        ca, cb = [await stack.enter_async_context(loopback_client(s)) for s in (a, b)]
        long = {**BODY, "stream": True, "max_tokens": 10}
        async with (
            ca.stream("POST", "/v1/chat/completions", json=long, headers=AUTH) as first,
            cb.stream("POST", "/v1/chat/completions", json=long, headers=AUTH) as second,
        ):
            assert (first.status_code, second.status_code) == (200, 200)
            for client in (ca, cb):
                refused = await client.post("/v1/chat/completions", json=BODY, headers=AUTH)
                assert refused.status_code == 429
                assert refused.json()["error"]["code"] == "too_many_streams"
            await first.aread()
        # first's slot is released as its handler returns, just after its last byte
        with trio.fail_after(2):
            while (  # noqa: ASYNC110 - the release is on the server's side
                await cb.post("/v1/chat/completions", json=BODY, headers=AUTH)
            ).status_code != 200:
                await trio.sleep(0.02)


async def test_tokens_budget_and_a_cut_stream_across_nodes(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    """Charges in Redis, across two nodes.  ``tpm = 30``: a stream of 40
    tokens on node A is never cut by its own tokens, and once it has ended
    the key's next request on node B is refused (type ``tokens``) with a
    ``Retry-After`` of the window's rest.  ``tokens_per_day = 10``: once A
    has charged 12 tokens, B answers ``insufficient_quota``.  A stream cut by
    its client after 10 tokens is charged what it sent (B's ``/v1/usage``
    reads it), not the 200 it asked for."""
    settings = node_settings(tmp_path, own_redis, mock_delay_ms=20)
    key_list = parse_keys([
        {"name": "alice", "secret": "sk-alice", "tpm": 30},
        {"name": "bob", "secret": "sk-bob", "tokens_per_day": 10},
        {"name": "carol", "secret": "sk-carol", "tpm": 100_000},
    ])  # fmt: skip
    async with AsyncExitStack() as stack:
        a, b = [
            await stack.enter_async_context(running_server(settings, keys=key_list))
            for _ in range(2)
        ]
        ca, cb = [await stack.enter_async_context(loopback_client(s)) for s in (a, b)]
        chat = "/v1/chat/completions"
        long = {**BODY, "stream": True, "max_tokens": 40}
        first = await ca.post(chat, json=long, headers=AUTH)
        assert first.status_code == 200
        assert first.text.count('"content"') >= 40  # never cut by its own tokens
        second = await cb.post(chat, json=BODY, headers=AUTH)
        assert second.status_code == 429
        assert second.json()["error"]["type"] == "tokens"
        assert second.headers["x-ratelimit-remaining-tokens"] == "0"
        assert 58 <= int(second.headers["retry-after"]) <= 61
        bob = {"authorization": "Bearer sk-bob"}
        spent = await ca.post(chat, json={**BODY, "max_tokens": 12}, headers=bob)
        assert spent.status_code == 200
        over = await cb.post(chat, json=BODY, headers=bob)
        assert over.status_code == 429
        assert over.json()["error"]["code"] == "insufficient_quota"
        assert over.headers["x-should-retry"] == "false"
        carol = {"authorization": "Bearer sk-carol"}
        cut = {**BODY, "stream": True, "max_tokens": 200}
        async with ca.stream("POST", chat, json=cut, headers=carol) as stream:
            seen = 0
            async for line in stream.aiter_lines():
                seen += '"content"' in line
                if seen >= 10:
                    break
        with trio.fail_after(5):  # the cut run's cleanup charges it in full
            await a.service.runs.wait_idle()
        [row] = (await cb.get("/v1/usage", headers=carol)).json()["data"]
        assert row["requests"] == 1
        assert 10 <= row["completion_tokens"] < 20


async def _outage(settings: Settings, redis: RedisServer) -> httpx.Response:
    async with (
        running_server(settings, keys=keys(rpm=100)) as server,
        loopback_client(server) as client,
    ):
        ok = await client.post("/v1/chat/completions", json=BODY, headers=AUTH)
        assert ok.status_code == 200
        redis.kill()
        try:
            with trio.fail_after(2.5):  # never a hang: a refused connection fails at once
                return await client.post("/v1/chat/completions", json=BODY, headers=AUTH)
        finally:
            redis.start()


async def test_redis_stopped_closed_refuses_fast_and_open_admits(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    """Redis stopped: ``limits_on_outage = "closed"`` answers 503
    ``limits_unavailable`` within 2.5 s; ``"open"`` admits the request
    unchecked -- which only a node whose shared state does not need that
    Redis can serve (``--limits-redis`` without ``--redis``: otherwise the
    shared state answers 503 ``shared_state_unavailable`` anyway)."""
    closed = await _outage(node_settings(tmp_path, own_redis), own_redis)
    assert closed.status_code == 503
    assert closed.json()["error"]["code"] == "limits_unavailable"
    assert closed.headers["retry-after"] == "1"
    shared_too = await _outage(
        node_settings(tmp_path, own_redis, limits_on_outage="open"), own_redis
    )
    assert shared_too.json()["error"]["code"] == "shared_state_unavailable"
    settings = node_settings(tmp_path, own_redis, limits_on_outage="open")
    opened = await _outage(settings.replace(redis=None, limits_redis=own_redis.url), own_redis)
    assert opened.status_code == 200
    assert "x-ratelimit-limit-requests" not in opened.headers  # nothing was checked


async def test_the_official_sdk_backs_off_on_our_429(settings: Settings) -> None:
    """The official SDK reads our 429 as ``RateLimitError`` with our code,
    and its back-off honours ``Retry-After``: with one stream slot held for
    1.2 s, a request with retries gets its answer after the slot frees."""
    settings = settings.replace(mock_delay_ms=100)
    async with (
        running_server(settings, keys=keys(max_streams=1)) as server,
        loopback_client(server) as client,
    ):
        long = {**BODY, "stream": True, "max_tokens": 12}

        def ask(retries: int) -> str | None:
            http = httpx2.Client(verify=False)
            sdk = openai.OpenAI(
                base_url=server.url + "/v1", api_key="sk-alice", max_retries=retries,
                http_client=http,
            )  # fmt: skip
            try:
                answer = sdk.chat.completions.create(
                    model="mock", messages=[{"role": "user", "content": "x"}], max_tokens=1
                )
                return answer.choices[0].message.content
            except openai.RateLimitError as exc:
                return f"429 {exc.code}"
            finally:
                http.close()

        async with client.stream("POST", "/v1/chat/completions", json=long, headers=AUTH):
            assert await trio.to_thread.run_sync(ask, 0) == "429 too_many_streams"
            start = time.monotonic()
            async with trio.open_nursery() as nursery:

                async def retried() -> None:
                    result.append(await trio.to_thread.run_sync(ask, 3))

                result: list[str | None] = []
                nursery.start_soon(retried)
        assert result
        assert result[0] is not None
        assert not result[0].startswith("429")
        assert time.monotonic() - start >= 0.9  # it waited (Retry-After: 1)
