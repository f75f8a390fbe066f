"""Per-key limits on the served app (docs/api.md section 2.11), in memory
with ``autojump_clock``: the in-process limiter's windows run on trio's
clock, so a minute passes at once and every figure is exact."""

from __future__ import annotations

from typing import Any

import orjson
import trio
import trio.testing

from tests.conftest import memory_app
from tests.memasgi import MemoryClient, start_request
from trio_stream import Settings, TrioStreamApp
from trio_stream.limits.keys import parse_keys
from trio_stream.limits.meter import FLUSH

CHAT = "/v1/chat/completions"


def keys(**limits: Any) -> Any:
    return parse_keys(
        [
            {"name": "alice", "secret": "sk-alice", **limits},
            {"name": "bob", "secret": "sk-bob"},
        ]
    )


def post(
    nursery: trio.Nursery, app: TrioStreamApp, secret: str = "sk-alice", **body: Any
) -> MemoryClient:
    payload = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, **body}
    return start_request(
        nursery, app, "POST", CHAT, json=payload, headers={"authorization": f"Bearer {secret}"}
    )


def error(client: MemoryClient) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(bytes(client.body))["error"]
    return body


async def test_rpm_admits_exactly_the_limit_and_retry_after_is_right(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """``rpm = 60``: of 100 requests sent at once exactly 60 are answered; the
    other 40 get 429 ``rate_limit_exceeded`` (type ``requests``) whose
    ``Retry-After`` is the time until the first admitted request is a minute
    old, to within 1 s; a request sent then is admitted.  Another key is not
    limited by it."""
    async with memory_app(settings, keys=keys(rpm=60)) as (_, app):
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            clients = [post(nursery, app) for _ in range(100)]
        elapsed = trio.current_time() - start
        statuses = sorted(c.status or 0 for c in clients)
        assert statuses == [200] * 60 + [429] * 40
        refused = [c for c in clients if c.status == 429]
        for client in refused:
            assert (error(client)["type"], error(client)["code"]) == (
                "requests", "rate_limit_exceeded",
            )  # fmt: skip
            assert client.headers["x-ratelimit-limit-requests"] == "60"
            assert client.headers["x-ratelimit-remaining-requests"] == "0"
            retry = int(client.headers["retry-after"])
            assert abs(retry - (60 - elapsed)) <= 1
        admitted = [c for c in clients if c.status == 200]
        remaining = sorted(int(c.headers["x-ratelimit-remaining-requests"]) for c in admitted)
        assert remaining == list(range(60))
        async with trio.open_nursery() as nursery:
            other = post(nursery, app, "sk-bob")
        assert other.status == 200
        assert "x-ratelimit-limit-requests" not in other.headers
        await trio.sleep(int(refused[0].headers["retry-after"]))
        async with trio.open_nursery() as nursery:
            late = post(nursery, app)
        assert late.status == 200


async def test_tokens_are_charged_and_the_next_request_waits_for_the_window(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """``tpm = 30``: a stream of 40 tokens is admitted and never cut by its
    own tokens; once it ended, the key's next request is refused (type
    ``tokens``) until the window frees, then admitted; the usage shows the
    stream's tokens."""
    async with memory_app(settings, keys=keys(tpm=30)) as (service, app):
        async with trio.open_nursery() as nursery:
            first = post(nursery, app, stream=True, max_tokens=40)
        assert first.status == 200
        assert len([e for e in first.events() if e.data.startswith("{")]) >= 40
        async with trio.open_nursery() as nursery:
            second = post(nursery, app)
        assert second.status == 429
        assert error(second)["type"] == "tokens"
        assert second.headers["x-ratelimit-remaining-tokens"] == "0"
        retry = int(second.headers["retry-after"])
        assert 58 <= retry <= 60
        await trio.sleep(retry)
        async with trio.open_nursery() as nursery:
            third = post(nursery, app)
        assert third.status == 200
        rows = await service.limits.limiter.usage("alice")
        assert [(r.model, r.requests, r.completion_tokens) for r in rows] == [("mock", 2, 43)]


async def test_a_long_stream_is_charged_while_it_streams(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """Tokens are charged as they stream, not only at the end: while a long
    stream of the key is still running and past ``tpm``, its next request is
    refused; the running stream is not cut and delivers every token."""
    settings = settings.replace(mock_delay_ms=100, token_timeout=6.4)  # re-armed every 0.1 s
    async with memory_app(settings, keys=keys(tpm=20)) as (_, app):
        async with trio.open_nursery() as nursery:
            long = post(nursery, app, stream=True, max_tokens=100)
            await trio.sleep(5)  # ~50 tokens sent
            assert not long.finished.is_set()
            second = post(nursery, app)
            await second.finished.wait()
            assert second.status == 429
            assert error(second)["type"] == "tokens"
        assert long.status == 200
        assert long.text().count(" ") >= 99  # every token delivered


async def test_max_streams_is_released_on_every_path(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """``max_streams = 2``: a third stream is refused (429
    ``too_many_streams``); a disconnected stream frees its slot at once, a
    finished one too, and a superseded one as well."""
    settings = settings.replace(mock_delay_ms=1000)
    async with memory_app(settings, keys=keys(max_streams=2)) as (service, app):
        async with trio.open_nursery() as nursery:
            a = post(nursery, app, stream=True, max_tokens=50)
            b = start_request(
                nursery, app, "POST", CHAT,
                json={"messages": [{"role": "user", "content": "x"}], "stream": True,
                      "max_tokens": 50},
                headers={"authorization": "Bearer sk-alice", "x-session-id": "s1"},
            )  # fmt: skip
            await trio.sleep(1.5)
            c = post(nursery, app)
            await c.finished.wait()
            assert c.status == 429
            assert error(c)["code"] == "too_many_streams"
            await a.disconnect()
            await a.finished.wait()
            d = post(nursery, app, max_tokens=1)  # admitted: a's slot is free
            await d.finished.wait()
            assert d.status == 200
            # b superseded by a new request of its session: b's slot is freed
            e = start_request(
                nursery, app, "POST", CHAT,
                json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
                headers={"authorization": "Bearer sk-alice", "x-session-id": "s1"},
            )  # fmt: skip
            await e.finished.wait()
            assert e.status == 200
            await b.finished.wait()
        assert service.streams == 0


async def test_a_spent_budget_is_insufficient_quota(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """``tokens_per_day = 10``: once the day's tokens reach it the key is
    answered 429 ``insufficient_quota`` with ``x-should-retry: false``, even
    after the minute's window passed."""
    async with memory_app(settings, keys=keys(tokens_per_day=10)) as (_, app):
        async with trio.open_nursery() as nursery:
            first = post(nursery, app, max_tokens=12)
        assert first.status == 200
        await trio.sleep(61)
        async with trio.open_nursery() as nursery:
            second = post(nursery, app)
        assert second.status == 429
        assert (error(second)["type"], error(second)["code"]) == (
            "insufficient_quota", "insufficient_quota",
        )  # fmt: skip
        assert second.headers["x-should-retry"] == "false"


async def test_models_usage_and_headers_on_json_answers(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """A model the key may not use is 404 ``model_not_found`` and starts no
    run; ``GET /v1/usage`` returns the key's own usage by day and model;
    JSON answers of a limited key carry its ``x-ratelimit-*`` headers."""
    async with memory_app(settings, keys=keys(rpm=10, models=["mock"])) as (service, app):
        async with trio.open_nursery() as nursery:
            refused = post(nursery, app, model="gpt-x")
            ok = post(nursery, app)
        assert refused.status == 404
        assert error(refused)["code"] == "model_not_found"
        assert ok.status == 200
        await trio.sleep(FLUSH)  # a key without token limits is charged on the next round
        async with trio.open_nursery() as nursery:
            usage = start_request(
                nursery, app, "GET", "/v1/usage", headers={"authorization": "Bearer sk-alice"}
            )
            theirs = start_request(
                nursery, app, "GET", "/v1/usage", headers={"authorization": "Bearer sk-bob"}
            )
        assert usage.status == 200
        body = usage.json()
        assert body["key"] == "alice"
        [row] = body["data"]
        assert (row["model"], row["requests"], row["completion_tokens"]) == ("mock", 1, 3)
        assert row["total_tokens"] == row["prompt_tokens"] + 3
        assert usage.headers["x-ratelimit-limit-requests"] == "10"
        assert usage.headers["x-ratelimit-remaining-requests"] == "9"
        assert theirs.json()["data"] == []  # bob has used nothing
        assert "x-ratelimit-limit-requests" not in theirs.headers
        assert service.runs.live == 0


async def test_a_cancelled_stream_is_charged_for_what_was_sent(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """A stream cut by its client is charged what it received (the counted
    usage), not what it asked for; the limits leave no task behind."""
    from tests.conftest import tasks_living

    settings = settings.replace(mock_delay_ms=100)
    async with memory_app(settings, keys=keys(tpm=1000)) as (service, app):
        baseline = await tasks_living()
        async with trio.open_nursery() as nursery:
            cut = post(nursery, app, stream=True, max_tokens=100)
            await cut.wait_until(lambda c: len(c.events()) >= 10)
            await cut.disconnect()
        rows = await service.limits.limiter.usage("alice")
        [row] = rows
        assert 10 <= row.completion_tokens < 15
        assert row.requests == 1
        assert await tasks_living() == baseline


async def test_metrics_count_per_key_name_never_the_secret(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """``/metrics`` counts each limited key's decisions and tokens under its
    name; the secret appears nowhere in it."""
    async with memory_app(settings, keys=keys(rpm=1)) as (_, app):
        async with trio.open_nursery() as nursery:
            first = post(nursery, app)
        async with trio.open_nursery() as nursery:
            second = post(nursery, app)
        assert (first.status, second.status) == (200, 429)
        await trio.sleep(FLUSH)  # a key without token limits is charged on the next round
        async with trio.open_nursery() as nursery:
            scrape = start_request(nursery, app, "GET", "/metrics")
        text = bytes(scrape.body).decode()
        assert 'trio_stream_key_requests_total{decision="admitted",key="alice"} 1.0' in text
        assert 'trio_stream_key_requests_total{decision="requests",key="alice"} 1.0' in text
        assert 'trio_stream_key_tokens_total{key="alice",kind="completion"} 3.0' in text
        assert "sk-alice" not in text
