"""Traces: the seam, and its no-op (docs/api.md section 10, docs/design.md section 18).

Tracing is off by default, and then this module is all there is of it: the
:class:`Tracing` here and its :data:`NO_SPAN` do nothing, import nothing of
OpenTelemetry, and every call site costs one method call on a shared
object (the run's, the attempt's) or one attribute test (the app's
``tracing.enabled``).  ``--otel`` makes :func:`create_tracing` import
:mod:`trio_stream.tracing.otel`, the OpenTelemetry SDK behind the same
methods.

Who calls what, in the ownership tree (docs/design.md section 18):

* the app (``http/app.py``) wraps each HTTP request in :meth:`Tracing.serve`:
  the server span, current in the request task while it runs;
* :meth:`RunManager.create` opens the run span (:meth:`Tracing.run`, a child
  of the current request's span) and ``drive`` ends it after the run's
  cleanup, on every path (its ``finally``);
* every subscriber links its request's span to the run's
  (:meth:`Tracing.subscribe`; a mirror of another node's run carries that
  run's span context, :meth:`Tracing.remote`);
* each upstream attempt is a client span (:meth:`Tracing.attempt`), a child
  of the run span, whose ``traceparent`` the upstream receives.

A span handle (:class:`Span`) is ended at most once, by the one code path
that owns it; :meth:`Span.end` is idempotent so that a second end on an error
path is harmless.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import NO_SPAN, NO_TRACING, Dispatch, Span, Tracing

if TYPE_CHECKING:
    from ..config import Settings
    from ..metrics import Metrics

__all__ = ["NO_SPAN", "NO_TRACING", "Dispatch", "Span", "Tracing", "create_tracing"]


def create_tracing(settings: Settings, metrics: Metrics, exporter: object = None) -> Tracing:
    """:data:`NO_TRACING` unless ``--otel``; then the OpenTelemetry SDK,
    configured by the ``OTEL_*`` environment variables.  ``exporter``: a
    span exporter to use instead of OTLP/HTTP (tests)."""
    if not settings.otel and exporter is None:
        return NO_TRACING
    from .otel import OTelTracing  # the SDK, imported only now

    return OTelTracing(metrics, exporter)
