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

_LINE = (
    b'{"time":"%s","requestId":"%s","clientRequestId":%s,"service":"%s","version":%s,'
    b'"replica":%s,"method":"%s","status":%d,"bytesIn":%d,"bytesOut":%d,"authMs":%.3f,'
    b'"queueMs":%.3f,"upstreamMs":%.3f,"totalMs":%.3f,"error":%s}\n'
)


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

    def request(
        self,
        rid: str,
        client_id: bytes | None,
        service: str,
        version: str,
        replica: str | None,
        method: bytes,
        status: int,
        bytes_in: int,
        bytes_out: int,
        auth_s: float,
        queue_s: float,
        upstream_s: float,
        total_s: float,
        error: str | None,
    ) -> None:
        """One request's line. Every string here is already JSON-safe (a UUID, names checked
        by config, an address, an HTTP method token, a client id checked against azureml's
        pattern, our own error words), so a template does what a JSON encoder would, for a
        fraction of the cost of building and encoding a dict on the hot path."""
        if self._fmt != "json":
            self.write({"time": self.now(), "requestId": rid,
                        "clientRequestId": client_id.decode() if client_id else None,
                        "service": service, "version": version or None, "replica": replica,
                        "method": method.decode(), "status": status, "bytesIn": bytes_in,
                        "bytesOut": bytes_out, "authMs": round(auth_s * 1000, 3),
                        "queueMs": round(queue_s * 1000, 3),
                        "upstreamMs": round(upstream_s * 1000, 3),
                        "totalMs": round(total_s * 1000, 3), "error": error})
            return
        self._append(_LINE % (
            self.now().encode(), rid.encode(),
            b"null" if client_id is None else b'"' + client_id + b'"',
            service.encode(), b'"' + version.encode() + b'"' if version else b"null",
            b'"' + replica.encode() + b'"' if replica else b"null", method, status,
            bytes_in, bytes_out, auth_s * 1000, queue_s * 1000, upstream_s * 1000,
            total_s * 1000, b'"' + error.encode() + b'"' if error else b"null",
        ))

    def write(self, record: dict[str, Any]) -> None:
        if self._stream is None:
            return
        if self._fmt == "json":
            line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        else:
            line = (" ".join(f"{k}={v}" for k, v in record.items() if v is not None)
                    + "\n").encode()
        self._append(line)

    def _append(self, line: bytes) -> None:
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
