"""The HTTP answers of per-key limits (docs/api.md section 2.2).

A refusal is a 429 in OpenAI's shape: ``rate_limit_exceeded`` (type
``requests`` or ``tokens``) with ``retry-after``; ``too_many_streams`` for a
key's ``max_streams``; ``insufficient_quota`` for a spent budget, with
``x-should-retry: false`` (no wait helps; the official SDKs then do not
retry).  Every one carries the key's ``x-ratelimit-*`` headers.  A limits
store that cannot be reached, with ``limits_on_outage = "closed"``, is 503
``limits_unavailable``.  A model the key may not use is 404
``model_not_found``, as OpenAI answers it.
"""

from __future__ import annotations

import itertools
import math
import secrets
from typing import Any

import trio
from prometheus_client import Counter

from ..errors import ApiError
from ..limits.base import CALL_TIMEOUT, Limiter, LimitsUnavailable, UsageRow, Verdict
from ..limits.headers import RateHeaders, rate_headers
from ..limits.keys import KeyDef
from ..limits.meter import NO_METER, Charger, Meter
from ..logs import EventLogger
from ..metrics import Metrics
from ..runs import Run
from ..wire.usage import estimate_prompt
from .asgi import AsgiMessage, Send

#: Seconds after a failed call to the limits' store during which answers
#: carry no ``x-ratelimit-*`` headers rather than ask it again.
QUIET = 1.0


def refusal(key: KeyDef, verdict: Verdict) -> ApiError:
    """The 429 of a refused verdict."""
    headers = rate_headers(verdict)
    limits = key.limits
    if verdict.refused == "budget":
        period = "day" if limits.tokens_per_day is not None else "month"
        return ApiError(
            429, "insufficient_quota",
            f"Key {key.name!r} has used its token budget for this {period}.",
            "insufficient_quota", (*headers, (b"x-should-retry", b"false")),
        )  # fmt: skip
    if verdict.refused == "streams":
        return ApiError(
            429, "rate_limit_error",
            f"Too many concurrent streams for key {key.name!r} (limit {limits.max_streams}).",
            "too_many_streams", (*headers, (b"retry-after", b"1")),
        )  # fmt: skip
    kind, unit, limit = (
        ("requests", "RPM", limits.rpm) if verdict.refused == "requests"
        else ("tokens", "TPM", limits.tpm)
    )  # fmt: skip
    return ApiError(
        429, kind,
        f"Rate limit reached for key {key.name!r} on {kind} per min ({unit}): limit {limit}. "
        f"Please try again in {verdict.retry_after:.3g}s.",
        "rate_limit_exceeded", headers,
    )  # fmt: skip


def usage_row(row: UsageRow) -> dict[str, object]:
    """One row of ``GET /v1/usage``."""
    return {
        "day": row.day, "model": row.model, "requests": row.requests,
        "prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens,
        "total_tokens": row.prompt_tokens + row.completion_tokens,
    }  # fmt: skip


def limits_unavailable() -> ApiError:
    """503: the limits' store cannot be reached and the outage setting is closed."""
    return ApiError(
        503, "unavailable_error", "Rate limits cannot be checked now, retry shortly.",
        "limits_unavailable", ((b"retry-after", b"1"),),
    )  # fmt: skip


def model_not_allowed(model: str) -> ApiError:
    return ApiError(
        404, "invalid_request_error",
        f"The model {model!r} does not exist or you do not have access to it.",
        "model_not_found",
    )  # fmt: skip


class KeyLimits:
    """The service's side of per-key limits: admission, metering, metrics.

    ``closed``: with the limits' store unreachable, refuse (503) rather than
    admit unchecked (``limits_on_outage``).
    """

    def __init__(
        self, limiter: Limiter, *, closed: bool, metrics: Metrics, logger: EventLogger
    ) -> None:
        self.limiter = limiter
        self.closed = closed
        self.logger = logger
        r = metrics.registry
        self.decisions = Counter(
            "trio_stream_key_requests", "Requests of limited keys by key name and decision.",
            ["key", "decision"], registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "trio_stream_key_tokens", "Tokens charged to limited keys by key name and kind.",
            ["key", "kind"], registry=r,
        )  # fmt: skip
        self.charger = Charger(limiter, self._charge_failed, self._charged)
        self._token_counters: dict[str, tuple[Any, Any]] = {}  # key -> prompt, completion
        self._admitted: dict[str, Any] = {}  # key -> its "admitted" counter
        self._anonymous = Admission(self, None)  # shared: it holds no state
        # Stream slot ids: unique across nodes by this process's prefix.
        self._slot_ids = map(f"st_{secrets.token_hex(6)}_{{}}".format, itertools.count())
        self._quiet_until = -math.inf

    def _charge_failed(self, error: str) -> None:
        self.logger.event("limits_unavailable", step="charge", error=error)

    def _charged(self, name: str, prompt: int, completion: int) -> None:
        counters = self._token_counters.get(name)
        if counters is None:  # labels() costs a lookup under a lock: once per key
            counters = self.tokens.labels(name, "prompt"), self.tokens.labels(name, "completion")
            self._token_counters[name] = counters
        counters[0].inc(max(0, prompt))
        counters[1].inc(max(0, completion))

    def admission(self, key: KeyDef | None, model: str) -> Admission:
        """``async with limits.admission(key, model) as admitted: ...``:
        admit one stream of ``key`` (404 for a model it may not use, 429 when
        refused, 503 when the store is down and the setting is closed), hold
        its stream slot for the block; ``admitted.headers`` are its
        ``x-ratelimit-*`` headers, ``admitted.meter(run)`` its run's meter.
        An ``--api-key`` key (``None``) costs nothing; a key without limits
        only its meter."""
        if key is None:
            return self._anonymous
        if not key.allows(model):
            self.decisions.labels(key.name, "model").inc()
            raise model_not_allowed(model)
        return Admission(self, key)

    def meter(self, key: KeyDef | None, run: Run, slot: str | None = None) -> Meter:
        """The meter of ``run``, of ``key`` (every ``[[key]]`` key's usage is
        kept; an ``--api-key`` key's is not), which frees the stream slot
        ``slot`` with the run's last charge.  Charged from now on: the run
        must be driven (its cleanup settles the meter)."""
        if key is None:
            return NO_METER
        lim = key.limits
        urgent = any(v is not None for v in (lim.tpm, lim.tokens_per_day, lim.tokens_per_month))
        model, prompt = run.request.model, estimate_prompt(run.request.messages)
        return Meter(
            self.charger, key.name, model, prompt, count=lambda: run.log.last_seq, urgent=urgent,
            release=slot,
        )  # fmt: skip

    def _unavailable(self) -> None:
        """The store just failed a call: for :data:`QUIET` seconds,
        :meth:`headers` does not ask it (an answer never waits twice for a
        store that does not answer)."""
        self._quiet_until = trio.current_time() + QUIET

    async def headers(self, key: KeyDef | None) -> RateHeaders:
        """The key's ``x-ratelimit-*`` headers now (for an answer that was
        not admitted with them); none for a key without a rate, and none
        while the store is unreachable or failed a call less than
        :data:`QUIET` seconds ago.

        Cancellation: a checkpoint for a key with a rate (unless quiet); a read.
        """
        if key is None or (key.limits.rpm is None and key.limits.tpm is None):
            return ()
        if trio.current_time() < self._quiet_until:
            return ()
        try:
            verdict = await self.limiter.peek(key.name, key.limits)
        except LimitsUnavailable:
            self._unavailable()
            return ()
        return rate_headers(Verdict(None, 0.0, verdict.requests, verdict.tokens))


class RatedSend:
    """An ASGI ``send`` that adds a key's ``x-ratelimit-*`` headers to the
    answer's head when it has none (an admitted stream's and a refusal's
    head already carry those of their verdict).  Built by
    :meth:`~trio_stream.http.service.Service.rated` for every request of a
    key with a rate, whatever its route.

    Cancellation: a ``Cancelled`` while it reads the key's state leaves the
    head unsent, as a ``Cancelled`` in ``send`` itself would.
    """

    __slots__ = ("_key", "_limits", "_send")

    def __init__(self, send: Send, limits: KeyLimits, key: KeyDef) -> None:
        self._send = send
        self._limits = limits
        self._key = key

    async def __call__(self, message: AsgiMessage) -> None:
        if message["type"] == "http.response.start":
            headers = message.get("headers", ())
            if not any(name.startswith(b"x-ratelimit-") for name, _ in headers):
                extra = await self._limits.headers(self._key)
                if extra:
                    message = {**message, "headers": [*headers, *extra]}
        await self._send(message)


class Admission:
    """One admitted stream of a key: its ``x-ratelimit-*`` headers, its
    slot (released on exit, or with its run's last charge), its meter.  The
    admission of an ``--api-key`` key (``key`` None) holds nothing and is
    shared."""

    __slots__ = ("_key", "_limits", "_slot", "headers")

    def __init__(self, limits: KeyLimits, key: KeyDef | None) -> None:
        self._limits = limits
        self._key = key
        self._slot: str | None = None
        self.headers: RateHeaders = ()

    def meter(self, run: Run) -> Meter:
        """The meter of the admitted ``run``: it frees the slot with the
        run's last charge (:meth:`KeyLimits.meter`)."""
        return self._limits.meter(self._key, run, self._slot)

    async def __aenter__(self) -> Admission:
        """Cancellation: a checkpoint (the limiter's call) for a limited
        key.  A ``Cancelled`` releases whatever slot the call may have taken
        (shielded, bounded) before it propagates."""
        limits, key = self._limits, self._key
        if key is None or not key.limits.limited:
            return self
        self._slot = next(limits._slot_ids)
        try:
            verdict = await limits.limiter.admit(key.name, key.limits, self._slot)
        except LimitsUnavailable as exc:
            self._slot = None
            limits._unavailable()
            limits.logger.event("limits_unavailable", step="admit", key=key.name, error=str(exc))
            limits.decisions.labels(
                key.name, "outage_closed" if limits.closed else "outage_open"
            ).inc()
            if limits.closed:
                raise limits_unavailable() from exc
            return self
        except BaseException:
            await self._release()
            raise
        if not verdict.admitted:
            self._slot = None
            limits.decisions.labels(key.name, verdict.refused or "").inc()
            raise refusal(key, verdict)
        admitted = limits._admitted.get(key.name)
        if admitted is None:
            admitted = limits._admitted[key.name] = limits.decisions.labels(key.name, "admitted")
        admitted.inc()
        self.headers = rate_headers(verdict)
        if key.limits.max_streams is None:
            self._slot = None  # none was taken: nothing to release
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Cancellation: the release is shielded and bounded; a ``Cancelled``
        never interrupts it."""
        await self._release()

    async def _release(self) -> None:
        slot, self._slot = self._slot, None
        if slot is None or self._key is None:
            return
        with trio.CancelScope(shield=True) as cs:
            cs.deadline = trio.current_time() + CALL_TIMEOUT + 0.5
            try:
                await self._limits.limiter.release(self._key.name, slot)
            except LimitsUnavailable as exc:  # the slot's lease expires by itself
                self._limits.logger.event(
                    "limits_unavailable", step="release", key=self._key.name, error=str(exc)
                )
