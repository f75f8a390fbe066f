"""One contract suite for every backend of the per-key limits (L1-L7 of
:mod:`trio_stream.limits.base`).

The same tests run against the in-process backend and the Redis backend (a
real ``redis-server``).  Two *nodes* are two limiters sharing one store (for
the in-process backend: one limiter, since it has one process).  Windows are
shortened (``window`` seconds of 60 buckets) so that a test can wait for one
to pass; the arithmetic does not depend on the length.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable

import pytest
import trio

from tests.redis_server import RedisServer, hung_port
from trio_stream.limits import Limiter, Limits, LimitsUnavailable, LocalLimiter
from trio_stream.limits import redis as redis_mod
from trio_stream.limits.base import BUCKETS, CALL_TIMEOUT, utc_day
from trio_stream.limits.redis import RedisLimiter

Make = Callable[[float], Awaitable[tuple[Limiter, Limiter]]]


@pytest.fixture(params=["local", "redis"])
async def make(
    request: pytest.FixtureRequest, nursery: trio.Nursery, redis_server: RedisServer
) -> Make:
    """Two nodes' limiters over one store, with a window of the given length."""

    async def build(window: float) -> tuple[Limiter, Limiter]:
        if request.param == "local":
            local = LocalLimiter(window)
            return local, local
        prefix = f"t{secrets.token_hex(4)}:"
        pair = [RedisLimiter(redis_server.url, window, prefix=prefix) for _ in range(2)]
        for limiter in pair:
            await nursery.start(limiter.run)
        return pair[0], pair[1]

    return build


def slot() -> str:
    return "s_" + secrets.token_hex(6)


async def test_nodes_together_admit_exactly_rpm(make: Make) -> None:
    """L1: requests sent through two nodes at once are admitted exactly up to
    ``rpm`` in the window; every other one is refused for ``requests`` with a
    positive retry no longer than the window."""
    a, b = await make(30.0)
    limits = Limits(rpm=10)
    verdicts = []

    async def send(limiter: Limiter) -> None:
        verdicts.append(await limiter.admit("k", limits, slot()))

    async with trio.open_nursery() as nursery:
        for i in range(25):
            nursery.start_soon(send, (a, b)[i % 2])
    admitted = [v for v in verdicts if v.admitted]
    refused = [v for v in verdicts if not v.admitted]
    assert len(admitted) == 10
    assert {v.refused for v in refused} == {"requests"}
    assert all(0 < v.retry_after <= 30.0 for v in refused)
    assert sorted(v.requests.remaining for v in admitted if v.requests) == list(range(10))


async def test_retry_after_says_when_the_window_has_room(make: Make) -> None:
    """L5: a refusal's retry is when the oldest request leaves the window (to
    within a bucket), and a request retried then is admitted."""
    a, b = await make(1.2)  # buckets of 20 ms
    limits = Limits(rpm=3)
    start = trio.current_time()
    for _ in range(3):
        assert (await a.admit("k", limits, slot())).admitted
    refusal = await b.admit("k", limits, slot())
    elapsed = trio.current_time() - start
    assert refusal.refused == "requests"
    expected = 1.2 - elapsed
    assert expected - 0.05 <= refusal.retry_after <= expected + 0.05
    await trio.sleep(refusal.retry_after)
    assert (await b.admit("k", limits, slot())).admitted


async def test_tokens_charged_refuse_the_next_request_until_the_window_frees(make: Make) -> None:
    """L2: a charge is never refused, even beyond ``tpm``; while the window
    holds ``tpm`` tokens the key's next request is refused for ``tokens``,
    and admitted again once they left the window."""
    a, b = await make(1.2)
    limits = Limits(tpm=100)
    await a.charge("k", "m", 40, 59)
    assert (await b.admit("k", limits, slot())).admitted  # 99 < 100
    await a.charge("k", "m", 0, 51)  # over the limit: still charged
    refusal = await b.admit("k", limits, slot())
    assert refusal.refused == "tokens"
    assert refusal.tokens is not None
    assert refusal.tokens.remaining == 0
    assert 0 < refusal.retry_after <= 1.2
    await trio.sleep(refusal.retry_after)
    verdict = await a.admit("k", limits, slot())
    assert verdict.admitted
    assert verdict.tokens is not None
    # 49 if the two charges fell in different buckets: the second is still in
    assert verdict.tokens.remaining in (49, 100)


async def test_stream_slots_are_held_across_nodes_and_released_by_id(make: Make) -> None:
    """L3: at most ``max_streams`` slots are held across nodes; a release frees
    its own slot only, and releasing again (or a slot never held) is a no-op."""
    a, b = await make(30.0)
    limits = Limits(max_streams=2)
    s1, s2, s3 = slot(), slot(), slot()
    assert (await a.admit("k", limits, s1)).admitted
    assert (await b.admit("k", limits, s2)).admitted
    assert (await a.admit("k", limits, s3)).refused == "streams"
    await a.release("k", s3)  # refused: held nothing
    assert (await b.admit("k", limits, slot())).refused == "streams"
    await a.release("k", s1)
    await a.release("k", s1)
    assert (await b.admit("k", limits, s3)).admitted
    assert (await a.admit("k", limits, slot())).refused == "streams"
    assert (await a.admit("other", limits, slot())).admitted  # keys apart


async def test_a_charge_frees_the_slots_it_is_given(make: Make) -> None:
    """L3 with a run's last charge: ``charge(release=...)`` frees those
    slots (and only those) in the same step; the caller's own release of a
    slot freed so is then a no-op."""
    a, b = await make(30.0)
    limits = Limits(max_streams=2)
    s1, s2 = slot(), slot()
    assert (await a.admit("k", limits, s1)).admitted
    assert (await b.admit("k", limits, s2)).admitted
    assert (await b.admit("k", limits, slot())).refused == "streams"
    await a.charge("k", "m", 1, 2, requests=1, release=(s1,))
    s3 = slot()
    assert (await b.admit("k", limits, s3)).admitted
    assert (await a.admit("k", limits, slot())).refused == "streams"
    await a.release("k", s1)
    assert (await a.admit("k", limits, slot())).refused == "streams"
    [row] = await a.usage("k")
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (1, 1, 2)


async def test_a_spent_budget_refuses_whatever_the_window(make: Make) -> None:
    """L4: once the day's (or month's) charges reach the budget the key is
    refused for ``budget``, checked before every other limit; a fresh window
    does not help, and a key without a budget is not refused."""
    a, b = await make(0.6)
    await a.charge("k", "m", 60, 40)
    assert (await b.admit("k", Limits(tokens_per_day=100), slot())).refused == "budget"
    assert (await b.admit("k", Limits(tokens_per_month=101), slot())).admitted
    await trio.sleep(0.7)
    assert (await b.admit("k", Limits(tokens_per_month=100, rpm=0), slot())).refused == "budget"
    assert (await b.admit("k", Limits(rpm=5), slot())).admitted


async def test_the_state_of_the_window_is_reported(make: Make) -> None:
    """L6: an admission reports the limits, what remains once it is counted,
    and the time until the window is empty; ``peek`` counts nothing."""
    a, b = await make(30.0)
    limits = Limits(rpm=5, tpm=50)
    verdict = await a.admit("k", limits, slot())
    assert verdict.requests is not None
    assert verdict.tokens is not None
    assert (verdict.requests.limit, verdict.requests.remaining) == (5, 4)
    assert 29.0 < verdict.requests.reset <= 30.0
    assert (verdict.tokens.limit, verdict.tokens.remaining, verdict.tokens.reset) == (50, 50, 0)
    await b.charge("k", "m", 5, 15)
    peek = await b.peek("k", limits)
    assert peek.admitted
    assert peek.requests is not None
    assert peek.tokens is not None
    assert (peek.requests.remaining, peek.tokens.remaining) == (4, 30)
    assert 29.0 < peek.tokens.reset <= 30.0
    again = (await a.peek("k", limits)).requests  # peek counted nothing
    assert again is not None
    assert again.remaining == 4
    assert (await a.admit("k", Limits(), slot())).requests is None  # unlimited: no state


async def test_usage_is_kept_by_day_and_model(make: Make) -> None:
    """L7: charges are summed per UTC day and model, readable from any node."""
    a, b = await make(30.0)
    await a.charge("k", "gpt", 10, 5, requests=1)
    await b.charge("k", "gpt", 0, 7)
    await b.charge("k", "mock", 3, 4, requests=1)
    await a.charge("other", "gpt", 1, 1, requests=1)
    rows = await b.usage("k")
    today = utc_day(time.time())
    assert [(r.day, r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        (today, "gpt", 1, 10, 12),
        (today, "mock", 1, 3, 4),
    ]
    assert await a.usage("nobody") == []


async def test_a_dead_nodes_slots_expire_and_live_ones_are_renewed(
    redis_server: RedisServer, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L3 in Redis: a slot of a node that stopped renewing (it died) is free
    after its lease; a live node renews its slots past the lease."""
    monkeypatch.setattr(redis_mod, "SLOT_LEASE", 0.4)
    monkeypatch.setattr(redis_mod, "SLOT_RENEW", 0.1)
    prefix = f"t{secrets.token_hex(4)}:"
    live, other = (RedisLimiter(redis_server.url, prefix=prefix) for _ in range(2))
    await nursery.start(live.run)
    await nursery.start(other.run)
    dead = RedisLimiter(redis_server.url, prefix=prefix)
    limits = Limits(max_streams=1)
    async with trio.open_nursery() as dying:  # its run() ends at once: it never renews
        await dying.start(dead.run)
        assert (await dead.admit("dead", limits, slot())).admitted
        dying.cancel_scope.cancel()
    assert (await live.admit("live", limits, slot())).admitted
    await trio.sleep(0.8)
    assert (await other.admit("dead", limits, slot())).admitted
    assert (await other.admit("live", limits, slot())).refused == "streams"


async def test_redis_windows_stay_bounded_without_their_limit(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """In Redis, a key without ``rpm`` writes no request window, and the
    token window of a key without ``tpm`` (which no admission reads, so
    none prunes) never holds more than twice the window's buckets however
    long it is charged."""
    limiter = RedisLimiter(redis_server.url, 1.2, prefix=f"t{secrets.token_hex(4)}:")
    await nursery.start(limiter.run)
    for _ in range(3 * BUCKETS):  # a charge in each of 180 buckets of 0.02 s
        held = slot()
        assert (await limiter.admit("k", Limits(max_streams=5), held)).admitted
        await limiter.charge("k", "m", 1, 1, requests=1, release=(held,))
        await trio.sleep(limiter.bucket)
    assert await limiter.pipe.call("EXISTS", limiter._k("k", "rq")) == 0
    assert 0 < await limiter.pipe.call("HLEN", limiter._k("k", "tk")) <= 2 * BUCKETS + 1


async def test_redis_unreachable_fails_fast(own_redis: RedisServer, nursery: trio.Nursery) -> None:
    """An outage is :class:`LimitsUnavailable` within the call's deadline,
    whether Redis refuses connections (stopped) or never answers them."""
    limiter = RedisLimiter(own_redis.url, prefix="x:")
    await nursery.start(limiter.run)
    assert (await limiter.admit("k", Limits(rpm=1), slot())).admitted
    own_redis.kill()
    start = trio.current_time()
    with pytest.raises(LimitsUnavailable):
        await limiter.admit("k", Limits(rpm=1, max_streams=1), slot())
    with pytest.raises(LimitsUnavailable):
        await limiter.charge("k", "m", 1, 1)
    assert trio.current_time() - start < CALL_TIMEOUT
    assert limiter._held == {}  # nothing left to renew: no slot held by a failed call
    with hung_port() as port:
        hung = RedisLimiter(f"redis://127.0.0.1:{port}/0", prefix="x:")
        await nursery.start(hung.run)
        start = trio.current_time()
        with pytest.raises(LimitsUnavailable):
            await hung.admit("k", Limits(rpm=1), slot())
        assert trio.current_time() - start < 2.5


async def test_in_process_retry_after_is_exact(autojump_clock: trio.abc.Clock) -> None:
    """L5 in-process, on a virtual clock: with ``rpm = 60`` the 61st request
    of a minute is refused with the time until the first one is 60 s old
    (to within a 1 s bucket), and admitted exactly then."""
    limiter = LocalLimiter()
    limits = Limits(rpm=60)
    await trio.sleep(1000.25 - trio.current_time() % 1)  # 0.25 s into a bucket
    first = trio.current_time()
    for _ in range(60):
        assert (await limiter.admit("k", limits, slot())).admitted
        await trio.sleep(0.5)
    refusal = await limiter.admit("k", limits, slot())
    assert refusal.refused == "requests"
    assert refusal.retry_after == pytest.approx(first - 0.25 + 60 - trio.current_time())
    await trio.sleep(refusal.retry_after - 0.001)
    assert (await limiter.admit("k", limits, slot())).refused == "requests"
    await trio.sleep(0.001)
    assert (await limiter.admit("k", limits, slot())).admitted
