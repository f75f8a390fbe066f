"""Traces (--otel), in process: the spans' structure, with the SDK's in-memory
exporter, and no span left open on any path (docs/api.md section 10).

Each test serves the real app on a real socket against a real HTTP fake
upstream (tools/fakes.py), with tracing on (``open_service``'s
``trace_exporter``: the SDK's ``InMemorySpanExporter`` behind the same batch
processor as OTLP).  :class:`~tests.tracing_kit.OpenSpans` counts the spans
started and not ended; every test ends with that count at zero.  Events are
ordered by waiting for a span to end or an upstream request to arrive, never
by sleeping.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import orjson
import pytest
import trio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from tests.conftest import RawClient, Server, loopback_client, running_server
from tests.test_multi_upstream import error_plan, first_time, slow_plan
from tests.test_run_crash import CrashingUpstream
from tests.tracing_kit import (
    OpenSpans,
    events,
    named,
    one,
    parent_id,
    server_spans,
    span_id,
    trace_id,
)
from tools.fakes import FakeUpstream, mock_plan, token_plan
from trio_stream import Settings, config
from trio_stream.config.members import GroupSpec, MemberSpec, Upstreams
from trio_stream.errors import ConfigError
from trio_stream.tracing.otel import OTelTracing

CHAT = "/v1/chat/completions"
RUN_EVENTS = "/v1/runs/<run_id>/events"
INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01"


async def raw_get(port: int, path: str) -> RawClient:
    """A GET on a raw socket, read as SSE with :class:`RawClient`."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = RawClient(stream)
    request = h11.Request(method="GET", target=path, headers=[("host", "127.0.0.1")])
    await stream.send_all(client.h11.send(request) + client.h11.send(h11.EndOfMessage()))
    return client


def body(content: str = "hello", **more: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **more}


@dataclass
class Traced:
    server: Server
    memory: InMemorySpanExporter
    spans: OpenSpans

    @property
    def tracing(self) -> OTelTracing:
        tracing = self.server.service.tracing
        assert isinstance(tracing, OTelTracing)
        return tracing

    def exported(self) -> Sequence[ReadableSpan]:
        """The spans the exporter received (after a flush of the batch)."""
        self.tracing.processor.force_flush()
        return self.memory.get_finished_spans()

    async def request_ended(self, route: str, n: int = 1) -> None:
        """Wait until ``n`` server spans of ``route`` have ended (the last
        span of a request: it ends after the handler, and so after the run
        of an attached request)."""
        await self.spans.wait_for(lambda ended: len(server_spans(ended, route)) >= n)


@asynccontextmanager
async def traced(
    settings: Settings, exporter: SpanExporter | None = None, **kw: Any
) -> AsyncIterator[Traced]:
    memory = InMemorySpanExporter()
    spans = OpenSpans()
    async with running_server(settings, trace_exporter=exporter or memory, **kw) as server:
        tracing = server.service.tracing
        assert isinstance(tracing, OTelTracing)
        tracing.provider.add_span_processor(spans)
        yield Traced(server, memory, spans)
    assert spans.open == {}, spans.open  # the server has shut down: nothing open


def openai_settings(settings: Settings, fake: FakeUpstream, **more: Any) -> Settings:
    return settings.replace(upstream="openai", upstream_url=fake.url, log_format="json", **more)


async def test_tracing_off_imports_no_sdk_and_is_the_no_op() -> None:
    """Off (the default), nothing of OpenTelemetry is imported by the
    package, the server or a service, and the seam is the shared no-op."""
    code = (
        "import sys, trio, trio_stream, trio_stream.cli, trio_stream.server.serve\n"
        "from trio_stream import Settings, open_service\n"
        "from trio_stream.tracing import NO_TRACING\n"
        "async def main():\n"
        "    async with open_service(Settings(db=':memory:')) as service:\n"
        "        assert service.tracing is NO_TRACING\n"
        "trio.run(main)\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    done = await trio.run_process([sys.executable, "-c", code], check=False)
    assert done.returncode == 0


def test_otel_without_the_extra_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--otel`` without the ``otel`` extra installed is refused before
    anything starts (exit 2), naming the extra; with it, accepted."""
    Settings(otel=True).validate()
    monkeypatch.setattr(config, "otel_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'trio-stream\[otel\]'"):
        Settings(otel=True).validate()
    Settings().validate()  # off: not asked


async def test_a_stream_is_one_trace_from_the_client_to_the_upstream(
    settings: Settings, fake_openai: FakeUpstream
) -> None:
    """One streamed request: a server span that continues the client's
    ``traceparent``; the run span its child; one client span per upstream
    attempt, the run's child, with the GenAI attributes, whose ids the
    upstream receives in ``traceparent``; the run's events and status; the
    JSON log lines carry the ids; no span left open."""
    async with traced(openai_settings(settings, fake_openai)) as t:
        async with loopback_client(t.server) as client:
            r = await client.post(
                CHAT, json=body(stream=True, max_tokens=5), headers={"traceparent": TRACEPARENT}
            )
            assert r.status_code == 200
        await t.request_ended(CHAT)
        assert t.spans.open == {}
        spans = t.exported()
        (server,) = server_spans(spans, CHAT)
        run = one(spans, "trio_stream.run")
        (attempt,) = [s for s in spans if s.kind.name == "CLIENT"]
        assert f"{trace_id(server):032x}" == INCOMING_TRACE
        assert parent_id(server) == int(INCOMING_SPAN, 16)
        assert server.kind.name == "SERVER"
        assert (server.attributes or {})["http.response.status_code"] == 200
        assert parent_id(run) == span_id(server)
        assert parent_id(attempt) == span_id(run)
        assert {trace_id(run), trace_id(attempt)} == {trace_id(server)}
        a = dict(attempt.attributes or {})
        assert attempt.name == "chat m"
        assert a["gen_ai.system"] == a["gen_ai.provider.name"] == "openai"
        assert a["gen_ai.request.model"] == "m"
        assert a["gen_ai.usage.output_tokens"] == 5
        assert isinstance(a["gen_ai.usage.input_tokens"], int)
        assert a["gen_ai.response.finish_reasons"] == ("length",)
        assert attempt.status.status_code is StatusCode.OK
        (exchange,) = fake_openai.exchanges
        sent = dict(exchange.headers)[b"traceparent"].decode()
        assert sent == f"00-{trace_id(attempt):032x}-{span_id(attempt):016x}-01"
        r_attrs = dict(run.attributes or {})
        assert r_attrs["gen_ai.request.model"] == "m"
        assert r_attrs["trio_stream.run.status"] == "completed"
        assert r_attrs["gen_ai.usage.output_tokens"] == 5
        assert run.status.status_code is StatusCode.OK
        assert {"first_token", "save"} <= set(events(run))
        assert events(run)["save"]["trio_stream.save"] == "saved"
        (end,) = t.server.logs.events("stream_end")  # an attached run's: its request writes it
        assert end["trace_id"] == f"{trace_id(run):032x}"
        assert end["span_id"] == f"{span_id(server):016x}"


@pytest.mark.parametrize(
    ("fmt", "answered"),
    [("openai", "gpt-4o-2024-08-06"), ("ollama", "gpt-4o-2024-08-06"), ("openai", None)],
    ids=["openai", "ollama", "unnamed"],
)
async def test_the_model_the_upstream_names_is_the_response_model(
    fmt: str, answered: str | None, settings: Settings, nursery: trio.Nursery
) -> None:
    """The client asks for ``gpt-4o``; the upstream's chunks (Ollama's lines)
    name ``gpt-4o-2024-08-06``: the attempt's client span and the run span
    say ``gen_ai.request.model = gpt-4o`` and ``gen_ai.response.model =
    gpt-4o-2024-08-06``, while the client still reads ``gpt-4o`` in every
    chunk (section 2.4: trio-stream's own ``model``).  An upstream that names
    no model leaves ``gen_ai.response.model`` unset."""
    fake = FakeUpstream(fmt, plan=lambda _: token_plan(["a", "b", "c"], fmt=fmt, model=answered))
    await nursery.start(fake.serve)
    s = settings.replace(upstream=fmt, upstream_url=fake.url)
    async with traced(s) as t:
        async with loopback_client(t.server) as client:
            r = await client.post(CHAT, json={**body(stream=True), "model": "gpt-4o"})
            assert r.status_code == 200
        await t.request_ended(CHAT)
        chunks = [orjson.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]  # fmt: skip
        assert chunks
        assert {c["model"] for c in chunks} == {"gpt-4o"}
        spans = t.exported()
        run = one(spans, "trio_stream.run")
        (attempt,) = [s for s in spans if s.kind.name == "CLIENT"]
        for span in (attempt, run):
            a = dict(span.attributes or {})
            assert a["gen_ai.request.model"] == "gpt-4o"
            assert a.get("gen_ai.response.model") == answered
        assert run.status.status_code is StatusCode.OK


async def test_a_disconnect_ends_the_run_span_and_its_attempt(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """A client that leaves mid-stream: the run span ends with the
    ``disconnect`` event (status unset: a cancel is no error), its attempt
    span ends, and no span is left open."""
    fake = FakeUpstream("openai", plan=lambda _: token_plan(["a"] * 3, hang_after=2))
    await nursery.start(fake.serve)
    async with traced(openai_settings(settings, fake)) as t:
        client = await RawClient.post(t.server.port, CHAT, body(stream=True))
        event = await client.next_event()
        assert event is not None
        await client.aclose()
        await t.request_ended(CHAT)
        assert t.spans.open == {}
        spans = t.exported()
        run = one(spans, "trio_stream.run")
        assert events(run)["disconnect"]["reason"] == "client_disconnect"
        assert run.status.status_code is StatusCode.UNSET
        assert (run.attributes or {})["trio_stream.run.reason"] == "client_disconnect"
        (attempt,) = [s for s in spans if s.kind.name == "CLIENT"]
        assert (attempt.attributes or {})["trio_stream.attempt.outcome"] == "cancelled"


async def test_supersede_stop_and_resume_are_events_and_links(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """A detached run A of a session, followed by a second request (a
    resume: its server span links to A's run span); B in the same session
    supersedes A (A's ``superseded`` event, B's ``supersede`` naming A);
    B stopped (``stop``).  Every span closed."""
    fake = FakeUpstream("openai", plan=lambda _: token_plan(["a"] * 3, hang_after=2))
    await nursery.start(fake.serve)
    async with traced(openai_settings(settings, fake)) as t:
        session = {"x-session-id": "s1"}
        async with loopback_client(t.server) as client:
            a = await RawClient.post(t.server.port, CHAT, body(stream=True, detach=True),
                                     headers=tuple(session.items()))  # fmt: skip
            await a.start()
            a_id = a.headers["x-run-id"]
            await fake.wait_for(lambda: len(fake.exchanges) == 1)
            follower = await raw_get(t.server.port, f"/v1/runs/{a_id}/events")
            assert await follower.start() == 200
            b = await RawClient.post(t.server.port, CHAT, body(stream=True, detach=True),
                                     headers=tuple(session.items()))  # fmt: skip
            await b.start()
            b_id = b.headers["x-run-id"]
            await fake.wait_for(lambda: len(fake.exchanges) == 2)
            stopped = await client.post(f"/v1/runs/{b_id}/cancel")
            assert stopped.status_code == 200
            for c in (a, b, follower):
                await c.read_all()
                await c.aclose()
        await t.request_ended(RUN_EVENTS)
        await t.spans.wait_for(lambda ended: len(named(ended, "trio_stream.run")) == 2)
        await t.request_ended(CHAT, 2)
        spans = t.exported()
        runs = {
            (s.attributes or {})["trio_stream.run.id"]: s for s in named(spans, "trio_stream.run")
        }
        run_a, run_b = runs[a_id], runs[b_id]
        assert events(run_a)["superseded"]["reason"] == "superseded"
        assert events(run_b)["supersede"]["trio_stream.predecessor"] == a_id
        assert events(run_b)["stop"]["reason"] == "stopped"
        (follow,) = server_spans(spans, RUN_EVENTS)
        linked = [(lk.context.trace_id, lk.context.span_id) for lk in follow.links]
        assert linked == [(trace_id(run_a), span_id(run_a))]
        # A detached run's stream_end is written in its cleanup, in its reader's task.
        (a_end,) = t.server.logs.events("stream_end", trace=a_id)
        assert a_end["span_id"] == f"{span_id(run_a):016x}"
    assert t.spans.open == {}


async def test_failover_is_one_client_span_per_attempt(settings: Settings) -> None:
    """A member answering 500 (the first choice), then the next member: two client spans,
    both children of the run span; the first an error (its failure class),
    the second OK, with the upstream's model (as the run); each upstream got
    its own attempt's ``traceparent``."""
    failing = FakeUpstream("openai", plan=first_time(error_plan(500)))
    healthy = FakeUpstream("openai", plan=mock_plan("openai"))
    async with trio.open_nursery() as nursery:
        for fake in (failing, healthy):
            await nursery.start(fake.serve)
        members = (
            MemberSpec("one", "openai", failing.url, weight=100),  # the first choice
            MemberSpec("two", "openai", healthy.url),
        )
        s = settings.replace(upstreams=Upstreams(members, ()))
        async with traced(s) as t, loopback_client(t.server) as client:
            r = await client.post(CHAT, json=body(stream=True, max_tokens=3))
            assert r.status_code == 200
            await t.request_ended(CHAT)
            spans = t.exported()
            run = one(spans, "trio_stream.run")
            attempts = sorted(
                (s for s in spans if s.kind.name == "CLIENT"), key=lambda s: s.start_time or 0
            )
            assert [(a.attributes or {})["trio_stream.upstream.member"] for a in attempts] == [
                "one", "two",
            ]  # fmt: skip
            assert all(parent_id(a) == span_id(run) for a in attempts)
            assert attempts[0].status.status_code is StatusCode.ERROR
            assert (attempts[0].attributes or {})["trio_stream.attempt.outcome"] == "server"
            assert attempts[1].status.status_code is StatusCode.OK
            for span, model in ((attempts[0], None), (attempts[1], "fake"), (run, "fake")):
                assert (span.attributes or {}).get("gen_ai.response.model") == model
            for fake, attempt in zip((failing, healthy), attempts, strict=True):
                sent = dict(fake.exchanges[0].headers)[b"traceparent"].decode()
                assert sent.split("-")[2] == f"{span_id(attempt):016x}"
        nursery.cancel_scope.cancel()


async def test_a_hedge_race_is_one_client_span_per_attempt(settings: Settings) -> None:
    """``hedge_after_ms``: the slow first choice is raced by a hedge on the
    fast member, which wins.  Two client spans under the run span: the
    winner ``served`` (OK), the loser ``hedge_lost`` (status unset), both
    ended; each member got its own attempt's ``traceparent``; the upstream's
    model is on the winner's span and the run's, not on the loser's."""
    slow = FakeUpstream("openai", plan=slow_plan(5.0))
    fast = FakeUpstream("openai", plan=mock_plan("openai"))
    async with trio.open_nursery() as nursery:
        for fake in (slow, fast):
            await nursery.start(fake.serve)
        members = (
            MemberSpec("slow", "openai", slow.url, weight=100),  # the first choice
            MemberSpec("fast", "openai", fast.url),
        )
        s = settings.replace(upstreams=Upstreams(members, (GroupSpec("m", 50.0),)))
        async with traced(s) as t, loopback_client(t.server) as client:
            r = await client.post(CHAT, json=body(stream=True, max_tokens=3))
            assert r.status_code == 200
            await t.request_ended(CHAT)
            assert t.spans.open == {}
            spans = t.exported()
            run = one(spans, "trio_stream.run")
            attempts = {
                (a.attributes or {})["trio_stream.upstream.member"]: a
                for a in spans if a.kind.name == "CLIENT"
            }  # fmt: skip
            assert set(attempts) == {"slow", "fast"}
            assert all(parent_id(a) == span_id(run) for a in attempts.values())
            assert (attempts["fast"].attributes or {})["trio_stream.attempt.outcome"] == "served"
            assert attempts["fast"].status.status_code is StatusCode.OK
            assert (attempts["slow"].attributes or {})[
                "trio_stream.attempt.outcome"
            ] == "hedge_lost"
            assert attempts["slow"].status.status_code is StatusCode.UNSET
            said = ((attempts["fast"], "fake"), (run, "fake"), (attempts["slow"], None))
            for span, model in said:
                assert (span.attributes or {}).get("gen_ai.response.model") == model
            for fake, name in ((slow, "slow"), (fast, "fast")):
                sent = dict(fake.exchanges[0].headers)[b"traceparent"].decode()
                assert sent.split("-")[2] == f"{span_id(attempts[name]):016x}"
        nursery.cancel_scope.cancel()


async def test_a_crash_in_a_run_is_an_error_span_and_nothing_stays_open(
    settings: Settings,
) -> None:
    """A bug in the reader (an unexpected exception mid-stream): the run
    span ends as an error (``internal_error``), and its attempt span ends."""
    async with traced(settings, upstream=CrashingUpstream()) as t, loopback_client(t.server) as c:
        r = await c.post(CHAT, json=body("crash-mid-stream", stream=True))
        assert r.status_code == 200
        await t.request_ended(CHAT)
        assert t.spans.open == {}
        run = one(t.exported(), "trio_stream.run")
        assert run.status.status_code is StatusCode.ERROR
        assert (run.attributes or {})["trio_stream.run.reason"] == "internal_error"
        assert "fail" in events(run)


async def test_shutdown_ends_every_span(settings: Settings, nursery: trio.Nursery) -> None:
    """The server stops with a stream in flight (attached) and a detached
    run: both run spans end with the ``shutdown`` event, and after the exit
    no span is open (``traced`` checks it)."""
    fake = FakeUpstream("openai", plan=lambda _: token_plan(["a"] * 3, hang_after=1))
    await nursery.start(fake.serve)
    memory = InMemorySpanExporter()
    async with traced(openai_settings(settings, fake), exporter=memory) as t:
        attached = await RawClient.post(t.server.port, CHAT, body(stream=True))
        detached = await RawClient.post(t.server.port, CHAT, body(stream=True, detach=True))
        for c in (attached, detached):
            assert await c.next_event() is not None
    for c in (attached, detached):
        await c.aclose()
    spans = memory.get_finished_spans()  # the exit flushed the batch
    runs = named(spans, "trio_stream.run")
    assert len(runs) == 2
    assert all(events(r)["shutdown"]["reason"] == "shutdown" for r in runs)
    assert len(server_spans(spans, CHAT)) == 2


class HangingExporter(SpanExporter):
    """A collector that never answers: ``export`` blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(30)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


async def test_a_hanging_collector_costs_drops_only(
    settings: Settings, fake_openai: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collector that hangs: the batch processor's export is stuck, yet
    every stream completes with its whole answer while it is, and the
    spans that do not fit the bounded queue are dropped and counted in
    ``trio_stream_otel_spans_dropped_total``."""
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "1")
    hanging = HangingExporter()
    async with traced(openai_settings(settings, fake_openai), exporter=hanging) as t:
        async with loopback_client(t.server) as client:
            texts = []
            for _ in range(5):
                r = await client.post(CHAT, json=body(max_tokens=4))
                assert r.status_code == 200
                texts.append(r.json()["choices"][0]["message"]["content"])
            assert hanging.entered.is_set()  # an export is stuck in the collector...
            assert not hanging.release.is_set()  # ...and still is: the streams did not wait
            assert len(set(texts)) == 1
            assert texts[0]
            metrics = (await client.get("/metrics")).text
        dropped = [
            line for line in metrics.splitlines()
            if line.startswith("trio_stream_otel_spans_dropped_total ")
        ]  # fmt: skip
        assert float(dropped[0].split()[1]) > 0, dropped


async def test_trace_ids_are_in_json_log_lines(tmp_path: Path, fake_openai: FakeUpstream) -> None:
    """``--log-format json`` with tracing on: a run's lines carry the run
    span's ``trace_id`` and ``span_id``; with tracing off, none do."""
    s = Settings(port=0, db=str(tmp_path / "t.db"))
    async with traced(openai_settings(s, fake_openai)) as t, loopback_client(t.server) as c:
        r = await c.post(CHAT, json=body(max_tokens=2))
        assert r.status_code == 200
        await t.request_ended(CHAT)
        start = t.server.logs.events("stream_start")[0]
        assert len(start["trace_id"]) == 32
        assert len(start["span_id"]) == 16
        line = orjson.dumps(start)
        assert b'"trace_id"' in line
    async with running_server(openai_settings(s, fake_openai)) as plain:
        async with loopback_client(plain) as c:
            assert (await c.post(CHAT, json=body(max_tokens=2))).status_code == 200
        assert all("trace_id" not in r for r in plain.logs.records)
