"""What the tracing tests share: a span processor that counts open spans, a
real OTLP/HTTP receiver, and span lookups (tests/test_tracing*.py).

The receiver is a real HTTP/1.1 server on 127.0.0.1 (trio + h11) that
decodes each ``POST /v1/traces`` body as an ``ExportTraceServiceRequest``
with ``opentelemetry-proto``, as a collector does; ``hang=True`` makes it a
collector that accepts connections and never answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
import trio
from opentelemetry.context import Context
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor


class OpenSpans(SpanProcessor):
    """Counts the spans started and not yet ended (called on the trio
    thread, where spans start and end), and keeps the ended ones."""

    def __init__(self) -> None:
        self.open: dict[int, str] = {}
        self.ended: list[ReadableSpan] = []
        self._changed = trio.Event()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        ctx = span.get_span_context()
        self.open[ctx.span_id] = span.name

    def on_end(self, span: ReadableSpan) -> None:
        assert span.context is not None
        self.open.pop(span.context.span_id, None)
        self.ended.append(span)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[list[ReadableSpan]], bool]) -> None:
        """Block until ``predicate(ended spans)`` holds."""
        while not predicate(self.ended):
            await self._changed.wait()


def kind_name(span: ReadableSpan) -> str:
    return span.kind.name


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = named(spans, name)
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else int(span.parent.span_id)


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


def events(span: ReadableSpan) -> dict[str, dict[str, Any]]:
    """The span's events by name (the last of each name)."""
    return {e.name: dict(e.attributes or {}) for e in span.events}


def server_spans(spans: Sequence[ReadableSpan], route: str) -> list[ReadableSpan]:
    return [s for s in spans if (s.attributes or {}).get("http.route") == route]


# -- the OTLP/HTTP receiver --------------------------------------------------------


@dataclass
class WireSpan:
    """A span as it came over the wire (hex ids)."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent: str
    attributes: dict[str, Any]
    events: dict[str, dict[str, Any]]
    links: list[tuple[str, str]]
    status: int
    service: str


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    return getattr(v, which) if which else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class Receiver:
    """A real OTLP/HTTP trace receiver (see the module docstring)."""

    hang: bool = False
    port: int = 0
    spans: list[WireSpan] = field(default_factory=list)
    requests: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def wait_for(self, predicate: Callable[[list[WireSpan]], bool]) -> None:
        while not predicate(self.spans):
            await self._changed.wait()

    async def _handle(self, stream: trio.SocketStream) -> None:
        h = h11.Connection(h11.SERVER)
        try:
            while True:
                body = b""
                target = b""
                while True:
                    event = h.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        h.receive_data(data)
                    elif isinstance(event, h11.Request):
                        target = event.target
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                self.requests += 1
                if self.hang:
                    await trio.sleep_forever()
                assert target == b"/v1/traces", target
                self._decode(body)
                answer = ExportTraceServiceResponse().SerializeToString()
                head = [("content-type", "application/x-protobuf"),
                        ("content-length", str(len(answer)))]  # fmt: skip
                await stream.send_all(h.send(h11.Response(status_code=200, headers=head)))
                await stream.send_all(h.send(h11.Data(data=answer)) + h.send(h11.EndOfMessage()))
                h.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()

    def _decode(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for rs in request.resource_spans:
            service = str(_attrs(rs.resource.attributes).get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        WireSpan(
                            s.name,
                            s.kind,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            _attrs(s.attributes),
                            {e.name: _attrs(e.attributes) for e in s.events},
                            [(lk.trace_id.hex(), lk.span_id.hex()) for lk in s.links],
                            s.status.code,
                            service,
                        )
                    )
        self._changed.set()
        self._changed = trio.Event()
