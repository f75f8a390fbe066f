"""OpenAI's rate-limit headers for a verdict, as pure functions.

Every answer to a limited key carries, for each rate the key has::

    x-ratelimit-limit-requests      rpm
    x-ratelimit-remaining-requests  what is left in the window (after this request)
    x-ratelimit-reset-requests      until the window is empty again: "1s", "6m0s", "20ms"

and their ``-tokens`` twins for ``tpm``.  A refusal for requests or tokens
adds ``retry-after`` (whole seconds, rounded up: the official SDKs honour
it) and ``retry-after-ms``.  Never imports trio.
"""

from __future__ import annotations

import math

from .base import Verdict, Window

RateHeaders = tuple[tuple[bytes, bytes], ...]


def duration(seconds: float) -> str:
    """OpenAI's duration format: ``20ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole, rest = divmod(round(seconds, 3), 60)
    hours, minutes = divmod(int(whole), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def _window(kind: str, window: Window) -> RateHeaders:
    return (
        (b"x-ratelimit-limit-" + kind.encode(), str(window.limit).encode()),
        (b"x-ratelimit-remaining-" + kind.encode(), str(window.remaining).encode()),
        (b"x-ratelimit-reset-" + kind.encode(), duration(window.reset).encode()),
    )


def rate_headers(verdict: Verdict) -> RateHeaders:
    """The ``x-ratelimit-*`` headers of a verdict, and ``retry-after`` on a
    refusal for requests or tokens."""
    headers: RateHeaders = ()
    if verdict.requests is not None:
        headers += _window("requests", verdict.requests)
    if verdict.tokens is not None:
        headers += _window("tokens", verdict.tokens)
    if verdict.retry_after > 0:
        headers += (
            (b"retry-after", str(math.ceil(verdict.retry_after)).encode()),
            (b"retry-after-ms", str(math.ceil(verdict.retry_after * 1000)).encode()),
        )
    return headers
