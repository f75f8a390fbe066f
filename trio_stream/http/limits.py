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

from ..errors import ApiError
from ..limits.base import Verdict
from ..limits.headers import rate_headers
from ..limits.keys import KeyDef


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
