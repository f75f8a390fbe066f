"""Traces over the wire: ``trio-stream serve --otel`` processes exporting
OTLP/HTTP to a real receiver (tests/tracing_kit.py: a real HTTP server on
127.0.0.1 decoding ``ExportTraceServiceRequest`` with opentelemetry-proto).

The nodes are configured as an operator would: ``--otel`` (or ``otel =
true`` in ``[serve]``) and the standard ``OTEL_*`` variables.  The upstream
is the scripted real HTTP fake of tests/test_cluster.py; two nodes share a
Redis of the test's own.  Every span a node opened must arrive: a span is
exported only when it ends, so "every span closed" is checked as "every
span expected arrived, and every parent arrived".  Waits are bounded and
wait for what they need (a span arriving, a process exiting), never sleep.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from tests.conftest import ServeProcess, serve_process
from tests.redis_server import RedisServer
from tests.test_cluster import CHAT, Upstream, chat, client, session, start_upstream, stream
from tests.test_multi_upstream import error_plan, refused_url
from tests.tracing_kit import Receiver, WireSpan
from tools.fakes import FakeUpstream

SERVER, CLIENT = 2, 3  # OTLP's SpanKind numbers (SPAN_KIND_SERVER, SPAN_KIND_CLIENT)
INCOMING_TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{INCOMING_TRACE}-b7ad6b7169203331-01"


def otel_env(receiver_endpoint: str, service: str) -> dict[str, str]:
    """The standard variables: where to export, the node's name, a short batch delay."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver_endpoint,
        "OTEL_SERVICE_NAME": service,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
    }


@asynccontextmanager
async def node(
    *args: str, env: dict[str, str], db: Path, upstream: str = ""
) -> AsyncIterator[ServeProcess]:
    """A ``trio-stream serve`` node (killed at the block's end if still running)."""
    more = ("--upstream", "openai", "--upstream-url", upstream) if upstream else ()
    args = ("--port", "0", "--db", str(db), "--log-format", "json", *more, *args)
    async with serve_process(*args, env=env) as proc:
        yield proc


async def stop(proc: ServeProcess) -> float:
    """SIGTERM, then wait for the exit; the seconds it took."""
    began = trio.current_time()
    proc.process.send_signal(signal.SIGTERM)
    with trio.fail_after(15):
        assert await proc.wait_exit() == 0
    return trio.current_time() - began


def runs_of(spans: list[WireSpan], run_id: str) -> list[WireSpan]:
    return [
        s for s in spans
        if s.name == "trio_stream.run" and s.attributes.get("trio_stream.run.id") == run_id
    ]  # fmt: skip


def assert_tree_closed(spans: list[WireSpan]) -> None:
    """Every parent of every span arrived (a parent left open never would),
    but the client's own incoming one."""
    ids = {s.span_id for s in spans}
    orphans = [
        (s.name, s.parent) for s in spans
        if s.parent and s.parent not in ids and s.trace_id != INCOMING_TRACE
    ]  # fmt: skip
    assert orphans == []


async def test_a_stream_and_a_disconnect_over_otlp(tmp_path: Path, nursery: trio.Nursery) -> None:
    """One node, ``otel = true`` in its ``--config`` file's ``[serve]``: a
    streamed request continuing the client's ``traceparent`` and a client
    that leaves mid-stream.  The receiver gets, for each, the server span,
    the run span (its child) and the attempt's client span (the run's
    child) with the GenAI attributes -- ``gen_ai.response.model`` the model
    the upstream's chunks name (``gpt-4o-2024-08-06``), not the one asked
    for (``gpt-4o``); the upstream got that client span's ``traceparent``;
    the disconnected run's span ends with ``disconnect``."""
    receiver = Receiver()
    await nursery.start(receiver.serve)
    up = await start_upstream(nursery)
    up.script("wire one", 4, 0.005, model="gpt-4o-2024-08-06")
    up.script("wire gone", 500, 0.02)
    config = tmp_path / "c.toml"
    config.write_text("[serve]\notel = true\n")
    env = otel_env(receiver.endpoint, "wire-node")
    async with node("--config", str(config), env=env, db=tmp_path / "w.db", upstream=up.url) as n:
        async with client(n) as c:
            async with stream(c, "POST", CHAT, json={**chat("wire one"), "model": "gpt-4o"},
                              headers={"traceparent": TRACEPARENT}) as s:  # fmt: skip
                await s.rest()
                one_id = s.run_id
            async with stream(c, "POST", CHAT, json=chat("wire gone")) as g:
                await g.deltas(2)
                gone_id = g.run_id
        with trio.fail_after(10):
            await receiver.wait_for(
                lambda spans: (
                    any("disconnect" in r.events for r in runs_of(spans, gone_id))
                    and bool(runs_of(spans, one_id))
                )
            )
        await stop(n)
    spans = receiver.spans
    assert {s.service for s in spans} == {"wire-node"}
    (run,) = runs_of(spans, one_id)
    (server,) = [s for s in spans if s.span_id == run.parent]
    assert server.kind == SERVER
    assert server.trace_id == run.trace_id == INCOMING_TRACE
    assert server.parent == "b7ad6b7169203331"
    (attempt,) = [s for s in spans if s.kind == CLIENT and s.parent == run.span_id]
    assert attempt.attributes["gen_ai.system"] == "openai"
    for span in (attempt, run):
        assert span.attributes["gen_ai.request.model"] == "gpt-4o"
        assert span.attributes["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    assert attempt.attributes["gen_ai.usage.output_tokens"] == 4
    assert attempt.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert {"first_token", "save"} <= set(run.events)
    exchange = next(x for x in up.exchanges if x.request["messages"][0]["content"] == "wire one")
    assert dict(exchange.headers)[b"traceparent"].decode().split("-")[1:3] == [
        attempt.trace_id, attempt.span_id,
    ]  # fmt: skip
    (gone,) = runs_of(spans, gone_id)
    assert gone.events["disconnect"]["reason"] == "client_disconnect"
    assert [s for s in spans if s.kind == CLIENT and s.parent == gone.span_id]
    assert_tree_closed(spans)


async def test_a_failed_over_request_over_otlp(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Two members in the ``--config`` file, the first choice (by weight)
    answering 500: the request fails over, and the receiver gets two client
    spans under the one run span, the first an error, the second served;
    each member got its own attempt's ``traceparent``."""
    receiver = Receiver()
    await nursery.start(receiver.serve)
    fakes = [FakeUpstream("openai", plan=lambda _: error_plan(500)), FakeUpstream("openai")]
    for fake in fakes:
        await nursery.start(fake.serve)
    config = tmp_path / "c.toml"
    config.write_text(
        "".join(
            f'[[upstream]]\nname = "m{i}"\nkind = "openai"\nurl = "{f.url}"\nweight = {w}\n\n'
            for i, (f, w) in enumerate(zip(fakes, (100, 1), strict=True))
        )
    )
    env = otel_env(receiver.endpoint, "failover-node")
    async with node("--otel", "--config", str(config), env=env, db=tmp_path / "f.db") as n:
        async with client(n) as c, stream(c, "POST", CHAT, json=chat("failover")) as s:
            await s.rest()
            run_id = s.run_id
            assert s.done
        with trio.fail_after(10):
            await receiver.wait_for(lambda spans: bool(runs_of(spans, run_id)))
        await stop(n)
    spans = receiver.spans
    (run,) = runs_of(spans, run_id)
    attempts = [s for s in spans if s.kind == CLIENT and s.parent == run.span_id]
    outcomes = sorted(a.attributes["trio_stream.attempt.outcome"] for a in attempts)
    assert outcomes == ["served", "server"]
    sent = {dict(x.headers)[b"traceparent"].decode().split("-")[2]
            for f in fakes for x in f.exchanges}  # fmt: skip
    assert sent == {a.span_id for a in attempts}
    assert_tree_closed(spans)


async def test_supersede_and_resume_across_two_nodes_over_otlp(
    own_redis: RedisServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Two nodes on one Redis.  A request of session S on node 2 supersedes
    S's run on node 1: node 1's run span has ``superseded``, node 2's has
    ``supersede`` naming it.  A detached run of node 1 followed from node 2:
    node 2's server span links to node 1's run span (its context travelled
    in the run's Redis record).  Every span of both nodes arrives."""
    receiver = Receiver()
    await nursery.start(receiver.serve)
    up: Upstream = await start_upstream(nursery)
    up.script("S old", 2000, 0.02)
    up.script("S new", 5, 0.005)
    up.script("detached", 30, 0.02)
    db = tmp_path / "cluster.db"
    common = ("--otel", "--redis", own_redis.url)
    async with (
        node(*common, env=otel_env(receiver.endpoint, "node1"), db=db, upstream=up.url) as n1,
        node(*common, env=otel_env(receiver.endpoint, "node2"), db=db, upstream=up.url) as n2,
        client(n1) as c1,
        client(n2) as c2,
    ):
        with trio.fail_after(20):
            async with stream(c1, "POST", CHAT, json=chat("S old"), headers=session("S")) as old:
                await old.deltas(1)
                async with stream(c2, "POST", CHAT, json=chat("S new"),
                                  headers=session("S")) as new:  # fmt: skip
                    await new.rest()
                    new_id = new.run_id
                await old.rest()
                old_id = old.run_id
            async with stream(c1, "POST", CHAT, json=chat("detached", detach=True)) as d:
                await d.deltas(1)
                detached_id = d.run_id
                async with stream(c2, "GET", f"/v1/runs/{detached_id}/events") as follow:
                    await follow.rest()
                await d.rest()
            await receiver.wait_for(
                lambda spans: (
                    len(runs_of(spans, detached_id)) == 1
                    and any(s.links for s in spans if s.service == "node2" and s.kind == SERVER)
                )
            )
        await stop(n1)
        await stop(n2)
    spans = receiver.spans
    (run_old,) = runs_of(spans, old_id)
    (run_new,) = runs_of(spans, new_id)
    assert run_old.service == "node1"
    assert run_new.service == "node2"
    assert run_old.events["superseded"]["reason"] == "superseded"
    assert run_new.events["supersede"]["trio_stream.predecessor"] == old_id
    (run_d,) = runs_of(spans, detached_id)
    followers = [
        s for s in spans
        if s.service == "node2" and s.kind == SERVER
        and s.attributes.get("http.route") == "/v1/runs/<run_id>/events"
    ]  # fmt: skip
    (follower,) = followers
    assert follower.links == [(run_d.trace_id, run_d.span_id)]
    assert_tree_closed(spans)


async def test_a_collector_down_or_hanging_changes_nothing_for_the_client(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Three nodes -- tracing off, on with no collector listening, on with a
    collector that accepts and never answers -- serve the same stream: the
    same answer, and the traced ones take no longer than the untraced one
    beyond noise; each exits on SIGTERM within its usual bound."""
    hanging = Receiver(hang=True)
    await nursery.start(hanging.serve)
    refused = refused_url().removesuffix("/v1")  # nothing listens there
    up = await start_upstream(nursery)
    up.script("same", 20, 0.01)
    envs = {
        "off": {},
        "down": otel_env(refused, "down"),
        "hang": otel_env(hanging.endpoint, "hang"),
    }
    results: dict[str, tuple[str, float, float]] = {}
    for name, env in envs.items():
        extra = () if name == "off" else ("--otel",)
        async with node(*extra, env=env, db=tmp_path / f"{name}.db", upstream=up.url) as n:
            async with client(n) as c:
                began = trio.current_time()
                async with stream(c, "POST", CHAT, json=chat("same")) as s:
                    await s.rest()
                took = trio.current_time() - began
                text = s.text
            results[name] = (text, took, await stop(n))
    texts = {text for text, _, _ in results.values()}
    assert len(texts) == 1, results
    off = results["off"][1]
    for name in ("down", "hang"):
        _, took, exit_took = results[name]
        assert took < off + 0.5, results  # 20 tokens 10 ms apart: about 0.2 s each
        assert exit_took < results["off"][2] + 2.0, results  # the export's bound: 1 s
    assert hanging.requests >= 1  # the hanging collector was reached (and never answered)


async def test_a_node_takeover_is_in_the_lost_runs_trace(
    own_redis: RedisServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Node 1 is killed (SIGKILL) during a detached run; node 2 takes it over
    after the lease.  Node 1's spans are lost with it, but node 2 exports a
    ``trio_stream.run.takeover`` span in the run's trace (the trace the
    upstream was told in ``traceparent``), with the ``node_takeover`` and
    ``save`` events and an error status (``node_lost``)."""
    receiver = Receiver()
    await nursery.start(receiver.serve)
    up: Upstream = await start_upstream(nursery)
    up.script("doomed", 2000, 0.02)
    db = tmp_path / "cluster.db"
    common = ("--otel", "--redis", own_redis.url, "--node-lease", "1")
    async with (
        node(*common, env=otel_env(receiver.endpoint, "node1"), db=db, upstream=up.url) as n1,
        node(*common, env=otel_env(receiver.endpoint, "node2"), db=db, upstream=up.url) as n2,
        client(n1) as c1,
        client(n2) as c2,
    ):
        with trio.fail_after(20):
            async with stream(c1, "POST", CHAT, json=chat("doomed", detach=True)) as d:
                await d.deltas(2)
                run_id = d.run_id
                n1.process.kill()  # SIGKILL, by its own pid
            await receiver.wait_for(lambda spans: any(
                s.name == "trio_stream.run.takeover" for s in spans
            ))  # fmt: skip
            assert (await c2.get(f"/v1/runs/{run_id}")).json()["reason"] == "node_lost"
        await stop(n2)
    (takeover,) = [s for s in receiver.spans if s.name == "trio_stream.run.takeover"]
    assert takeover.service == "node2"
    assert takeover.attributes["trio_stream.run.id"] == run_id
    assert takeover.events["node_takeover"]["reason"] == "node_lost"
    assert takeover.events["save"]["trio_stream.save"] == "saved"
    assert takeover.status == 2  # STATUS_CODE_ERROR
    exchange = next(x for x in up.exchanges if x.request["messages"][0]["content"] == "doomed")
    told = dict(exchange.headers)[b"traceparent"].decode().split("-")
    assert takeover.trace_id == told[1]  # the lost run's trace
    assert takeover.parent  # under the lost run's span (from its Redis record)
