"""The access log: one line per request (JSON by default), batched off the hot path.

A record costs one orjson encode and a list append; lines go out together every few
milliseconds, so a busy router makes one write per batch, not one per request. Only the fields
below are logged: never a header value, a key, a token or a body.
"""

from __future__ import annotations

import asyncio
import time
from typing import IO, Any, Literal

import orjson

FLUSH_INTERVAL_S = 0.05
FLUSH_LINES = 512

LogFormat = Literal["json", "text"]


class _WallClock:
    """ISO-8601 UTC timestamps, with the formatting of the seconds part done once a second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        t = time.time()
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((t - second) * 1000):03d}Z"


class AccessLog:
    def __init__(self, stream: IO[bytes] | None, fmt: LogFormat = "json") -> None:
        self._stream = stream
        self._fmt = fmt
        self._lines: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._clock = _WallClock()

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def now(self) -> str:
        return self._clock.now()

    def write(self, record: dict[str, Any]) -> None:
        if self._stream is None:
            return
        if self._fmt == "json":
            line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        else:
            line = (" ".join(f"{k}={v}" for k, v in record.items() if v is not None)
                    + "\n").encode()
        self._lines.append(line)
        if len(self._lines) >= FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines and self._stream is not None:
            lines, self._lines = self._lines, []
            self._stream.write(b"".join(lines))
            self._stream.flush()
