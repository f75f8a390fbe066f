"""Chaos (issue 6): the load generator's ``mixed`` scenario against an upstream
that randomly fails, stalls, drops and lies.

The server is a real in-process server on 127.0.0.1; its upstream is a real
:class:`~tools.fakes.FakeUpstream` whose reply to each request is drawn from a
random generator seeded with the request's messages, so every request meets
the same fate however the requests interleave.  Each reply streams the mock's
text (so the load generator can check every token it receives) and then,
depending on the draw, finishes, or breaks: HTTP 500, a slow or missing first
token, a malformed chunk, a dropped connection, or silence mid-stream.  The
load generator mixes full reads, early disconnects, supersedes, stops,
detached resumes and slow readers.

Afterwards, whatever happened:

* no request is still in flight at the upstream, and no upstream connection
  is left open (the fake closes each connection after its response, so an
  open one can only be one the server forgot);
* Trio's live task count is exactly back at its baseline;
* every run the server started ended once, and every run that produced
  content was saved exactly once (one ``save()`` call, one row); no run
  without content was saved; no save failed or was refused as a duplicate;
* no client saw a lost, repeated, reordered or foreign token;
* ``/healthz`` still answers at once.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import h11
import orjson
import trio

from tests.conftest import RecordingStore, running_server, tasks_living
from tools.fakes import FakeUpstream, Plan, Step, openai_chunk
from trio_stream import Settings
from trio_stream.load import LoadConfig, run_load
from trio_stream.upstream import mocktext

SEED = 20261
REQUESTS = 300
CONCURRENCY = 24
MAX_TOKENS = 12
FIRST_TOKEN_TIMEOUT = 0.5
TOKEN_TIMEOUT = 0.3

#: The upstream's fates and their weights.
FATES = (
    ("ok", 50), ("http_500", 8), ("slow_first_token", 10), ("no_first_token", 4),
    ("malformed", 8), ("drop", 10), ("silent", 10),
)  # fmt: skip


def draw_fate(body: dict[str, Any]) -> tuple[str, random.Random]:
    """This request's fate: a pure function of its messages."""
    rng = random.Random(f"{SEED}:{orjson.dumps(body['messages']).decode()}")
    names, weights = zip(*FATES, strict=True)
    return rng.choices(names, weights)[0], rng


def chaos_plan(body: dict[str, Any]) -> Plan:
    fate, rng = draw_fate(body)
    if fate == "http_500":
        return Plan(status=500, steps=[Step(b'{"error": "chaos"}')], content_type="text/plain")
    tokens = list(mocktext.tokens(body["messages"], body.get("max_tokens")))
    steps = [Step(openai_chunk(t), delay=rng.choice((0.0, 0.0, 0.002, 0.01))) for t in tokens]
    cut = rng.randrange(1, len(tokens))  # where a mid-stream fault strikes
    if fate == "slow_first_token":
        steps[0].delay = rng.uniform(0.05, 0.2)  # under the first-token timeout
    elif fate == "no_first_token":
        steps = [Step(hang=True)]
    elif fate == "malformed":
        steps[cut:] = [Step(b"data: {not json\n\n"), Step(hang=True)]
    elif fate == "drop":
        steps[cut:] = [Step(drop=True)]
    elif fate == "silent":
        steps[cut:] = [Step(hang=True)]
    if fate in ("ok", "slow_first_token"):
        finish = mocktext.reply_length(body.get("max_tokens"))[1]
        steps += [Step(openai_chunk(finish=finish)), Step(b"data: [DONE]\n\n")]
    return Plan(steps=steps)


class _CloseAfterResponse:
    """Wraps the fake's h11 connection: every response says ``connection: close``."""

    def __init__(self, h: h11.Connection) -> None:
        self._h = h

    def send(self, event: Any) -> bytes | None:
        if isinstance(event, h11.Response):
            headers = [*event.headers, (b"connection", b"close")]
            event = h11.Response(status_code=event.status_code, headers=headers)
        data: bytes | None = self._h.send(event)
        return data


class ChaosUpstream(FakeUpstream):
    """A FakeUpstream that closes each connection after one response and counts
    responses in flight, so that after the load any open upstream connection
    or in-flight request is one the server failed to close."""

    def __init__(self) -> None:
        super().__init__("openai", chaos_plan)
        self.in_flight = 0
        self.fates: Counter[str] = Counter()

    async def _respond(self, stream: Any, h: h11.Connection, request: dict[str, Any]) -> bool:
        self.in_flight += 1
        self.fates[draw_fate(request)[0]] += 1
        try:
            await super()._respond(stream, _CloseAfterResponse(h), request)  # type: ignore[arg-type]
        finally:
            self.in_flight -= 1
            self._notify()
        return False


async def test_mixed_load_against_a_chaotic_upstream_leaves_nothing_behind(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """After 300 mixed requests against an upstream that fails, stalls, drops
    and lies at random: no upstream request or connection is left, no task is
    left, every run with content is saved exactly once (and none without),
    no client saw a wrong token, and /healthz answers within 0.5 s."""
    fake = ChaosUpstream()
    await nursery.start(fake.serve)
    db = str(tmp_path / "chaos.db")
    store = RecordingStore(db)
    settings = Settings(
        port=0, db=db, upstream="openai", upstream_url=fake.url,
        first_token_timeout=FIRST_TOKEN_TIMEOUT, token_timeout=TOKEN_TIMEOUT,
        supersede_timeout=1.0,
    )  # fmt: skip
    config = LoadConfig(
        scenario="mixed", requests=REQUESTS, concurrency=CONCURRENCY, max_tokens=MAX_TOKENS,
        seed=SEED, timeout=10.0, model="fake",
    )  # fmt: skip
    with trio.fail_after(60):
        async with running_server(settings, store=store) as server:
            baseline = await tasks_living()
            t0 = trio.current_time()
            report = await run_load(config.replace(url=server.url))
            elapsed = trio.current_time() - t0
            with trio.fail_after(5):  # a forgotten upstream request would hang here
                await fake.wait_for(lambda: fake.in_flight == 0 and fake.open_connections == 0)
            assert await tasks_living() == baseline

            with trio.fail_after(0.5):  # a liveness check, not a benchmark
                health_t0 = trio.current_time()
                async with server.client(verify=False) as client:
                    assert (await client.get("/healthz")).json() == {"status": "ok"}
                health = trio.current_time() - health_t0

            logs = server.logs
            starts = {r["trace"] for r in logs.events("stream_start")}
            ends = logs.events("stream_end")
            assert sorted(r["trace"] for r in ends) == sorted(starts)  # each run ended once
            for end in ends:
                saves = store.saves_of(end["trace"])
                assert len(saves) == (1 if end["tokens"] else 0), end
                assert await store.count(end["trace"]) == len(saves)
                if saves:
                    assert saves[0].events == end["tokens"]
            for bad in ("save_failed", "save_timeout", "save_duplicate_refused", "run_crashed"):
                assert not logs.events(bad), bad

    integrity = report["integrity"]
    assert {k: integrity[k] for k in ("lost", "duplicated", "reordered", "foreign")} == {
        "lost": 0, "duplicated": 0, "reordered": 0, "foreign": 0,
    }  # fmt: skip
    assert report["requests"]["total"] == REQUESTS
    assert len(starts) <= REQUESTS
    saved = Counter(m.status for m in store.saves)
    reasons = Counter(r["reason"] for r in logs.events("stream_cancelled"))
    assert fake.fates["ok"] > 0
    assert all(fake.fates[name] > 0 for name, _ in FATES)
    print(
        f"\nchaos: {REQUESTS} requests in {elapsed:.2f} s (load {report['wall_s']} s, "
        f"concurrency {CONCURRENCY}, max_tokens {MAX_TOKENS}); "
        f"runs {len(starts)}, saved {dict(saved)}; upstream fates {dict(fake.fates)}; "
        f"cancellations {dict(reasons)}; client requests {report['requests']}, "
        f"errors {report['errors']}, cancelled_by {report['cancelled_by']}, "
        f"integrity {integrity}; /healthz {health * 1000:.1f} ms"
    )
