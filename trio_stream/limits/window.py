"""The sliding window and the admission decision, as pure functions.

The in-process backend calls these; the Redis backend's scripts
(:mod:`trio_stream.limits.redis`) do the same arithmetic in Lua, and the
contract suite checks that both decide alike.  Never imports trio.
"""

from __future__ import annotations

import math

from .base import BUCKETS, Limits, Verdict, Window


def bucket_of(now: float, bucket: float) -> int:
    """The index of the bucket ``now`` falls in."""
    return math.floor(now / bucket)


def live(counts: dict[int, int], current: int) -> list[tuple[int, int]]:
    """Drop the buckets that left the window (in place); the rest, oldest first."""
    first = current - (BUCKETS - 1)
    for idx in [i for i in counts if i < first]:
        del counts[idx]
    return sorted(counts.items())


def window_state(
    items: list[tuple[int, int]], limit: int, now: float, bucket: float, *, add: int = 0
) -> tuple[Window, float]:
    """The window of ``limit`` with ``add`` more counted in the current
    bucket, and how long until it has room for one more (0: it has).

    Room means the count is below the limit.  What is counted in bucket
    ``i`` leaves at ``(i + BUCKETS) * bucket``.
    """
    total = sum(n for _, n in items)
    retry = 0.0
    if total >= limit:
        left = total
        for idx, n in items:
            left -= n
            if left < limit:
                retry = (idx + BUCKETS) * bucket - now
                break
    newest = max((idx for idx, n in items if n), default=None)
    if add:
        total += add
        newest = bucket_of(now, bucket)
    reset = 0.0 if newest is None else max(0.0, (newest + BUCKETS) * bucket - now)
    return Window(limit, max(0, limit - total), reset), max(0.0, retry)


def decide(
    limits: Limits,
    now: float,
    bucket: float,
    requests: list[tuple[int, int]],
    tokens: list[tuple[int, int]],
    day_used: int,
    month_used: int,
    streams: int,
    *,
    counting: bool,
) -> Verdict:
    """L1-L6 for one request: the verdict, and (``counting``) the state as it
    will be once an admitted request is counted."""
    rq = tk = None
    rq_retry = tk_retry = 0.0
    if limits.rpm is not None:
        rq, rq_retry = window_state(requests, limits.rpm, now, bucket)
    if limits.tpm is not None:
        tk, tk_retry = window_state(tokens, limits.tpm, now, bucket)
    refused: str | None = None
    retry = 0.0
    if (limits.tokens_per_day is not None and day_used >= limits.tokens_per_day) or (
        limits.tokens_per_month is not None and month_used >= limits.tokens_per_month
    ):
        refused = "budget"
    elif rq_retry > 0:
        refused, retry = "requests", rq_retry
    elif tk_retry > 0:
        refused, retry = "tokens", tk_retry
    elif limits.max_streams is not None and streams >= limits.max_streams:
        refused = "streams"
    if refused is None and counting and limits.rpm is not None:
        rq, _ = window_state(requests, limits.rpm, now, bucket, add=1)
    return Verdict(refused, retry, rq, tk)
