"""Model data collection: JSON lines per service/version/day, written off the request path.

Nothing here sleeps: a slow or failing disk is a patched ``_append`` that blocks on a
``threading.Event`` or raises, and the test waits for the writer thread on events, not on time.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from router import datacollect
from router.datacollect import DataCollector

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC).timestamp()
DAY = "2024/05/01"
JSON = b"application/json"


# Every test here must leave no task running (the fixture is in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("no_leaked_tasks")


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def collector(tmp_path: Path, **kw: Any) -> DataCollector:
    kw.setdefault("clock", Clock())
    return DataCollector(tmp_path, **kw)


def submit(
    dc: DataCollector,
    rid: str,
    req: bytes | list[bytes] = b'{"data": [1, 2]}',
    resp: bytes | list[bytes] = b"[0.5]",
    *,
    req_ct: bytes | None = JSON,
    resp_ct: bytes | None = JSON,
    service: str = "svc",
    version: str = "v1",
    status: int = 200,
    t: float | None = None,
) -> bool:
    return dc.submit(service, version, rid, status, req, req_ct, resp, resp_ct, t)


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def all_records(root: Path) -> list[dict[str, Any]]:
    files = sorted(root.rglob("data-*.jsonl"), key=lambda p: (p.parent, int(p.stem[5:])))
    return [rec for f in files for rec in lines(f)]


def day_dir(root: Path, service: str = "svc", version: str = "v1", day: str = DAY) -> Path:
    return root / service / version / day


def b64(data: bytes, ct: str | None) -> dict[str, Any]:
    return {"base64": base64.b64encode(data).decode(), "contentType": ct}


class BlockingSink:
    """Replaces ``DataCollector._append``: signals ``entered`` and waits for ``release``."""

    def __init__(self, dc: DataCollector, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        real = dc._append

        def append(path: Path, data: bytes, size: int) -> None:
            self.entered.set()
            if not self.release.wait(10):
                raise TimeoutError("test never released the sink")
            real(path, data, size)

        monkeypatch.setattr(dc, "_append", append)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10)


# ---- what is written ------------------------------------------------------------------------


async def test_every_submitted_record_is_one_line_after_stop(tmp_path: Path) -> None:
    dc = collector(tmp_path, batch=64)
    dc.start()
    ids = [f"req-{i}" for i in range(1000)]
    for i, rid in enumerate(ids):
        assert submit(dc, rid, status=200 + i % 2)
        if i % 100 == 0:
            await asyncio.sleep(0)  # let the drain take partial batches too
    await dc.stop()

    (f,) = day_dir(tmp_path).iterdir()
    assert f.name == "data-1.jsonl"
    records = lines(f)
    assert [r["requestId"] for r in records] == ids
    assert (dc.written, dc.dropped, dc.failed, dc.queued) == (1000, 0, 0, 0)
    assert records[1] == {
        "time": "2024-05-01T12:00:00.000000Z",
        "requestId": "req-1",
        "service": "svc",
        "version": "v1",
        "status": 201,
        "request": {"data": [1, 2]},
        "response": [0.5],
        "requestTruncated": False,
        "responseTruncated": False,
    }


async def test_records_queued_before_start_are_flushed_by_stop(tmp_path: Path) -> None:
    dc = collector(tmp_path)
    for i in range(3):
        submit(dc, f"r{i}")
    await dc.stop()
    assert [r["requestId"] for r in all_records(tmp_path)] == ["r0", "r1", "r2"]


async def test_data_files_and_folders_are_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    dc = collector(data)
    dc.start()
    submit(dc, "r1")
    await dc.stop()
    files = list(data.rglob("*.jsonl"))
    assert files
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o600, f
        d = f.parent
        while d != data:
            assert d.stat().st_mode & 0o777 == 0o700, d
            d = d.parent


@pytest.mark.parametrize(
    ("body", "content_type", "stored"),
    [
        (b'{"a": 1}', b"application/json", {"a": 1}),
        (b'{"a": 1}', b"Application/JSON; charset=utf-8", {"a": 1}),
        (b'{"a": 1}', b"application/vnd.api+json", {"a": 1}),
        (b'{"a": 1}', None, {"a": 1}),  # no content type: JSON if it parses
        (b'"text"', None, "text"),
        (b"\x89PNG\r\n\x1a\n\x00", b"image/png", b64(b"\x89PNG\r\n\x1a\n\x00", "image/png")),
        (b"not json", None, b64(b"not json", None)),
        (b"{broken", b"application/json", b64(b"{broken", "application/json")),
        (b"\xff\xfe", b"application/json", b64(b"\xff\xfe", "application/json")),
        (b"123", b"text/plain", b64(b"123", "text/plain")),  # parses, but was sent as text
        (
            b"a=1&b=2",
            b"application/x-www-form-urlencoded",
            b64(b"a=1&b=2", "application/x-www-form-urlencoded"),
        ),
        (b"", None, None),
        (b"", b"application/json", None),
        (b'{\n  "pretty": [1,\n 2]\n}', JSON, {"pretty": [1, 2]}),  # re-encoded on one line
    ],
)
async def test_json_bodies_are_parsed_others_are_base64(
    tmp_path: Path, body: bytes, content_type: bytes | None, stored: Any
) -> None:
    dc = collector(tmp_path)
    submit(dc, "r", req=body, req_ct=content_type, resp=body, resp_ct=content_type)
    await dc.stop()
    (rec,) = all_records(tmp_path)
    assert rec["request"] == stored
    assert rec["response"] == stored
    assert rec["requestTruncated"] is rec["responseTruncated"] is False


async def test_bodies_given_as_chunks_are_joined(tmp_path: Path) -> None:
    dc = collector(tmp_path)
    submit(dc, "r", req=[b'{"da', b'ta": ', b"[1]}"], resp=[b"\x00", b"\x01"], resp_ct=None)
    await dc.stop()
    (rec,) = all_records(tmp_path)
    assert rec["request"] == {"data": [1]}
    assert rec["response"] == b64(b"\x00\x01", None)


async def test_bodies_over_the_cap_are_truncated_and_marked(tmp_path: Path) -> None:
    dc = collector(tmp_path, max_body_bytes=16)
    at_cap = b'{"x": "' + b"a" * 7 + b'"}'  # 16 bytes: kept whole, parsed
    over = b'{"x": "' + b"a" * 100 + b'"}'
    submit(dc, "at-cap", req=at_cap, resp=at_cap)
    submit(dc, "over", req=over, resp=[over[:10], over[10:]], resp_ct=b"text/plain")
    await dc.stop()

    at, cut = all_records(tmp_path)
    assert at["request"] == at["response"] == {"x": "a" * 7}
    assert not at["requestTruncated"] and not at["responseTruncated"]
    # A cut JSON document does not parse: the first max_body_bytes bytes, as base64.
    assert cut["request"] == b64(over[:16], "application/json")
    assert cut["response"] == b64(over[:16], "text/plain")
    assert cut["requestTruncated"] is cut["responseTruncated"] is True


async def test_submit_slices_a_big_body_instead_of_holding_it(tmp_path: Path) -> None:
    dc = collector(tmp_path, max_body_bytes=1024)
    big = b"x" * (10 * 1024 * 1024)
    submit(dc, "r", req=big, resp=b"{}")
    queued = dc._queue[0]
    assert len(queued[5]) == 1025  # cap + 1: enough for the writer to see it was over
    await dc.stop()
    (rec,) = all_records(tmp_path)
    assert rec["requestTruncated"] is True
    assert base64.b64decode(rec["request"]["base64"]) == b"x" * 1024


async def test_json_orjson_cannot_write_back_falls_back_to_base64(tmp_path: Path) -> None:
    deep = b"[" * 300 + b"]" * 300  # parses (limit 1024), too deep to serialize (limit 254)
    dc = collector(tmp_path)
    submit(dc, "r", req=deep, resp=b"[1]")
    await dc.stop()
    (rec,) = all_records(tmp_path)
    assert rec["request"] == b64(deep, "application/json")
    assert rec["response"] == b64(b"[1]", "application/json")
    assert dc.written == 1


async def test_unsafe_names_stay_inside_the_data_dir(tmp_path: Path) -> None:
    root = tmp_path / "data"
    dc = collector(root)
    submit(dc, "r1", service="..", version="../../etc")
    submit(dc, "r2", service="a/b", version=".")
    await dc.stop()
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jsonl"))
    assert files == [
        f"%2E%2E/..%2F..%2Fetc/{DAY}/data-1.jsonl",
        f"a%2Fb/%2E/{DAY}/data-1.jsonl",
    ]
    assert {r["service"] for r in all_records(root)} == {"..", "a/b"}  # names kept as given


# ---- files: rotation, days, restarts --------------------------------------------------------


async def test_rotation_by_size_creates_data_1_2_3(tmp_path: Path) -> None:
    dc = collector(tmp_path, rotate_bytes=1000, batch=7)
    ids = [f"req-{i:03d}" for i in range(40)]
    dc.start()
    for rid in ids:
        submit(dc, rid)
    await dc.stop()

    d = day_dir(tmp_path)
    names = sorted((p.name for p in d.iterdir()), key=lambda n: int(n[5:-6]))
    assert len(names) > 3
    assert names == [f"data-{n}.jsonl" for n in range(1, len(names) + 1)]
    sizes = [(d / n).stat().st_size for n in names]
    line_len = len((d / "data-1.jsonl").read_bytes().splitlines(keepends=True)[0])
    assert all(1000 - line_len < s <= 1000 for s in sizes[:-1])  # full, never over
    assert [r["requestId"] for r in all_records(tmp_path)] == ids  # in order, none lost


async def test_a_line_bigger_than_rotate_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    dc = collector(tmp_path, rotate_bytes=500)
    submit(dc, "small-1")
    submit(dc, "small-2")
    submit(dc, "big", req=b'"' + b"x" * 1000 + b'"')
    submit(dc, "small-3")
    await dc.stop()
    d = day_dir(tmp_path)
    assert [r["requestId"] for r in lines(d / "data-1.jsonl")] == ["small-1", "small-2"]
    assert [r["requestId"] for r in lines(d / "data-2.jsonl")] == ["big"]
    assert [r["requestId"] for r in lines(d / "data-3.jsonl")] == ["small-3"]
    assert (d / "data-1.jsonl").stat().st_size <= 500


async def test_a_new_utc_day_starts_a_new_directory(tmp_path: Path) -> None:
    midnight = datetime(2024, 12, 31, 0, 0, tzinfo=UTC).timestamp() + 86400  # 2025-01-01
    clock = Clock(midnight - 0.001)
    dc = collector(tmp_path, clock=clock)
    dc.start()
    submit(dc, "old-year")  # time from the injected clock
    await asyncio.sleep(0)
    clock.now = midnight
    submit(dc, "new-year")
    submit(dc, "explicit", t=midnight - 86400 * 31)  # an explicit time wins
    await dc.stop()

    (old_year,) = lines(day_dir(tmp_path, day="2024/12/31") / "data-1.jsonl")
    assert (old_year["requestId"], old_year["time"]) == ("old-year", "2024-12-31T23:59:59.999000Z")
    (new,) = lines(day_dir(tmp_path, day="2025/01/01") / "data-1.jsonl")
    assert (new["requestId"], new["time"]) == ("new-year", "2025-01-01T00:00:00.000000Z")
    (old,) = lines(day_dir(tmp_path, day="2024/12/01") / "data-1.jsonl")
    assert old["requestId"] == "explicit"


async def test_a_restart_continues_after_the_highest_existing_file(tmp_path: Path) -> None:
    d = day_dir(tmp_path)
    d.mkdir(parents=True)
    (d / "data-3.jsonl").write_bytes(b'{"torn": ')  # a crash mid-line
    (d / "data-1.jsonl").write_bytes(b"")
    (d / "notes.txt").write_bytes(b"")

    dc = collector(tmp_path)
    submit(dc, "first")
    await dc.stop()
    assert (d / "data-3.jsonl").read_bytes() == b'{"torn": '
    assert [r["requestId"] for r in lines(d / "data-4.jsonl")] == ["first"]

    # The same collector keeps appending to its file across start/stop; a new one moves on.
    dc.start()
    submit(dc, "second")
    await dc.stop()
    assert [r["requestId"] for r in lines(d / "data-4.jsonl")] == ["first", "second"]

    dc2 = collector(tmp_path)
    submit(dc2, "third")
    await dc2.stop()
    assert [r["requestId"] for r in lines(d / "data-5.jsonl")] == ["third"]


async def test_a_removed_day_directory_is_created_again(tmp_path: Path) -> None:
    dc = collector(tmp_path)
    dc.start()
    submit(dc, "a")
    await dc.stop()
    d = day_dir(tmp_path)
    (d / "data-1.jsonl").unlink()
    d.rmdir()  # a retention job cleaned up
    dc.start()
    submit(dc, "b")
    await dc.stop()
    assert [r["requestId"] for r in lines(d / "data-1.jsonl")] == ["b"]


# ---- pressure: never block, drop and count -------------------------------------------------


async def test_slow_sink_drops_when_full_and_submit_never_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    dc = collector(tmp_path, max_queue=100, batch=10, clock=clock)
    sink = BlockingSink(dc, monkeypatch)
    dc.start()
    assert submit(dc, "first")
    await sink.wait_entered()  # the writer thread is now stuck on the first batch

    accepted = ["first"]
    for i in range(1000):
        ok = submit(dc, f"r{i}")
        if ok:
            accepted.append(f"r{i}")
    assert not sink.release.is_set()  # every call above returned while the sink was blocked
    assert len(accepted) == 1 + 100
    assert dc.dropped == 900 and dc.queued == 100  # (its cost: benchmarks/, not a timed test)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # rate-limited: one warning for the first drop...
    assert "dropped 1 record(s) (1 in total)" in warnings[0].getMessage()

    clock.now += 10  # ...and the next one, a period later, carries the count since then
    assert not submit(dc, "late")
    assert "dropped 900 record(s) (901 in total)" in caplog.records[-1].getMessage()

    sink.release.set()
    await dc.stop()
    assert [r["requestId"] for r in all_records(tmp_path)] == accepted
    assert (dc.written, dc.dropped, dc.failed) == (101, 901, 0)


async def test_the_queue_is_bounded_in_bytes_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dc = collector(tmp_path, max_queue_bytes=10_000)
    sink = BlockingSink(dc, monkeypatch)
    dc.start()
    assert submit(dc, "a", req=b"x" * 4000, resp=b"")
    await sink.wait_entered()  # bytes being written still count: the memory is still held
    assert submit(dc, "b", req=b"x" * 4000, resp=b"")
    assert not submit(dc, "c", req=b"x" * 4000, resp=b"")
    assert submit(dc, "d", req=[b"x" * 1000, b"x" * 1000], resp=b"")
    assert not submit(dc, "e", req=b"", resp=[b"x"])
    sink.release.set()
    await dc.stop()
    assert [r["requestId"] for r in all_records(tmp_path)] == ["a", "b", "d"]
    assert dc.dropped == 2

    dc.start()  # the budget is free again
    assert submit(dc, "f", req=b"x" * 9000, resp=b"")
    await dc.stop()


async def test_submit_is_cheap(tmp_path: Path) -> None:
    """A unit check that submit stays a few attribute reads and an append (no timing test)."""
    dc = collector(tmp_path, max_queue=200_000)
    req, resp = b'{"data": [[1, 2, 3, 4]]}', b"[1]"
    for _ in range(20_000):
        dc.submit("svc", "v1", "id", 200, req, JSON, resp, JSON)
    assert dc.queued == 20_000
    await dc.stop()
    assert dc.written == 20_000


async def test_stop_flushes_everything_queued_behind_a_slow_sink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dc = collector(tmp_path, batch=5)
    sink = BlockingSink(dc, monkeypatch)
    dc.start()
    submit(dc, "r0")
    await sink.wait_entered()
    for i in range(1, 23):
        submit(dc, f"r{i}")
    stopping = asyncio.create_task(dc.stop())
    await asyncio.sleep(0)
    assert not stopping.done()
    assert submit(dc, "while-stopping")  # still draining: taken and written too
    sink.release.set()
    await stopping
    expected = [f"r{i}" for i in range(23)] + ["while-stopping"]
    assert [r["requestId"] for r in all_records(tmp_path)] == expected
    assert (dc.written, dc.dropped, dc.queued) == (24, 0, 0)
    assert not submit(dc, "after-stop")  # stopped: dropped and counted
    assert dc.dropped == 1


async def test_a_stop_cut_short_drops_and_counts_what_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dc = collector(tmp_path, batch=5)
    sink = BlockingSink(dc, monkeypatch)
    dc.start()
    submit(dc, "r0")
    await sink.wait_entered()
    for i in range(1, 11):
        submit(dc, f"r{i}")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await dc.stop()
    assert dc.dropped == 10 and dc.queued == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 record(s) still being written" in m for m in messages)
    assert any("dropped 10 record(s)" in m for m in messages)
    sink.release.set()  # let the abandoned batch finish, so the thread ends


# ---- failures: counted, logged, and the collector carries on ------------------------------


async def test_a_failing_write_counts_drops_and_the_collector_keeps_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dc = collector(tmp_path)
    real = dc._append
    failing = threading.Event()
    failing.set()

    def append(path: Path, data: bytes, size: int) -> None:
        if failing.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data, size)

    monkeypatch.setattr(dc, "_append", append)
    dc.start()
    submit(dc, "lost-1")
    submit(dc, "lost-2")
    await _drained(dc)
    assert (dc.written, dc.dropped, dc.failed) == (0, 2, 2)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "dropped 2 record(s)" in warning.getMessage()
    assert "No space left on device" in warning.getMessage()

    failing.clear()
    submit(dc, "kept")
    await dc.stop()
    assert [r["requestId"] for r in all_records(tmp_path)] == ["kept"]
    assert (dc.written, dc.dropped, dc.failed) == (1, 2, 2)


async def test_a_partial_write_is_cut_off_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dc = collector(tmp_path)
    dc.start()
    submit(dc, "before")
    await _drained(dc)
    path = day_dir(tmp_path) / "data-1.jsonl"
    good = path.read_bytes()

    class HalfFull:
        """A file that takes half of what is written, then reports the disk full."""

        def __init__(self, p: Path, mode: str, opener: Any = None) -> None:
            self.f = open(p, mode, opener=opener)  # noqa: SIM115

        def __enter__(self) -> HalfFull:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, data: bytes) -> int:
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datacollect, "open", HalfFull, raising=False)
    submit(dc, "lost")
    await _drained(dc)
    assert path.read_bytes() == good  # no torn line left behind
    assert dc.failed == 1

    monkeypatch.undo()
    submit(dc, "after")
    await dc.stop()
    assert [r["requestId"] for r in lines(path)] == ["before", "after"]


async def test_a_bug_in_the_writer_loses_the_batch_not_the_collector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dc = collector(tmp_path)
    real = dc._write_batch
    calls = 0

    def write_batch(batch: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug")
        return real(batch)

    monkeypatch.setattr(dc, "_write_batch", write_batch)
    dc.start()
    submit(dc, "lost")
    await _drained(dc)
    assert (dc.written, dc.dropped) == (0, 1)
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)
    submit(dc, "kept")
    await dc.stop()
    assert [r["requestId"] for r in all_records(tmp_path)] == ["kept"]
    assert dc._queued_bytes == 0


async def test_a_record_that_cannot_be_encoded_is_lost_alone(tmp_path: Path) -> None:
    dc = collector(tmp_path)
    submit(dc, "bad\ud800")  # a lone surrogate: not encodable as UTF-8
    submit(dc, "good")
    await dc.stop()
    assert [r["requestId"] for r in all_records(tmp_path)] == ["good"]
    assert (dc.written, dc.dropped, dc.failed) == (1, 1, 1)


async def test_a_crashed_drain_task_is_restarted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dc = collector(tmp_path, restart_delay=0)
    dc.start()
    first = dc._task
    assert first is not None
    dc.batch = None  # type: ignore[assignment]  # a bug: the drain loop raises when woken
    submit(dc, "r")
    await asyncio.wait({first})
    assert isinstance(first.exception(), TypeError)
    dc.batch = 512
    await asyncio.sleep(0)  # the restart is scheduled with call_soon
    assert dc._task is not None and dc._task is not first and not dc._task.done()
    assert any("crashed; restarting" in r.getMessage() for r in caplog.records)
    await dc.stop()
    assert [r["requestId"] for r in all_records(tmp_path)] == ["r"]


# ---- helpers --------------------------------------------------------------------------------


async def _drained(dc: DataCollector) -> None:
    """Wait until the drain task has taken and finished everything queued so far."""
    for _ in range(10_000):
        if not dc.queued and not dc._in_flight and dc._wake.is_set() is False:
            return
        await asyncio.to_thread(lambda: None)  # let the writer thread and the loop run
    raise AssertionError("collector did not drain")
