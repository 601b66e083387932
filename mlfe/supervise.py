"""Supervised background tasks: named, kept, logged when they die, stopped with a bound.

A bare ``asyncio.create_task`` for an eternal loop fails silently: the event loop only holds a
weak reference, and an exception stays unseen until someone awaits the task. Every long-running
task of mlfe is started through :meth:`Supervisor.spawn` instead (kopf's ``create_guarded_task``
idea), which keeps a reference, logs a crash or an unexpected return with the task's name, and
reports it to the owner, who decides whether to shut down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable, Set
from dataclasses import dataclass
from typing import Any

from mlfe.clock import Clock, MonotonicClock

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TaskFailure:
    name: str
    error: Exception | None  # None: an eternal task returned


class Supervisor:
    """Owns a set of named background tasks.

    ``on_failure`` is called (synchronously, from the dying task) for every crash and for every
    eternal task that returns; the failures are also kept in :attr:`failures`.
    """

    def __init__(
        self,
        *,
        on_failure: Callable[[TaskFailure], None] | None = None,
        clock: Clock | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self._on_failure = on_failure
        self._clock = clock or MonotonicClock()
        self._log = logger or log
        self._tasks: set[asyncio.Task[None]] = set()
        self._failures: list[TaskFailure] = []

    @property
    def tasks(self) -> Set[asyncio.Task[None]]:
        return frozenset(self._tasks)

    @property
    def failures(self) -> list[TaskFailure]:
        return list(self._failures)

    def spawn(
        self,
        coro: Coroutine[Any, Any, None],
        *,
        name: str,
        finishable: bool = False,
    ) -> asyncio.Task[None]:
        """Start ``coro`` as a task named ``name``; ``finishable`` if returning is expected."""
        task = asyncio.create_task(self._guard(coro, name, finishable), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A task cancelled before its first step never awaits ``coro``; closing it then avoids
        # a "never awaited" warning. On a finished coroutine close() does nothing.
        task.add_done_callback(lambda _: coro.close())
        return task

    async def stop(self, *, grace_s: float | None = 5.0) -> set[asyncio.Task[None]]:
        """Cancel every task and wait at most ``grace_s`` seconds for them to finish.

        Returns the tasks that are still running (they swallowed the cancellation or are stuck
        in cleanup); each is logged. ``grace_s=None`` waits for as long as it takes.
        """
        return await self.stop_tasks(self._tasks, grace_s=grace_s)

    async def stop_tasks(
        self, tasks: Iterable[asyncio.Task[None]], *, grace_s: float | None = 5.0
    ) -> set[asyncio.Task[None]]:
        """Like :meth:`stop`, for some of the tasks only (a part of the process stopping)."""
        tasks = set(tasks)
        for task in tasks:
            task.cancel()
        pending = await self._wait(tasks, grace_s)
        for task in pending:
            self._log.warning("Task %r did not stop within %ss", task.get_name(), grace_s)
        return pending

    async def _wait(
        self, tasks: set[asyncio.Task[None]], grace_s: float | None
    ) -> set[asyncio.Task[None]]:
        if not tasks:
            return set()
        if grace_s is None:
            await asyncio.wait(tasks)
            return set()
        # The bound is measured on the injected clock, so tests can reach it without waiting.
        bound = asyncio.create_task(self._clock.sleep(grace_s), name="supervisor-stop-bound")
        pending = set(tasks)
        try:
            while pending and not bound.done():
                done, _ = await asyncio.wait({*pending, bound}, return_when=asyncio.FIRST_COMPLETED)
                pending -= done
        finally:
            bound.cancel()
            await asyncio.wait({bound})  # unlike ``await bound``, does not raise its cancellation
        return pending

    async def _guard(self, coro: Coroutine[Any, Any, None], name: str, finishable: bool) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            self._log.debug("Task %r cancelled", name)
            raise
        except Exception as exc:
            # Swallowed after reporting: the owner decides what a crash means.
            self._log.error("Task %r crashed", name, exc_info=exc)
            self._report(TaskFailure(name, exc))
        else:
            if not finishable:
                self._log.error("Task %r exited unexpectedly", name)
                self._report(TaskFailure(name, None))

    def _report(self, failure: TaskFailure) -> None:
        self._failures.append(failure)
        if self._on_failure is not None:
            try:
                self._on_failure(failure)
            except Exception:
                self._log.exception("on_failure callback failed for task %r", failure.name)
