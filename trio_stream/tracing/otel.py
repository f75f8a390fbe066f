"""The OpenTelemetry SDK behind the tracing seam (imported only with ``--otel``).

Configured by the standard environment variables, read by the SDK itself:
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
(default ``http://localhost:4318``), ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_EXPORTER_OTLP_TIMEOUT``, ``OTEL_SERVICE_NAME`` (default here
``trio-stream``), ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG`` (default ``parentbased_always_on``), and the batch
processor's ``OTEL_BSP_*``.

Nothing global is set: each service has its own ``TracerProvider`` (several
apps in one process each trace through their own), and ``traceparent`` is
read and written by the W3C propagator directly.  The current span lives in
OpenTelemetry's context (a ``ContextVar``): trio gives each task a copy of
its parent's, so a span made current in a task (:meth:`OTelTracing.serve`,
:meth:`OTelTracing.use`) is current there and in the tasks it starts, and
nowhere else.

Export never blocks a stream: finished spans go to a
:class:`~opentelemetry.sdk.trace.export.BatchSpanProcessor` (a bounded
deque, appended to in ``on_end``; a thread exports).  When the queue is
full -- the collector is down, hangs, or is slower than the spans -- a span
is dropped and counted (``trio_stream_otel_spans_dropped_total``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

import trio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter

from ..metrics import Metrics
from .base import Dispatch, Span, Tracing

#: How long :meth:`OTelTracing.aclose` waits for the last export (shutdown).
CLOSE_TIMEOUT = 1.0
_PROPAGATOR = TraceContextTextMapPropagator()
_STATUS = {"ok": StatusCode.OK, "error": StatusCode.ERROR}
_TRACE_HEADERS = (b"traceparent", b"tracestate")


class OTelSpan(Span):
    """An SDK span (or a non-recording one: not sampled, or another node's)."""

    __slots__ = ("_ended", "span")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self._ended = False

    @property
    def traceparent(self) -> str:
        ctx = self.span.get_span_context()
        if not ctx.is_valid:
            return ""
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        self.span.add_event(name, attributes)

    def set(self, attributes: Mapping[str, Any]) -> None:
        self.span.set_attributes(attributes)

    def end(self, status: str = "", description: str = "") -> None:
        if self._ended:
            return
        self._ended = True
        if status:
            code = _STATUS[status]
            self.span.set_status(Status(code, description if code is StatusCode.ERROR else None))
        self.span.end()

    @contextmanager
    def use(self) -> Iterator[None]:
        token = otel_context.attach(trace.set_span_in_context(self.span))
        try:
            yield
        finally:
            otel_context.detach(token)


class _CountingBatch(BatchSpanProcessor):
    """The SDK's batch processor, counting the spans it drops on a full queue.

    The SDK drops the oldest span when its bounded queue is full, and tells
    only its own (OpenTelemetry) meter; this counts the same drop in our
    Prometheus registry.  Reads the processor's queue (the SDK 1.45.2 pinned
    in the ``otel`` extra: ``BatchProcessor._queue``, a ``deque`` with a
    ``maxlen``).
    """

    def __init__(self, exporter: SpanExporter, dropped: Counter) -> None:
        super().__init__(exporter)
        self._dropped = dropped
        self._queue = self._batch_processor._queue

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if ctx is not None and ctx.trace_flags.sampled and len(self._queue) == self._queue.maxlen:
            self._dropped.inc()
        super().on_end(span)


def _resource() -> Resource:
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "trio-stream"}))
    return resource


def _otlp_exporter() -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


class OTelTracing(Tracing):
    """Traces through the OpenTelemetry SDK (see the module docstring)."""

    enabled = True

    def __init__(self, metrics: Metrics, exporter: object = None) -> None:
        self.provider = TracerProvider(resource=_resource())  # sampler: OTEL_TRACES_SAMPLER
        chosen = exporter if isinstance(exporter, SpanExporter) else _otlp_exporter()
        self.processor = _CountingBatch(chosen, metrics.otel_spans_dropped)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("trio_stream")

    # -- the server span -------------------------------------------------------
    async def serve(
        self,
        scope: MutableMapping[str, Any],
        receive: Any,
        send: Any,
        dispatch: Dispatch,
        route: str = "",
    ) -> None:
        """The request's server span around ``dispatch`` (see :meth:`Tracing.serve`).

        Cancellation: as ``dispatch``'s; the span ends on every exit (a
        ``Cancelled`` is marked ``trio_stream.cancelled`` and re-raised).
        """
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope.get("headers", ())
            if name in _TRACE_HEADERS
        }
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        method = scope.get("method", "")
        span = self.tracer.start_span(
            f"{method} {route}" if route else method, context=parent, kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method, "url.path": scope.get("path", ""),
                **({"http.route": route} if route else {}),
                "network.protocol.version": scope.get("http_version", ""),
            },
        )  # fmt: skip
        token = otel_context.attach(trace.set_span_in_context(span))
        status = 0

        async def traced_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await dispatch(scope, receive, traced_send)
        except trio.Cancelled:
            span.set_attribute("trio_stream.cancelled", True)
            raise
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            otel_context.detach(token)
            if status:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR, str(status)))
            span.end()

    # -- runs and attempts -----------------------------------------------------
    def run(self, attributes: Mapping[str, Any]) -> Span:
        return OTelSpan(self.tracer.start_span("trio_stream.run", attributes=attributes))

    def remote(self, traceparent: str) -> Span:
        if not traceparent:
            return OTelSpan(trace.INVALID_SPAN)
        ctx = _PROPAGATOR.extract({"traceparent": traceparent})
        return OTelSpan(trace.get_current_span(ctx))

    def subscribe(self, run: Span) -> None:
        current = trace.get_current_span()
        if not current.is_recording() or not isinstance(run, OTelSpan):
            return
        ctx = run.span.get_span_context()
        if ctx.is_valid:
            current.add_link(ctx, {"trio_stream.link": "subscribes_to_run"})

    def attempt(self, run: Span, attributes: Mapping[str, Any]) -> Span:
        parent = trace.set_span_in_context(run.span) if isinstance(run, OTelSpan) else None
        name = f"chat {attributes.get('gen_ai.request.model', '')}".rstrip()
        span = self.tracer.start_span(
            name, context=parent, kind=SpanKind.CLIENT, attributes=attributes
        )
        return OTelSpan(span)

    def takeover(self, traceparent: str, attributes: Mapping[str, Any]) -> None:
        parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
        span = self.tracer.start_span(
            "trio_stream.run.takeover", context=parent, attributes=attributes
        )
        span.add_event("node_takeover", {"reason": "node_lost", **attributes})
        span.add_event("save", {"reason": "node_lost", **attributes})
        span.set_status(Status(StatusCode.ERROR, "node_lost"))
        span.end()

    def log_ids(self) -> tuple[str, str] | None:
        ctx = trace.get_current_span().get_span_context()
        if not ctx.is_valid:
            return None
        return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"

    async def aclose(self) -> None:
        """Export what is queued, within :data:`CLOSE_TIMEOUT`, in a thread
        (a hanging collector holds that thread, never the loop or the exit).

        Cancellation: shielded, bounded; the thread is abandoned at the deadline.
        """
        with trio.CancelScope(shield=True) as cs:
            cs.deadline = trio.current_time() + CLOSE_TIMEOUT
            await trio.to_thread.run_sync(self._shutdown, abandon_on_cancel=True)

    def _shutdown(self) -> None:
        self.processor._batch_processor.shutdown(timeout_millis=int(CLOSE_TIMEOUT * 1000))
