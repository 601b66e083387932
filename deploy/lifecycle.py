"""One process's life: one supervisor for all its long-lived tasks, and what stops it.

A process stops on SIGTERM or SIGINT (exit 0 after a clean drain), or when one of its supervised
tasks dies unexpectedly: then it drains and exits 1 rather than running on half-alive, so that
its supervisor (systemd, Kubernetes, the worker supervisor) restarts it whole.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from mlfe.supervise import Supervisor, TaskFailure

log = logging.getLogger(__name__)


class ProcessLife:
    def __init__(self) -> None:
        self.supervisor = Supervisor(on_failure=self._failed)
        self.failure: TaskFailure | None = None
        self._stop = asyncio.Event()

    def _failed(self, failure: TaskFailure) -> None:
        if self.failure is None:
            self.failure = failure
            log.error("stopping: task %r died (%s)", failure.name,
                      "returned" if failure.error is None else repr(failure.error))
        self._stop.set()

    async def wait(self) -> None:
        """Until SIGTERM, SIGINT or the death of a supervised task."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self._stop.wait()

    @property
    def exit_code(self) -> int:
        return 1 if self.failure is not None else 0
