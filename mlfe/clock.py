"""Time as a seam: the control loop reads and waits on time only through a :class:`Clock`.

Production code uses :class:`MonotonicClock` (the event loop's own clock). Tests use
:class:`FakeClock`, whose time moves only when the test says so, so that a 60-second scale-down
window takes no real time and every run interleaves the same way.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds; only differences are meaningful."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time (zero or less: just yield to the loop)."""
        ...


class MonotonicClock:
    """The running event loop's clock: ``loop.time()`` and ``asyncio.sleep``.

    Going through the loop (not ``time.monotonic``) keeps the code compatible with loop-level
    virtual time such as the ``looptime`` pytest plugin.
    """

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """Manual clock for tests: time stands still until the test moves it.

    Sleepers resume only once time has reached their deadline, in deadline order (ties in the
    order they went to sleep). :meth:`advance` only makes them runnable;
    :meth:`advance_and_settle` also lets them run, stepping through every deadline on the way,
    so a loop that sleeps one second at a time ticks 60 times when time moves by 60 seconds.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        deadline = self._now + seconds
        if deadline <= self._now:
            # Like asyncio.sleep(0). Never registering a deadline that is already due also means
            # advance_and_settle() always makes progress.
            await asyncio.sleep(0)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._order), waiter))
        # A cancelled sleeper stays in the heap until its deadline; _wake_due() skips it.
        await waiter

    @property
    def sleepers(self) -> int:
        """How many tasks are waiting in :meth:`sleep` (lets a test see a loop is parked)."""
        return sum(1 for _, _, waiter in self._sleepers if not waiter.done())

    def next_deadline(self) -> float | None:
        """The earliest deadline of a live sleeper, if any."""
        for deadline, _, waiter in sorted(self._sleepers):
            if not waiter.done():
                return deadline
        return None

    def advance(self, seconds: float) -> None:
        """Move time forward and make every sleeper whose deadline has passed runnable."""
        if seconds < 0:
            raise ValueError(f"time cannot go backwards (advance by {seconds!r})")
        self._now += seconds
        self._wake_due()

    async def advance_and_settle(self, seconds: float, *, rounds: int = 20) -> None:
        """Advance by ``seconds``, stopping at each deadline on the way to let the woken run.

        Before the first step and after each one the event loop gets ``rounds`` turns, enough
        for a woken task to do its non-blocking work and go back to sleep.
        """
        if seconds < 0:
            raise ValueError(f"time cannot go backwards (advance by {seconds!r})")
        target = self._now + seconds
        await settle(rounds)  # tasks already runnable act at the current time, before it moves
        while (deadline := self.next_deadline()) is not None and deadline <= target:
            self._now = deadline
            self._wake_due()
            await settle(rounds)
        self._now = target
        await settle(rounds)

    def _wake_due(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, waiter = heapq.heappop(self._sleepers)
            if not waiter.done():
                waiter.set_result(None)


async def settle(rounds: int = 20) -> None:
    """Give the event loop ``rounds`` turns so that runnable tasks get to their next wait."""
    for _ in range(rounds):
        await asyncio.sleep(0)
