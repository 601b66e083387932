"""The access log: one line per request (JSON by default), formatted late and written off the loop.

A request costs the loop one tuple appended to a list. Every few milliseconds (or every
`FLUSH_LINES` records) the batch is formatted in one pass and handed to a writer thread, which
does the blocking `write(2)`s. What waits for that thread is bounded (`max_buffer_bytes`): when
stdout stalls (a reader that stops reading, a full pipe) new batches are dropped and counted
(`dropped`, exported as `mlfe_access_log_dropped_lines`), and the event loop never blocks on it.
Only the fields below are logged: never a header value, a key, a token or a body.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from typing import IO, Any, Literal

import orjson

FLUSH_INTERVAL_S = 0.05
FLUSH_LINES = 512
MAX_BUFFER_BYTES = 4 * 1024 * 1024  # waiting for the writer thread; more is dropped
CLOSE_WAIT_S = 1.0  # at shutdown, how long to wait for the writer to drain a stalled stdout

LogFormat = Literal["json", "text"]

_LINE = (
    b'{"time":"%s","requestId":"%s","clientRequestId":%s,"service":"%s","version":%s,'
    b'"replica":%s,"method":"%s","status":%d,"bytesIn":%d,"bytesOut":%d,"authMs":%.3f,'
    b'"queueMs":%.3f,"upstreamMs":%.3f,"totalMs":%.3f,"error":%s}\n'
)

# One request's fields as recorded on the hot path (formatted later, in a batch).
_Record = tuple[float, str, "bytes | None", str, str, "str | None", bytes, int, int, int, float,
                float, float, float, "str | None"]


class _WallClock:
    """ISO-8601 UTC timestamps, with the formatting of the seconds part done once a second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def at(self, t: float) -> str:
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((t - second) * 1000):03d}Z"

    def now(self) -> str:
        return self.at(time.time())


def _quoted(value: str | None) -> bytes:
    return b'"' + value.encode() + b'"' if value else b"null"


class _Writer(threading.Thread):
    """Writes handed-over chunks to a file descriptor; the only place that may block on it."""

    def __init__(self, fd: int) -> None:
        super().__init__(name="mlfe-access-log", daemon=True)
        self._fd = fd
        self._chunks: deque[bytes] = deque()
        self._cond = threading.Condition(threading.Lock())
        self.pending = 0  # bytes handed over and not yet written (read under the lock)
        self.failed = False

    def offer(self, chunk: bytes, limit: int) -> bool:
        """Queue `chunk` unless that would put more than `limit` bytes in waiting."""
        with self._cond:
            if self.failed or (self.pending and self.pending + len(chunk) > limit):
                return False
            self.pending += len(chunk)
            self._chunks.append(chunk)
            self._cond.notify()
        return True

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._chunks:
                    self._cond.wait()
                chunk = self._chunks.popleft()
            done = 0
            try:
                while done < len(chunk):
                    # (Not `view = view[os.write(...):]`: mypyc evaluates that write twice.)
                    done += os.write(self._fd, chunk[done:] if done else chunk)
            except OSError:
                with self._cond:  # stdout is gone (EPIPE, closed): stop and drop from now on
                    self.failed = True
                    self._chunks.clear()
                    self.pending = 0
                    self._cond.notify_all()
                return
            with self._cond:
                self.pending -= len(chunk)
                self._cond.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until everything handed over is written."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.pending and not self.failed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


class AccessLog:
    def __init__(
        self,
        stream: IO[bytes] | None,
        fmt: LogFormat = "json",
        max_buffer_bytes: int = MAX_BUFFER_BYTES,
    ) -> None:
        self._stream = stream
        self._fmt = fmt
        self._max_buffer = max_buffer_bytes
        self._records: list[_Record] = []
        self._lines: list[bytes] = []  # whole lines from write() (admin events, text format)
        self._timer: asyncio.TimerHandle | None = None
        self._clock = _WallClock()
        self._writer: _Writer | None = None
        self.written = 0  # lines handed to the writer
        self.dropped = 0  # lines dropped because the writer was too far behind

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
        """One request's line, recorded as a tuple; formatting waits for the batch."""
        if self._stream is None:
            return
        self._records.append((time.time(), rid, client_id, service, version, replica, method,
                              status, bytes_in, bytes_out, auth_s, queue_s, upstream_s, total_s,
                              error))
        self._scheduled()

    def write(self, record: dict[str, Any]) -> None:
        if self._stream is None:
            return
        if self._fmt == "json":
            line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        else:
            line = (" ".join(f"{k}={v}" for k, v in record.items() if v is not None)
                    + "\n").encode()
        self._lines.append(line)
        self._scheduled()

    def _scheduled(self) -> None:
        if len(self._records) + len(self._lines) >= FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL_S, self.flush)

    def _format(self, records: list[_Record]) -> list[bytes]:
        """Every string here is already JSON-safe (a UUID, names checked by config, an
        address, an HTTP method token, a client id checked against azureml's pattern, our own
        error words), so a template does what a JSON encoder would, for a fraction of the cost
        of building and encoding a dict per request."""
        at = self._clock.at
        if self._fmt != "json":
            return [
                (" ".join(f"{k}={v}" for k, v in {
                    "time": at(t), "requestId": rid,
                    "clientRequestId": cid.decode() if cid else None, "service": svc,
                    "version": ver or None, "replica": rep, "method": meth.decode(),
                    "status": st, "bytesIn": bi, "bytesOut": bo,
                    "authMs": round(a * 1000, 3), "queueMs": round(q * 1000, 3),
                    "upstreamMs": round(u * 1000, 3), "totalMs": round(tot * 1000, 3),
                    "error": err}.items() if v is not None) + "\n").encode()
                for (t, rid, cid, svc, ver, rep, meth, st, bi, bo, a, q, u, tot, err) in records
            ]
        return [
            _LINE % (at(t).encode(), rid.encode(),
                     b"null" if cid is None else b'"' + cid + b'"', svc.encode(), _quoted(ver),
                     _quoted(rep), meth, st, bi, bo, a * 1000, q * 1000, u * 1000, tot * 1000,
                     _quoted(err))
            for (t, rid, cid, svc, ver, rep, meth, st, bi, bo, a, q, u, tot, err) in records
        ]

    def flush(self) -> None:
        """Hand what is batched to the writer thread, or drop it (counted) when the writer is
        too far behind. Never blocks."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stream is None or not (self._records or self._lines):
            return
        records, self._records = self._records, []
        lines, self._lines = self._lines, []
        count = len(records) + len(lines)
        if records:
            lines += self._format(records)
        if self._hand_over(b"".join(lines)):
            self.written += count
        else:
            self.dropped += count

    def _hand_over(self, chunk: bytes) -> bool:
        writer = self._writer
        if writer is None or (not writer.is_alive() and not writer.failed):
            # Started on first use, so a forked worker process gets its own thread.
            assert self._stream is not None
            self._stream.flush()  # whatever the stream itself buffered goes first
            writer = self._writer = _Writer(self._stream.fileno())
            writer.start()
        return writer.offer(chunk, self._max_buffer)

    def drain(self, timeout_s: float = CLOSE_WAIT_S) -> bool:
        """Wait at most `timeout_s` for the writer to get out what was flushed (False if it
        did not: stdout is stalled, and what is left is given up). Blocks: not on the loop."""
        return self._writer is None or self._writer.drain(timeout_s)
