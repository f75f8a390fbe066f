"""The in-process backend of the limits: one process, no store.

Windows run on trio's clock (so a test's ``autojump_clock`` moves them), the
UTC days and months of budgets and usage on the wall clock.  No method
checkpoints: each is one step of the event loop, atomic by construction.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .base import USAGE_DAYS, Limiter, Limits, UsageRow, Verdict, utc_day
from .window import bucket_of, decide, live


@dataclass
class _Key:
    requests: dict[int, int] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    slots: set[str] = field(default_factory=set)
    spent: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # day or month
    # day -> model -> [requests, prompt, completion]
    used: dict[str, dict[str, list[int]]] = field(default_factory=dict)


class LocalLimiter(Limiter):
    def __init__(
        self,
        window: float = 60.0,
        *,
        clock: Callable[[], float] = trio.current_time,
        wall: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(window)
        self._clock = clock
        self._wall = wall
        self._keys: defaultdict[str, _Key] = defaultdict(_Key)

    def _decide(self, name: str, limits: Limits, *, counting: bool) -> tuple[_Key, Verdict, int]:
        key = self._keys[name]
        now = self._clock()
        current = bucket_of(now, self.bucket)
        day = utc_day(self._wall())
        verdict = decide(
            limits, now, self.bucket, live(key.requests, current), live(key.tokens, current),
            key.spent[day], key.spent[day[:7]], len(key.slots), counting=counting,
        )  # fmt: skip
        return key, verdict, current

    async def admit(self, name: str, limits: Limits, slot: str) -> Verdict:
        """Cancellation: never checkpoints: admitted entirely or not at all."""
        key, verdict, current = self._decide(name, limits, counting=True)
        if verdict.admitted:
            key.requests[current] = key.requests.get(current, 0) + 1
            if limits.max_streams is not None:
                key.slots.add(slot)
        return verdict

    async def release(self, name: str, slot: str) -> None:
        """Cancellation: never checkpoints."""
        key = self._keys.get(name)
        if key is not None:
            key.slots.discard(slot)

    async def charge(
        self, name: str, model: str, prompt: int, completion: int, *, requests: int = 0,
        release: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        """Cancellation: never checkpoints."""
        key = self._keys[name]
        key.slots.difference_update(release)
        current = bucket_of(self._clock(), self.bucket)
        live(key.tokens, current)
        tokens = prompt + completion
        key.tokens[current] = key.tokens.get(current, 0) + tokens
        day = utc_day(self._wall())
        key.spent[day] += tokens
        key.spent[day[:7]] += tokens
        for old in [d for d in key.spent if len(d) == 10 and d < _days_ago(self._wall(), 2)]:
            del key.spent[old]
        row = key.used.setdefault(day, {}).setdefault(model, [0, 0, 0])
        row[0] += requests
        row[1] += prompt
        row[2] += completion
        oldest = _days_ago(self._wall(), USAGE_DAYS - 1)
        for old in [d for d in key.used if d < oldest]:
            del key.used[old]

    async def peek(self, name: str, limits: Limits) -> Verdict:
        """Cancellation: never checkpoints."""
        return self._decide(name, limits, counting=False)[1]

    async def usage(self, name: str) -> list[UsageRow]:
        """Cancellation: never checkpoints."""
        key = self._keys.get(name)
        if key is None:
            return []
        oldest = _days_ago(self._wall(), USAGE_DAYS - 1)
        return [
            UsageRow(day, model, *counts)
            for day in sorted(key.used, reverse=True)
            if day >= oldest
            for model, counts in sorted(key.used[day].items())
        ]


def _days_ago(wall: float, days: int) -> str:
    return utc_day(wall - days * 86400)
