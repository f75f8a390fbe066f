"""The tracing seam: the interface, and its no-op (tracing off).

See the package docstring (:mod:`trio_stream.tracing`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

#: An ASGI request, as the app's dispatcher takes it: ``(scope, receive, send)``.
Dispatch = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


class Span:
    """A span handle; this one is the no-op (tracing off, or not sampled)."""

    __slots__ = ()

    @property
    def traceparent(self) -> str:
        """The W3C ``traceparent`` of this span ("" when there is none)."""
        return ""

    def event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        """Add a span event (``first_token``, ``supersede``, ``save``, ...)."""

    def set(self, attributes: Mapping[str, Any]) -> None:
        """Set attributes."""

    def end(self, status: str = "", description: str = "") -> None:
        """End the span (idempotent): ``status`` ``ok``, ``error`` or "" (unset)."""

    @contextmanager
    def use(self) -> Iterator[None]:
        """Make this span the current span of the task inside the block (log
        lines then carry its ids, and the spans opened there are its children)."""
        yield


#: The shared no-op span: every run's and attempt's while tracing is off.
NO_SPAN = Span()


class Tracing:
    """The tracing seam; this one is the no-op (tracing off)."""

    enabled = False

    async def serve(
        self,
        scope: MutableMapping[str, Any],
        receive: Any,
        send: Any,
        dispatch: Dispatch,
        route: str = "",
    ) -> None:
        """Run ``dispatch`` for one HTTP request inside its server span
        (``route``: the path's template, when the request matched one).

        Cancellation: as ``dispatch``'s; the span ends on every exit.
        """
        await dispatch(scope, receive, send)

    def run(self, attributes: Mapping[str, Any]) -> Span:
        """Open a run span, a child of the current request's span."""
        return NO_SPAN

    def remote(self, traceparent: str) -> Span:
        """The span of a run another node drives (from its shared record):
        a handle to link to, never ended here."""
        return NO_SPAN

    def subscribe(self, run: Span) -> None:
        """Link the current request's span to the run span it subscribes to."""

    def attempt(self, run: Span, attributes: Mapping[str, Any]) -> Span:
        """Open an upstream attempt's client span, a child of ``run``."""
        return NO_SPAN

    def takeover(self, traceparent: str, attributes: Mapping[str, Any]) -> None:
        """A survivor ended a lost node's run: a short span in that run's
        trace, with the ``node_takeover`` event."""

    def log_ids(self) -> tuple[str, str] | None:
        """The current span's trace and span ids (hex), for a log line."""
        return None

    async def aclose(self) -> None:
        """Flush what can be flushed within a bound, and stop exporting.

        Cancellation: bounded; a ``Cancelled`` abandons the flush.
        """


#: The no-op, shared: tracing off.
NO_TRACING = Tracing()
