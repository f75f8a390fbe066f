"""Per-key limits and budgets: one interface, two backends, the key table.

Owns the interface and its guarantees (:mod:`.base`), the window arithmetic
(:mod:`.window`, pure), the in-process backend (:mod:`.local`), the Redis
backend (:mod:`.redis`, imported only with ``--redis``, and its pipelined
connection, :mod:`.resp`), the ``[[key]]``
table of the configuration file (:mod:`.keys`, pure), the
``x-ratelimit-*`` headers (:mod:`.headers`, pure) and the factory
:func:`create_limiter`.

May import: the top-level :mod:`~trio_stream.config` and
:mod:`~trio_stream.errors`, and :mod:`trio_stream.wire.usage` (a run's
usage figures).  It raises no HTTP error: the HTTP layer
answers :class:`~.base.Verdict` and :class:`~.base.LimitsUnavailable`.
"""

from __future__ import annotations

from .base import (
    Limiter,
    Limits,
    LimitsUnavailable,
    UsageRow,
    Verdict,
    Window,
)
from .local import LocalLimiter

__all__ = [
    "Limiter",
    "Limits",
    "LimitsUnavailable",
    "LocalLimiter",
    "UsageRow",
    "Verdict",
    "Window",
    "create_limiter",
]


def create_limiter(redis: str | None, window: float = 60.0) -> Limiter:
    """The in-process limiter, or Redis with ``--redis`` (cluster mode)."""
    if redis is None:
        return LocalLimiter(window)
    from .redis import RedisLimiter  # only cluster mode imports coredis

    return RedisLimiter(redis, window)
