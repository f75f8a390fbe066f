"""Prometheus metrics, with the names of docs/api.md section 2.

Each app has its own :class:`~prometheus_client.CollectorRegistry`, so several
apps can live in one process (tests, embedders).  ``trio_stream_tasks_living``
is read from ``trio.lowlevel.current_statistics()`` at scrape time, which is
always in the trio thread because ``/metrics`` is served by the app.

Nothing here touches ``prometheus_client``'s process-wide state (such as
``disable_created_metrics()``): the ``*_created`` series are left out of our
own scrape only (:class:`WithoutCreated`), so an embedder's metrics are not
changed by importing or running trio_stream.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def _tasks_living() -> float:
    try:
        return float(trio.lowlevel.current_statistics().tasks_living)
    except RuntimeError:  # scraped from outside trio: there is no loop to ask
        return float("nan")


class WithoutCreated(Collector):
    """A view of a registry without its ``*_created`` samples.

    Every counter and histogram would add one, which only doubles the size of
    the scrape.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            created = metric.name + "_created"
            kept = copy.copy(metric)  # the registry's own object stays as it is
            kept.samples = [s for s in metric.samples if s.name != created]
            yield kept


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.active_streams = Gauge(
            "trio_stream_active_streams", "Client streams open now.", registry=r
        )
        self.active_runs = Gauge(
            "trio_stream_active_runs", "Runs whose upstream work is in progress.", registry=r
        )
        self.tasks_living = Gauge(
            "trio_stream_tasks_living", "trio's tasks_living at scrape time.", registry=r
        )
        self.tasks_living.set_function(_tasks_living)
        self.runs = Counter("trio_stream_runs", "Finished runs.", ["outcome"], registry=r)
        self.cancellations = Counter(
            "trio_stream_cancellations", "Cancelled runs by reason.", ["reason"], registry=r
        )
        self.save_failures = Counter(
            "trio_stream_save_failures",
            "Runs with content whose save did not land (save_failed).",
            registry=r,
        )
        self.tokens = Counter("trio_stream_tokens", "Deltas received from upstreams.", registry=r)
        self.ttft = Histogram(
            "trio_stream_ttft_seconds", "Run start to first upstream token.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        # Per upstream member (docs/api.md section 1.3): trio_stream/runs/routes.py.
        self.upstream_in_flight = Gauge(
            "trio_stream_upstream_in_flight", "Streams open to each upstream member.",
            ["member"], registry=r,
        )  # fmt: skip
        self.upstream_attempts = Counter(
            "trio_stream_upstream_attempts",
            "Attempts on each upstream member, by how they ended before the first token.",
            ["member", "outcome"], registry=r,
        )  # fmt: skip
        self.upstream_failovers = Counter(
            "trio_stream_upstream_failovers",
            "Requests moved on to another member after this one failed before the first token.",
            ["member"], registry=r,
        )  # fmt: skip
        self.upstream_hedges = Counter(
            "trio_stream_upstream_hedges",
            "Hedge attempts started on each member (event=started), and races it won as the "
            "hedge (event=won).",
            ["member", "event"], registry=r,
        )  # fmt: skip
        self.upstream_ttft = Histogram(
            "trio_stream_upstream_ttft_seconds", "An attempt's start to its member's first token.",
            ["member"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_probes = Counter(
            "trio_stream_upstream_probes",
            "Probes (GET /models) of each cooling member, by result: answered (the member is "
            "back) or failed.",
            ["member", "result"], registry=r,
        )  # fmt: skip
        self.upstream_cooling = Gauge(
            "trio_stream_upstream_cooling",
            "1 while the member is cooling down after failures, else 0 (at scrape time).",
            ["member"], registry=r,
        )  # fmt: skip
        self.cancel_seconds = Histogram(
            "trio_stream_cancel_seconds", "Cancel signal to the run's cleanup finished.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip

        # Tracing (--otel; docs/api.md section 10): trio_stream/tracing/otel.py.
        self.otel_spans_dropped = Counter(
            "trio_stream_otel_spans_dropped",
            "Finished spans dropped because the export queue was full (--otel).",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(WithoutCreated(self.registry))
