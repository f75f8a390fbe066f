"""1,000 random races of completion, Stop, supersession, interrupt and disconnect.

Invariant (docs/api.md section 3.4): whatever the interleaving, every run that produced
content has exactly one saved row -- never two, never none -- holding exactly
what the run received, and a run that produced nothing has no row.  And
afterwards nothing is left behind: no live run, no session entry, no task.

The in-memory driver and ``autojump_clock`` make 1,000 runs take a few
seconds.  The actions are drawn from a seeded ``random.Random``; Trio itself
also shuffles the order of tasks woken at the same instant, so each run of the
test explores more interleavings -- the invariant must hold for all of them.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import trio.testing

from tests.conftest import RecordingStore, tasks_living
from tests.memasgi import MemoryClient, start_request
from trio_stream import EventLogger, Service, Settings, TrioStreamApp, open_service
from trio_stream.logs import Record
from trio_stream.runs import Run
from trio_stream.upstream import mocktext

SEED = 20261104
CHAINS = 40  # concurrent "users"; each sends RUNS_PER_CHAIN requests
RUNS_PER_CHAIN = 25
ACTIONS = ("complete", "cancel", "supersede", "disconnect", "interrupt", "storm")
BAD_EVENTS = ("save_duplicate_refused", "save_failed", "save_timeout", "run_crashed")


@dataclass(frozen=True)
class Spec:
    tag: str
    session: str | None
    detach: bool
    stream: bool
    max_tokens: int
    action: str
    at: float  # seconds after the run was created

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.tag}]

    def body(self) -> dict[str, Any]:
        return {"messages": self.messages, "stream": self.stream,
                "max_tokens": self.max_tokens, "detach": self.detach}  # fmt: skip


def draw(rng: random.Random, chain: int, n: int) -> Spec:
    max_tokens = rng.randint(1, 8)
    return Spec(
        tag=f"race-{chain}-{n}",
        session=None if rng.random() < 0.15 else f"s{chain}",
        detach=rng.random() < 0.4,
        stream=rng.random() < 0.8,
        max_tokens=max_tokens,
        action=rng.choice(ACTIONS),
        at=rng.randint(0, max_tokens + 2) / 1000,  # the mock sends one token per 1 ms
    )


class Races:
    """Drives the chains and keeps every run the manager creates."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.service: Service | None = None
        self.app: TrioStreamApp | None = None
        self.runs: dict[str, Run] = {}  # by tag (the prompt)
        self.created: dict[str, trio.Event] = {}
        self.records: list[Record] = []
        self.clients: list[MemoryClient] = []
        self.side: list[MemoryClient] = []  # Stop / interrupt requests

    def sink(self, record: Record) -> None:
        """Log sink: ``stream_start`` is logged inside ``RunManager.create``."""
        self.records.append(record)
        if record["event"] == "stream_start":
            assert self.service is not None
            run = self.service.runs.runs[record["trace"]]
            tag = run.request.messages[0]["content"]
            self.runs[tag] = run
            self.created[tag].set()

    async def chain(self, nursery: trio.Nursery, chain: int, specs: list[Spec]) -> None:
        assert self.app is not None
        for spec in specs:
            self.created[spec.tag] = trio.Event()
            headers = {"x-session-id": spec.session} if spec.session else {}
            client = start_request(
                nursery, self.app, "POST", "/v1/chat/completions", json=spec.body(),
                headers=headers,
            )  # fmt: skip
            self.clients.append(client)
            await self.created[spec.tag].wait()
            await trio.sleep(spec.at)
            await self.act(nursery, spec, self.runs[spec.tag], client)

    async def act(self, nursery: trio.Nursery, spec: Spec, run: Run, client: MemoryClient) -> None:
        assert self.app is not None
        if spec.action in ("cancel", "storm"):
            self.side.append(start_request(nursery, self.app, "POST", f"/v1/runs/{run.id}/cancel"))
        if spec.action == "interrupt" and spec.session:
            path = f"/v1/sessions/{spec.session}/interrupt"
            self.side.append(start_request(nursery, self.app, "POST", path))
        if spec.action in ("disconnect", "storm"):
            await client.disconnect()
        if spec.action in ("supersede", "storm"):
            return  # the chain's next request starts now, while this one may run
        await client.finished.wait()


async def test_random_races_save_each_run_with_content_exactly_once(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """1,000 runs under random interleavings of completion, Stop, supersession,
    interrupt and disconnect (attached and detached): each run with content
    is saved by exactly one call into exactly one row holding its content;
    each run without content has no row; nothing is refused, failed or leaked."""
    races = Races(random.Random(SEED))
    specs = {c: [draw(races.rng, c, n) for n in range(RUNS_PER_CHAIN)] for c in range(CHAINS)}
    store = RecordingStore(str(tmp_path / "races.db"), threaded=False)
    logger = EventLogger(stream=io.StringIO(), sink=races.sink)
    cfg = settings.replace(mock_delay_ms=1, db=store.path)
    with trio.fail_after(600):  # virtual seconds; the whole test takes about one
        async with open_service(cfg, logger=logger, store=store) as service:
            races.service, races.app = service, TrioStreamApp(service)
            baseline = await tasks_living()
            async with trio.open_nursery() as nursery:
                for c, chain_specs in specs.items():
                    nursery.start_soon(races.chain, nursery, c, chain_specs)
            for run in races.runs.values():
                await run.done.wait()  # detached runs may outlive their requests
            assert await tasks_living() == baseline
            assert (service.runs.live, len(service.runs.sessions)) == (0, 0)
            counts = {run.id: await store.count(run.id) for run in races.runs.values()}

    all_specs = [s for chain_specs in specs.values() for s in chain_specs]
    assert len(races.runs) == len(all_specs) == 1000
    with_content = 0
    for spec in all_specs:
        run = races.runs[spec.tag]
        saves = store.saves_of(run.id)
        if run.log.last_seq == 0:
            assert (saves, counts[run.id]) == ([], 0), spec
            continue
        with_content += 1
        assert counts[run.id] == 1, spec
        [saved] = saves
        assert saved.content == run.log.content, spec
        assert mocktext.expected_text(spec.messages, spec.max_tokens).startswith(saved.content)
        outcome = run.log.outcome
        assert outcome is not None
        assert (saved.status, saved.reason) == (
            {"completed": "complete", "cancelled": "partial"}[outcome.status.value],
            outcome.reason,
        ), spec
    assert len(store.saves) == with_content  # no save of any other id
    assert [r for r in races.records if r["event"] in BAD_EVENTS] == []
    seen = {c.headers["x-run-id"] for c in races.clients if "x-run-id" in c.headers}
    assert seen <= {run.id for run in races.runs.values()}
    assert {c.status for c in races.side} <= {200, 404}

    # The draw really produced the races it claims to (else the test proves little).
    endings = Counter(
        run.log.outcome.reason for run in races.runs.values() if run.log.outcome is not None
    )
    for reason in ("length", "stopped", "superseded", "interrupted", "client_disconnect"):
        assert endings[reason] >= 20, endings
    assert 50 <= with_content <= 950, with_content
