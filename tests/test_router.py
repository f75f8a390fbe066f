"""Plain synchronous tests of the router (trio_stream/core/router.py): one
test per rule of its header table, time passed in, randomness seeded."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from trio_stream.config.members import GroupSpec, MemberSpec, ModelName, Upstreams
from trio_stream.core.router import (
    Failure,
    Lease,
    Refusal,
    Router,
    UnknownModel,
    classify,
    fails_over,
    retry_after_seconds,
)


def member(name: str, *models: str | ModelName, **options: object) -> MemberSpec:
    named = tuple(m if isinstance(m, ModelName) else ModelName(m, m) for m in models)
    return MemberSpec(name, "mock", **({"models": named} if named else {}), **options)  # type: ignore[arg-type]


def router(*members: MemberSpec, groups: tuple[GroupSpec, ...] = (), seed: int = 0) -> Router:
    return Router(Upstreams(members, groups), random.Random(seed))


def lease(r: Router, model: str, now: float = 0.0, exclude: tuple[str, ...] = ()) -> Lease:
    got = r.acquire(model, now, exclude)
    assert isinstance(got, Lease), got
    return got


# -- routing -------------------------------------------------------------------------


def test_r1_a_model_goes_to_the_members_naming_it_else_to_the_any_members() -> None:
    """R1: the members naming a model are its group; a model no member
    names goes to the "*" members; with none of those, UnknownModel."""
    r = router(member("a", "llama3"), member("b", "llama3", "qwen"), member("c"))
    assert [m.name for m in r.group("llama3")] == ["a", "b"]
    assert [m.name for m in r.group("qwen")] == ["b"]
    assert [m.name for m in r.group("other")] == ["c"]
    assert r.named_models() == ["llama3", "qwen"]
    assert [m.name for m in r.any_members()] == ["c"]
    only_named = router(member("a", "llama3"))
    with pytest.raises(UnknownModel) as info:
        only_named.acquire("gpt-4o", 0.0)
    assert info.value.model == "gpt-4o"


def test_r2_each_member_is_sent_the_model_under_its_own_name() -> None:
    """R2: a renamed model is sent as the member knows it; a "*" member is
    sent the name asked for."""
    r = router(member("a", ModelName("gpt-4o", "openai/gpt-4o")), member("c"))
    assert lease(r, "gpt-4o").model == "openai/gpt-4o"
    assert lease(r, "anything").model == "anything"


# -- choosing --------------------------------------------------------------------------


def test_b2_the_least_loaded_per_weight_is_chosen() -> None:
    """B2: each acquire goes to the least (in_flight + 1) / weight; with
    weights 2 and 1, 30 streams held split 20/10 exactly."""
    r = router(member("heavy", weight=2.0), member("light"))
    held = [lease(r, "m") for _ in range(30)]
    assert Counter(x.member.name for x in held) == {"heavy": 20, "light": 10}
    assert (r.members["heavy"].in_flight, r.members["light"].in_flight) == (20, 10)


def test_b2_ties_are_broken_by_the_seeded_random_source() -> None:
    """B2: equal loads are a random choice from the given source: the same
    seed gives the same sequence, and both members are chosen over time."""

    def picks(seed: int) -> list[str]:
        r = router(member("a"), member("b"), seed=seed)
        out = []
        for _ in range(20):
            x = lease(r, "m")
            out.append(x.member.name)
            r.release(x)
        return out

    assert picks(1) == picks(1)
    assert set(picks(1)) == {"a", "b"}


def test_b2_release_gives_the_stream_back_once() -> None:
    """B2: release takes back the lease's stream, once however often called."""
    r = router(member("a"))
    x = lease(r, "m")
    assert r.members["a"].in_flight == 1
    r.release(x)
    r.release(x)
    assert r.members["a"].in_flight == 0


def test_b1_b3_all_full_is_429_retry_after_1() -> None:
    """B1/B3: a member at max_streams is skipped; when every one is full
    the first choice is refused 429 with Retry-After 1."""
    r = router(member("a", max_streams=1), member("b", max_streams=2))
    held = [lease(r, "m") for _ in range(3)]
    assert r.acquire("m", 0.0) == Refusal(429, 1)
    r.release(held[0])
    assert lease(r, "m").member.name == held[0].member.name


def test_b3_all_cooling_is_503_retry_after_the_first_end() -> None:
    """B3: when every member is cooling, 503 with Retry-After the seconds to
    the first cooldown's end, rounded up, at least 1."""
    r = router(member("a", cooldown_ms=2500), member("b", cooldown_ms=4000))
    for name in ("a", "b"):
        r.failed(Lease(r.members[name], "m"), Failure.SERVER, 10.0)
    assert r.acquire("m", 10.0) == Refusal(503, 3)
    assert r.acquire("m", 12.4) == Refusal(503, 1)
    assert lease(r, "m", 12.5).member.name == "a"


def test_b3_some_cooling_rest_full_is_429() -> None:
    """B3: one member cooling and the other full is 429 (a stream ending
    frees room sooner than a cooldown)."""
    r = router(member("a"), member("b", max_streams=1))
    r.failed(Lease(r.members["a"], "m"), Failure.CONNECT, 0.0)
    assert lease(r, "m").member.name == "b"
    assert r.acquire("m", 0.5) == Refusal(429, 1)


def test_b4_failover_and_hedge_exclude_members_and_may_find_none() -> None:
    """B4: excluded members are never chosen; when none is left the answer
    is a refusal, which the caller reads as "no other member"."""
    r = router(member("a"), member("b"), member("c", max_streams=1))
    assert lease(r, "m", exclude=("a", "b")).member.name == "c"
    assert isinstance(r.acquire("m", 0.0, exclude=("a", "b")), Refusal)
    assert isinstance(r.acquire("m", 0.0, exclude=("a", "b", "c")), Refusal)


# -- health ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "timeout", "started", "failure"),
    [
        (None, False, False, Failure.CONNECT),
        (None, True, False, Failure.TIMEOUT),
        (408, False, False, Failure.TIMEOUT),
        (500, False, False, Failure.SERVER),
        (503, False, False, Failure.SERVER),
        (429, False, False, Failure.RATE_LIMITED),
        (400, False, False, Failure.CLIENT),
        (404, False, False, Failure.CLIENT),
        (None, False, True, Failure.BROKEN),
        (None, True, True, Failure.BROKEN),
    ],
)
def test_h1_classify(status: int | None, timeout: bool, started: bool, failure: Failure) -> None:
    """H1: each kind of attempt failure is named as the table says."""
    assert classify(status, timeout=timeout, started=started) is failure


def test_h2_consecutive_failures_back_off_exponentially_up_to_the_cap() -> None:
    """H2: from the cool_after_failures-th consecutive failure, each cools
    the member for cooldown * 2^k, capped at max_cooldown."""
    r = router(member("a", cool_after_failures=2, cooldown_ms=1000, max_cooldown_ms=5000))
    a = r.members["a"]
    x = Lease(a, "m")
    assert r.failed(x, Failure.CONNECT, 0.0) is None
    assert not a.cooling(0.0)
    steps = [(Failure.SERVER, 1.0), (Failure.TIMEOUT, 3.0), (Failure.BROKEN, 8.0)]
    delays = [r.failed(x, f, t) for f, t in [*steps, (Failure.SERVER, 20.0)]]
    assert delays == [1.0, 2.0, 4.0, 5.0]
    assert a.cool_until == 25.0
    assert a.cooling(24.999)
    assert not a.cooling(25.0)


def test_h2_a_cooldown_is_never_shortened() -> None:
    """H2: a failure whose back-off ends before the cooldown under way
    leaves that cooldown as it is."""
    r = router(member("a", cooldown_ms=1000))
    x = Lease(r.members["a"], "m")
    assert r.failed(x, Failure.RATE_LIMITED, 0.0, retry_after=10.0) == 10.0
    assert r.failed(x, Failure.SERVER, 1.0) is None
    assert r.members["a"].cool_until == 10.0


def test_h2_a_429_without_retry_after_counts_as_a_failure() -> None:
    """H2: a 429 that says nothing of when to come back backs off like a 5xx."""
    r = router(member("a", cooldown_ms=1000))
    assert r.failed(Lease(r.members["a"], "m"), Failure.RATE_LIMITED, 0.0) == 1.0
    assert r.members["a"].failures == 1


def test_h3_retry_after_is_the_cooldown_capped_and_counts_nothing() -> None:
    """H3: a 429's Retry-After is the member's cooldown exactly (at most
    max_cooldown), and the failure count does not move."""
    r = router(member("a", max_cooldown_ms=30000))
    a = r.members["a"]
    x = Lease(a, "m")
    assert r.failed(x, Failure.RATE_LIMITED, 100.0, retry_after=2.0) == 2.0
    assert (a.cool_until, a.failures) == (102.0, 0)
    assert r.acquire("m", 101.999) == Refusal(503, 1)
    assert lease(r, "m", 102.0).member is a
    assert r.failed(x, Failure.RATE_LIMITED, 200.0, retry_after=3600.0) == 30.0


def test_h4_a_first_token_or_a_client_error_resets_the_count() -> None:
    """H4: a first token, or a 4xx of the client's, resets the consecutive
    failures; after a cooldown ran out the next failure (the probe's) cools
    the member twice as long, a success does not."""
    r = router(member("a", cooldown_ms=1000))
    a = r.members["a"]
    x = Lease(a, "m")
    r.failed(x, Failure.SERVER, 0.0)
    assert r.failed(x, Failure.SERVER, 1.0) == 2.0
    r.succeeded(x)
    assert a.failures == 0
    assert r.failed(x, Failure.SERVER, 5.0) == 1.0
    r.failed(x, Failure.CLIENT, 6.0)
    assert a.failures == 0
    assert r.failed(x, Failure.CLIENT, 7.0) is None


def test_h5_the_shorthand_member_never_cools() -> None:
    """H5: cool_after_failures = 0 (the one-upstream shorthand): no failure
    and no Retry-After ever cools it, and nothing is counted."""
    r = router(member("a", cool_after_failures=0))
    a = r.members["a"]
    x = Lease(a, "m")
    for failure in (Failure.CONNECT, Failure.SERVER, Failure.TIMEOUT, Failure.BROKEN):
        assert r.failed(x, failure, 0.0) is None
    assert r.failed(x, Failure.RATE_LIMITED, 0.0, retry_after=5.0) is None
    assert (a.failures, a.cool_until) == (0, -math.inf)
    assert lease(r, "m").member is a


# -- failover ------------------------------------------------------------------------


@pytest.mark.parametrize("failure", list(Failure), ids=lambda f: f.value)
def test_f1_which_failures_fail_over_before_the_deadline(failure: Failure) -> None:
    """F1: connect, timeout, 5xx and 429 move the request on, only before its
    first-token deadline; a client 4xx and a broken stream never do."""
    moves = failure in (Failure.CONNECT, Failure.TIMEOUT, Failure.SERVER, Failure.RATE_LIMITED)
    assert fails_over(failure, 1.0, 2.0) is moves
    assert fails_over(failure, 2.0, 2.0) is False


def test_f2_an_attempt_deadline_is_the_members_never_past_the_requests() -> None:
    """F2: an attempt gives up after its member's first_token_timeout (the
    serve option's when unset), never after the request's deadline."""
    r = router(member("fast", first_token_timeout=2.0), member("plain"))
    fast = Lease(r.members["fast"], "m")
    plain = Lease(r.members["plain"], "m")
    assert r.attempt_deadline(fast, 10.0, 60.0, 30.0) == 12.0
    assert r.attempt_deadline(plain, 10.0, 60.0, 30.0) == 40.0
    assert r.attempt_deadline(plain, 10.0, 15.0, 30.0) == 15.0


# -- hedging -----------------------------------------------------------------------------


def test_hedge_after_is_the_groups_option_in_seconds() -> None:
    """A group's hedge_after_ms is returned in seconds; other groups never hedge."""
    r = router(member("a", "x", "y"), groups=(GroupSpec("x", 200.0),))
    assert r.hedge_after("x") == 0.2
    assert r.hedge_after("y") is None


# -- Retry-After -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("2", 2.0),
        (" 1.5 ", 1.5),
        ("-3", 0.0),
        ("soon", None),
        ("inf", None),
        ("Thu, 01 Jan 1970 00:01:40 GMT", 40.0),
        ("Thu, 01 Jan 1970 00:00:10 GMT", 0.0),
    ],
)
def test_retry_after_seconds(value: str | None, seconds: float | None) -> None:
    """Retry-After as delta-seconds or an HTTP date (against the wall clock
    passed in: 60 s here), never negative; unreadable is None."""
    assert retry_after_seconds(value, 60.0) == seconds


def test_h6_a_cooldown_from_another_node_applies_and_never_shortens() -> None:
    """H6: a cooldown learnt from another node keeps the member out here
    until it ends; a shorter one changes nothing, nor does one for an
    unknown member or a member that never cools (the shorthand)."""
    r = router(member("a"), member("b", cool_after_failures=0))
    assert r.cool("a", 5.0) is True
    assert r.acquire("m", 4.9, exclude=("b",)) == Refusal(503, 1)
    assert r.cool("a", 3.0) is False
    assert r.members["a"].cool_until == 5.0
    assert r.members["a"].failures == 0
    assert r.cool("nobody", 9.0) is False
    assert r.cool("b", 9.0) is False
    assert lease(r, "m", 5.0, exclude=("b",)).member.name == "a"


# -- the probe -----------------------------------------------------------------------


def test_p1_a_cooling_member_is_probed_every_interval_from_its_cooldowns_start() -> None:
    """P1: a member with probe = true is due one probe_interval_ms after its
    cooldown began, then once per interval while it cools; never while it
    does not cool, and never without probe = true."""
    r = router(member("a", probe=True, probe_interval_ms=500.0, cooldown_ms=10_000.0),
               member("b", cooldown_ms=10_000.0))  # fmt: skip
    assert r.probes_due(0.0) == []
    assert r.next_probe_at(0.0) == math.inf
    r.failed(lease(r, "m", 1.0, exclude=("b",)), Failure.SERVER, 1.0)
    r.failed(lease(r, "m", 1.0, exclude=("a",)), Failure.SERVER, 1.0)
    assert r.next_probe_at(1.0) == 1.5
    assert r.probes_due(1.4) == []
    assert r.probes_due(1.5) == ["a"]  # b has no probe
    assert r.probes_due(1.9) == []
    assert r.next_probe_at(1.9) == 2.0
    assert r.probes_due(2.0) == ["a"]
    assert r.probes_due(11.0) == []  # the cooldown ran out: nothing to probe
    assert r.next_probe_at(11.0) == math.inf


def test_p2_an_answered_probe_ends_the_cooldown_and_resets_the_failures() -> None:
    """P2: an answered probe of a cooling member opens it at once, with its
    failure count back to 0 (the next failure cools it for cooldown_ms, not
    twice that); answered after the cooldown ran out, it changes nothing."""
    r = router(member("a", probe=True, cooldown_ms=1000.0))
    r.failed(lease(r, "m", 0.0), Failure.CONNECT, 0.0)
    r.failed(lease(r, "m", 1.0), Failure.CONNECT, 1.0)  # cools 2 s, until 3.0
    assert r.members["a"].failures == 2
    assert r.acquire("m", 2.0) == Refusal(503, 1)
    assert r.probed("a", True, 2.0) is True
    assert r.members["a"].failures == 0
    assert lease(r, "m", 2.0).member.name == "a"
    assert r.failed(lease(r, "m", 2.5), Failure.CONNECT, 2.5) == 1.0
    assert r.probed("a", True, 9.0) is False  # not cooling any more


def test_p3_a_failed_probe_changes_nothing() -> None:
    """P3: a probe that failed leaves the cooldown and the failure count as
    they were; the cooldown still runs out by itself."""
    r = router(member("a", probe=True, cooldown_ms=1000.0))
    r.failed(lease(r, "m", 0.0), Failure.CONNECT, 0.0)
    assert r.probed("a", False, 0.5) is False
    assert r.members["a"].cool_until == 1.0
    assert r.members["a"].failures == 1
    assert lease(r, "m", 1.0).member.name == "a"


def test_h6_p2_the_shared_copy_of_a_cooldown_a_probe_ended_is_not_taken_back() -> None:
    """H6 with P2: after a probe ended a cooldown here, the same cooldown
    read back from the shared state (within CLEARED_SLACK of its end) does
    not cool the member again; a later one, from a new failure elsewhere, does."""
    r = router(member("a", probe=True, cooldown_ms=5000.0))
    r.failed(lease(r, "m", 0.0), Failure.SERVER, 0.0)  # until 5.0
    assert r.probed("a", True, 1.0) is True
    assert r.cool("a", 5.3) is False  # the heartbeat's copy of it
    assert lease(r, "m", 1.2).member.name == "a"
    assert r.cool("a", 9.0) is True
    assert r.acquire("m", 2.0) == Refusal(503, 7)
