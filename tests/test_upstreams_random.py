"""Three upstream members under a random walk of failures, slowness and
recoveries (memory driver + autojump clock, seeded, bounded).

Three scripted members (``a``, ``b``, ``c``) serve two models: ``m`` (one
attempt at a time, failover) and ``h`` (``hedge_after_ms = 200``).  A seeded
:class:`random.Random` picks, step after step: a new request for either
model, streamed or not, in one of 8 sessions or none (50 %); a member
changes state (25 %); a client disconnects (10 %); nothing (15 %); then
virtual time moves by a random amount.  A member's state is one of

* ``up``: its answer, one token every 10 ms;
* ``refused``: no HTTP answer (a connect failure);
* ``5xx``: HTTP 503 before any token;
* ``429``: HTTP 429 with ``Retry-After`` of 1 or 2 s;
* ``slow``: its first token after 0.3, 1.5 or 6 s (``c``'s own
  ``first_token_timeout`` is 1 s, the request's 4 s);
* ``breaks``: two tokens, then the stream fails.

``b`` has ``probe = true`` (every 300 ms while it cools): its probe is
answered unless it is ``refused``, ``5xx`` or ``429``.

Each member's tokens name it (``a0 a1 ...``), so the saved text says which
member streamed it.  The invariants:

* no request reaches a member in cooldown: checked by each member at the
  instant a request opens its stream;
* the served-by member is named right: every saved message's ``served_by``
  is the member whose tokens it holds, and all its tokens are that member's;
* saved exactly once: no run saved twice; every client that received text
  got a prefix of its run's saved content;
* no leaked task: ``tasks_living`` back at its exact baseline; no member has
  a stream in flight, no upstream stream is left open.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import RecordingStore, memory_app, task_census, tasks_living
from tests.memasgi import MemoryClient, start_request
from trio_stream import Settings
from trio_stream.config.members import GroupSpec, MemberSpec, ModelName, Upstreams
from trio_stream.core.router import Router
from trio_stream.errors import UpstreamError
from trio_stream.upstream import Finish, Item
from trio_stream.wire.request import ChatRequest

SEEDS = (20261207, 7, 2112)
STEPS = 600
NAMES = ("a", "b", "c")
MODELS = ("m", "h")
SESSIONS = [f"s{i}" for i in range(8)]
STATES = ("up", "up", "up", "refused", "5xx", "429", "slow", "breaks")
SLOW = (0.3, 1.5, 6.0)
PAUSES = (0.0, 0.0, 0.005, 0.02, 0.1, 0.3, 1.0)
GAP = 0.01


class Walked(UpstreamError):
    """An error a scripted member raises, with the upstream's status."""

    def __init__(self, message: str, status: int | None, retry_after: str | None = None) -> None:
        headers = () if retry_after is None else ((b"retry-after", retry_after.encode()),)
        super().__init__(message, headers=headers)
        self.upstream_status = status


@dataclass
class ScriptedMember:
    """One member: answers by its current ``state``; checks, at each open,
    that the router has it out of cooldown."""

    name: str
    rng: random.Random
    state: str = "up"
    router: Router | None = None
    opened: int = 0
    open_now: int = 0
    probes_answered: int = 0
    violations: list[str] = field(default_factory=list)

    def stream(self, request: ChatRequest) -> AbstractAsyncContextManager[AsyncIterator[Item]]:
        return self._stream(request)

    @asynccontextmanager
    async def _stream(self, request: ChatRequest) -> AsyncIterator[AsyncIterator[Item]]:
        assert self.router is not None
        now = trio.current_time()
        member = self.router.members[self.name]
        if member.cooling(now):
            self.violations.append(
                f"{self.name} opened at {now}, cooling until {member.cool_until}"
            )
        self.opened += 1
        self.open_now += 1
        state = self.state
        try:
            await trio.lowlevel.checkpoint()  # the request is on its way
            if state == "refused":
                raise Walked("connection refused", None)
            if state == "5xx":
                raise Walked("503 from the member", 503)
            if state == "429":
                raise Walked("429 from the member", 429, self.rng.choice(("1", "2")))
            first_after = self.rng.choice(SLOW) if state == "slow" else GAP
            yield self._items(request, first_after, breaks=state == "breaks")
        finally:
            self.open_now -= 1

    async def _items(self, request: ChatRequest, first_after: float, *, breaks: bool) -> Any:
        count = request.max_tokens or 4
        for i in range(count):
            await trio.sleep(first_after if i == 0 else GAP)
            if breaks and i == 2:
                raise Walked("the member's stream broke", None)
            yield f"{self.name}{i} "
        yield Finish("stop")

    async def models(self) -> list[dict[str, Any]]:
        """The probe (``b`` has ``probe = true``): answered unless the member is down."""
        await trio.lowlevel.checkpoint()
        if self.state in ("refused", "5xx", "429"):
            raise Walked("the probe failed", None)
        self.probes_answered += 1
        return []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def aclose(self) -> None:
        pass


@dataclass
class Request:
    client: MemoryClient
    model: str
    stream: bool
    disconnected: bool = False


@dataclass
class Walk:
    rng: random.Random
    nursery: trio.Nursery
    app: Any
    members: dict[str, ScriptedMember]
    requests: list[Request] = field(default_factory=list)

    def new_request(self, step: int) -> None:
        model = self.rng.choice(MODELS)
        stream = self.rng.random() < 0.8
        body = {"model": model, "stream": stream, "max_tokens": self.rng.randint(3, 6),
                "messages": [{"role": "user", "content": f"walk step {step}"}]}  # fmt: skip
        headers = {}
        if self.rng.random() < 0.5:
            headers["X-Session-Id"] = self.rng.choice(SESSIONS)
        client = start_request(
            self.nursery, self.app, "POST", "/v1/chat/completions", json=body, headers=headers
        )
        self.requests.append(Request(client, model, stream))

    async def step(self, step: int) -> None:
        action = self.rng.random()
        open_ = [r for r in self.requests if not (r.client.finished.is_set() or r.disconnected)]
        if action < 0.5 or (0.75 <= action < 0.85 and not open_):
            self.new_request(step)
        elif action < 0.75:
            member = self.members[self.rng.choice(NAMES)]
            member.state = self.rng.choice(STATES)
        elif action < 0.85:
            victim = self.rng.choice(open_)
            victim.disconnected = True
            await victim.client.disconnect()
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(self.rng.choice(PAUSES))


def streamed_text(req: Request) -> str:
    if req.stream:
        return req.client.text()
    if req.client.status == 200 and req.client.complete:
        return str(req.client.json()["choices"][0]["message"]["content"] or "")
    return ""


def specs() -> tuple[MemberSpec, ...]:
    models = tuple(ModelName(m, m) for m in MODELS)
    cool, cap = 500.0, 4000.0
    return (
        MemberSpec("a", "mock", models=models, weight=2.0, cooldown_ms=cool, max_cooldown_ms=cap),
        MemberSpec("b", "mock", models=models, cooldown_ms=cool, max_cooldown_ms=cap, probe=True,
                   probe_interval_ms=300.0),
        MemberSpec("c", "mock", models=models, first_token_timeout=1.0, cool_after_failures=2,
                   cooldown_ms=cool, max_cooldown_ms=cap),
    )  # fmt: skip


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_member_failures_slowness_and_recoveries(
    settings: Settings, autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    """600 random steps (each seed) of requests, member failures (refused, 5xx, 429 with
    Retry-After, broken after two tokens), slowness and recoveries, with and
    without hedging: no request reaches a member in cooldown, every saved
    message names the member whose tokens it holds, each run is saved at most
    once with what its client saw as a prefix, and at the end no member has a
    stream in flight and tasks_living is back at its exact baseline."""
    rng = random.Random(seed)
    members = {name: ScriptedMember(name, random.Random(f"{seed}:{name}")) for name in NAMES}
    upstreams = Upstreams(specs(), (GroupSpec("h", 200.0),))
    cfg = settings.replace(upstreams=upstreams, first_token_timeout=4.0)
    store = RecordingStore(":memory:", threaded=False)
    with trio.fail_after(300):
        async with memory_app(cfg, clients=members, store=store) as (service, app):
            service.router.rng = random.Random(f"{seed}:router")
            for m in members.values():
                m.router = service.router
            baseline = await tasks_living()
            async with trio.open_nursery() as nursery:
                walk = Walk(rng, nursery, app, members)
                for step in range(STEPS):
                    await walk.step(step)
                for m in members.values():  # let the last requests end
                    m.state = "up"
            await service.runs.wait_idle()
            assert all(r.client.finished.is_set() for r in walk.requests)
            assert service.runs.live == 0
            assert [m.in_flight for m in service.router.members.values()] == [0, 0, 0]
            assert [m.open_now for m in members.values()] == [0, 0, 0]
            living = await tasks_living()
            assert living == baseline, task_census()
            rows = [m for s in SESSIONS for m in await store.session_messages("public", s)]
            logs = app.logs.events("stream_end")

    for m in members.values():
        assert m.violations == [], m.violations
    calls = [m.run_id for m in store.saves]
    assert len(calls) == len(set(calls)), "a run was saved twice"
    assert app.logs.events("run_crashed") == []
    by_run = {m.run_id: m for m in store.saves}
    for msg in store.saves:
        words = msg.content.split()
        if words:
            owners = {w[0] for w in words}
            assert owners == {msg.served_by}, (msg.served_by, msg.content)
    for end in logs:
        row = by_run.get(end["trace"])
        if row is not None and row.content:
            assert end["served_by"] == row.served_by
    for req in walk.requests:
        text = streamed_text(req)
        if text:
            run_id = req.client.headers["x-run-id"]
            assert by_run[run_id].content.startswith(text), (text, by_run[run_id])
    assert {m.run_id for m in rows} == {m.run_id for m in store.saves if m.session_id}
    # The walk really went down every path.
    outcomes = {r["failure"] for r in app.logs.events("upstream_failed")}
    assert {"connect", "server", "rate_limited", "broken", "timeout"} <= outcomes, outcomes
    assert app.logs.events("upstream_hedge")
    assert [r for r in app.logs.events("upstream_probe", member="b") if r["back"]]
    assert app.logs.events("upstream_probe", member="b", answered=False)
    statuses = {r.client.status for r in walk.requests}
    assert 503 in statuses  # every member cooling at once, some time
    served = {m.served_by for m in by_run.values() if m.content}
    assert served == set(NAMES)
    assert sum(m.opened for m in members.values()) > len(walk.requests)  # failovers, hedges
