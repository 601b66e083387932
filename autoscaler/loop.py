"""The replica autoscaler's control loop: read counts, decide, actuate, every refresh period.

One supervised task per service, so that services keep their own ``refresh_seconds`` and a slow
actuator call for one service does not delay the others. The loop only ticks and applies; the
decision is :func:`autoscaler.decider.decide`. With the demand policy the loop ticks
``DEMAND_SAMPLES_PER_PERIOD`` times per refresh period, to sample the counts (the rates are
deltas between samples) and decide: a step is answered once its rate can be told (the scale-down
window makes the tick rate irrelevant to scaling down). Nothing a tick does
can end the loop: a failed read skips the tick and a failed scale call is retried on the next
one, because the desired count still differs from the current one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from autoscaler.decider import (
    DEMAND_HISTORY_PERIODS,
    DEMAND_SAMPLES_PER_PERIOD,
    DemandHistory,
    Policy,
    Reason,
    Recommendation,
    ScaleDownWindow,
    ScalingSpec,
    decide,
)
from autoscaler.ticker import tick_every
from mlfe.clock import Clock, MonotonicClock
from mlfe.stats import StatsSource
from mlfe.supervise import Supervisor, TaskFailure

log = logging.getLogger(__name__)


class Actuator(Protocol):
    def current(self, service: str) -> int:
        """The replica count ``service`` is scaled to now (cached; must not block)."""
        ...

    async def scale(self, service: str, desired: int) -> None:
        """Ask for ``desired`` replicas. Raising is fine: the next tick asks again."""
        ...


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """The last tick of one service, for metrics and ``GET /v1/stats``."""

    at: float  # clock time of the tick
    desired: int
    current: int  # the actuator's count when the tick decided
    utilization: float  # fraction; inf when there is demand but no ready replica
    reason: Reason
    busy: int
    queued: int
    replicas: int  # ready replicas the router was sending to
    rate: float | None = None  # the demand policy's arrival rate (requests/s)
    service_time: float | None = None  # and service time (s)


class AutoscalerLoop:
    """Scales every configured service through one :class:`Actuator`."""

    def __init__(
        self,
        *,
        counts: StatsSource,
        actuator: Actuator,
        clock: Clock | None = None,
        on_failure: Callable[[TaskFailure], None] | None = None,
        supervisor: Supervisor | None = None,
        stop_grace_s: float = 5.0,
    ) -> None:
        self._counts = counts
        self._actuator = actuator
        self._clock = clock or MonotonicClock()
        self._stop_grace_s = stop_grace_s
        # The process's one supervisor when given (mlfe serve); on_failure only hears of bugs in
        # the loop itself: tick errors are handled in place.
        self._supervisor = supervisor or Supervisor(on_failure=on_failure, clock=self._clock)
        self._specs: dict[str, ScalingSpec] = {}
        self._windows: dict[str, ScaleDownWindow] = {}
        self._histories: dict[str, DemandHistory] = {}
        self._status: dict[str, ServiceStatus] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running = False

    def set_services(self, specs: Mapping[str, ScalingSpec]) -> None:
        """Replace the set of scaled services (config reload).

        New services get a task (and a first tick) at once; removed ones are cancelled and
        forgotten. A changed spec is used from the service's next tick, so a new
        ``refresh_seconds`` applies after the current period ends.
        """
        removed = self._specs.keys() - specs.keys()
        self._specs = dict(specs)
        for name in removed:
            task = self._tasks.pop(name, None)
            if task is not None:
                task.cancel()
            self._windows.pop(name, None)
            self._histories.pop(name, None)
            self._status.pop(name, None)
        if self._running:
            for name in self._specs.keys() - self._tasks.keys():
                self._spawn(name)

    def adopt(self, service: str, replicas: int) -> None:
        """Someone else (a human with kubectl) set `service` to `replicas`: take it as if this
        loop had asked for it now, so it holds for a scale-down window before demand may take
        it down (scale-up still follows demand at once). Not fighting a human means not
        undoing their change on the next tick."""
        if service in self._specs:
            self._windows[service] = ScaleDownWindow(
                (Recommendation(self._clock.now(), replicas),))
            log.info("Adopting %d replicas for %r, set outside the autoscaler", replicas, service)

    def status(self) -> dict[str, ServiceStatus]:
        """The last tick of every service that has had one."""
        return dict(self._status)

    def start(self) -> None:
        """Start ticking every service; needs a running event loop."""
        if self._running:
            raise RuntimeError("autoscaler loop already started")
        self._running = True
        for name in self._specs:
            self._spawn(name)

    async def stop(self) -> None:
        """Cancel every service's task, waiting at most ``stop_grace_s`` seconds."""
        self._running = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await self._supervisor.stop_tasks(tasks, grace_s=self._stop_grace_s)

    def _spawn(self, name: str) -> None:
        self._tasks[name] = self._supervisor.spawn(self._run(name), name=f"autoscaler:{name}")

    async def _run(self, name: str) -> None:
        # Removal cancels this task, so the name is present whenever the ticker asks.
        await tick_every(self._clock, lambda: _tick_period(self._specs[name]),
                         lambda now: self._tick(name, now))

    async def _tick(self, name: str, now: float) -> None:
        spec = self._specs[name]
        try:
            counts = self._counts.counts(name)
            history = None
            if spec.policy is Policy.DEMAND:
                history = self._histories.get(name, DemandHistory()).observe(
                    counts, now, keep_s=spec.refresh_seconds * DEMAND_HISTORY_PERIODS)
                self._histories[name] = history
            current = self._actuator.current(name)
            decision, window = decide(
                spec,
                counts,
                current=current,
                window=self._windows.get(name, ScaleDownWindow()),
                now=now,
                history=history,
            )
        except Exception:
            log.warning("Autoscaler skipped a tick of %r", name, exc_info=True)
            return
        self._windows[name] = window
        self._status[name] = ServiceStatus(
            at=now,
            desired=decision.desired,
            current=current,
            utilization=decision.utilization,
            reason=decision.reason,
            busy=counts.busy,
            queued=counts.queued,
            replicas=counts.replicas,
            rate=decision.rate,
            service_time=decision.service_time,
        )
        if decision.desired != current:
            log.info(
                "Scaling %r from %d to %d replicas (%s, utilization %.0f%%)",
                name,
                current,
                decision.desired,
                decision.reason,
                decision.utilization * 100,
            )
            try:
                await self._actuator.scale(name, decision.desired)
            except Exception:
                log.warning(
                    "Scaling %r to %d failed; retrying next tick",
                    name,
                    decision.desired,
                    exc_info=True,
                )


def _tick_period(spec: ScalingSpec) -> float:
    if spec.policy is Policy.DEMAND:
        return spec.refresh_seconds / DEMAND_SAMPLES_PER_PERIOD
    return spec.refresh_seconds
