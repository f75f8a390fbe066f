"""Upstreams: where completions come from.

The seam's types and its cancellation contract are in :mod:`.base`
(:class:`~.base.Upstream`, :class:`~.base.Item`, :class:`~.base.Finish`); the
adapters (:mod:`.mock`, :mod:`.openai`, :mod:`.ollama`) import only
:mod:`.base` and their transport, and this package's :func:`create_upstream`
imports the one ``--upstream`` names, when it is called.

May import: :mod:`trio_stream.wire`, :mod:`trio_stream.core`, the top-level
:mod:`~trio_stream.config` and :mod:`~trio_stream.errors`.
"""

from __future__ import annotations

from ..config import Settings
from ..config.members import MemberSpec
from .base import Finish, Item, ResponseModel, Upstream, UpstreamItem

__all__ = [
    "Finish", "Item", "ResponseModel", "Upstream", "UpstreamItem", "create_member",
    "create_upstream",
]  # fmt: skip


def create_upstream(settings: Settings) -> Upstream:
    """The upstream named by ``--upstream``."""
    if settings.upstream == "mock":
        from .mock import MockUpstream

        return MockUpstream(settings.mock_delay_ms / 1000)
    assert settings.upstream_url is not None
    if settings.upstream == "openai":
        from .openai import OpenAIUpstream

        return OpenAIUpstream(settings)
    from .ollama import OllamaUpstream

    return OllamaUpstream(settings)


def create_member(settings: Settings, spec: MemberSpec) -> Upstream:
    """The client of one upstream member: its kind, URL, key and connect
    timeout (the ``serve`` option's when it sets none)."""
    connect = settings.connect_timeout if spec.connect_timeout is None else spec.connect_timeout
    delay = settings.mock_delay_ms if spec.mock_delay_ms is None else spec.mock_delay_ms
    own = settings.replace(
        upstream=spec.kind, upstream_url=spec.url, upstream_api_key=spec.api_key,
        upstreams=None, connect_timeout=connect, mock_delay_ms=delay,
    )  # fmt: skip
    return create_upstream(own)
