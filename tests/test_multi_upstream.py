"""Several upstream members (docs/api.md section 1.3): routing by model,
failover before the first token, cooldown, hedging -- the real server on a
real socket, three fake upstreams as real HTTP servers on 127.0.0.1.

The router's rules themselves are tested synchronously in tests/test_router.py;
here each test checks what a client and the upstreams see.  Time is trio's
``autojump_clock`` where a test waits for a cooldown or a hedge: loopback
delivers at send time, so the clock only jumps when every task waits.
"""

from __future__ import annotations

import socket
import statistics
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from tests.conftest import RawClient, Server, loopback_client, running_server, tasks_living
from tests.redis_server import RedisServer
from tools.fakes import Connection, FakeUpstream, Plan, Step, mock_plan, token_plan
from trio_stream import Settings
from trio_stream.config.members import GroupSpec, MemberSpec, ModelName, Upstreams
from trio_stream.store import open_store
from trio_stream.upstream import mocktext

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "several upstreams"}]
TEXT = mocktext.expected_text(MESSAGES, 12)


def chat(model: str = "m", stream: bool = False, **more: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "stream": stream, "max_tokens": 12, **more}


def member(name: str, fake: FakeUpstream | str, **options: Any) -> MemberSpec:
    url = fake if isinstance(fake, str) else fake.url
    return MemberSpec(name, "openai", url, **options)


def refused_url() -> str:
    """An address nothing listens on: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def error_plan(status: int, retry_after: str | None = None) -> Plan:
    body = orjson.dumps({"error": {"message": f"fake {status}", "type": "x", "code": None}})
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    if retry_after is not None:
        headers.append(("retry-after", retry_after))
    return Plan(status=status, steps=[Step(body)], headers=headers)


def first_time(plan: Plan) -> Callable[[dict[str, Any]], Plan]:
    """``plan`` for the first request, the mock's answer after."""
    seen: list[int] = []
    normal = mock_plan("openai")

    def pick(body: dict[str, Any]) -> Plan:
        seen.append(1)
        return plan if len(seen) == 1 else normal(body)

    return pick


def slow_plan(first_after: float) -> Callable[[dict[str, Any]], Plan]:
    """The mock's answer, its first token ``first_after`` seconds late."""

    def plan(body: dict[str, Any]) -> Plan:
        tokens = list(mocktext.tokens(body["messages"], body.get("max_tokens")))
        p = token_plan(tokens, finish=mocktext.reply_length(body.get("max_tokens"))[1])
        p.steps[0].delay = first_after
        return p

    return plan


@asynccontextmanager
async def fakes(n: int) -> AsyncIterator[list[FakeUpstream]]:
    async with trio.open_nursery() as nursery:
        started = [FakeUpstream("openai") for _ in range(n)]
        for fake in started:
            await nursery.start(fake.serve)
        yield started
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def serving(
    settings: Settings, *members: MemberSpec, groups: tuple[GroupSpec, ...] = ()
) -> AsyncIterator[Server]:
    s = settings.replace(upstreams=Upstreams(members, groups))
    # The store inline: a save in a worker thread would let the autojump clock run.
    async with running_server(s, store=open_store(s.db, threaded=False)) as server:
        yield server


def metric(server: Server, name: str, **labels: str) -> float:
    value = server.service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def stream_end(server: Server) -> dict[str, Any]:
    """The run's ``stream_end`` line: its request task writes it once the
    response is sent, so it is there once every task waits."""
    await trio.testing.wait_all_tasks_blocked()
    (end,) = server.logs.events("stream_end")
    return end


async def post(server: Server, body: dict[str, Any], **headers: str) -> Any:
    async with loopback_client(server) as client:
        return await client.post(CHAT, json=body, headers=headers)


async def test_the_model_picks_the_group_and_models_is_the_union(settings: Settings) -> None:
    """R1/R2 end to end: each model reaches only the members that list it,
    under each member's own name; an unknown model is 404 model_not_found
    (OpenAI body) and reaches nobody; /v1/models lists every named model once."""
    async with fakes(2) as (a, b):
        specs = (
            member("a", a, models=(ModelName("llama3", "llama3"),)),
            member("b", b, models=(ModelName("llama3", "llama3"),
                                   ModelName("gpt-4o", "openai/gpt-4o"))),
        )  # fmt: skip
        async with serving(settings, *specs) as server:
            with trio.fail_after(10):
                response = await post(server, chat("gpt-4o"))
                assert response.status_code == 200
                assert response.json()["choices"][0]["message"]["content"] == TEXT
                assert response.json()["model"] == "gpt-4o"
                assert [r["model"] for r in b.requests] == ["openai/gpt-4o"]
                assert a.requests == []
                missing = await post(server, chat("nope"))
                assert missing.status_code == 404
                assert missing.json() == {"error": {
                    "message": "The model 'nope' does not exist.", "type": "invalid_request_error",
                    "param": None, "code": "model_not_found"}}  # fmt: skip
                async with loopback_client(server) as client:
                    models = (await client.get("/v1/models")).json()["data"]
                assert sorted(m["id"] for m in models) == ["gpt-4o", "llama3"]
                assert len(a.requests) + len(b.requests) == 1


@pytest.mark.parametrize("how", ["refused", "500", "503", "429"])
async def test_failover_before_the_first_token(settings: Settings, how: str) -> None:
    """A connect refusal, a 5xx or a 429 on the member chosen first moves
    the request to the next member: the client sees one complete response,
    the run names the member that served it (stream_end, the run object,
    the saved message) and is saved once; the failed member is counted (attempts, failovers)."""
    async with fakes(2) as (bad, good):
        bad.plan = first_time(error_plan(int(how))) if how != "refused" else bad.plan
        first = member("first", refused_url() if how == "refused" else bad, weight=10.0)
        async with serving(settings, first, member("second", good)) as server:
            baseline = await tasks_living()
            with trio.fail_after(10):
                client = await RawClient.post(server.port, CHAT, chat(stream=True),
                                              headers=(("x-session-id", "s1"),))  # fmt: skip
                try:
                    assert await client.start() == 200
                    events = await client.read_all()
                finally:
                    await client.aclose()
                text = "".join(
                    orjson.loads(e.data)["choices"][0]["delta"].get("content") or ""
                    for e in events if e.data.startswith("{")
                )  # fmt: skip
                assert text == TEXT
                assert events[-1].data == "[DONE]"
                end = await stream_end(server)
                assert end["served_by"] == "second"
                async with loopback_client(server) as http:
                    saved = (await http.get("/v1/sessions/s1/messages")).json()["data"]
                    run_id = client.headers["x-run-id"]
                    run = (await http.get(f"/v1/runs/{run_id}")).json()
                assert [m["content"] for m in saved] == [TEXT]
                assert saved[0]["served_by"] == "second"
                assert run["served_by"] == "second"
                assert len(good.requests) == 1
                assert len(bad.requests) == (0 if how == "refused" else 1)
                outcome = {"refused": "connect", "429": "rate_limited"}.get(how, "server")
                assert metric(server, "trio_stream_upstream_attempts_total",
                              member="first", outcome=outcome) == 1  # fmt: skip
                assert metric(server, "trio_stream_upstream_failovers_total", member="first") == 1
                # The fake's task serving the pooled connection is the only one more.
                assert await tasks_living() == baseline + good.open_connections


async def test_a_members_own_first_token_timeout_fails_over(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """F2: a member silent past its own first_token_timeout (0.5 s) is given
    up -- its connection closed -- and the request moves on at that moment,
    well within the request's --first-token-timeout."""
    async with fakes(2) as (slow, fast):
        slow.plan = slow_plan(5.0)
        specs = (member("slow", slow, weight=10.0, first_token_timeout=0.5), member("fast", fast))
        async with serving(settings, *specs) as server:
            start = trio.current_time()
            response = await post(server, chat())
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"] == TEXT
            (exchange,) = fast.exchanges
            assert exchange.started - start == pytest.approx(0.5, abs=0.01)
            (conn,) = slow.connections
            assert conn.closed is not None
            assert conn.closed - start == pytest.approx(0.5, abs=0.01)
            assert metric(server, "trio_stream_upstream_attempts_total", member="slow",
                          outcome="timeout") == 1  # fmt: skip


async def test_a_client_error_is_not_failed_over(settings: Settings) -> None:
    """A 4xx other than 408/429 is the client's: answered as the upstream
    gave it, and no other member is tried."""
    async with fakes(2) as (bad, good):
        bad.plan = first_time(error_plan(400))
        async with serving(settings, member("first", bad, weight=10.0),
                           member("second", good)) as server:  # fmt: skip
            with trio.fail_after(10):
                response = await post(server, chat())
            assert response.status_code == 400
            assert response.json()["error"]["message"] == "fake 400"
            assert good.requests == []


async def test_retry_after_cools_the_member_and_nothing_reaches_it(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """A 429 with Retry-After: 2 cools its member for 2 s (H3): the request
    fails over, no request reaches the member until then, and the first one
    after goes to it again (it is the heavier member)."""
    async with fakes(2) as (limited, other):
        limited.plan = first_time(error_plan(429, retry_after="2"))
        async with serving(settings, member("limited", limited, weight=10.0),
                           member("other", other)) as server:  # fmt: skip
            start = trio.current_time()
            assert (await post(server, chat())).status_code == 200
            assert len(limited.requests) == 1
            assert metric(server, "trio_stream_upstream_cooling", member="limited") == 1
            for _ in range(4):
                await trio.sleep(0.3)
                assert (await post(server, chat())).status_code == 200
            assert len(limited.requests) == 1
            assert len(other.requests) == 5
            await trio.sleep_until(start + 2.0)
            assert metric(server, "trio_stream_upstream_cooling", member="limited") == 0
            assert (await post(server, chat())).status_code == 200
            assert len(limited.requests) == 2


async def test_every_member_cooling_is_503_with_retry_after(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """When every member of the model is cooling down the request is
    refused at once, 503 upstreams_cooling_down with Retry-After (B3)."""
    async with fakes(1) as (only,):
        only.plan = first_time(error_plan(429, retry_after="3"))
        async with serving(settings, member("only", only)) as server:
            first = await post(server, chat())
            assert first.status_code == 429  # no other member: the 429 is answered
            refused = await post(server, chat())
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "upstreams_cooling_down"
            assert refused.headers["retry-after"] == "3"
            assert len(only.requests) == 1


async def test_max_streams_full_is_429(settings: Settings) -> None:
    """A member at max_streams takes no more; when every member is full the
    request is refused 429 upstreams_busy with Retry-After: 1 (B3)."""
    async with fakes(1) as (only,):
        only.plan = slow_plan(30.0)
        async with serving(settings, member("only", only, max_streams=1)) as server:
            with trio.fail_after(10):
                holder = await RawClient.post(server.port, CHAT, chat(stream=True))
                try:
                    await only.wait_for(lambda: only.busy_connections == 1)
                    refused = await post(server, chat())
                    assert refused.status_code == 429
                    assert refused.json()["error"]["code"] == "upstreams_busy"
                    assert refused.headers["retry-after"] == "1"
                finally:
                    await holder.aclose()


async def test_hedge_the_fast_member_wins_and_the_slow_one_is_closed_at_once(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """hedge_after_ms = 200: the slow member (first token after 2 s) is
    chosen first, the hedge starts on the fast one at 200 ms and wins; the
    slow member's connection is closed at the instant of the win (the
    clock does not move in between); one run, one saved message, served_by
    the fast member; hedges counted; tasks back to their baseline."""
    async with fakes(2) as (slow, fast):
        slow.plan = slow_plan(2.0)
        specs = (member("slow", slow, weight=10.0), member("fast", fast))
        async with serving(settings, *specs, groups=(GroupSpec("m", 200.0),)) as server:
            baseline = await tasks_living()
            start = trio.current_time()
            client = await RawClient.post(server.port, CHAT, chat(stream=True),
                                          headers=(("x-session-id", "h"),))  # fmt: skip
            try:
                assert await client.start() == 200
                first = await client.next_event()
                first_at = trio.current_time()
                events = [first, *await client.read_all()]
            finally:
                await client.aclose()
            assert 0.2 <= first_at - start < 0.25
            (slow_conn,) = slow.connections
            (exchange,) = fast.exchanges
            assert slow_conn.closed is not None
            assert slow_conn.closed - exchange.started < 0.005
            text = "".join(
                orjson.loads(e.data)["choices"][0]["delta"].get("content") or ""
                for e in events if e is not None and e.data.startswith("{")
            )  # fmt: skip
            assert text == TEXT
            end = await stream_end(server)
            assert end["served_by"] == "fast"
            async with loopback_client(server) as http:
                saved = (await http.get("/v1/sessions/h/messages")).json()["data"]
            assert len(saved) == 1
            assert metric(server, "trio_stream_upstream_hedges_total", member="fast",
                          event="started") == 1  # fmt: skip
            assert metric(server, "trio_stream_upstream_hedges_total", member="fast",
                          event="won") == 1  # fmt: skip
            assert metric(server, "trio_stream_upstream_attempts_total", member="slow",
                          outcome="hedge_lost") == 1  # fmt: skip
            assert metric(server, "trio_stream_upstream_in_flight", member="slow") == 0
            assert metric(server, "trio_stream_upstream_in_flight", member="fast") == 0
            assert slow.open_connections == 0
            assert await tasks_living() == baseline + fast.open_connections


async def test_a_supersede_during_a_hedge_closes_both_members(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """A run racing two members is superseded before either sent a token:
    both upstream connections close (the cancel reaches every attempt), the
    new run streams, each run is saved once."""
    async with fakes(2) as (a, b):
        a.plan = b.plan = slow_plan(30.0)
        specs = (member("a", a, weight=10.0), member("b", b))
        async with serving(settings, *specs, groups=(GroupSpec("m", 200.0),)) as server:
            baseline = await tasks_living()
            old = await RawClient.post(server.port, CHAT, chat(stream=True),
                                       headers=(("x-session-id", "s"),))  # fmt: skip
            try:
                await a.wait_for(lambda: a.busy_connections == 1)
                await b.wait_for(lambda: b.busy_connections == 1)
                a.plan = b.plan = mock_plan("openai")
                new = await post(server, chat(), **{"x-session-id": "s"})
                assert new.status_code == 200
                assert new.json()["choices"][0]["message"]["content"] == TEXT
                assert old.ended or await old.read_all() is not None
            finally:
                await old.aclose()
            assert a.connections[0].closed is not None
            assert b.connections[0].closed is not None
            async with loopback_client(server) as http:
                saved = (await http.get("/v1/sessions/s/messages")).json()["data"]
            assert [m["status"] for m in saved] == ["complete"]  # the old run had no content
            assert server.logs.events("stream_cancelled", reason="superseded")
            assert await tasks_living() == baseline + a.open_connections + b.open_connections


async def test_a_hedged_group_fails_over_and_hedges_only_the_slow(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """In a hedged group a failure before the first token still fails over
    (within the race), and a member that answers before hedge_after_ms is
    never hedged: no second upstream request, no hedge counted."""
    async with fakes(2) as (bad, good):
        bad.plan = first_time(error_plan(502))
        specs = (member("bad", bad, weight=10.0), member("good", good))
        async with serving(settings, *specs, groups=(GroupSpec("m", 200.0),)) as server:
            baseline = await tasks_living()
            response = await post(server, chat())
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"] == TEXT
            assert (len(bad.requests), len(good.requests)) == (1, 1)
            assert metric(server, "trio_stream_upstream_failovers_total", member="bad") == 1
            assert metric(server, "trio_stream_upstream_hedges_total", member="good",
                          event="started") == 0  # fmt: skip
            bad.plan = mock_plan("openai")
            await trio.sleep(5)  # bad's cooldown (1 s) is over: it is the heavier member again
            assert (await post(server, chat())).status_code == 200
            assert (len(bad.requests), len(good.requests)) == (2, 1)
            for name in ("bad", "good"):
                assert metric(server, "trio_stream_upstream_hedges_total", member=name,
                              event="started") == 0  # fmt: skip
            open_ = bad.open_connections + good.open_connections
            assert await tasks_living() == baseline + open_


async def test_cluster_mode_every_node_skips_a_cooling_member(
    settings: Settings, own_redis: RedisServer
) -> None:
    """Cluster mode (H6): a 429 with Retry-After on node A cools the member
    on node B too, within one heartbeat (node_lease / 3, at most 1 s), and
    B's requests then never reach it."""
    async with fakes(2) as (limited, other):
        limited.plan = first_time(error_plan(429, retry_after="30"))
        members = Upstreams((member("limited", limited, weight=10.0), member("other", other)))
        cfg = settings.replace(redis=own_redis.url, node_lease=1.5, upstreams=members)
        node_a = running_server(cfg.replace(db=cfg.db + ".a"))
        node_b = running_server(cfg.replace(db=cfg.db + ".b"))
        with trio.fail_after(30):
            async with node_a as a, node_b as b:
                assert (await post(a, chat())).status_code == 200
                told = trio.current_time()
                assert len(limited.requests) == 1
                cooling = b.service.router.members["limited"]
                for _ in range(100):  # bounded: 100 x 20 ms
                    if cooling.cooling(trio.current_time()):
                        break
                    await trio.sleep(0.02)
                assert cooling.cooling(trio.current_time())
                assert trio.current_time() - told <= 0.5 + 0.3  # one heartbeat, and slack
                for _ in range(3):
                    assert (await post(b, chat())).status_code == 200
                assert len(limited.requests) == 1
                assert len(other.requests) == 4


async def test_a_member_silent_past_the_requests_deadline_cools_down(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """A member with no first_token_timeout of its own that stays silent
    past --first-token-timeout fails that request (504, no time left to
    fail over) and is counted a timeout (H1/H2): it cools down, and the next
    request goes to the other member."""
    async with fakes(2) as (hung, other):
        hung.plan = lambda body: Plan(steps=[Step(hang=True)])
        specs = (member("hung", hung, weight=10.0), member("other", other))
        async with serving(settings.replace(first_token_timeout=2.0), *specs) as server:
            timed_out = await post(server, chat())
            assert timed_out.status_code == 504
            assert metric(server, "trio_stream_upstream_attempts_total", member="hung",
                          outcome="timeout") == 1  # fmt: skip
            assert metric(server, "trio_stream_upstream_cooling", member="hung") == 1
            assert hung.open_connections == 0
            assert (await post(server, chat())).status_code == 200
            assert (len(hung.requests), len(other.requests)) == (1, 1)


async def test_a_probe_brings_a_cooling_member_back(
    settings: Settings, autojump_clock: trio.testing.MockClock
) -> None:
    """P1-P3 end to end: two members with probe = true (probe_interval_ms =
    500) fail one request (a 502, a refused connection) and cool for 30 s.
    Each is sent GET /models 0.5 s after its cooldown began: the one that
    answers is open again at that instant (the next request goes to it), the
    refused one is probed again each 0.5 s and stays cooling; no request
    reaches either before its probe."""
    async with fakes(2) as (flaky, other):
        flaky.plan = first_time(error_plan(502))
        probing = {"weight": 10.0, "probe": True, "probe_interval_ms": 500.0,
                   "cooldown_ms": 30_000.0, "max_cooldown_ms": 30_000.0}  # fmt: skip
        specs = (member("flaky", flaky, **probing), member("dead", refused_url(), **probing),
                 member("other", other))  # fmt: skip
        async with serving(settings, *specs) as server:
            start = trio.current_time()
            assert (await post(server, chat())).status_code == 200  # flaky, dead, then other

            def chats() -> list[dict[str, Any]]:  # the chat requests (a GET /models is {})
                return [r for r in flaky.requests if r]

            assert len(chats()) == 1
            assert len(other.requests) == 1
            await trio.sleep(0.4)
            assert (await post(server, chat())).status_code == 200
            assert (len(chats()), len(other.requests)) == (1, 2)
            assert [e.target for e in flaky.exchanges] == [b"/v1/chat/completions"]
            await trio.sleep_until(start + 0.6)
            probe = flaky.exchanges[1]
            assert probe.target == b"/v1/models"
            assert probe.started - start == pytest.approx(0.5, abs=0.01)
            assert metric(server, "trio_stream_upstream_cooling", member="flaky") == 0
            assert metric(server, "trio_stream_upstream_cooling", member="dead") == 1
            assert (await post(server, chat())).status_code == 200
            assert (len(chats()), len(other.requests)) == (2, 2)
            await trio.sleep_until(start + 1.2)
            assert metric(server, "trio_stream_upstream_probes_total", member="flaky",
                          result="answered") == 1  # fmt: skip
            assert metric(server, "trio_stream_upstream_probes_total", member="dead",
                          result="failed") == 2  # fmt: skip
            assert metric(server, "trio_stream_upstream_cooling", member="dead") == 1
            (back,) = server.logs.events("upstream_probe", member="flaky")
            assert back["back"] is True


FAST_GAP = 0.01


def is_closed(conn: Connection) -> Callable[[], bool]:
    return lambda: conn.closed is not None


async def test_hedge_on_the_real_clock(settings: Settings) -> None:
    """The hedge test above on trio's real clock, 20 times (each response
    read to its end): the first token comes 200 ms after the request plus
    the fast member's time (median under 250 ms); the slow member's
    connection is closed a median under 5 ms after the fast member sent its
    first token -- before the win, so the close follows the win by less --
    and none later than 100 ms (a loaded machine's scheduling), while the fast
    member's answer goes on for another ~130 ms: the loser is closed at the
    win, not when the run ends."""
    async with fakes(2) as (slow, fast):
        slow.plan = slow_plan(2.0)
        fast.plan = mock_plan("openai", delay=FAST_GAP)  # its answer lasts ~130 ms after the win
        specs = (member("slow", slow, weight=10.0), member("fast", fast))
        async with serving(settings, *specs, groups=(GroupSpec("m", 200.0),)) as server:
            ttfts, closes = [], []
            with trio.fail_after(30):
                for _ in range(20):
                    start = trio.current_time()
                    client = await RawClient.post(server.port, CHAT, chat(stream=True))
                    try:
                        assert await client.start() == 200
                        assert await client.next_event() is not None
                        ttfts.append(trio.current_time() - start)
                        await client.read_all()
                    finally:
                        await client.aclose()
                    slow_conn, exchange = slow.connections[-1], fast.exchanges[-1]
                    await slow.wait_for(is_closed(slow_conn))
                    assert slow_conn.closed is not None
                    # The fake sends its first token FAST_GAP after the request (or later).
                    closes.append(slow_conn.closed - (exchange.started + FAST_GAP))
            assert min(ttfts) >= 0.2
            assert statistics.median(ttfts) < 0.25, ttfts
            assert statistics.median(closes) < 0.005, closes
            assert max(closes) < 0.1, closes
            assert len(fast.exchanges) == 20
            assert slow.open_connections == 0


@pytest.mark.parametrize("how", ["disconnect", "stop"])
async def test_a_disconnect_or_stop_during_a_hedge_closes_both_members(
    settings: Settings, autojump_clock: trio.testing.MockClock, how: str
) -> None:
    """A run racing two members (neither has sent a token) is ended by its
    client's disconnect, or by POST /v1/runs/{id}/cancel: both upstream
    connections close at that virtual instant (the cancel reaches every
    attempt of the race), no member has a stream in flight, and the tasks
    are back at their baseline."""
    async with fakes(2) as (a, b):
        a.plan = b.plan = slow_plan(30.0)
        specs = (member("a", a, weight=10.0), member("b", b))
        async with serving(settings, *specs, groups=(GroupSpec("m", 200.0),)) as server:
            baseline = await tasks_living()
            client = await RawClient.post(server.port, CHAT, chat(stream=True))
            try:
                await a.wait_for(lambda: a.busy_connections == 1)
                await b.wait_for(lambda: b.busy_connections == 1)
                ended = trio.current_time()
                if how == "disconnect":
                    await client.aclose()
                else:
                    run_id = next(iter(server.service.runs.runs))
                    async with loopback_client(server) as http:
                        stopped = await http.post(f"/v1/runs/{run_id}/cancel")
                    assert stopped.status_code == 200
                    events = await client.read_all()  # the stream ends: stopped
                    assert '"stopped"' in events[-1].data or '"stopped"' in events[-2].data
                await a.wait_for(lambda: a.open_connections == 0)
                await b.wait_for(lambda: b.open_connections == 0)
            finally:
                await client.aclose()
            for fake in (a, b):
                closed = fake.connections[0].closed
                assert closed is not None
                assert closed - ended < 0.005
            for name in ("a", "b"):
                assert metric(server, "trio_stream_upstream_in_flight", member=name) == 0
            assert await tasks_living() == baseline
