"""What the load generator does, decided up front and sans-IO: config, scenarios, budget.

Every request has a number (0, 1, 2, ...).  Its scenario parameters come
from a random generator seeded with ``(--seed, number)``, so a run is
reproducible however the requests interleave: request 17 of seed 3 always
disconnects after the same number of events.

Scenarios (one *unit* of work each; a unit is one request, except
``supersede``, which is a small group in one session):

=============  ================================================================
steady         stream the reply to its end
disconnect     disconnect after ``cut_after`` events (0: right after sending)
supersede      ``group`` requests in one ``X-Session-Id``, each sent once the
               previous one streams; all but the last should be superseded
stop           ``POST /v1/runs/{id}/cancel`` after ``cut_after`` events, then
               read to the end (attached or detached run)
resume         detached; read ``cut_after`` events, drop the connection, then
               ``GET /v1/runs/{id}/events`` with ``Last-Event-ID`` to the end
slow-reader    read in small pieces with ``pause`` seconds between reads
mixed          each unit picks one of the above (weights :data:`MIX`)
=============  ================================================================

This module never imports trio.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import orjson

SCENARIOS = ("steady", "disconnect", "supersede", "stop", "resume", "slow-reader", "mixed")
MIX = (
    ("steady", 4), ("disconnect", 2), ("supersede", 1), ("stop", 1), ("resume", 1),
    ("slow-reader", 1),
)  # fmt: skip
DEFAULT_REQUESTS = 100


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """Everything ``trio-stream load`` takes (and :func:`run_load` accepts)."""

    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    concurrency: int = 16
    requests: int | None = None  # None with no duration: DEFAULT_REQUESTS
    duration: float | None = None  # seconds during which new requests start
    scenario: str = "steady"
    http2: bool = False
    insecure: bool = False
    max_tokens: int = 64
    seed: int = 0
    timeout: float = 60.0  # per unit of work
    model: str = "mock"
    supersede_group: int = 3
    streams_per_connection: int = 100  # HTTP/2
    settle_timeout: float = 5.0  # wait for the server's tasks to return before the last scrape

    def replace(self, **changes: Any) -> LoadConfig:
        return dataclasses.replace(self, **changes)

    @property
    def request_limit(self) -> int | None:
        if self.requests is None and self.duration is None:
            return DEFAULT_REQUESTS
        return self.requests

    def validate(self) -> LoadConfig:
        """Raise ``ValueError`` naming every invalid option; return self."""
        problems = []
        if self.scenario not in SCENARIOS:
            problems.append(f"--scenario must be one of {', '.join(SCENARIOS)}")
        if self.concurrency < 1:
            problems.append("--concurrency must be >= 1")
        if self.requests is not None and self.requests < 1:
            problems.append("--requests must be >= 1")
        if self.duration is not None and not self.duration > 0:
            problems.append("--duration must be > 0")
        if not 1 <= self.max_tokens <= 1_000_000:
            problems.append("--max-tokens must be 1-1000000")
        if not self.timeout > 0:
            problems.append("--timeout must be > 0")
        if self.supersede_group < 2:
            problems.append("supersede_group must be >= 2")
        if not 1 <= self.streams_per_connection <= 1000:
            problems.append("streams_per_connection must be 1-1000")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass(frozen=True, slots=True)
class Unit:
    """One unit of work: a scenario and its parameters."""

    kind: str
    cut_after: int = 0  # disconnect / stop / resume: events read before acting
    detach: bool = False  # stop: a detached run
    pause: float = 0.0  # slow-reader: seconds between reads
    group: int = 1  # supersede: requests in the session


def plan_unit(config: LoadConfig, number: int) -> Unit:
    """The unit that starts with request ``number`` (deterministic in seed and number)."""
    rng = random.Random(f"{config.seed}:{number}")
    kind = config.scenario
    if kind == "mixed":
        names, weights = zip(*MIX, strict=True)
        kind = rng.choices(names, weights)[0]
    n = config.max_tokens
    if kind == "disconnect":
        return Unit(kind, cut_after=rng.randrange(0, n))
    if kind == "supersede":
        return Unit(kind, group=config.supersede_group)
    if kind == "stop":
        return Unit(kind, cut_after=rng.randint(1, max(1, n // 2)), detach=rng.random() < 0.5)
    if kind == "resume":
        return Unit(kind, cut_after=rng.randint(1, max(1, n // 2)))
    if kind == "slow-reader":
        return Unit(kind, pause=rng.uniform(0.001, 0.005))
    return Unit(kind)


class Budget:
    """Hands out request numbers until ``--requests`` or ``--duration`` is used up."""

    def __init__(self, limit: int | None, deadline: float | None) -> None:
        self.limit = limit
        self.deadline = deadline
        self.issued = 0

    def next(self, now: float) -> int | None:
        """The next request number, or None: start no more units."""
        if self.deadline is not None and now >= self.deadline:
            return None
        return self._take()

    def extend(self, count: int) -> list[int]:
        """Up to ``count`` more numbers for the unit being started (no deadline check)."""
        out = []
        for _ in range(count):
            n = self._take()
            if n is None:
                break
            out.append(n)
        return out

    def _take(self) -> int | None:
        if self.limit is not None and self.issued >= self.limit:
            return None
        self.issued += 1
        return self.issued - 1


def messages_for(config: LoadConfig, number: int) -> list[dict[str, Any]]:
    """Distinct messages per request, so that every reply differs."""
    return [{"role": "user", "content": f"trio-stream load: seed {config.seed}, request {number}"}]


def chat_body(config: LoadConfig, messages: list[dict[str, Any]], *, detach: bool) -> bytes:
    body: dict[str, Any] = {
        "model": config.model, "messages": messages, "stream": True,
        "max_tokens": config.max_tokens,
    }  # fmt: skip
    if detach:
        body["detach"] = True
    return orjson.dumps(body)


def base_headers(config: LoadConfig) -> list[tuple[str, str]]:
    headers = [("accept", "text/event-stream")]
    if config.api_key:
        headers.append(("authorization", f"Bearer {config.api_key}"))
    return headers
