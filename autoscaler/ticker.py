"""The one fixed-rate tick loop of the control loops (the replica autoscaler, the router's
self-scaler), on an injected :class:`~mlfe.clock.Clock`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from mlfe.clock import Clock


async def tick_every(
    clock: Clock,
    period: Callable[[], float],
    tick: Callable[[float], Awaitable[None]],
) -> None:
    """Run ``tick(now)`` every ``period()`` seconds of ``clock``, the first at once; never ends.

    ``now`` is the tick's *scheduled* time, not the time the task woke: windows then close on
    the tick they are due, not one period late when a wake-up comes a hair early. ``period`` is
    read after every tick, so a new period applies from the next one. After a tick that took
    longer than a period the next one runs at once (and is scheduled then), rather than a burst
    of ticks catching up on the missed ones.
    """
    scheduled = clock.now()
    while True:
        await tick(scheduled)
        scheduled = max(scheduled + period(), clock.now())
        await clock.sleep(scheduled - clock.now())
