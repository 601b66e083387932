"""Model data collection (``collect_model_data: true``), off the request path.

For every scored request the scoring path calls :meth:`DataCollector.submit` with what it already
has in hand (the bodies as ``bytes`` or as the list of chunks it collected, the content types, the
status and the ids). ``submit`` only appends a tuple to a bounded in-memory queue (bounded in
records and in body bytes), so it costs well under a microsecond on the event loop and never
blocks or does I/O: when the queue is full the record is dropped and counted instead.

A supervised drain task takes the queued records in batches and hands each batch to a dedicated
writer thread, which does all the work: joining chunks, truncating bodies over the cap, parsing
JSON bodies, base64 for the others, encoding the line with orjson, and appending it to

    <data_dir>/<service>/<version>/<yyyy>/<mm>/<dd>/data-<n>.jsonl      (UTC date of the record;
                                            a worker process writes data-worker-<i>-<n>.jsonl)

One line per record::

    {"time": "2024-05-01T12:00:00.123456Z", "requestId": ..., "service": ..., "version": ...,
     "status": 200, "request": <body>, "response": <body>,
     "requestTruncated": false, "responseTruncated": false}

where a body is the parsed JSON value when the body is JSON (its content type is JSON, or it has
no content type, and it parses) and is not truncated; otherwise
``{"base64": ..., "contentType": ... | null}``; an empty body is ``null``. A body longer than
``max_body_bytes`` is cut to its first ``max_body_bytes`` bytes, stored as base64 (a cut JSON
document does not parse) and marked ``*Truncated: true``.

Files are opened in append mode for each batch, so nothing is held open between batches. The
current file ``data-<n>`` is left for ``data-<n+1>`` when the next line would take it past
``rotate_bytes`` (a single line larger than that gets a file of its own). The first write a
collector makes to a directory goes to a new file after the highest existing ``n``, so after a
process restart a line torn by a crash is never continued. Records are handed to the OS at each
batch; they are not fsynced.

A write that fails (disk full, permissions) drops the batch's lines for that file (the partial
write is cut off again, so the file stays valid JSON lines), counts them in :attr:`dropped`, logs
(rate-limited) and carries on with the next batch. :meth:`stop` flushes every queued record.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

#: A body as the scoring path has it: whole, or as the list of chunks it received. A list is
#: taken as is (joined in the writer thread) and must not be changed after :meth:`submit`.
Body = bytes | list[bytes]

# (time, service, version, request_id, status,
#  request_body, request_content_type, response_body, response_content_type, queued_bytes)
_Record = tuple[float, str, str, str, int, Body, bytes | None, Body, bytes | None, int]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_DIRS = 1024  # rotation state kept per directory; older days are forgotten past this


@dataclass(slots=True)
class _BatchResult:
    written: int = 0
    failed: int = 0
    freed_bytes: int = 0
    error: BaseException | None = None


@dataclass(slots=True)
class _Sink:
    """Rotation state of one ``<service>/<version>/<yyyy>/<mm>/<dd>`` directory."""

    directory: Path
    n: int
    size: int
    prefix: str = "data"

    @property
    def path(self) -> Path:
        return self.directory / f"{self.prefix}-{self.n}.jsonl"


def _owner_only(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _mkdirs_private(directory: Path) -> None:
    """`mkdir -p` with every folder it creates owner-only (0700)."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)


class DataCollector:
    """Bounded queue of scored requests, written as JSON lines by a background writer.

    ``submit`` must be called on the event loop thread that runs :meth:`start`/:meth:`stop`.
    """

    def __init__(
        self,
        data_dir: Path,
        max_queue: int = 10_000,
        max_body_bytes: int = 64 * 1024,
        rotate_bytes: int = 64 * 1024 * 1024,
        batch: int = 512,
        clock: Callable[[], float] = time.time,
        *,
        max_queue_bytes: int = 128 * 1024 * 1024,
        warn_interval: float = 10.0,
        restart_delay: float = 1.0,
        file_prefix: str = "data",
    ) -> None:
        if max_queue < 1 or batch < 1 or max_body_bytes < 0 or rotate_bytes < 1:
            raise ValueError("max_queue, batch and rotate_bytes must be >= 1, max_body_bytes >= 0")
        self.data_dir = Path(data_dir)
        # Files are <prefix>-<n>.jsonl: several processes writing one data dir (router worker
        # processes) each take their own prefix, so their lines never interleave.
        self._prefix = file_prefix
        self._data_file = re.compile(re.escape(file_prefix) + r"-(\d+)\.jsonl")
        self.max_queue = max_queue
        #: Bodies longer than this are truncated. The scoring path may stop collecting a body's
        #: chunks once it holds more than this many bytes: the record is still marked truncated.
        self.max_body_bytes = max_body_bytes
        self.rotate_bytes = rotate_bytes
        self.batch = batch
        #: Bound on the body bytes queued or being written (memory), besides ``max_queue``.
        self.max_queue_bytes = max_queue_bytes
        self._clock = clock
        self._warn_interval = warn_interval
        self._restart_delay = restart_delay
        self._keep = max_body_bytes + 1  # kept of a longer ``bytes`` body at submit

        #: Records written to a file.
        self.written = 0
        #: Records lost: queue full, collector stopped, or the write failed (includes ``failed``).
        self.dropped = 0
        #: Records lost because encoding or writing them failed (a part of ``dropped``).
        self.failed = 0

        self._queue: deque[_Record] = deque()
        self._queued_bytes = 0  # body bytes queued or in the batch being written
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._restart: asyncio.Handle | None = None
        self._stopping = False
        self._closed = False
        self._in_flight = 0
        self._unwarned = 0  # drops since the last warning
        self._last_warn = float("-inf")
        self._last_error: BaseException | None = None
        # Writer thread only:
        self._sinks: dict[tuple[str, str, str], _Sink] = {}
        self._second: int | None = None
        self._second_text = ""
        self._day_text = ""

    # ---- request path ---------------------------------------------------------------------

    def submit(
        self,
        service: str,
        version: str,
        request_id: str,
        status: int,
        request_body: Body,
        request_content_type: bytes | None,
        response_body: Body,
        response_content_type: bytes | None,
        t: float | None = None,
    ) -> bool:
        """Queue one scored request; never blocks. False (and counted) if it was dropped.

        ``bytes`` bodies are kept as given; one longer than ``max_body_bytes`` is sliced here to
        ``max_body_bytes + 1`` bytes (so the big buffer is not held in the queue, and the writer
        still sees it was over the cap). Lists of chunks are kept as given. ``t`` defaults to
        the collector's clock (epoch seconds).
        """
        q = self._queue
        n = len(q)
        keep = self._keep
        if type(request_body) is list:
            size = sum(map(len, request_body))
        else:
            if len(request_body) > keep:
                request_body = request_body[:keep]
            size = len(request_body)
        if type(response_body) is list:
            size += sum(map(len, response_body))
        else:
            if len(response_body) > keep:
                response_body = response_body[:keep]
            size += len(response_body)
        if n >= self.max_queue or self._queued_bytes + size > self.max_queue_bytes or self._closed:
            self._drop(1, None)
            return False
        q.append(
            (
                self._clock() if t is None else t,
                service,
                version,
                request_id,
                status,
                request_body,
                request_content_type,
                response_body,
                response_content_type,
                size,
            )
        )
        self._queued_bytes += size
        if n == 0:
            self._wake.set()
        return True

    @property
    def queued(self) -> int:
        """Records waiting in the queue (not counting a batch being written)."""
        return len(self._queue)

    def _drop(self, count: int, error: BaseException | None) -> None:
        """Count lost records; warn at most once per ``warn_interval`` with what was lost."""
        self.dropped += count
        self._unwarned += count
        if error is not None:
            self._last_error = error
        now = self._clock()
        if not 0 <= now - self._last_warn < self._warn_interval:  # (or the clock went back)
            self._last_warn = now
            self._warn()

    def _warn(self) -> None:
        dropped, self._unwarned = self._unwarned, 0
        error, self._last_error = self._last_error, None
        log.warning(
            "Model data collection dropped %d record(s) (%d in total)%s",
            dropped,
            self.dropped,
            f"; last write error: {error!r}" if error is not None else " (queue full or stopped)",
        )

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the drain task on the running loop (idempotent)."""
        self._stopping = False
        self._closed = False
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="mlfe-datacollect"
            )
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()  # bound to this loop on first wait
            self._spawn()

    async def stop(self) -> None:
        """Write every queued record, then stop; later submits are dropped.

        To bound it, wrap it (``async with asyncio.timeout(s): await dc.stop()``): when
        cancelled, the records still queued are dropped (counted and logged) and a batch the
        writer thread is busy with is abandoned to it.
        """
        self._cancel_restart()
        if self._task is None or self._task.done():
            self.start()  # flush what was queued before start(), or after a crash
        self._stopping = True
        self._wake.set()
        task = self._task
        assert task is not None
        try:
            await asyncio.wait({task})
        finally:
            self._closed = True
            self._cancel_restart()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
            if self._in_flight:
                log.warning(
                    "Model data collection stopped with %d record(s) still being written",
                    self._in_flight,
                )
                self._in_flight = 0
            left = len(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            if left:
                self._drop(left, None)
            if self._unwarned:
                self._warn()  # the last word on losses is never swallowed by the rate limit
            executor, self._executor = self._executor, None
            if executor is not None:
                executor.shutdown(wait=False)

    def _cancel_restart(self) -> None:
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None

    def _spawn(self) -> None:
        self._restart = None
        task = asyncio.get_running_loop().create_task(self._drain(), name="model data collector")
        task.add_done_callback(self._drain_done)
        self._task = task

    def _drain_done(self, task: asyncio.Task[None]) -> None:
        """Supervision: the drain loop only ends when stopping; anything else is restarted."""
        if task.cancelled() or self._closed:
            return
        exc = task.exception()
        if exc is not None:
            log.error("Model data collector crashed; restarting", exc_info=exc)
        else:
            log.error("Model data collector exited unexpectedly; restarting")
        loop = asyncio.get_running_loop()
        if self._restart_delay > 0:
            self._restart = loop.call_later(self._restart_delay, self._spawn)
        else:
            self._restart = loop.call_soon(self._spawn)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            q = self._queue
            if not q:
                if self._stopping:
                    self._closed = True  # same step as the check: no submit slips in between
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(q) <= self.batch:
                batch: list[_Record] | deque[_Record] = q
                self._queue = deque()
            else:
                batch = [q.popleft() for _ in range(self.batch)]
            self._in_flight = len(batch)
            try:
                result = await loop.run_in_executor(self._executor, self._write_batch, batch)
            except Exception as exc:  # a bug in the writer: lose the batch, keep draining
                log.exception("Model data collection failed to write a batch")
                result = _BatchResult(
                    failed=len(batch), freed_bytes=sum(r[9] for r in batch), error=exc
                )
            self._in_flight = 0
            self._queued_bytes -= result.freed_bytes
            self.written += result.written
            if result.failed:
                self.failed += result.failed
                self._drop(result.failed, result.error)

    # ---- writer thread --------------------------------------------------------------------

    def _write_batch(self, batch: list[_Record] | deque[_Record]) -> _BatchResult:
        """Encode a batch and append it to its files; runs in the writer thread."""
        result = _BatchResult()
        groups: dict[tuple[str, str, str], list[bytes]] = {}
        for record in batch:
            result.freed_bytes += record[9]
            try:
                key, line = self._encode(record)
            except Exception as exc:  # e.g. a name orjson cannot encode: lose this one only
                result.failed += 1
                result.error = exc
                continue
            lines = groups.get(key)
            if lines is None:
                groups[key] = [line]
            else:
                lines.append(line)
        for key, lines in groups.items():
            done = 0
            try:
                sink = self._sink(key)
                start = 0
                size = sink.size  # of the file plus lines[start:i]
                for i, line in enumerate(lines):
                    if size and size + len(line) > self.rotate_bytes:
                        if i > start:
                            self._append(sink.path, b"".join(lines[start:i]), sink.size)
                            done = start = i
                        sink.n += 1
                        sink.size = size = 0
                    size += len(line)
                self._append(sink.path, b"".join(lines[start:]), sink.size)
                sink.size = size
                done = len(lines)
            except Exception as exc:  # OSError mostly (disk full, permissions)
                result.error = exc
            result.written += done
            result.failed += len(lines) - done
        return result

    def _append(self, path: Path, data: bytes, size: int) -> None:
        """Append ``data`` to ``path`` (whose length is ``size``); all or nothing."""
        try:
            # Request bodies are user data: owner-only, like the state dir.
            with open(path, "ab", opener=_owner_only) as f:
                f.write(data)
        except OSError:
            with contextlib.suppress(OSError):
                if os.path.getsize(path) > size:
                    os.truncate(path, size)
            raise

    def _sink(self, key: tuple[str, str, str]) -> _Sink:
        sink = self._sinks.get(key)
        if sink is not None and sink.directory.is_dir():
            return sink
        service, version, day = key
        directory = self.data_dir / _safe(service) / _safe(version) / day
        _mkdirs_private(directory)  # new, or removed since: (re)scan it
        highest = 0
        for entry in os.scandir(directory):
            m = self._data_file.fullmatch(entry.name)
            if m is not None:
                highest = max(highest, int(m.group(1)))
        if len(self._sinks) >= _MAX_DIRS:
            self._sinks = {k: s for k, s in self._sinks.items() if k[2] == day}
        sink = self._sinks[key] = _Sink(directory, highest + 1, 0, self._prefix)
        return sink

    def _encode(self, record: _Record) -> tuple[tuple[str, str, str], bytes]:
        t, service, version, request_id, status, req, req_ct, resp, resp_ct, _ = record
        sec, us = divmod(round(t * 1_000_000), 1_000_000)
        if sec != self._second:  # strftime is most of the cost: once per second, not per line
            when = datetime.fromtimestamp(sec, UTC)
            self._second_text = when.strftime("%Y-%m-%dT%H:%M:%S.")
            self._day_text = when.strftime("%Y/%m/%d")
            self._second = sec
        request, request_truncated = self._body(req, req_ct)
        response, response_truncated = self._body(resp, resp_ct)
        doc: dict[str, Any] = {
            "time": f"{self._second_text}{us:06d}Z",
            "requestId": request_id,
            "service": service,
            "version": version,
            "status": status,
            "request": request,
            "response": response,
            "requestTruncated": request_truncated,
            "responseTruncated": response_truncated,
        }
        try:
            line = orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:  # a parsed body orjson cannot write back (too deep)
            doc["request"] = self._raw(req, req_ct)
            doc["response"] = self._raw(resp, resp_ct)
            line = orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)
        return (service, version, self._day_text), line

    def _body(self, body: Body, content_type: bytes | None) -> tuple[Any, bool]:
        if isinstance(body, list):
            body = b"".join(body)
        cap = self.max_body_bytes
        truncated = len(body) > cap
        if truncated:
            body = body[:cap]
        if not body:
            return None, truncated
        if not truncated and _is_json(content_type):
            try:
                return orjson.loads(body), False
            except orjson.JSONDecodeError:
                pass
        return _b64(body, content_type), truncated

    def _raw(self, body: Body, content_type: bytes | None) -> Any:
        if isinstance(body, list):
            body = b"".join(body)
        body = body[: self.max_body_bytes]
        return _b64(body, content_type) if body else None


def _b64(body: bytes, content_type: bytes | None) -> dict[str, str | None]:
    return {
        "base64": base64.b64encode(body).decode("ascii"),
        "contentType": None if content_type is None else content_type.decode("latin-1"),
    }


@functools.lru_cache(maxsize=256)
def _is_json(content_type: bytes | None) -> bool:
    """A JSON media type (``application/json``, ``*/*+json``, ``text/json``), or none given."""
    if content_type is None:
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media in (b"application/json", b"text/json") or media.endswith(b"+json")


def _safe(name: str) -> str:
    """A path segment for a service or version name: never a separator, ``.`` or ``..``."""
    safe = _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), name)
    return safe if safe.strip(".") else safe.replace(".", "%2E") or "%00"
