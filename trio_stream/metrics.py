"""Prometheus metrics, with the names of API.md section 2.

Each app has its own :class:`~prometheus_client.CollectorRegistry`, so several
apps can live in one process (tests, embedders).  ``trio_stream_tasks_living``
is read from ``trio.lowlevel.current_statistics()`` at scrape time, which is
always in the trio thread because ``/metrics`` is served by the app.
"""

from __future__ import annotations

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series only double the scrape size

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def _tasks_living() -> float:
    try:
        return float(trio.lowlevel.current_statistics().tasks_living)
    except RuntimeError:  # scraped from outside trio: there is no loop to ask
        return float("nan")


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
        self.tokens = Counter("trio_stream_tokens", "Deltas received from upstreams.", registry=r)
        self.ttft = Histogram(
            "trio_stream_ttft_seconds", "Run start to first upstream token.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.cancel_seconds = Histogram(
            "trio_stream_cancel_seconds", "Cancel signal to the run's cleanup finished.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)
