"""One run per session, over real sockets: the incident's five scenarios.

A server we learned from deadlocked when a user sent a new prompt before the
last answer was done.  These tests replay that story against a real
in-process hypercorn on 127.0.0.1 (and, where the upstream's connections
matter, a real :class:`~tools.fakes.FakeUpstream`).  The incident's "100 ms
later" and "50 ms apart" are replaced by ordering on events: the next request
is sent once the previous one is known to be in flight (its ``stream_start``
is logged, or its upstream request has arrived), so nothing depends on how
fast this machine is.  ``test_supersede_deadline.py`` replays the literal
timings in virtual time.

Also here: ``POST /v1/sessions/{id}/interrupt`` (reason ``interrupted``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import httpx
import orjson
import pytest
import trio

from tests.conftest import (
    RawClient,
    RecordingUpstream,
    Server,
    WaitableSink,
    tasks_living,
    waitable_server,
)
from tools.fakes import FakeUpstream, Plan, Step, mock_plan
from trio_stream import EventLogger, Settings, open_service, serve_service
from trio_stream.upstream import mocktext
from trio_stream.upstream.openai import OpenAIUpstream
from trio_stream.wire.request import ChatRequest
from trio_stream.wire.sse import SSEDecoder, SSEEvent

PROMPT_A = [{"role": "user", "content": "prompt A"}]
PROMPT_B = [{"role": "user", "content": "prompt B"}]
LIFECYCLE = ("stream_start", "stream_cancelled", "prev_stream_finished_cleanly", "stream_end")


@dataclass
class Reply:
    """What one streaming client received."""

    status: int = 0
    run_id: str = ""
    events: list[SSEEvent] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1].data == "[DONE]"

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [orjson.loads(e.data) for e in self.events if '"choices"' in e.data]

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in self.chunks)

    @property
    def error_code(self) -> str | None:
        errors = [orjson.loads(e.data)["error"] for e in self.events if '"error"' in e.data]
        return errors[-1]["code"] if errors else None


def body(messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    return {"model": "m", "messages": messages, "stream": True, "max_tokens": max_tokens}


async def chat(
    client: httpx.AsyncClient, payload: dict[str, Any], *, session: str | None = None,
    reply: Reply | None = None,
) -> Reply:  # fmt: skip
    """Stream one completion into ``reply`` (which a sibling task may watch)."""
    reply = reply if reply is not None else Reply()
    headers = {"x-session-id": session} if session else {}
    async with client.stream("POST", "/v1/chat/completions", json=payload, headers=headers) as r:
        reply.status = r.status_code
        reply.run_id = r.headers.get("x-run-id", "")
        decoder = SSEDecoder()
        async for raw in r.aiter_bytes():
            reply.events.extend(decoder.feed(raw))
    return reply


def lifecycle(logs: WaitableSink, *traces: str) -> list[tuple[str, str, str | None]]:
    """The lifecycle lines naming ``traces``, in log order: (event, trace, reason)."""
    return [
        (r["event"], r["trace"], r.get("reason"))
        for r in logs.records
        if r["event"] in LIFECYCLE and r.get("trace") in traces
    ]


async def settled(server: Server) -> None:
    """Every client stream closed (so every ``stream_end`` is logged)."""
    await server.service.wait_streams_closed()
    await server.service.runs.wait_idle()


def hang_on_prompt_a(body: dict[str, Any]) -> Plan:
    """Prompt A's upstream never sends a token (stuck before the first one);
    anything else is answered like the built-in mock, at once."""
    if body["messages"] == PROMPT_A:
        return Plan(steps=[Step(hang=True)])
    return mock_plan("openai")(body)


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeUpstream:
    upstream = FakeUpstream("openai", plan=hang_on_prompt_a)
    await nursery.start(upstream.serve)
    return upstream


A_LETS_GO_AFTER = 0.3  # seconds prompt A's upstream call ignores its cancellation


@pytest.fixture
async def on_fake(
    settings: Settings, fake: FakeUpstream
) -> AsyncIterator[tuple[Server, WaitableSink]]:
    """A server on the fake upstream whose upstream call for prompt A goes on
    for 0.3 s after A is cancelled (a blocking upstream call, as in the
    incident, but one that ends within the supersede deadline).  httpx closes
    A's connection as soon as its read is cancelled; the call itself, as the
    run manager sees it, ends 0.3 s later."""
    cfg = settings.replace(upstream="openai", upstream_url=fake.url)

    def stuck_close(request: ChatRequest) -> float:
        return A_LETS_GO_AFTER if request.messages == PROMPT_A else 0.0

    upstream = RecordingUpstream(OpenAIUpstream(cfg), stuck_close=stuck_close)
    async with waitable_server(cfg, upstream=upstream) as served:
        yield served


# -- scenario 1 -----------------------------------------------------------------


async def test_scenario_1_normal_stream(settings: Settings) -> None:
    """A normal stream logs stream_start then stream_end (completed), is never
    cancelled, and leaves no task behind."""
    with trio.fail_after(10):
        async with waitable_server(settings) as (server, logs):
            baseline = await tasks_living()
            async with server.client() as client:
                reply = await chat(client, body(PROMPT_A, 12), session="s1")
            await settled(server)
            assert await tasks_living() == baseline
    assert reply.done
    assert reply.text == mocktext.expected_text(PROMPT_A, 12)
    run = reply.run_id
    assert lifecycle(logs, run) == [("stream_start", run, None), ("stream_end", run, None)]
    assert logs.events("stream_end", trace=run)[0]["status"] == "completed"
    assert len(server.service.runs.sessions) == 0


# -- scenario 2 -----------------------------------------------------------------


async def test_scenario_2_user_stops_stream(settings: Settings) -> None:
    """A client killed mid-stream cancels its run (reason client_disconnect)
    before stream_end; the partial answer is saved once and no task leaks."""
    cfg = settings.replace(mock_delay_ms=20)  # 1,000 tokens: the stream outlives the client
    with trio.fail_after(10):
        async with waitable_server(cfg) as (server, logs):
            baseline = await tasks_living()
            client = await RawClient.post(
                server.port, "/v1/chat/completions", body(PROMPT_A, 1000),
                headers=(("x-session-id", "s2"),),
            )  # fmt: skip
            reply = Reply(events=[])
            while len(reply.chunks) < 3:  # the user reads a little, then kills the client
                event = await client.next_event()
                assert event is not None
                reply.events.append(event)
            await client.aclose()
            run = logs.events("stream_start")[0]["trace"]
            await logs.wait_for("stream_end", trace=run)
            await settled(server)
            assert await tasks_living() == baseline
            saved = await server.service.store.get("public", run)
    assert not reply.done
    assert lifecycle(logs, run) == [
        ("stream_start", run, None),
        ("stream_cancelled", run, "client_disconnect"),
        ("stream_end", run, None),
    ]
    assert saved is not None
    assert (saved.status, saved.reason) == ("partial", "client_disconnect")
    assert mocktext.expected_text(PROMPT_A, 1000).startswith(saved.content)
    assert saved.content.startswith(reply.text)  # the client got a prefix of what was saved


# -- scenario 3: the critical one ---------------------------------------------


async def supersede_before_first_token(
    server: Server, logs: WaitableSink, fake: FakeUpstream
) -> tuple[Reply, Reply]:
    """Prompt A in session S; once A's upstream request is in flight (and
    before its first token, which never comes), prompt B in S."""
    first, second = Reply(), Reply()
    async with server.client() as client, trio.open_nursery() as nursery:
        nursery.start_soon(lambda: chat(client, body(PROMPT_A, 10), session="S", reply=first))
        await fake.wait_for(lambda: len(fake.requests) == 1)
        await chat(client, body(PROMPT_B, 10), session="S", reply=second)
    await settled(server)
    return first, second


async def test_scenario_3_new_prompt_supersedes_running_one(
    on_fake: tuple[Server, WaitableSink], fake: FakeUpstream
) -> None:
    """The incident: B supersedes A before A's first token.  A's client gets
    the superseded error event; B answers fully, without waiting out the
    supersede deadline; the log reads A start, B start, A cancelled
    (superseded), prev_stream_finished_cleanly, A end, B end -- and never
    prev_stream_timeout_on_cancel.  The session entry is gone afterwards."""
    server, logs = on_fake
    with trio.fail_after(10):
        a, b = await supersede_before_first_token(server, logs, fake)
    assert (a.status, a.error_code, a.text, a.done) == (200, "superseded", "", False)
    assert b.done
    assert b.text == mocktext.expected_text(PROMPT_B, 10)
    assert lifecycle(logs, a.run_id, b.run_id) == [
        ("stream_start", a.run_id, None),
        ("stream_start", b.run_id, None),
        ("stream_cancelled", a.run_id, "superseded"),
        ("prev_stream_finished_cleanly", a.run_id, None),
        ("stream_end", a.run_id, None),
        ("stream_end", b.run_id, None),
    ]
    assert logs.events("prev_stream_finished_cleanly")[0]["session"] == "S"
    assert logs.events("prev_stream_timeout_on_cancel") == []
    # "Quickly": B's stream took a fraction of the 2 s deadline it never hit.
    took = logs.time_of("stream_end", trace=b.run_id) - logs.time_of("stream_start", trace=b.run_id)
    assert took < server.service.settings.supersede_timeout / 2
    assert len(server.service.runs.sessions) == 0
    assert server.service.runs.live == 0


async def test_scenario_3_successor_upstream_opens_after_predecessor_closed(
    on_fake: tuple[Server, WaitableSink], fake: FakeUpstream
) -> None:
    """Two runs of one session never hold upstream requests at once.  A's
    upstream call goes on for 0.3 s after A is cancelled; B's upstream request
    starts only once A's call has ended (in the server's record of upstream
    calls), 0.3 s or more but less than the supersede deadline after B
    arrived, and the fake upstream sees B's connection open only after A's
    connection has closed."""
    server, logs = on_fake
    with trio.fail_after(10):
        _, b = await supersede_before_first_token(server, logs, fake)
    (upstream,) = server.service.clients.values()
    assert isinstance(upstream, RecordingUpstream)
    req_a, req_b = (
        next(r for _, r in upstream.opened if r.messages == p) for p in (PROMPT_A, PROMPT_B)
    )
    assert upstream.history == [("open", req_a), ("close", req_a), ("open", req_b),
                                ("close", req_b)]  # fmt: skip
    b_arrived = logs.time_of("stream_start", trace=b.run_id)
    waited = upstream.opened_at(req_b) - b_arrived
    assert A_LETS_GO_AFTER <= waited < server.service.settings.supersede_timeout
    by_prompt = {orjson.dumps(c.requests[0]["messages"]): c for c in fake.connections}
    conn_a, conn_b = by_prompt[orjson.dumps(PROMPT_A)], by_prompt[orjson.dumps(PROMPT_B)]
    assert len(fake.connections) == 2
    assert conn_a.closed is not None
    assert conn_a.closed <= conn_b.opened
    assert conn_b.opened - b_arrived >= A_LETS_GO_AFTER


# -- scenario 4 -----------------------------------------------------------------


async def test_scenario_4_requests_without_session_all_complete(settings: Settings) -> None:
    """Five overlapping requests without a session (each sent once the previous
    one has started) all complete with their exact text; none is cancelled."""
    cfg = settings.replace(mock_delay_ms=10)
    prompts = [[{"role": "user", "content": f"request {i}"}] for i in range(5)]
    replies = [Reply() for _ in prompts]
    with trio.fail_after(10):
        async with waitable_server(cfg) as (server, logs):
            baseline = await tasks_living()
            async with server.client() as client, trio.open_nursery() as nursery:
                for i, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
                    payload = body(prompt, 20)
                    nursery.start_soon(partial(chat, client, payload, reply=reply))
                    await logs.wait_until(lambda n=i: len(logs.events("stream_start")) > n)
                # all five were in flight at once
                assert len(logs.events("stream_end")) < 5
            await settled(server)
            assert await tasks_living() == baseline
    for prompt, reply in zip(prompts, replies, strict=True):
        assert reply.done
        assert reply.text == mocktext.expected_text(prompt, 20)
    assert [r["status"] for r in logs.events("stream_end")] == ["completed"] * 5
    assert logs.events("stream_cancelled") == []


# -- scenario 5 -----------------------------------------------------------------


async def test_scenario_5_sessions_do_not_disturb_each_other(settings: Settings) -> None:
    """Rapid prompts in two sessions, interleaved (X1 Y1 X2 Y2 X3 Y3): a new
    prompt cancels only its own session's run.  Each cancel line directly
    follows the start of the same session's next run, X3 and Y3 complete with
    their exact text, and each prev_stream_finished_cleanly names its session."""
    cfg = settings.replace(mock_delay_ms=10)
    order = [("X", 1), ("Y", 1), ("X", 2), ("Y", 2), ("X", 3), ("Y", 3)]
    prompts = {key: [{"role": "user", "content": f"{key[0]}{key[1]}"}] for key in order}
    replies = {key: Reply() for key in order}
    with trio.fail_after(10):
        async with waitable_server(cfg) as (server, logs):
            baseline = await tasks_living()
            async with server.client() as client, trio.open_nursery() as nursery:
                for n, key in enumerate(order):
                    payload = body(prompts[key], 30)
                    nursery.start_soon(
                        partial(chat, client, payload, session=key[0], reply=replies[key])
                    )
                    await logs.wait_until(lambda n=n: len(logs.events("stream_start")) > n)
            await settled(server)
            assert await tasks_living() == baseline
    for key in [("X", 1), ("Y", 1), ("X", 2), ("Y", 2)]:
        assert replies[key].error_code == "superseded", key
    for key in [("X", 3), ("Y", 3)]:
        assert replies[key].done, key
        assert replies[key].text == mocktext.expected_text(prompts[key], 30)
    run_of = {key: replies[key].run_id for key in order}
    session_of = {run_of[key]: key[0] for key in order}
    lines = [(r["event"], r.get("trace")) for r in logs.records if r["event"] in LIFECYCLE[:2]]
    for key, successor in [
        (("X", 1), ("X", 2)), (("Y", 1), ("Y", 2)), (("X", 2), ("X", 3)), (("Y", 2), ("Y", 3)),
    ]:  # fmt: skip
        at = lines.index(("stream_cancelled", run_of[key]))
        assert lines[at - 1] == ("stream_start", run_of[successor]), (key, lines)
    assert len(logs.events("stream_cancelled")) == 4
    for record in logs.events("prev_stream_finished_cleanly"):
        assert record["session"] == session_of[record["trace"]]
    assert len(logs.events("prev_stream_finished_cleanly")) == 4


# -- the interrupt endpoint ----------------------------------------------------


async def test_interrupt_cancels_session_run_before_first_token(
    on_fake: tuple[Server, WaitableSink], fake: FakeUpstream
) -> None:
    """POST /v1/sessions/{id}/interrupt cancels the session's running run even
    while it waits for its first token: the answer names the run, its client
    gets the interrupted error event, its upstream connection closes, and a
    second interrupt finds nothing to interrupt."""
    server, logs = on_fake
    a = Reply()
    with trio.fail_after(10):
        async with server.client() as client, trio.open_nursery() as nursery:
            nursery.start_soon(lambda: chat(client, body(PROMPT_A, 10), session="S", reply=a))
            await fake.wait_for(lambda: len(fake.requests) == 1)
            first = await client.post("/v1/sessions/S/interrupt")
            await fake.wait_for(lambda: fake.open_connections == 0)
            await logs.wait_for("stream_end")
            again = await client.post("/v1/sessions/S/interrupt")
        await settled(server)
    assert first.status_code == 200
    run = first.json()["run_id"]
    assert first.json() == {"interrupted": True, "run_id": run}
    assert a.run_id == run
    assert (a.error_code, a.done) == ("interrupted", False)
    assert lifecycle(logs, run) == [
        ("stream_start", run, None),
        ("stream_cancelled", run, "interrupted"),
        ("stream_end", run, None),
    ]
    # Nothing was produced, so nothing was saved and the session is unknown now.
    assert again.status_code == 404
    assert len(server.service.runs.sessions) == 0


async def test_interrupt_without_running_run_and_across_keys(settings: Settings) -> None:
    """The interrupt endpoint answers {"interrupted": false, "run_id": null}
    for a known session with nothing running, 404 for an unknown session, and
    never reaches into another API key's session of the same name."""
    cfg = settings.replace(api_keys=("key-one", "key-two"), mock_delay_ms=10)
    one = {"authorization": "Bearer key-one"}
    two = {"authorization": "Bearer key-two"}
    with trio.fail_after(10):
        async with waitable_server(cfg) as (server, logs):
            async with server.client(headers=one) as c1, server.client(headers=two) as c2:
                finished = await chat(c1, body(PROMPT_A, 3), session="S")
                idle = await c1.post("/v1/sessions/S/interrupt")
                unknown = await c1.post("/v1/sessions/nobody/interrupt")
                running = Reply()
                async with trio.open_nursery() as nursery:
                    payload = body(PROMPT_B, 1000)
                    nursery.start_soon(lambda: chat(c1, payload, session="T", reply=running))
                    await logs.wait_for("stream_start", session="T")
                    foreign = await c2.post("/v1/sessions/T/interrupt")
                    assert logs.events("stream_cancelled") == []  # key two touched nothing
                    own = await c1.post("/v1/sessions/T/interrupt")
            await settled(server)
    assert finished.done
    assert idle.json() == {"interrupted": False, "run_id": None}
    assert unknown.status_code == 404
    assert foreign.status_code == 404
    assert foreign.json()["error"]["type"] == "not_found_error"
    assert own.json() == {"interrupted": True, "run_id": running.run_id}
    assert running.error_code == "interrupted"


# -- the operator script ----------------------------------------------------------

SCRIPT = Path(__file__).parent.parent / "tools" / "scenarios.sh"


@pytest.fixture
def server_log(tmp_path: Path) -> Iterator[TextIO]:
    with open(tmp_path / "server.log", "w") as log:
        yield log


async def test_operator_script_passes_against_a_live_server(
    settings: Settings, server_log: TextIO
) -> None:
    """tools/scenarios.sh, run as an operator runs it (curl, real sleeps)
    against a live server and its text log file, checks all five scenarios,
    the client side and the log lines, and passes (exit status 0)."""
    cfg = settings.replace(mock_delay_ms=150)  # B arrives before A's first token
    logger = EventLogger("text", stream=server_log)
    with trio.fail_after(60):
        async with open_service(cfg, logger=logger) as service, trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_service, service))
            url = f"http://127.0.0.1:{port}"
            done = await trio.run_process(
                ["bash", str(SCRIPT), url, server_log.name], capture_stdout=True, check=False
            )
            nursery.cancel_scope.cancel()
    out = done.stdout.decode()
    assert done.returncode == 0, out
    assert out.count("PASS") == 15, out  # five scenarios, ten log checks
    assert out.count("(log)") == 10, out
    assert "FAIL" not in out
    assert "A had tokens" not in out  # scenario 3 replayed exactly: B before A's first token
