"""Supervised background tasks: crashes and unexpected exits are logged and reported; stop is
bounded (on a fake clock, so the bound takes no real time)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from mlfe.clock import FakeClock, settle
from mlfe.supervise import Supervisor, TaskFailure

# Every test here must leave no task running (the fixture is in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("no_leaked_tasks")


async def forever() -> None:
    await asyncio.Event().wait()


async def crash() -> None:
    await asyncio.sleep(0)
    raise RuntimeError("boom")


async def test_crash_is_logged_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    reported: list[TaskFailure] = []
    sup = Supervisor(on_failure=reported.append)
    task = sup.spawn(crash(), name="crasher")
    await settle()

    assert task.done() and not task.cancelled()
    (failure,) = reported
    assert failure.name == "crasher"
    assert isinstance(failure.error, RuntimeError)
    assert sup.failures == reported
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "crasher" in record.getMessage() and "crashed" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is failure.error


async def test_eternal_task_returning_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    sup = Supervisor()
    sup.spawn(settle(1), name="quitter")
    await settle()

    assert sup.failures == [TaskFailure("quitter", None)]
    assert any(
        "quitter" in r.getMessage() and "exited unexpectedly" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR
    )


async def test_finishable_task_may_return(caplog: pytest.LogCaptureFixture) -> None:
    sup = Supervisor()
    task = sup.spawn(settle(1), name="one-shot", finishable=True)
    await settle()

    assert task.done()
    assert sup.failures == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_tasks_are_named_and_kept_until_done() -> None:
    sup = Supervisor()
    task = sup.spawn(forever(), name="worker")
    assert task.get_name() == "worker"
    assert sup.tasks == {task}

    assert await sup.stop() == set()
    assert task.cancelled()
    assert sup.tasks == set()


async def test_stop_cancels_every_task_without_reporting_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    sup = Supervisor(clock=clock)
    tasks = [sup.spawn(forever(), name=f"worker-{i}") for i in range(3)]
    tasks.append(sup.spawn(clock.sleep(100), name="sleeper"))
    await settle()

    assert await sup.stop() == set()
    assert all(t.cancelled() for t in tasks)
    assert sup.failures == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_stop_with_nothing_running() -> None:
    assert await Supervisor().stop() == set()


async def test_stop_gives_up_on_a_stubborn_task_after_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    sup = Supervisor(clock=clock)
    release = asyncio.Event()

    async def stubborn() -> None:
        try:
            await forever()
        except asyncio.CancelledError:
            await release.wait()  # cleanup that hangs

    task = sup.spawn(stubborn(), name="stubborn", finishable=True)
    sup.spawn(forever(), name="polite")
    await settle()

    stopping = asyncio.create_task(sup.stop(grace_s=5.0))
    await clock.advance_and_settle(4.9)
    assert not stopping.done()

    await clock.advance_and_settle(0.1)
    assert stopping.done()
    assert stopping.result() == {task}
    assert any(
        "stubborn" in r.getMessage() and "did not stop" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )

    release.set()
    await task
    assert sup.failures == []


async def test_stop_without_bound_waits_for_cleanup() -> None:
    sup = Supervisor(clock=FakeClock())
    release = asyncio.Event()

    async def slow_cleanup() -> None:
        try:
            await forever()
        finally:
            await release.wait()

    sup.spawn(slow_cleanup(), name="slow")
    await settle()
    stopping = asyncio.create_task(sup.stop(grace_s=None))
    await settle()
    assert not stopping.done()

    release.set()
    assert await stopping == set()


async def test_a_failing_callback_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def explode(failure: TaskFailure) -> None:
        raise ValueError("callback bug")

    sup = Supervisor(on_failure=explode)
    task = sup.spawn(crash(), name="crasher")
    await settle()

    assert task.done() and task.exception() is None
    assert any("on_failure" in r.getMessage() for r in caplog.records)


async def test_stop_before_the_task_ever_ran() -> None:
    # Cancelled before its first step: no "coroutine was never awaited" warning (an error here).
    sup = Supervisor()
    task = sup.spawn(forever(), name="never-started")
    assert await sup.stop() == set()
    assert task.cancelled()
