"""Which upstream member serves a request: routing, balancing, health, failover (sans-IO).

The members and their groups come from
:class:`~trio_stream.config.members.Upstreams`.  :class:`Router` holds each
member's state -- streams in flight, consecutive failures, the end of its
cooldown -- and makes every decision; the trio layer
(:mod:`trio_stream.runs`) only does what it says.  Time is passed in
(``now``, seconds on any monotonic clock), nothing here reads a clock, and the
one random choice takes a seedable :class:`random.Random`: the tests are
synchronous and exact.

Routing (``model`` -> group):

====  ==========================================================================
R1    The members whose ``models`` name ``model`` are its group; only if none
      does, the members listing ``"*"`` are.  No member at all:
      :class:`UnknownModel` (answered 404 ``model_not_found``).
R2    Each member is sent the model under its own name (``ModelName.upstream``;
      a ``"*"`` member, the name asked for).
====  ==========================================================================

Choosing a member (:meth:`Router.acquire`; ``exclude``: those this request
already tried or has in flight):

====  ==========================================================================
B1    Candidates: the group minus ``exclude``.  A member is *cooling* while
      ``now < cool_until``, *full* while ``in_flight >= max_streams``, *open*
      when neither.
B2    Among the open candidates, the least ``(in_flight + 1) / weight`` (the
      load it would have); a tie is broken by the random source.  Acquiring
      adds one to its ``in_flight``; :meth:`Router.release` takes it back
      (once, however often it is called).
B3    No open candidate, on a request's first choice: some candidate is not
      cooling (all of those are full) -> 429 ``upstreams_busy``, ``Retry-After:
      1``; every candidate is cooling -> 503 ``upstreams_cooling_down``,
      ``Retry-After`` the seconds to the first one's end (rounded up, >= 1).
B4    No open candidate on a failover or a hedge: no member (the request ends
      with the error it had; no hedge is started).
====  ==========================================================================

Health (:meth:`Router.failed`, :meth:`Router.succeeded`):

====  ==========================================================================
H1    :func:`classify` names a failure: ``CONNECT`` (no HTTP answer: refused,
      reset, bad framing), ``TIMEOUT`` (connect or first-token deadline, or
      HTTP 408; the request's own first-token deadline counts too),
      ``SERVER`` (5xx), ``RATE_LIMITED`` (429), ``CLIENT`` (any other 4xx),
      ``BROKEN`` (the stream failed, or went silent past its token timeout,
      after its first token).
H2    ``CONNECT``, ``TIMEOUT``, ``SERVER``, ``BROKEN`` and a 429 without
      ``Retry-After`` add one to the member's consecutive failures; from the
      ``cool_after_failures``-th on, each puts it in cooldown for
      ``min(cooldown * 2 ** (failures - cool_after_failures), max_cooldown)``
      (never shortening a cooldown under way).
H3    A 429 with ``Retry-After`` cools the member for exactly that long (at
      most ``max_cooldown``); its failure count is unchanged.
H4    A first token, or a ``CLIENT`` answer (the member is up; the request was
      at fault), resets the consecutive failures to 0.  A cooldown under way
      runs out by itself; the next request to it after that is the probe: a
      failure cools it again, twice as long.
H5    ``cool_after_failures = 0`` (the one-upstream shorthand): the member
      never cools down; H2 and H3 count nothing.
H6    A cooldown another node started (cluster mode, :meth:`Router.cool`)
      applies here too, never shortening one under way, nor one that ends no
      later than :data:`CLEARED_SLACK` after the last cooldown a probe ended
      here (P2: that is the shared copy of the same cooldown, read back with
      the heartbeat's delay); the failure count is each node's own.
====  ==========================================================================

The probe (a member with ``probe = true``; :meth:`Router.probes_due`,
:meth:`Router.probed`):

====  ==========================================================================
P1    A cooling member is probed (``GET {url}/models``) every
      ``probe_interval_ms``, the first one that long after its cooldown began
      here (a cooldown learnt from another node: at the next round).  A
      member not cooling is never probed.
P2    A probe answered (2xx, while it still cools) ends the cooldown at once
      and resets the consecutive failures (H4): the member is open again.
P3    A failed probe changes nothing: the cooldown runs out by itself, or
      the next probe ends it.
====  ==========================================================================

Failover before the first token (:func:`fails_over`):

====  ==========================================================================
F1    ``CONNECT``, ``TIMEOUT``, ``SERVER``, ``RATE_LIMITED`` move the request to
      the next member (B4), if ``now`` is before the request's first-token
      deadline; ``CLIENT`` is the client's, answered as the upstream gave it;
      after the first token (``BROKEN``) nothing is retried.
F2    An attempt's own deadline is the member's ``first_token_timeout`` from its
      start, never past the request's (:meth:`Router.attempt_deadline`).
====  ==========================================================================

Hedging: a group with ``hedge_after_ms`` starts a second member (B4's
choice, excluding the first) if the first has sent no token that long after
its start (:meth:`Router.hedge_after`); the first token wins.

This module never imports trio.
"""

from __future__ import annotations

import email.utils
import enum
import math
import random
from collections.abc import Collection
from dataclasses import dataclass, field

from ..config.members import ANY_MODEL, MemberSpec, Upstreams


class UnknownModel(Exception):
    """R1: no member serves ``model``."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


class Failure(enum.Enum):
    CONNECT = "connect"
    TIMEOUT = "timeout"
    SERVER = "server"
    RATE_LIMITED = "rate_limited"
    CLIENT = "client"
    BROKEN = "broken"


#: H6: seconds within which a shared cooldown is the one a probe ended here.
CLEARED_SLACK = 1.0

#: F1: the failures before the first token that move a request on.
FAILS_OVER = frozenset({Failure.CONNECT, Failure.TIMEOUT, Failure.SERVER, Failure.RATE_LIMITED})


def classify(status: int | None, *, timeout: bool = False, started: bool = False) -> Failure:
    """H1: the failure of an attempt that got HTTP ``status`` (``None``: no
    answer), timed out (``timeout``), or broke after its first token (``started``)."""
    if started:
        return Failure.BROKEN
    if timeout or status == 408:
        return Failure.TIMEOUT
    if status is None:
        return Failure.CONNECT
    if status == 429:
        return Failure.RATE_LIMITED
    if status >= 500:
        return Failure.SERVER
    return Failure.CLIENT


def fails_over(failure: Failure, now: float, deadline: float) -> bool:
    """F1: does ``failure`` move the request to another member?"""
    return failure in FAILS_OVER and now < deadline


def retry_after_seconds(value: str | None, now_epoch: float) -> float | None:
    """A ``Retry-After`` header's delay: delta-seconds or an HTTP date
    (``now_epoch``: the wall clock, for the date); ``None`` if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - now_epoch
    return max(seconds, 0.0) if math.isfinite(seconds) else None


@dataclass(slots=True)
class Member:
    """A member's state.  ``cool_until``: the end of its cooldown (-inf: none)."""

    spec: MemberSpec
    in_flight: int = 0
    failures: int = 0
    cool_until: float = -math.inf
    #: P1: when it may be probed next.
    next_probe: float = -math.inf
    #: H6/P2: the end of the last cooldown a probe ended.
    cleared_until: float = -math.inf

    @property
    def name(self) -> str:
        return self.spec.name

    def cooling(self, now: float) -> bool:
        return now < self.cool_until

    def full(self) -> bool:
        limit = self.spec.max_streams
        return limit is not None and self.in_flight >= limit

    def load(self) -> float:
        """B2: its load with one more stream."""
        return (self.in_flight + 1) / self.spec.weight


@dataclass(slots=True, eq=False)
class Lease:
    """One stream on ``member``, sent ``model`` (R2).  Held until released."""

    member: Member
    model: str
    released: bool = field(default=False)


@dataclass(frozen=True, slots=True)
class Refusal:
    """B3/B4: no member could take the request.  ``status`` 429 (all full) or
    503 (all cooling), ``retry_after`` in whole seconds."""

    status: int
    retry_after: int


class Router:
    """The members' state and every routing decision (see the module's rules)."""

    def __init__(self, upstreams: Upstreams, rng: random.Random | None = None) -> None:
        self.upstreams = upstreams
        self.members = {m.name: Member(m) for m in upstreams.members}
        self.rng = rng if rng is not None else random.Random()
        named: dict[str, list[Member]] = {}
        for member in self.members.values():
            for m in member.spec.models:
                if m.name != ANY_MODEL:
                    named.setdefault(m.name, []).append(member)
        self._named = named
        self._any = [m for m in self.members.values() if m.spec.serves_any]

    # -- routing -------------------------------------------------------------
    def group(self, model: str) -> list[Member]:
        """R1: the members serving ``model``.  Raises :class:`UnknownModel`."""
        group = self._named.get(model) or self._any
        if not group:
            raise UnknownModel(model)
        return group

    def named_models(self) -> list[str]:
        """The model names the members list (not ``"*"``), sorted."""
        return sorted(self._named)

    def any_members(self) -> list[Member]:
        """The members that serve any model not named (``"*"``)."""
        return list(self._any)

    def hedge_after(self, model: str) -> float | None:
        """Seconds after which a request for ``model`` is hedged (``None``: never)."""
        ms = self.upstreams.group(model).hedge_after_ms
        return None if ms is None else ms / 1000

    # -- choosing ----------------------------------------------------------------
    def acquire(self, model: str, now: float, exclude: Collection[str] = ()) -> Lease | Refusal:
        """B1-B4: a lease on the member to use, or why there is none.

        ``exclude`` non-empty (a failover or a hedge): a refusal only means
        "no other member" (B4).  Raises :class:`UnknownModel` (R1).
        """
        candidates = [m for m in self.group(model) if m.name not in exclude]
        open_ = [m for m in candidates if not m.cooling(now) and not m.full()]
        if not open_:
            if not candidates or any(not m.cooling(now) for m in candidates):
                return Refusal(429, 1)
            first_end = min(m.cool_until for m in candidates)
            return Refusal(503, max(1, math.ceil(first_end - now)))
        least = min(m.load() for m in open_)
        best = [m for m in open_ if m.load() == least]
        member = best[0] if len(best) == 1 else self.rng.choice(best)
        member.in_flight += 1
        name = member.spec.upstream_model(model)
        assert name is not None
        return Lease(member, name)

    def release(self, lease: Lease) -> None:
        """B2: the lease's stream ended.  Idempotent."""
        if not lease.released:
            lease.released = True
            lease.member.in_flight -= 1

    def attempt_deadline(self, lease: Lease, now: float, deadline: float, default: float) -> float:
        """F2: when an attempt started ``now`` gives up waiting for its first
        token (``default``: ``--first-token-timeout``)."""
        own = lease.member.spec.first_token_timeout
        return min(deadline, now + (default if own is None else own))

    # -- health --------------------------------------------------------------
    def succeeded(self, lease: Lease) -> None:
        """H4: the member sent a first token."""
        lease.member.failures = 0

    def cool(self, name: str, until: float) -> bool:
        """H6: ``name`` cools down until ``until`` (learnt from another node);
        False if that changes nothing (an unknown member, a longer cooldown)."""
        member = self.members.get(name)
        if member is None or member.spec.cool_after_failures == 0:
            return False
        if until <= member.cool_until or until <= member.cleared_until + CLEARED_SLACK:
            return False
        member.cool_until = until
        return True

    # -- the probe -----------------------------------------------------------------
    def probes_due(self, now: float) -> list[str]:
        """P1: the members to probe now (each then not again for its interval)."""
        due = []
        for member in self.members.values():
            spec = member.spec
            if spec.probe and member.cooling(now) and now >= member.next_probe:
                member.next_probe = now + spec.probe_interval_ms / 1000
                due.append(member.name)
        return due

    def next_probe_at(self, now: float) -> float:
        """P1: when :meth:`probes_due` may next return a member (``inf``: not
        until a member starts cooling)."""
        return min(
            (max(m.next_probe, now) for m in self.members.values()
             if m.spec.probe and m.cooling(now)),
            default=math.inf,
        )  # fmt: skip

    def probed(self, name: str, answered: bool, now: float) -> bool:
        """P2/P3: a probe of ``name`` was ``answered`` (or failed); True if
        that brought the member back."""
        member = self.members[name]
        if not answered or not member.cooling(now):
            return False
        member.cleared_until = member.cool_until
        member.cool_until = -math.inf
        member.failures = 0
        return True

    def failed(
        self, lease: Lease, failure: Failure, now: float, retry_after: float | None = None
    ) -> float | None:
        """H2-H5: record ``failure``; the cooldown it started (seconds), if any."""
        member = lease.member
        spec = member.spec
        if failure is Failure.CLIENT:
            member.failures = 0
            return None
        if spec.cool_after_failures == 0:
            return None
        cap = spec.max_cooldown_ms / 1000
        if failure is Failure.RATE_LIMITED and retry_after is not None:
            delay = min(retry_after, cap)
        else:
            member.failures += 1
            beyond = member.failures - spec.cool_after_failures
            if beyond < 0:
                return None
            delay = min(spec.cooldown_ms / 1000 * 2.0 ** min(beyond, 64), cap)
        until = now + delay
        if until <= member.cool_until:
            return None
        if not member.cooling(now):  # P1: a new cooldown's first probe
            member.next_probe = now + spec.probe_interval_ms / 1000
        member.cool_until = until
        return delay
