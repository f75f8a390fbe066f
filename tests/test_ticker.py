"""The mock's shared timer, :class:`trio_stream.upstream.mock.Ticker`.

Every mock stream sleeps on one ticker (one task for all of them): a sleep
wakes at the first tick at or after its delay, never earlier, sleepers of one
tick wake together, a cancelled sleep is skipped, and a sleep shorter than
every pending one is not held behind them.  Run on
trio's autojump clock, so the times are exact.
"""

from __future__ import annotations

import trio
import trio.testing

from trio_stream.upstream.mock import TICK, Ticker


async def test_sleepers_wake_at_their_tick(autojump_clock: trio.testing.MockClock) -> None:
    """Each sleeper wakes at the first tick at or after its delay (not
    before); the sleepers of one tick wake together, after those of an
    earlier tick (within one tick trio runs them in its own batch order)."""
    ticker = Ticker()
    woken: list[tuple[str, float]] = []

    async def sleeper(name: str, delay: float) -> None:
        start = trio.current_time()
        await ticker.sleep(delay)
        woken.append((name, trio.current_time() - start))

    async with trio.open_nursery() as nursery:
        await nursery.start(ticker.run)
        for name, delay in (("a", 0.05), ("b", 0.05), ("c", 0.0204), ("d", 0.05)):
            nursery.start_soon(sleeper, name, delay)
            await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    assert woken[0][0] == "c"
    assert sorted(name for name, _ in woken[1:]) == ["a", "b", "d"]
    assert len({slept for name, slept in woken if name != "c"}) == 1
    for name, slept in woken:
        delay = 0.0204 if name == "c" else 0.05
        assert delay - 1e-9 <= slept < delay + TICK + 1e-9


async def test_a_cancelled_sleep_is_skipped(autojump_clock: trio.testing.MockClock) -> None:
    """A sleep cancelled before its tick raises ``Cancelled`` at once and is
    not woken later; the other sleepers of its tick still wake."""
    ticker = Ticker()
    woken: list[str] = []

    async def sleeper(name: str) -> None:
        await ticker.sleep(0.05)
        woken.append(name)

    async with trio.open_nursery() as nursery:
        await nursery.start(ticker.run)
        cancelled = trio.CancelScope()

        async def cancellable() -> None:
            with cancelled:
                await sleeper("x")

        nursery.start_soon(cancellable)
        nursery.start_soon(sleeper, "y")
        await trio.testing.wait_all_tasks_blocked()
        cancelled.cancel()
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    assert cancelled.cancelled_caught
    assert woken == ["y"]


async def test_an_earlier_tick_wakes_the_ticker(autojump_clock: trio.testing.MockClock) -> None:
    """While the ticker waits for a far tick, a new sleep due sooner is woken
    at its own tick, not held until the far one (removing the wake-up of the
    ticker on a new earliest tick makes "short" wake at 10 s)."""
    ticker = Ticker()
    woken: dict[str, float] = {}

    async def sleeper(name: str, delay: float) -> None:
        await ticker.sleep(delay)
        woken[name] = trio.current_time()

    async with trio.open_nursery() as nursery:
        await nursery.start(ticker.run)
        start = trio.current_time()
        nursery.start_soon(sleeper, "long", 10.0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(sleeper, "short", 0.01)
        await trio.sleep(11)
        nursery.cancel_scope.cancel()
    assert woken["short"] - start < 0.01 + TICK + 1e-9
    assert woken["long"] - start >= 10.0 - 1e-9
