"""A fake clock whose sleepers wake late, as a busy event loop wakes them: lets a test tell the
scheduled time of a tick from the time it ran."""

from __future__ import annotations

from mlfe.clock import FakeClock


class LateClock(FakeClock):
    """Every sleep ends ``late`` seconds after its deadline."""

    def __init__(self, late: float, start: float = 0.0) -> None:
        super().__init__(start)
        self.late = late

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds + self.late)
