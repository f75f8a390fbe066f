"""State shared between the processes of a cluster: one interface, two backends.

Owns the interface and its guarantees (:mod:`.base`), the in-process backend
(:mod:`.local`, the embedded default), the Redis backend (:mod:`.redis`,
cluster mode) and the factory :func:`create_shared`, which imports
:mod:`.redis` (and so coredis) only for ``--redis``.

May import: :mod:`trio_stream.core`, :mod:`trio_stream.wire`, the top-level
:mod:`~trio_stream.config` and :mod:`~trio_stream.errors`.  It sits below the
runs layer: what it needs of a run is the :class:`~.base.RunView` shape.
"""

from __future__ import annotations

from ..config import Settings
from .base import (
    Claim,
    LogPage,
    Owner,
    RunRecord,
    RunView,
    SessionKey,
    SharedState,
    SharedUnavailable,
)
from .local import LocalState

__all__ = [
    "Claim",
    "LocalState",
    "LogPage",
    "Owner",
    "RunRecord",
    "RunView",
    "SessionKey",
    "SharedState",
    "SharedUnavailable",
    "create_shared",
]


def create_shared(settings: Settings) -> SharedState:
    """The embedded in-process state, or Redis with ``--redis`` (cluster mode)."""
    if settings.redis is None:
        return LocalState()
    from .redis import RedisState  # only cluster mode imports coredis

    return RedisState(settings.redis, lease=settings.node_lease, ttl=settings.run_ttl)
