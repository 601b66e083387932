"""The access log writes off the event loop into a bounded buffer: a stdout that nobody reads
costs dropped (and counted) lines, never a stalled loop. Real pipes, a real `mlfe serve`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from router.accesslog import AccessLog
from tests.support import REPO, free_port

ADMIN = "admin-token-for-tests"


def _record(log: AccessLog, i: int) -> None:
    log.request(f"00000000-0000-4000-8000-{i:012d}", b"client-1" if i % 2 else None, "svc",
                "blue" if i % 3 else "", "127.0.0.1:5001", b"POST", 200, 44, 14, 0.00001,
                0.0, 0.0005, 0.0006, None if i % 5 else "timeout")


async def test_a_pipe_nobody_reads_drops_lines_and_never_blocks_the_loop() -> None:
    r, w = os.pipe()
    stream = os.fdopen(w, "wb")
    log = AccessLog(stream, max_buffer_bytes=64 * 1024)
    try:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        tick = asyncio.get_running_loop().create_task(ticker())
        for i in range(20_000):  # ~6 MB of lines: far past the pipe's 64 KiB and the buffer
            _record(log, i)
            if i % 1000 == 999:
                await asyncio.sleep(0)  # the loop goes on turning meanwhile
        log.flush()
        await asyncio.sleep(0)
        tick.cancel()
        assert ticks >= 20, ticks
        assert log.dropped > 0
        assert log.written + log.dropped == 20_000
        assert not log.drain(0.05)  # stdout is stalled: the writer cannot finish
        # Now a reader comes: every line handed over arrives whole, and nothing else.
        os.set_blocking(r, False)
        data = bytearray()
        deadline = time.monotonic() + 10
        while not log.drain(0.01):
            with contextlib.suppress(BlockingIOError):
                data += os.read(r, 1 << 20)
            assert time.monotonic() < deadline
        while True:
            try:
                chunk = os.read(r, 1 << 20)
            except BlockingIOError:
                break
            data += chunk
        lines = bytes(data).splitlines()
        assert len(lines) == log.written
        for line in lines[:50] + lines[-50:]:
            rec = json.loads(line)
            assert rec["service"] == "svc" and rec["status"] == 200
            assert rec["time"].endswith("Z")
    finally:
        stream.close()
        os.close(r)


async def test_lines_are_the_same_json_as_before() -> None:
    r, w = os.pipe()
    stream = os.fdopen(w, "wb")
    log = AccessLog(stream)
    try:
        _record(log, 1)
        log.request("11111111-2222-4333-8444-555555555555", None, "", "", None, b"GET", 404, 0,
                    70, 0.0, 0.0, 0.0, 0.0001, None)
        log.write({"event": "keys_rotated", "service": "svc"})
        log.flush()
        assert log.drain(5)
        got = [json.loads(line) for line in os.read(r, 1 << 16).splitlines()]
    finally:
        stream.close()
        os.close(r)
    assert got[0] == {"event": "keys_rotated", "service": "svc"}
    first = got[1]
    assert first["clientRequestId"] == "client-1" and first["version"] == "blue"
    assert first["replica"] == "127.0.0.1:5001" and first["error"] is None
    assert first["authMs"] == pytest.approx(0.01) and first["upstreamMs"] == pytest.approx(0.5)
    assert got[2] == {**got[2], "clientRequestId": None, "version": None, "replica": None,
                      "method": "GET", "status": 404, "error": None}


def _dropped(admin_port: int) -> float:
    r = httpx.get(f"http://127.0.0.1:{admin_port}/metrics",
                  headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            if s.name == "mlfe_access_log_lines_total" and s.labels == {"result": "dropped"}:
                return s.value
    raise AssertionError(r.text)


def test_router_keeps_answering_when_its_stdout_is_never_read(tmp_path: Path) -> None:
    """`mlfe serve` with stdout a pipe nobody reads, under wrk: every request is answered, the
    lines that do not fit are counted as dropped, and SIGTERM still ends it promptly."""
    port, admin_port = free_port(), free_port()
    cfg = tmp_path / "router.yaml"
    cfg.write_text(yaml.safe_dump({
        "router": {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin_port}",
                   "state_dir": str(tmp_path / "state"), "cluster_purpose": "DevTest"},
        "services": {"svc": {"upstreams": [f"127.0.0.1:{free_port()}"]}},
    }))
    err = (tmp_path / "stderr.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "serve", "--config", str(cfg)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=err,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "MLFE_ADMIN_TOKEN": ADMIN})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/-/healthy", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "stderr.log").read_text()
            time.sleep(0.05)  # poll interval while it starts
        # POSTs answered 404: each one a logged line (~300 bytes), thousands a second; load
        # until lines were dropped (the pipe's 64 KiB and the 4 MiB buffer are full), bounded.
        done = 0
        for _ in range(10):
            wrk = subprocess.run(
                ["wrk", "-t1", "-c16", "-d2s", "--timeout=2s", "-s",
                 str(REPO / "benchmarks" / "wrk" / "post.lua"),
                 f"http://127.0.0.1:{port}/api/v1/service/nope/score"],
                capture_output=True, text=True, timeout=60, check=True)
            assert "Socket errors" not in wrk.stdout, wrk.stdout  # no timeouts, no resets
            done += int(wrk.stdout.split(" requests in ")[0].split()[-1])
            if _dropped(admin_port) > 0:
                break
        assert _dropped(admin_port) > 0, done
        r = httpx.get(f"http://127.0.0.1:{port}/-/healthy", timeout=2)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, (tmp_path / "stderr.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()
        err.close()
