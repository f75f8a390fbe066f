"""One run per session under 1,000 random interleavings (memory driver + autojump).

A seeded :class:`random.Random` picks, step after step, among: a new request
in one of 20 sessions (attached or detached, streamed or not; 55 %), a
disconnect of one open client (10 %), ``POST /v1/sessions/{id}/interrupt``
(10 %), and nothing (25 %); after each step virtual time moves by a random
amount.  (Disconnects are kept rare: the few clients open at any moment are
mostly successors waiting for a slow predecessor, and cutting them all would
leave the deadline path untested.)

Each request also draws, when it is made, how long its run's cleanup is
stuck: its upstream call may ignore the cancel for a while (holding the
upstream), and its save may be slow -- each up to 3 s, past the 2 s
supersede deadline, so some predecessors are fenced.  Only the order of
trio's scheduler is not seeded, so the invariants must hold under any order.

Invariants, checked after every step, after every pause and at every
upstream open: in every session at most one *unfenced* run holds its
upstream request, and the session's current run is its newest run while that
one is live (an old run's cleanup never clears its successor's entry).  At
the end: every client finished, the registry is empty, no run is live,
``tasks_living`` is back at its exact baseline, every run was saved at most
once, and every client saw a prefix of what its run saved.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from tests.conftest import (
    RecordingUpstream,
    Slow,
    SlowPostgresStore,
    SlowStore,
    memory_app,
    tasks_living,
)
from tests.memasgi import MemoryClient, start_request
from trio_stream import Service, Settings, TrioStreamApp
from trio_stream.limits import Limiter, Limits, LocalLimiter, Verdict
from trio_stream.limits.keys import parse_keys
from trio_stream.store import Message
from trio_stream.upstream import mocktext
from trio_stream.upstream.mock import MockUpstream
from trio_stream.wire.request import ChatRequest

SEED = 20261103
STEPS = 1000
SESSIONS = [f"s{i}" for i in range(20)]
TENANT = "public"
STUCK = (0.0, 0.0, 0.0, 0.0, 0.01, 0.5, 3.0)  # 3.0 > --supersede-timeout
PAUSES = (0.0, 0.0, 0.001, 0.005, 0.02, 0.1)
KEY_NAME = "walker"


@dataclass
class Request:
    client: MemoryClient
    messages: list[dict[str, str]]
    max_tokens: int
    stream: bool
    disconnected: bool = False


@dataclass
class Harness:
    """The random walk's state, its steps and its invariant checks."""

    rng: random.Random
    nursery: trio.Nursery
    app: TrioStreamApp
    service: Service
    upstream: RecordingUpstream
    stuck: dict[str, tuple[float, float]]  # prompt -> (upstream close, save) delays
    requests: list[Request] = field(default_factory=list)
    interrupts: list[MemoryClient] = field(default_factory=list)
    newest: dict[str, str] = field(default_factory=dict)  # session -> newest run id
    violations: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)  # the key, with limits on
    limits: Limits | None = None
    admitted: list[float] = field(default_factory=list)  # when each was admitted
    _seen_records: int = 0

    def new_request(self, step: int) -> None:
        session = self.rng.choice(SESSIONS)
        messages = [{"role": "user", "content": f"{session} step {step}"}]
        self.stuck[messages[0]["content"]] = (self.rng.choice(STUCK), self.rng.choice(STUCK))
        req = Request(MemoryClient(), messages, self.rng.randint(1, 8), self.rng.random() < 0.85)
        body = {
            "messages": messages, "max_tokens": req.max_tokens, "stream": req.stream,
            "detach": self.rng.random() < 0.15,
        }  # fmt: skip
        req.client = start_request(
            self.nursery, self.app, "POST", "/v1/chat/completions", json=body,
            headers={"X-Session-Id": session, **self.headers},
        )  # fmt: skip
        self.requests.append(req)

    async def step(self, step: int) -> None:
        action = self.rng.random()
        open_clients = [
            r for r in self.requests if not (r.client.finished.is_set() or r.disconnected)
        ]
        if action < 0.55 or not open_clients:
            self.new_request(step)
        elif action < 0.65:
            victim = self.rng.choice(open_clients)
            victim.disconnected = True
            await victim.client.disconnect()
        elif action < 0.75:
            path = f"/v1/sessions/{self.interrupt_target()}/interrupt"
            self.interrupts.append(
                start_request(self.nursery, self.app, "POST", path, headers=self.headers)
            )
        # else: only time passes (a waiting successor may reach its deadline)
        await trio.testing.wait_all_tasks_blocked()
        self.check()
        await trio.sleep(self.rng.choice(PAUSES))
        self.check()

    def interrupt_target(self) -> str:
        """The session an interrupt step names: any, at random."""
        return self.rng.choice(SESSIONS)

    def check(self) -> None:
        """The invariants of the module docstring, for every session.

        Also called from inside a run's upstream call, where the run manager
        would turn an ``AssertionError`` into a crashed run: so a violation is
        recorded in :attr:`violations` as well, for the test to assert on.
        """
        try:
            self._check()
        except AssertionError as exc:
            self.violations.append(repr(exc))
            raise

    def _check(self) -> None:
        records = self.app.logs.records  # type: ignore[attr-defined]
        for record in records[self._seen_records :]:
            if record["event"] == "stream_start":
                self.newest[record["session"]] = record["trace"]
        self._seen_records = len(records)
        table = self.service.runs.sessions
        for session in SESSIONS:
            live = table.live((TENANT, session))
            holders = [
                run_id for run_id, fenced in live.items()
                if not fenced and self.upstream.holds(self.service.runs.runs[run_id].request)
            ]  # fmt: skip
            assert len(holders) <= 1, (session, live)
            newest = self.newest.get(session)
            assert table.current((TENANT, session)) == (newest if newest in live else None)
        if self.limits is not None:
            assert self.limits.max_streams is not None
            assert self.limits.rpm is not None
            limiter = self.service.limits.limiter
            assert isinstance(limiter, LocalLimiter)
            assert len(limiter._keys[KEY_NAME].slots) <= self.limits.max_streams
            now = math.floor(trio.current_time())
            in_window = [t for t in self.admitted if math.floor(t) > now - 60]
            assert len(in_window) <= self.limits.rpm


def received(req: Request) -> str:
    """The content this client received (streamed text, or the one object's)."""
    if req.stream:
        return req.client.text()
    if req.client.status == 200 and req.client.complete:
        return str(req.client.json()["choices"][0]["message"]["content"] or "")
    return ""


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_random_interleavings_keep_one_run_per_session(
    settings: Settings,
    autojump_clock: trio.testing.MockClock,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    """1,000 random steps over 20 sessions never leave two unfenced runs of a
    session holding the upstream, never lose a session's current run, and end
    with an empty registry, no live run, no leaked task, and every run saved
    at most once with what its client saw as a prefix (module docstring) --
    in SQLite and in Postgres alike."""
    stuck: dict[str, tuple[float, float]] = {}
    harness: list[Harness] = []

    def stuck_close(request: ChatRequest) -> float:
        return stuck[request.messages[0]["content"]][0]

    def save_delay(message: Message) -> float:
        run = harness[0].service.runs.runs[message.run_id]  # registered while it saves
        return stuck[run.request.messages[0]["content"]][1]

    upstream = RecordingUpstream(
        MockUpstream(0.01), stuck_close=stuck_close, on_open=lambda _: harness[0].check()
    )
    store: Slow
    if backend == "postgres":
        store = SlowPostgresStore(request.getfixturevalue("pg_url"), save_delay)
    else:
        store = SlowStore(":memory:", save_delay)
    with trio.fail_after(120):
        async with memory_app(settings, upstream=upstream, store=store) as (service, app):
            baseline = await tasks_living()
            async with trio.open_nursery() as nursery:
                h = Harness(random.Random(SEED), nursery, app, service, upstream, stuck)
                harness.append(h)
                for step in range(STEPS):
                    await h.step(step)
            await service.runs.wait_idle()
            assert all(r.client.finished.is_set() for r in h.requests)
            assert len(service.runs.sessions) == 0
            assert service.runs.live == 0
            assert await tasks_living() == baseline
            saved = {m.run_id: m for s in SESSIONS for m in await store.session_messages(TENANT, s)}

    assert h.violations == []
    assert app.logs.events("run_crashed") == []
    calls = [m.run_id for m in store.saves]
    assert len(calls) == len(set(calls)), "a run was saved twice"
    assert set(saved) == set(calls)
    assert len(app.logs.events("stream_start")) == len(h.requests)
    for req in h.requests:
        if text := received(req):
            content = saved[req.client.headers["x-run-id"]].content
            assert content.startswith(text)
            assert mocktext.expected_text(req.messages, req.max_tokens).startswith(content)
    assert all(c.status in (200, 404) for c in h.interrupts)
    # The walk really went down every path.
    reasons = {r["reason"] for r in app.logs.events("stream_cancelled")}
    assert {"superseded", "client_disconnect", "interrupted"} <= reasons
    assert app.logs.events("prev_stream_finished_cleanly")
    assert len(app.logs.events("prev_stream_timeout_on_cancel")) >= 3
    assert any(c.json()["interrupted"] for c in h.interrupts if c.status == 200)


async def test_random_interleavings_with_limits_on(
    settings: Settings, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same walk by one key with ``max_streams = 3``, ``rpm = 200`` and
    ``tpm = 100000``: after every step no more than 3 of its streams hold a
    slot and no minute's window (of whole seconds) has more than 200 admissions;
    some requests are refused (429), none of them starts a run; at the end
    every slot is released, no run is live and no task leaked."""
    limits = Limits(rpm=200, tpm=100000, max_streams=3)
    keys = parse_keys([{"name": KEY_NAME, "secret": "sk-walk", "tenant": TENANT, "rpm": 200,
                        "tpm": 100000, "max_streams": 3}])  # fmt: skip
    admitted: list[float] = []
    real_admit = LocalLimiter.admit

    async def admit(self: Limiter, name: str, lim: Limits, slot: str) -> Verdict:
        verdict = await real_admit(self, name, lim, slot)  # type: ignore[arg-type]
        if verdict.admitted:
            admitted.append(trio.current_time())
        return verdict

    monkeypatch.setattr(LocalLimiter, "admit", admit)
    upstream = RecordingUpstream(MockUpstream(0.01), stuck_close=lambda _: 0.0)
    with trio.fail_after(120):
        async with memory_app(settings, upstream=upstream, keys=keys) as (service, app):
            baseline = await tasks_living()
            async with trio.open_nursery() as nursery:
                h = Harness(random.Random(SEED), nursery, app, service, upstream, {},
                            headers={"authorization": "Bearer sk-walk"}, limits=limits,
                            admitted=admitted)  # fmt: skip
                for step in range(STEPS // 2):
                    await h.step(step)
            await service.runs.wait_idle()
            assert all(r.client.finished.is_set() for r in h.requests)
            assert service.runs.live == 0
            limiter = service.limits.limiter
            assert isinstance(limiter, LocalLimiter)
            assert limiter._keys[KEY_NAME].slots == set()
            assert await tasks_living() == baseline
    assert h.violations == []
    statuses = [r.client.status for r in h.requests]
    refused = [r for r in h.requests if r.client.status == 429]
    assert refused, statuses
    assert {r.client.json()["error"]["code"] for r in refused} == {
        "rate_limit_exceeded", "too_many_streams",
    }  # fmt: skip
    assert len(app.logs.events("stream_start")) == len(h.requests) - len(refused)
    assert len(admitted) == len(h.requests) - len(refused)
