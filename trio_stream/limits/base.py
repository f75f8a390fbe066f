"""Per-key limits: one interface, an in-process and a Redis backend.

A key of the configuration file (:mod:`trio_stream.limits.keys`) may carry
limits -- requests and tokens per minute, concurrent streams, a token budget
per day or month.  Every node of a cluster must enforce them *together*: a
key with ``rpm = 60`` gets 60 requests a minute from the whole cluster, not
60 from each node.  This module states what every backend promises, once, as
the interface :class:`Limiter`; the in-process backend
(:mod:`trio_stream.limits.local`, one process) and the Redis backend
(:mod:`trio_stream.limits.redis`, cluster mode) implement it, and one
contract suite (``tests/test_limits_contract.py``) runs against both.

The window.  Requests and tokens are counted in a sliding window of
``window`` seconds (60: "per minute") made of 60 buckets of ``window / 60``
seconds (1 s) on the backend's own clock (Redis's ``TIME`` in cluster mode,
so that the nodes' clocks do not matter).  What was counted in a bucket
leaves the window when that bucket is 60 buckets old.

Guarantees every backend gives:

L1 (requests)  :meth:`Limiter.admit` is atomic across every node: in any
               window, at most ``rpm`` requests of a key are admitted, and a
               request is refused for its rate only when ``rpm`` were
               admitted in the window -- so N nodes together admit exactly
               the limit.  A refused request counts nothing.
L2 (tokens)    A request is admitted only while the tokens charged to its
               key in the window are below ``tpm``.  :meth:`Limiter.charge`
               is never refused: a stream in progress is never cut by its
               own tokens; the key's *next* request waits for the window.
L3 (streams)   At most ``max_streams`` slots of a key are held at once;
               :meth:`Limiter.release` (or :meth:`Limiter.charge` given
               it) frees a slot by its own id and is idempotent.  A slot
               whose node died (it stopped renewing it) is freed after
               :data:`SLOT_LEASE` seconds.
L4 (budget)    A key whose tokens charged in the current UTC day (or month)
               reached its budget is refused (``budget``) until the period
               ends; the charges of both periods are kept whatever the
               key's current setting, so a reload does not reset them.
L5 (retry)     A refusal for requests or tokens says after how long the
               window will have room (``retry_after``), exact to within one
               bucket: a request retried then is admitted if nothing else
               was admitted or charged meanwhile.
L6 (state)     Each verdict carries the key's window state as OpenAI's
               ``x-ratelimit-*`` headers say it: limit, remaining, and the
               time until the window is empty again (``reset``).
L7 (usage)     :meth:`Limiter.usage` returns what was charged, per UTC day
               (the last :data:`USAGE_DAYS`) and model.

Refusal order, when several limits are hit at once: ``budget`` (no retry
helps), ``requests``, ``tokens``, ``streams``.

A backend that cannot reach its store raises :class:`LimitsUnavailable`
within :data:`CALL_TIMEOUT`; the HTTP layer then refuses (503) or admits
according to ``limits_on_outage``.  No call waits longer.
"""

from __future__ import annotations

import abc
import datetime
from dataclasses import dataclass

import trio

from ..errors import TrioStreamError

#: How long a Redis call may take before it is :class:`LimitsUnavailable`
#: (the same bound as the shared state's calls).
CALL_TIMEOUT = 2.0
#: Seconds a stream slot outlives its last renewal (a dead node's slots).
SLOT_LEASE = 30.0
#: How often a node renews the stream slots it holds.
SLOT_RENEW = SLOT_LEASE / 3
#: Days of usage kept and returned by :meth:`Limiter.usage`.
USAGE_DAYS = 31
#: Buckets per window.
BUCKETS = 60

#: The refusal reasons, in the order they are checked.
REFUSALS = ("budget", "requests", "tokens", "streams")


class LimitsUnavailable(TrioStreamError):
    """The limits' store cannot be reached now (``limits_on_outage`` decides)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """A key's limits; ``None`` is unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    max_streams: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    @property
    def limited(self) -> bool:
        """Does any limit apply (then the key's answers carry the headers)?"""
        return any(
            v is not None
            for v in (self.rpm, self.tpm, self.max_streams, self.tokens_per_day,
                      self.tokens_per_month)
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Window:
    """One rate of a key, as the ``x-ratelimit-*`` headers say it (L6)."""

    limit: int
    remaining: int
    reset: float  # seconds until the window is empty again


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :meth:`Limiter.admit` decided."""

    refused: str | None  # None: admitted; else one of REFUSALS
    retry_after: float  # seconds (L5); 0 unless refused for requests or tokens
    requests: Window | None  # None when the key has no rpm
    tokens: Window | None  # None when the key has no tpm

    @property
    def admitted(self) -> bool:
        return self.refused is None


@dataclass(frozen=True, slots=True)
class UsageRow:
    """What a key was charged on one UTC day for one model (L7)."""

    day: str  # YYYY-MM-DD
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


def utc_day(wall: float) -> str:
    """The UTC day of a wall-clock time, ``YYYY-MM-DD``."""
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).strftime("%Y-%m-%d")


class Limiter(abc.ABC):
    """Admission, charges, stream slots and usage of limited keys.

    ``window`` is the length of the rate window in seconds (60 in service;
    the tests shorten it).

    Cancellation: every method is cancellable; one cancelled mid-way leaves
    the limits as if it had either happened or not (each write is one atomic
    step of the backend).  A ``Cancelled`` after :meth:`admit` landed but
    before its caller saw it leaves a slot held: the caller releases its slot
    id in a ``finally`` whatever :meth:`admit` did (:meth:`release` of a slot
    not held is a no-op).
    """

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self.bucket = window / BUCKETS

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work (renewing stream slots) until cancelled.

        Cancellation: runs until cancelled; a ``Cancelled`` stops it and
        leaves the store as it was (slots then expire after :data:`SLOT_LEASE`).
        """
        task_status.started()
        await trio.sleep_forever()

    @abc.abstractmethod
    async def admit(self, name: str, limits: Limits, slot: str) -> Verdict:
        """L1-L6: admit one request of key ``name`` or refuse it.  Admitted,
        it counts in the request window and, when the key has
        ``max_streams``, holds the stream slot ``slot`` until
        :meth:`release`.

        Cancellation: see the class (atomic).
        """

    @abc.abstractmethod
    async def release(self, name: str, slot: str) -> None:
        """L3: free the stream slot ``slot`` (a no-op if not held).

        Cancellation: see the class (atomic).
        """

    @abc.abstractmethod
    async def charge(
        self, name: str, model: str, prompt: int, completion: int, *, requests: int = 0,
        release: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        """L2, L4, L7: add tokens (and requests, for usage) to the key's
        window, budget and usage.  Never refused; amounts may be negative (a
        correction when the upstream's usage is below what was counted).
        ``release``: stream slots of the key to free in the same step, as
        :meth:`release` would (a run's last charge frees its slot: one
        call for both).

        Cancellation: see the class (atomic).
        """

    @abc.abstractmethod
    async def peek(self, name: str, limits: Limits) -> Verdict:
        """The key's state now, as :meth:`admit` would report it, counting
        nothing and holding no slot (``refused`` says what :meth:`admit`
        would refuse).

        Cancellation: see the class (a read).
        """

    @abc.abstractmethod
    async def usage(self, name: str) -> list[UsageRow]:
        """L7: the key's usage by UTC day (newest first) and model.

        Cancellation: see the class (a read).
        """
