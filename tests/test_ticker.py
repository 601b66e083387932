"""The one fixed-rate tick loop, on fake time: the scheduled time as `now`, no burst after a
slow tick, a new period from the next tick."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from autoscaler.ticker import tick_every
from mlfe.clock import FakeClock
from tests.late_clock import LateClock

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")

Tick = Callable[[float], Awaitable[None]]


@contextlib.asynccontextmanager
async def ticking(
    clock: FakeClock, period: Callable[[], float], tick: Tick
) -> AsyncIterator[None]:
    task = asyncio.create_task(tick_every(clock, period, tick))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_ticks_at_a_fixed_rate_from_the_start() -> None:
    clock = FakeClock(100.0)
    seen: list[float] = []

    async def tick(now: float) -> None:
        seen.append(now)

    async with ticking(clock, lambda: 2.0, tick):
        await clock.advance_and_settle(7)
    assert seen == [100.0, 102.0, 104.0, 106.0]


async def test_now_is_the_scheduled_time_not_the_wake_up() -> None:
    clock = LateClock(late=0.25)
    seen: list[tuple[float, float]] = []  # (now given, clock time when it ran)

    async def tick(now: float) -> None:
        seen.append((now, clock.now()))

    async with ticking(clock, lambda: 1.0, tick):
        await clock.advance_and_settle(3.5)
    assert seen == [(0.0, 0.0), (1.0, 1.25), (2.0, 2.25), (3.0, 3.25)]


async def test_a_slow_tick_is_followed_at_once_not_by_a_burst() -> None:
    clock = FakeClock()
    seen: list[float] = []

    async def tick(now: float) -> None:
        seen.append(now)
        if len(seen) == 1:
            await clock.sleep(3.5)  # three and a half periods of work

    async with ticking(clock, lambda: 1.0, tick):
        await clock.advance_and_settle(3.5)
        assert seen == [0.0, 3.5]  # the missed ticks at 1, 2 and 3 are not made up
        await clock.advance_and_settle(2)
    assert seen == [0.0, 3.5, 4.5, 5.5]


async def test_a_new_period_applies_from_the_next_tick() -> None:
    clock = FakeClock()
    period = 5.0
    seen: list[float] = []

    async def tick(now: float) -> None:
        seen.append(now)

    async with ticking(clock, lambda: period, tick):
        await clock.advance_and_settle(6)
        period = 1.0  # the sleep until 10 is under way; the one after it is 1 s
        await clock.advance_and_settle(6)
    assert seen == [0.0, 5.0, 10.0, 11.0, 12.0]
