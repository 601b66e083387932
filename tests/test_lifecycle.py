"""One supervisor per process: a long-lived task that dies stops the process with exit 1, its
name and error logged; SIGTERM stops it with exit 0 (deploy/lifecycle.py, deploy/runtime.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest

from deploy.lifecycle import ProcessLife
from deploy.runtime import serve
from mlfe.config import parse_config
from router.server import Router


async def test_a_task_that_dies_stops_the_process_with_exit_1(
        caplog: pytest.LogCaptureFixture) -> None:
    life = ProcessLife()

    async def broken() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("a bug")

    life.supervisor.spawn(broken(), name="some loop")
    await asyncio.wait_for(life.wait(), 10)
    assert life.exit_code == 1
    assert life.failure is not None and life.failure.name == "some loop"
    assert "stopping: task 'some loop' died (RuntimeError('a bug'))" in caplog.text
    await life.supervisor.stop()


async def test_an_eternal_task_that_returns_counts_as_dying() -> None:
    life = ProcessLife()

    async def returns() -> None:
        return None

    life.supervisor.spawn(returns(), name="eternal")
    await asyncio.wait_for(life.wait(), 10)
    assert life.exit_code == 1


async def test_sigterm_stops_the_process_with_exit_0() -> None:
    life = ProcessLife()
    waiting = asyncio.create_task(life.wait())
    await asyncio.sleep(0)  # the handlers are installed when wait() starts
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(waiting, 10)
    assert life.exit_code == 0
    asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
    asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)


async def test_serve_exits_1_when_one_of_its_tasks_dies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """`mlfe serve` does not run on half-alive: the client timeout sweeper (a real supervised
    task of the router) dies of a bug, and serve drains, stops and returns 1."""

    async def sweep_with_a_bug(self: Router) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("sweeper bug")

    monkeypatch.setattr(Router, "_sweep", sweep_with_a_bug)
    cfg = parse_config({
        "router": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
                   "state_dir": str(tmp_path / "state"), "access_log": False},
        "services": {"echo": {"upstreams": ["127.0.0.1:9"]}},
    })
    caplog.set_level(logging.INFO)
    code = await asyncio.wait_for(serve(cfg, tmp_path), 60)
    assert code == 1
    assert "task 'client timeout sweeper' died" in caplog.text
    loop = asyncio.get_running_loop()
    loop.remove_signal_handler(signal.SIGTERM)
    loop.remove_signal_handler(signal.SIGINT)
